"""A single-batch top eigenvalue at equal products against PyHessian, with our checks on.

MLPs 100-300-300-10 (0.12M parameters) and 100-1000-1000-10 (1.1M), tanh, float32, one batch of
1000 random samples (cross-entropy over 10 classes). Each call computes the top eigenvalue from
10 Hessian-vector products:

* ``pyhessian``: ``hessian(model, criterion, data=(x, y))`` then ``eigenvalues(maxIter=10,
  tol=-1)`` (power iteration; a negative ``tol`` never stops it early), construction included;
* ``ours, new data``: ``top_eigenvalues(k=1, max_hvp=10, tol=1e-12)`` at its defaults (checks
  on) on a new list object each call: the determinism check's two passes every time;
* ``ours, same data``: the same call on one list object: the verdict of the first call reused;
* ``ours, checks off``: ``check_deterministic=False``.

The candidates are interleaved over ``--rounds`` rounds (``--per-round`` calls each); the
median wall time is taken. *guards* is ``metadata["determinism"]["guard_seconds"]`` (argument
checks, the determinism check or its reuse) as a fraction of the call.

    python benchmarks/single_batch.py [--rounds 7] [--threads 1] [--out FILE.json]

``--quick``: one small MLP, two rounds: a smoke test, not figures.
"""
from __future__ import annotations

import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from analysis import supervised, top_eigenvalues  # noqa: E402
from harness import Recorder, interleaved, median_of_medians, parse, parser  # noqa: E402

CRITERION = nn.CrossEntropyLoss()
LOSS = supervised(CRITERION)


def problem(widths: tuple[int, ...], samples: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The MLP and one batch."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).eval()
    return model, torch.randn(samples, widths[0]), torch.randint(0, widths[-1], (samples,))


def candidates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hvps: int, log: dict):
    """The calls to time; ``log`` collects eigenvalues, products and guard seconds."""
    import pyhessian

    same = [(x, y)]

    def ours(data, name, **kw):
        def call():
            r = top_eigenvalues(model, LOSS, data() if callable(data) else data, k=1,
                                max_hvp=hvps, tol=1e-12, progress=False, **kw)
            log.setdefault(name, []).append((float(r.eigenvalues[0]), r.n_hvp,
                                             r.metadata["determinism"]))
        return call

    def peer():
        h = pyhessian.hessian(model, CRITERION, data=(x, y), cuda=False)
        values, _ = h.eigenvalues(maxIter=hvps, tol=-1.0, top_n=1)
        log.setdefault("pyhessian", []).append((float(values[0]), hvps, None))

    return {"pyhessian": peer,
            "ours, new data": ours(lambda: [(x, y)], "ours, new data"),
            "ours, same data": ours(same, "ours, same data"),
            "ours, checks off": ours(same, "ours, checks off", check_deterministic=False)}


def main() -> None:
    """Time each model's candidates and print the ratios to PyHessian."""
    p = parser(__doc__, threads=True)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--per-round", type=int, default=3)
    p.add_argument("--hvps", type=int, default=10)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--models", nargs="+", default=["100-300-300-10", "100-1000-1000-10"])
    args = parse(p, quick={"rounds": 2, "per_round": 1, "models": ["100-30-10"]})
    run = Recorder("single_batch", args)
    warnings.filterwarnings("ignore", message="Lanczos did not converge")
    results = {}
    for spec in args.models:
        widths = tuple(int(w) for w in spec.split("-"))
        model, x, y = problem(widths, args.samples)
        log: dict = {}
        calls = candidates(model, x, y, args.hvps, log)
        for fn in calls.values():  # warm-up (and the first, checked call of "same data")
            fn()
        times = interleaved(calls, rounds=args.rounds, per_round=args.per_round)
        wall = median_of_medians(times)
        guards = {name: statistics.median(entry[2]["guard_seconds"] for entry in log[name][1:])
                  for name in calls if name != "pyhessian"}
        row = {"parameters": sum(q.numel() for q in model.parameters()), "seconds": wall,
               "ratio": {n: wall[n] / wall["pyhessian"] for n in wall},
               "guard_seconds": guards,
               "guard_fraction": {n: guards[n] / wall[n] for n in guards},
               "checks": {n: sorted({e[2]["check"] for e in log[n][1:]}) for n in guards},
               "n_hvp": {n: sorted({e[1] for e in log[n]}) for n in log},
               "eigenvalue": {n: log[n][-1][0] for n in log}}
        results[spec] = row
        print(f"{spec} ({row['parameters']:,} parameters): pyhessian "
              f"{wall['pyhessian'] * 1e3:.1f} ms", flush=True)
        for name in guards:
            print(f"  {name:18s} {wall[name] * 1e3:8.1f} ms  ratio {row['ratio'][name]:.2f}  "
                  f"guards {row['guard_fraction'][name]:.1%} ({row['checks'][name]})", flush=True)
    run.write(results)


if __name__ == "__main__":
    main()
