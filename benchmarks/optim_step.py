"""Optimizer update time against torch.optim.AdamW(foreach=True) and AdamW(fused=True), in one
process.

Models: MLPs of about 1M (512-1024-512-10), 10M (1024-2048-2560-1024-10) and 100M
(4096-8192-8192-10, with ``--sizes 100M``) parameters; fixed gradients. For each size and thread
count every optimizer's update is timed in rounds that interleave the optimizers (so load drifts
hit all of them alike), after a warm-up; the median over rounds of the median of ``--per-round``
calls is reported with its ratio to both AdamW baselines, next to the ratio of the median process
CPU time (with one thread: the work done, unaffected by descheduling on a loaded machine).

* ``step``: ``opt.step()`` on the fixed gradients (optimizers that accept it after the caller's
  backward).
* ``update`` (AdaSAM): the AMSGrad-type update of its second step alone, the part the target
  (AdaSAM <= 1.5x AdamW-fused) refers to; ``two-step``: ``first_step()`` + ``second_step()`` on
  the fixed gradients, all the optimizer work of a SAM-family step (ascent, restore, base update).
* ``fused=True`` rows compile their kernels on first use; that compile time is measured once per
  optimizer (first step minus a warm step), with an empty Inductor cache (a fresh
  ``TORCHINDUCTOR_CACHE_DIR``), and printed separately. Kernels shared between rows (the AdaSAM
  rows) compile once.

* ``--breakdown``: also times, in the same calls, the kernel call inside each fused row's step:
  ``torch._fused_adamw_`` for AdamW-fused, the ``torch.compile``d function (Dynamo's guards and
  entry, the AOT wrappers and Inductor's kernel) for ours; the rest of the step is the optimizer's
  Python. The wrappers that time it add about a microsecond per call, so record the ratios from a
  run without it.

* ``--device cuda``: the same rows on the GPU (every call timed between two
  ``torch.cuda.synchronize()``; ``--threads`` does not apply; the *cpu* column is then the host's
  CPU time).

* ``--quick``: a 10k-parameter MLP, one thread, one round of one call, the rows that compile
  nothing (unless ``--only`` names others): a smoke test, not figures.

Targets (ratio to AdamW-fused, CPU and CUDA): AGD <= 1.3x, NDAdam <= 1.6x, AdaSAM <= 1.5x.
Run: ``python benchmarks/optim_step.py [--rounds 7] [--threads 1 2] [--sizes 1M 10M 100M]
[--only AGD ...] [--breakdown] [--device cuda] [--out FILE.json] [--quick]``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import optim  # noqa: E402
from harness import (Clock, Recorder, cuda_sync, interleaved, median_of_medians,  # noqa: E402
                     no_sync, parse, parser)
from optim import _fused  # noqa: E402  (the compiled-call entry, timed by --breakdown)


@dataclass(frozen=True)
class Bench:
    factory: Callable[[nn.Module], torch.optim.Optimizer]
    # "step", "two-step" (SAM family: first_step + second_step) or "update" (AdaSAM)
    mode: str = "step"


def _adamw(m: nn.Module, **kw) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2, **kw)


BASELINES = ("AdamW foreach", "AdamW fused")
def _agd(m: nn.Module, **kw) -> torch.optim.Optimizer:
    return optim.AGD(m.parameters(), lr=1e-4, **kw)


def _ndadam(m: nn.Module, **kw) -> torch.optim.Optimizer:
    return optim.NDAdam(m.parameters(), lr=1e-3, **kw)


def _adasam(m: nn.Module, **kw) -> torch.optim.Optimizer:
    return optim.AdaSAM(m.parameters(), lr=1e-3, **kw)


BENCH: dict[str, Bench] = {
    "AdamW foreach": Bench(lambda m: _adamw(m, foreach=True)),
    "AdamW fused": Bench(lambda m: _adamw(m, fused=True)),
    "AGD": Bench(lambda m: _agd(m, weight_decay=1e-2)),
    "AGD foreach": Bench(lambda m: _agd(m, weight_decay=1e-2, foreach=True)),
    "AGD fused": Bench(lambda m: _agd(m, weight_decay=1e-2, fused=True)),
    "AGD amsgrad+clip fused": Bench(lambda m: _agd(m, amsgrad=True, clip=5.0, fused=True)),
    "NDAdam": Bench(lambda m: _ndadam(m)),
    "NDAdam foreach": Bench(lambda m: _ndadam(m, foreach=True)),
    "NDAdam fused": Bench(lambda m: _ndadam(m, fused=True)),
    "AdaSAM": Bench(lambda m: _adasam(m), mode="update"),
    "AdaSAM foreach": Bench(lambda m: _adasam(m, foreach=True), mode="update"),
    "AdaSAM fused": Bench(lambda m: _adasam(m, fused=True), mode="update"),
    "AdaSAM fused two-step": Bench(lambda m: _adasam(m, fused=True), mode="two-step"),
    "SAM (AdamW fused) two-step": Bench(lambda m: optim.SAM(_adamw(m, fused=True)),
                                        mode="two-step"),
    "WSAM (AdamW fused) two-step": Bench(lambda m: optim.WSAM(_adamw(m, fused=True)),
                                         mode="two-step"),
    "Lookahead (AdamW fused)": Bench(lambda m: optim.Lookahead(_adamw(m, fused=True))),
}
COMPILED = ("AGD fused", "AGD amsgrad+clip fused", "NDAdam fused", "AdaSAM fused")
TARGETS = {"AGD fused": 1.3, "NDAdam fused": 1.6, "AdaSAM fused": 1.5}
SIZES = {"1M": (512, 1024, 512, 10), "10M": (1024, 2048, 2560, 1024, 10),
         "100M": (4096, 8192, 8192, 10), "10k": (64, 128, 10)}  # 10k: --quick
DEFAULT_SIZES = ("1M", "10M")


class _KernelClock:
    """Seconds spent inside the kernel calls of the step being timed (``--breakdown``)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Time ``torch._fused_adamw_`` and every ``FusedKernel`` call while the context is open."""
        adamw, kernel = torch._fused_adamw_, _fused.FusedKernel.__call__
        torch._fused_adamw_, _fused.FusedKernel.__call__ = self.wrap(adamw), self.wrap(kernel)
        try:
            yield
        finally:
            torch._fused_adamw_, _fused.FusedKernel.__call__ = adamw, kernel


CLOCK = _KernelClock()


class StepClock(Clock):
    """A :class:`Clock` that also records the seconds ``CLOCK`` saw inside kernel calls."""

    kernel = 0.0

    def __enter__(self) -> "StepClock":
        CLOCK.seconds = 0.0
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.kernel = CLOCK.seconds


def _model(sizes: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


class _Runner:
    """One optimizer on its own copy of the model (on ``device``), with fixed small gradients."""

    def __init__(self, bench: Bench, sizes: tuple[int, ...], device: torch.device):
        self.model = _model(sizes).to(device)
        gen = torch.Generator().manual_seed(1)
        for p in self.model.parameters():
            p.grad = (1e-3 * torch.randn(p.shape, generator=gen)).to(device)
        self.opt, self.mode = bench.factory(self.model), bench.mode

    def call(self) -> None:
        if self.mode == "step":
            self.opt.step()
        elif self.mode == "two-step":
            self.opt.first_step()
            self.opt.second_step()
        else:  # the second step's update alone, on the parameters as they are (benchmark only)
            with torch.no_grad():
                self.opt._update([(g, list(g["params"])) for g in self.opt.param_groups])


def run(names: list[str], sizes: tuple[int, ...], rounds: int, per_round: int, warmup: int,
        compile_times: dict[str, float], device: torch.device) -> dict[str, dict[str, float]]:
    """Median over ``rounds`` interleaved rounds of the median of ``per_round`` calls: ``{"wall",
    "cpu", "kernel"}`` seconds per optimizer, after ``warmup`` calls (and the compile times)."""
    sync = cuda_sync if device.type == "cuda" else no_sync

    def clock() -> StepClock:
        return StepClock(sync)

    def wall_of_call(runner: _Runner) -> float:
        with clock() as c:
            runner.call()
        return c.wall

    runners = {name: _Runner(BENCH[name], sizes, device) for name in names}
    for name, runner in runners.items():
        first = wall_of_call(runner)
        warm = [wall_of_call(runner) for _ in range(warmup)]
        if name in COMPILED and name not in compile_times:
            compile_times[name] = first - min(warm)
    times = interleaved({name: r.call for name, r in runners.items()}, rounds, per_round, clock)
    medians = {what: median_of_medians(times, what) for what in ("wall", "cpu", "kernel")}
    return {name: {what: medians[what][name] for what in medians} for name in names}


def table(names: list[str], timings: dict[str, dict[str, float]],
          breakdown: bool) -> list[dict]:
    """Print one size's rows (ratios to the AdamW baselines, targets) and return them."""
    print(f"{'optimizer':<30}{'ms':>9}{'x foreach':>11}{'x fused':>9}{'(cpu)':>7}"
          + (f"{'kernel ms':>11}{'rest ms':>9}" if breakdown else "") + "  target")
    foreach, fused = timings["AdamW foreach"], timings["AdamW fused"]
    rows = []
    for name in names:
        t = timings[name]
        ratio = t["wall"] / fused["wall"]
        target = TARGETS.get(name)
        met = target is not None and ratio <= target
        verdict = "" if target is None else f"<= {target}: {'met' if met else 'NOT met'}"
        split = " " * 20 if breakdown else ""
        if breakdown and t["kernel"]:
            split = f"{1e3 * t['kernel']:>11.2f}{1e3 * (t['wall'] - t['kernel']):>9.2f}"
        print(f"{name:<30}{1e3 * t['wall']:>9.2f}{t['wall'] / foreach['wall']:>11.2f}"
              f"{ratio:>9.2f}{t['cpu'] / fused['cpu']:>7.2f}{split}  {verdict}")
        rows.append({"optimizer": name, **t, "x_foreach": t["wall"] / foreach["wall"],
                     "x_fused": ratio, "x_fused_cpu": t["cpu"] / fused["cpu"], "target": target,
                     "met": None if target is None else met})
    return rows


# --quick: the rows that compile nothing (the AdaSAM two-step row shares AdaSAM's kernel)
QUICK = {"sizes": ["10k"], "threads": [1], "rounds": 1, "per_round": 1, "warmup": 1,
         "only": [n for n in BENCH if n not in (*COMPILED, "AdaSAM fused two-step")]}


def main() -> None:
    p = parser(__doc__, device=True)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--per-round", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), choices=list(SIZES))
    p.add_argument("--only", nargs="*", default=None,
                   help="optimizer names (the baselines always run)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the kernel call inside each step")
    args = parse(p, quick=QUICK)
    device = torch.device(args.device)
    if device.type == "cuda" and args.breakdown:
        p.error("--breakdown times host calls, which return before a GPU kernel ends: use it "
                "with --device cpu")
    # cold compiles
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="optim_step_inductor_")
    names = list(BASELINES) + [n for n in BENCH
                               if n not in BASELINES and (args.only is None or n in args.only)]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {where}, load average {load[0]:.2f} {load[1]:.2f}, "
          f"median of {args.rounds} rounds x {args.per_round}")
    run_record = Recorder("optim_step", args)
    compile_times: dict[str, float] = {}
    results = []
    for size in args.sizes:
        for threads in args.threads if device.type == "cpu" else [None]:
            if threads is not None:
                torch.set_num_threads(threads)
            n_params = sum(p.numel() for p in _model(SIZES[size]).parameters())
            with CLOCK.installed() if args.breakdown else contextlib.nullcontext():
                timings = run(names, SIZES[size], args.rounds, args.per_round, args.warmup,
                              compile_times, device)
            on = f"{threads} thread(s)" if threads is not None else where
            print(f"\n{size} ({n_params / 1e6:.2f}M params), {on}, load {os.getloadavg()[0]:.2f}")
            results.append({"size": size, "n_params": n_params, "threads": threads,
                            "rows": table(names, timings, args.breakdown)})
    print("\ncompile time of the fused kernels (first step minus a warm one, once per process):")
    for name, seconds in compile_times.items():
        print(f"  {name:<28}{seconds:>7.1f} s")
    print("\nms: median wall time of one update; x foreach / x fused: its ratio to "
          "AdamW(foreach=True) / AdamW(fused=True); (cpu): the ratio of process CPU times to "
          "AdamW-fused's; kernel ms / rest ms (--breakdown): median time inside the kernel call / "
          "the rest of the step; target: the ratio x fused against the target. Load average at "
          f"the end {os.getloadavg()[0]:.2f} (figures are comparable only on an idle machine).")
    run_record.write({"cases": results, "compile_seconds": compile_times,
                      "units": "wall, cpu, kernel: median seconds of one update"})


if __name__ == "__main__":
    main()
