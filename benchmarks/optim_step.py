"""Optimizer update time against torch.optim.AdamW(foreach=True) and AdamW(fused=True), in one process.

Models: MLPs of about 1M (512-1024-512-10), 10M (1024-2048-2560-1024-10) and 100M (4096-8192-8192-10, with
``--sizes 100M``) parameters; fixed gradients.
For each size and thread count every optimizer's update is timed in rounds that interleave the optimizers
(so load drifts hit all of them alike), after a warm-up; the median over rounds of the median of
``--per-round`` calls is reported with its ratio to both AdamW baselines, next to the ratio of the median
process CPU time (with one thread: the work done, unaffected by descheduling on a loaded machine).

* ``step``: ``opt.step()`` on the fixed gradients (optimizers that accept it after the caller's backward).
* ``update`` (AdaSAM): the AMSGrad-type update of its second step alone, the part the issue's target
  (AdaSAM <= 1.5x AdamW-fused) refers to; ``two-step``: ``first_step()`` + ``second_step()`` on the fixed
  gradients, all the optimizer work of a SAM-family step (ascent, restore, base update).
* ``fused=True`` rows compile their kernels on first use; that compile time is measured once per optimizer
  (first step minus a warm step), with an empty Inductor cache (a fresh ``TORCHINDUCTOR_CACHE_DIR``), and
  printed separately. Kernels shared between rows (the AdaSAM rows) compile once.

* ``--breakdown``: also times, in the same calls, the kernel call inside each fused row's step:
  ``torch._fused_adamw_`` for AdamW-fused, the ``torch.compile``d function (Dynamo's guards and entry, the AOT
  wrappers and Inductor's kernel) for ours; the rest of the step is the optimizer's Python. The wrappers that
  time it add about a microsecond per call, so record the ratios from a run without it.

* ``--device cuda``: the same rows on the GPU (every call timed between two ``torch.cuda.synchronize()``;
  ``--threads`` does not apply; the *cpu* column is then the host's CPU time).

Targets (ratio to AdamW-fused, CPU and CUDA): AGD <= 1.3x, NDAdam <= 1.6x, AdaSAM <= 1.5x.
Run: ``python benchmarks/optim_step.py [--rounds 7] [--threads 1 2] [--sizes 1M 10M 100M] [--only AGD ...]
[--breakdown] [--device cuda]``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import optim  # noqa: E402
from optim import _fused  # noqa: E402  (the compiled-call entry, timed by --breakdown)


@dataclass(frozen=True)
class Bench:
    factory: Callable[[nn.Module], torch.optim.Optimizer]
    mode: str = "step"   # "step", "two-step" (SAM family: first_step + second_step) or "update" (AdaSAM)


def _adamw(m: nn.Module, **kw) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2, **kw)


BASELINES = ("AdamW foreach", "AdamW fused")
BENCH: dict[str, Bench] = {
    "AdamW foreach": Bench(lambda m: _adamw(m, foreach=True)),
    "AdamW fused": Bench(lambda m: _adamw(m, fused=True)),
    "AGD": Bench(lambda m: optim.AGD(m.parameters(), lr=1e-4, weight_decay=1e-2)),
    "AGD foreach": Bench(lambda m: optim.AGD(m.parameters(), lr=1e-4, weight_decay=1e-2, foreach=True)),
    "AGD fused": Bench(lambda m: optim.AGD(m.parameters(), lr=1e-4, weight_decay=1e-2, fused=True)),
    "AGD amsgrad+clip fused": Bench(lambda m: optim.AGD(m.parameters(), lr=1e-4, amsgrad=True, clip=5.0, fused=True)),
    "NDAdam": Bench(lambda m: optim.NDAdam(m.parameters(), lr=1e-3)),
    "NDAdam foreach": Bench(lambda m: optim.NDAdam(m.parameters(), lr=1e-3, foreach=True)),
    "NDAdam fused": Bench(lambda m: optim.NDAdam(m.parameters(), lr=1e-3, fused=True)),
    "AdaSAM": Bench(lambda m: optim.AdaSAM(m.parameters(), lr=1e-3), mode="update"),
    "AdaSAM foreach": Bench(lambda m: optim.AdaSAM(m.parameters(), lr=1e-3, foreach=True), mode="update"),
    "AdaSAM fused": Bench(lambda m: optim.AdaSAM(m.parameters(), lr=1e-3, fused=True), mode="update"),
    "AdaSAM fused two-step": Bench(lambda m: optim.AdaSAM(m.parameters(), lr=1e-3, fused=True), mode="two-step"),
    "SAM (AdamW fused) two-step": Bench(lambda m: optim.SAM(_adamw(m, fused=True)), mode="two-step"),
    "WSAM (AdamW fused) two-step": Bench(lambda m: optim.WSAM(_adamw(m, fused=True)), mode="two-step"),
    "Lookahead (AdamW fused)": Bench(lambda m: optim.Lookahead(_adamw(m, fused=True))),
}
COMPILED = ("AGD fused", "AGD amsgrad+clip fused", "NDAdam fused", "AdaSAM fused")
TARGETS = {"AGD fused": 1.3, "NDAdam fused": 1.6, "AdaSAM fused": 1.5}
SIZES = {"1M": (512, 1024, 512, 10), "10M": (1024, 2048, 2560, 1024, 10), "100M": (4096, 8192, 8192, 10)}
DEFAULT_SIZES = ("1M", "10M")


@dataclass
class Timing:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    kernel: list[float] = field(default_factory=list)


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
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
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

    def timed(self) -> tuple[float, float, float]:
        """Wall and CPU seconds of one call, and the seconds ``CLOCK`` saw inside its kernel calls."""
        CLOCK.seconds = 0.0
        self.sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        self.call()
        self.sync()
        return time.perf_counter() - start, time.process_time() - start_cpu, CLOCK.seconds


def run(names: list[str], sizes: tuple[int, ...], rounds: int, per_round: int, warmup: int,
        compile_times: dict[str, float], device: torch.device) -> dict[str, Timing]:
    runners = {name: _Runner(BENCH[name], sizes, device) for name in names}
    for name, runner in runners.items():
        first = runner.timed()[0]
        warm = [runner.timed()[0] for _ in range(warmup)]
        if name in COMPILED and name not in compile_times:
            compile_times[name] = first - min(warm)
    timings = {name: Timing() for name in names}
    for _ in range(rounds):
        for name, runner in runners.items():
            calls = [runner.timed() for _ in range(per_round)]
            timings[name].wall.append(statistics.median(w for w, _, _ in calls))
            timings[name].cpu.append(statistics.median(c for _, c, _ in calls))
            timings[name].kernel.append(statistics.median(k for _, _, k in calls))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), choices=list(SIZES))
    parser.add_argument("--only", nargs="*", default=None, help="optimizer names (the baselines always run)")
    parser.add_argument("--breakdown", action="store_true", help="also time the kernel call inside each step")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    if device.type == "cuda" and args.breakdown:
        parser.error("--breakdown times host calls, which return before a GPU kernel ends: use it with --device cpu")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="optim_step_inductor_")  # cold compiles
    names = list(BASELINES) + [n for n in BENCH if n not in BASELINES and (args.only is None or n in args.only)]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}, load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}, "
          f"median of {args.rounds} rounds x {args.per_round}")
    compile_times: dict[str, float] = {}
    for size in args.sizes:
        for threads in args.threads if device.type == "cpu" else [None]:
            if threads is not None:
                torch.set_num_threads(threads)
            n_params = sum(p.numel() for p in _model(SIZES[size]).parameters())
            with CLOCK.installed() if args.breakdown else contextlib.nullcontext():
                timings = run(names, SIZES[size], args.rounds, args.per_round, args.warmup, compile_times, device)
            base = {b: (statistics.median(timings[b].wall), statistics.median(timings[b].cpu)) for b in BASELINES}
            on = f"{threads} thread(s)" if threads is not None else where
            print(f"\n{size} ({n_params / 1e6:.2f}M params), {on}, load {os.getloadavg()[0]:.2f}")
            print(f"{'optimizer':<30}{'ms':>9}{'x foreach':>11}{'x fused':>9}{'(cpu)':>7}"
                  + (f"{'kernel ms':>11}{'rest ms':>9}" if args.breakdown else "") + "  target")
            for name in names:
                wall, cpu = statistics.median(timings[name].wall), statistics.median(timings[name].cpu)
                ratio = wall / base["AdamW fused"][0]
                target = TARGETS.get(name)
                verdict = "" if target is None else f"<= {target}: {'met' if ratio <= target else 'NOT met'}"
                kernel = statistics.median(timings[name].kernel)
                split = f"{1e3 * kernel:>11.2f}{1e3 * (wall - kernel):>9.2f}" if args.breakdown and kernel else (
                    " " * 20 if args.breakdown else "")
                print(f"{name:<30}{1e3 * wall:>9.2f}{wall / base['AdamW foreach'][0]:>11.2f}{ratio:>9.2f}"
                      f"{cpu / base['AdamW fused'][1]:>7.2f}{split}  {verdict}")
    print("\ncompile time of the fused kernels (first step minus a warm one, once per process):")
    for name, seconds in compile_times.items():
        print(f"  {name:<28}{seconds:>7.1f} s")
    print(f"\nms: median wall time of one update; x foreach / x fused: its ratio to AdamW(foreach=True) / "
          f"AdamW(fused=True); (cpu): the ratio of process CPU times to AdamW-fused's; kernel ms / rest ms "
          f"(--breakdown): median time inside the kernel call / the rest of the step; target: the ratio x fused "
          f"against the target. Load average at the end {os.getloadavg()[0]:.2f} (figures are comparable only "
          f"on an idle machine).")


if __name__ == "__main__":
    main()
