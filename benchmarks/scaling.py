"""How time and memory grow with the model and the data: five routines against their peers.

Models: MLPs ``100-w-w-10`` (tanh, float32, eval mode), ``w`` chosen so that the parameter count is
closest to each of ``--sizes`` (default 0.1M, 1M, 10M: ``w`` = 265, 946, 3107); cross-entropy on
random inputs and labels over 10 classes, ``--batches`` batches (default 1, 4, 16) of
``--samples`` samples (default 32). Each routine is called at a fixed budget of products, the same
for ours and its peer, so that times compare across sizes and tools:

* ``top_eigenvalues``: ours ``top_eigenvalues(k=1, max_hvp=10, tol=1e-12)`` (a tolerance that never
  stops early); PyHessian ``hessian(...).eigenvalues(maxIter=10, tol=-1)`` (power iteration);
* ``hutch++`` / ``xtrace``: ours ``hessian_trace(n_hvp=12, method=...)``; curvlinops'
  ``hutchpp_trace`` / ``xtrace`` with 12 products (a multiple of 3 and of 2, as they require) on
  its ``HessianLinearOperator`` (``check_deterministic=False``: its check would add 2 products and
  2 gradients). Ours spends 4 + 4 more products on a float32 model: its rounding floor (4 on the
  model, 4 on a float64 copy);
* ``spectral_density``: ours ``spectral_density(n_lanczos=10, n_vectors=1)``; PyHessian
  ``density(iter=10, n_v=1)``;
* ``plane``: ours two ``random_direction`` draws (filter-normalised) and ``plane`` on a 5 x 5 grid;
  loss-landscapes ``random_plane(steps=5, normalization="filter")``: 25 points each.

PyHessian gets ``data=(x, y)`` for one batch (its single-batch path) and ``dataloader=`` otherwise
(its ``density`` calls ``torch.eig``, removed in torch 2.0: :func:`eig` stands in, from ``eigh``);
its constructor leaves ``.grad`` on the model, which each of its calls clears afterwards (in the
time). Ours runs at its defaults, checks on, on a new list of the same batches every call (so the
determinism check's two forward passes are paid every time, as in a first call). Construction
(operators, directions) is inside every timed call.

Time: the ten calls of a configuration interleaved over ``--rounds`` rounds (``--big-rounds`` where
parameters x batches exceed ``--big``), the median process CPU time and median wall time taken
(one torch thread: the CPU time is the work, and it stays steady on a loaded machine where the
wall time does not; ratios and exponents are from CPU times). Memory: the peak of live torch
allocations during one call (profiler events, ``harness.torch_peak``), from a first untimed call
that is also the warm-up, made only where parameters x batches <= ``--memory-max``. Exponents: a
least squares fit of ``log t = a log(parameters) + b log(batches) + c`` over the configurations,
per routine and tool.

    python benchmarks/scaling.py [--threads 1] [--rounds 3] [--out FILE.json]
    (curvlinops from PYTHONPATH, e.g. PYTHONPATH=/tmp/peers; a peer not installed is skipped)

``--resume``: the configurations already in ``--out`` are kept (the file is rewritten after each
configuration), the others run; every row records the load average at its end. ``--report``:
no measurement, the tables and exponents of the rows in ``--out`` (e.g. rows merged from runs
of parts of the grid).

``--quick``: two small MLPs, 1 and 2 batches of 8 samples, small budgets, one round: a smoke
test, not figures.
"""
from __future__ import annotations

import copy
import json
import os
import importlib.util
import math
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from analysis import hessian_trace, spectral_density, supervised, top_eigenvalues  # noqa: E402
from harness import Recorder, interleaved, parse, parser, torch_peak  # noqa: E402
from landscape import plane, random_direction  # noqa: E402

CRITERION = nn.CrossEntropyLoss()
LOSS = supervised(CRITERION)
D_IN, CLASSES = 100, 10
ROUTINES = ("top_eigenvalues", "hutch++", "xtrace", "spectral_density", "plane")
PEER = {"top_eigenvalues": "pyhessian", "hutch++": "curvlinops", "xtrace": "curvlinops",
        "spectral_density": "pyhessian", "plane": "loss_landscapes"}


def width_for(params: int) -> int:
    """The hidden width ``w`` of ``100-w-w-10`` whose parameter count is closest to ``params``
    (``w^2 + 112 w + 10`` parameters)."""
    w = (-(D_IN + 2 + CLASSES) + math.sqrt((D_IN + 2 + CLASSES) ** 2 + 4 * params)) / 2
    return min((max(1, math.floor(w)), math.ceil(w)), key=lambda v: abs(count(v) - params))


def count(w: int) -> int:
    """Parameters of ``100-w-w-10``."""
    return D_IN * w + w + w * w + w + w * CLASSES + CLASSES


def problem(w: int, n_batches: int, samples: int) -> tuple[nn.Module, list]:
    """The MLP and its batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(),
                          nn.Linear(w, CLASSES)).eval()
    batches = [(torch.randn(samples, D_IN), torch.randint(0, CLASSES, (samples,)))
               for _ in range(n_batches)]
    return model, batches


def ours(model: nn.Module, batches: list, args, log: dict) -> dict:
    """Our five calls; ``log`` collects the products each spent."""
    def note(name, n):
        log.setdefault(name, set()).add(n)

    def top():
        r = top_eigenvalues(model, LOSS, list(batches), k=1, max_hvp=args.top_hvp, tol=1e-12,
                            progress=False)
        note("top_eigenvalues", r.n_hvp)

    def trace(method):
        def call():
            r = hessian_trace(model, LOSS, list(batches), n_hvp=args.trace_hvp, method=method,
                              progress=False)
            floor = r.metadata.get("rounding_floor", {})
            note(method, f"{r.n_hvp} + {floor.get('low_precision_products', 0)} + "
                         f"{floor.get('float64_products', 0)} float64")
        return call

    def density():
        r = spectral_density(model, LOSS, list(batches), n_lanczos=args.lanczos, n_vectors=1,
                             progress=False)
        note("spectral_density", r.n_hvp)

    def surface():
        d1 = random_direction(model, "filter", seed=0)
        d2 = random_direction(model, "filter", seed=1)
        xs = np.linspace(-1.0, 1.0, args.grid)
        r = plane(model, LOSS, list(batches), d1, d2, xs, xs, progress=False)
        note("plane", f"{r.losses.size} points")

    return {"top_eigenvalues": top, "hutch++": trace("hutch++"), "xtrace": trace("xtrace"),
            "spectral_density": density, "plane": surface}


def peers(model: nn.Module, batches: list, args, log: dict) -> dict:
    """The peers' calls that are installed, same budgets as ours."""
    out = {}
    if importlib.util.find_spec("pyhessian"):
        import pyhessian

        def hessian():
            if len(batches) == 1:
                return pyhessian.hessian(model, CRITERION, data=batches[0], cuda=False)
            return pyhessian.hessian(model, CRITERION, dataloader=batches, cuda=False)

        def top():
            try:
                hessian().eigenvalues(maxIter=args.top_hvp, tol=-1.0, top_n=1)
            finally:
                model.zero_grad(set_to_none=True)
            log.setdefault("top_eigenvalues", set()).add(args.top_hvp)

        def density():
            removed, torch.eig = torch.eig, eig  # PyHessian calls torch.eig (gone since 2.0)
            try:
                hessian().density(iter=args.lanczos, n_v=1)
            finally:
                torch.eig = removed
                model.zero_grad(set_to_none=True)
            log.setdefault("spectral_density", set()).add(args.lanczos)

        out.update({"top_eigenvalues": top, "spectral_density": density})
    if importlib.util.find_spec("curvlinops"):
        from curvlinops import HessianLinearOperator
        from curvlinops.trace.epperly2024xtrace import xtrace
        from curvlinops.trace.meyer2020hutch import hutchpp_trace

        def trace(name, estimator):
            def call():
                op = HessianLinearOperator(model, CRITERION, list(model.parameters()), batches,
                                           check_deterministic=False)
                estimator(op, args.trace_hvp)
                log.setdefault(name, set()).add(args.trace_hvp)
            return call

        out.update({"hutch++": trace("hutch++", hutchpp_trace),
                    "xtrace": trace("xtrace", xtrace)})
    if importlib.util.find_spec("loss_landscapes"):
        out["plane"] = lambda: landscapes_plane(model, batches, args.grid, log)
    return out


def eig(T: torch.Tensor, eigenvectors: bool = False):
    """``torch.eig`` (removed in torch 2.0) for PyHessian's symmetric tridiagonal ``T``: the
    eigenvalues as ``[n, 2]`` (real, imaginary = 0) and the eigenvectors, from ``eigh``."""
    values, vectors = torch.linalg.eigh(T)
    return torch.stack([values, torch.zeros_like(values)], 1), vectors


def landscapes_plane(model: nn.Module, batches: list, steps: int, log: dict) -> None:
    """loss-landscapes' filter-normalised random plane, ``steps x steps`` points."""
    import loss_landscapes
    from loss_landscapes.metrics import Metric

    class BatchesLoss(Metric):  # its Loss, sample-weighted over the batches
        def __call__(self, wrapper) -> float:
            return sum(len(y) * CRITERION(wrapper.forward(x), y).item()
                       for x, y in batches) / sum(len(y) for _, y in batches)

    with torch.no_grad():
        values = loss_landscapes.random_plane(model, BatchesLoss(), distance=1, steps=steps,
                                              normalization="filter", deepcopy_model=True)
    log.setdefault("plane", set()).add(f"{np.asarray(values).size} points")


def run_config(w: int, n_batches: int, args) -> dict:
    """Memory (and warm-up) then the interleaved timings of one size and batch count."""
    model, batches = problem(w, n_batches, args.samples)
    state = copy.deepcopy(model.state_dict())
    params = count(w)
    big = params * n_batches > args.big
    measure = params * n_batches <= args.memory_max
    logs: dict = {"ours": {}, "peer": {}}
    mine, theirs = ours(model, batches, args, logs["ours"]), peers(model, batches, args,
                                                                    logs["peer"])
    calls = {}
    for r in ROUTINES:
        calls[(r, "ours")] = mine[r]
        if r in theirs:
            calls[(r, "peer")] = theirs[r]
    memory = {} if not measure else {key: torch_peak(fn) for key, fn in calls.items()}
    times = interleaved(calls, rounds=args.big_rounds if big else args.rounds)
    wall, cpu = ({key: statistics.median(getattr(c, what) for calls_ in rounds for c in calls_)
                  for key, rounds in times.items()} for what in ("wall", "cpu"))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "model changed"
    row = {"parameters": params, "width": w, "batches": n_batches, "samples": args.samples,
           "load_average": list(os.getloadavg()), "rounds": len(next(iter(times.values()))),
           "routines": {}}
    for r in ROUTINES:
        entry = {}
        for who in ("ours", "peer"):
            if (r, who) in calls:
                entry[who] = {"seconds": cpu[(r, who)], "wall_seconds": wall[(r, who)],
                              "peak_bytes": memory.get((r, who)),
                              "products": sorted(map(str, logs[who].get(r, ())))}
        if "peer" in entry:
            entry["peer"]["name"] = PEER[r]
            entry["time_ratio"] = entry["ours"]["seconds"] / entry["peer"]["seconds"]
            if memory:
                entry["memory_ratio"] = memory[(r, "ours")] / max(memory[(r, "peer")], 1)
        row["routines"][r] = entry
    return row


def fit(rows: list[dict], routine: str, who: str) -> dict | None:
    """``log t = a log(parameters) + b log(batches) + c`` by least squares (``None`` when the
    configurations do not determine it)."""
    pts = [(row["parameters"], row["batches"], row["routines"][routine][who]["seconds"])
           for row in rows if who in row["routines"][routine]]
    A = np.array([[math.log(p), math.log(b), 1.0] for p, b, _ in pts])
    if len(pts) < 3 or np.linalg.matrix_rank(A) < 3:
        return None
    t = np.log([s for *_, s in pts])
    coef, *_ = np.linalg.lstsq(A, t, rcond=None)
    residual = t - A @ coef
    return {"params": float(coef[0]), "batches": float(coef[1]), "const": float(coef[2]),
            "rms_log_residual": float(np.sqrt(np.mean(residual ** 2)))}


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}" if value >= 2**24 else \
        f"{value / 2**20:.1f}"


def print_tables(rows: list[dict], fits: dict) -> None:
    """The markdown tables of the README's Scaling section."""
    print("\n| routine | parameters | batches | ours s | peer s | ratio | ours MiB | peer MiB "
          "| ratio |\n|---|---|---|---|---|---|---|---|---|")
    for r in ROUTINES:
        for row in rows:
            e = row["routines"][r]
            o, p = e["ours"], e.get("peer", {})
            print(f"| {r} | {row['parameters'] / 1e6:.3g}M | {row['batches']} | "
                  f"{o['seconds']:.3g} | {p.get('seconds', float('nan')):.3g} | "
                  f"{e.get('time_ratio', float('nan')):.2f} | {mib(o['peak_bytes'])} | "
                  f"{mib(p.get('peak_bytes'))} | "
                  + (f"{e['memory_ratio']:.2f} |" if "memory_ratio" in e else "- |"))
    print("\n| routine | peer | ours a (params) | peer a | ours b (batches) | peer b | "
          "rms log residual ours / peer |\n|---|---|---|---|---|---|---|")
    for r in ROUTINES:
        o, p = fits[r].get("ours"), fits[r].get("peer")
        if o is None:
            continue
        pa = f"{p['params']:.2f}" if p else "-"
        pb = f"{p['batches']:.2f}" if p else "-"
        pr = f"{p['rms_log_residual']:.2f}" if p else "-"
        print(f"| {r} | {PEER[r]} | {o['params']:.2f} | {pa} | {o['batches']:.2f} | {pb} | "
              f"{o['rms_log_residual']:.2f} / {pr} |")


BUDGETS = ("samples", "top_hvp", "trace_hvp", "lanczos", "grid")


def resumed(args) -> list[dict]:
    """With ``--resume``: the rows already in ``--out`` (a run killed part way, or run at
    another time: each row keeps its own load in ``load_average``), if measured at the same
    budgets; else none."""
    if not ((args.resume or args.report) and args.out and Path(args.out).exists()):
        return []
    record = json.loads(Path(args.out).read_text())
    if any(record["config"][k] != getattr(args, k) for k in BUDGETS):
        raise SystemExit(f"--resume: {args.out} was measured at other budgets")
    return record["results"]["rows"]


def main() -> None:
    """Run every configuration, print its line, then the tables and the exponents."""
    p = parser(__doc__, threads=True)
    p.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--samples", type=int, default=32, help="samples per batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--big-rounds", type=int, default=1)
    p.add_argument("--big", type=float, default=2e6,
                   help="parameters x batches above which --big-rounds are run")
    p.add_argument("--memory-max", type=float, default=2e7,
                   help="parameters x batches up to which a memory (and warm-up) call is made")
    p.add_argument("--top-hvp", type=int, default=10)
    p.add_argument("--trace-hvp", type=int, default=12)
    p.add_argument("--lanczos", type=int, default=10)
    p.add_argument("--grid", type=int, default=5)
    p.add_argument("--resume", action="store_true",
                   help="keep the configurations already in --out, run the others")
    p.add_argument("--report", action="store_true",
                   help="no measurement: the tables and exponents of the rows in --out")
    args = parse(p, quick={"sizes": [2e3, 1e4], "batches": [1, 2], "samples": 8, "rounds": 1,
                           "top_hvp": 4, "trace_hvp": 6, "lanczos": 4, "grid": 3})
    run = Recorder("scaling", args)
    warnings.filterwarnings("ignore", message="Lanczos did not converge")
    warnings.filterwarnings("ignore", message="Using backward")  # PyHessian's create_graph
    missing = sorted({PEER[r] for r in ROUTINES} - {
        n for n in ("pyhessian", "curvlinops", "loss_landscapes") if importlib.util.find_spec(n)})
    if missing:
        print(f"not installed, skipped: {', '.join(missing)}", flush=True)
    rows = resumed(args)
    done = {(row["parameters"], row["batches"]) for row in rows}
    for size in args.sizes:
        w = width_for(int(size))
        for b in args.batches:
            if (count(w), b) in done or args.report:
                continue
            row = run_config(w, b, args)
            rows.append(row)
            line = "  ".join(f"{r} {e['ours']['seconds']:.3g}"
                             + (f"/{e['peer']['seconds']:.3g}" if "peer" in e else "")
                             for r, e in row["routines"].items())
            print(f"{row['parameters']:,} parameters, {b} batches: {line}", flush=True)
            run.write({"rows": rows, "partial": True})  # what a killed run leaves
    fits = {r: {who: fit(rows, r, who) for who in ("ours", "peer")} for r in ROUTINES}
    print_tables(rows, fits)
    run.write({"rows": rows, "fits": fits, "missing_peers": missing})


if __name__ == "__main__":
    main()
