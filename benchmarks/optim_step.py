"""Optimizer step time against torch.optim.AdamW(foreach=True), on CPU, in one process.

Model: a ~5M-parameter MLP (1024-2048-1024-512-10), batch 64. Two timings per optimizer, each the median
over rounds that interleave the optimizers (so load drifts hit all of them alike), after a warm-up. On a
loaded machine wall-clock ratios are noisy: the update ratio of the minima and of the process CPU time
(median; with ``--threads 1`` it is the work done, unaffected by descheduling) are printed too.

* update: ``opt.step()`` alone on fixed gradients (optimizers that accept ``step()`` after the caller's
  backward); the ratio to AdamW's update is the figure the targets refer to (AGD <= 1.3x, ND-Adam <= 1.5x).
* iteration: ``opt.step(closure)`` with a real forward-backward closure, and the number of closure calls
  (forward-backward passes) per step, which is what the SAM family pays for.

To add an optimizer: one line in BENCH, name -> Bench(factory(model) -> optimizer, update=...).
Run: ``python benchmarks/optim_step.py [--rounds 15] [--only AGD NDAdam]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import optim  # noqa: E402


@dataclass(frozen=True)
class Bench:
    factory: Callable[[nn.Module], torch.optim.Optimizer]
    update: bool = True   # accepts step() after the caller's own backward


BASELINE = "AdamW"
BENCH: dict[str, Bench] = {
    BASELINE: Bench(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2, foreach=True)),
    "AGD": Bench(lambda m: optim.AGD(m.parameters(), lr=1e-4, weight_decay=1e-2)),
    "AGD foreach": Bench(lambda m: optim.AGD(m.parameters(), lr=1e-4, weight_decay=1e-2, foreach=True)),
    "AGD amsgrad+clip": Bench(lambda m: optim.AGD(m.parameters(), lr=1e-4, amsgrad=True, clip=5.0)),
    "NDAdam": Bench(lambda m: optim.NDAdam(m.parameters(), lr=1e-3)),
    "NDAdam foreach": Bench(lambda m: optim.NDAdam(m.parameters(), lr=1e-3, foreach=True)),
    "SAM (AdamW)": Bench(lambda m: optim.SAM(torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True), model=m), update=False),
    "WSAM (AdamW)": Bench(lambda m: optim.WSAM(torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True), model=m), update=False),
    "AdaSAM": Bench(lambda m: optim.AdaSAM(m.parameters(), lr=1e-3, model=m), update=False),
    "AdaSAM foreach": Bench(lambda m: optim.AdaSAM(m.parameters(), lr=1e-3, model=m, foreach=True), update=False),
    "Lookahead (AdamW)": Bench(lambda m: optim.Lookahead(torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True))),
    "SALA (AdamW)": Bench(lambda m: optim.SALA(torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True), model=m), update=False),
}

SIZES = (1024, 2048, 1024, 512, 10)
BATCH = 64


@dataclass
class Timing:
    update: list[float]
    iteration: list[float]
    update_cpu: list[float] = field(default_factory=list)
    passes: int = 0
    steps: int = 0


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(SIZES) - 2 else [])
    return nn.Sequential(*layers)


class _Runner:
    """One optimizer on its own copy of the model, fed the same batch every step."""

    def __init__(self, bench: Bench, batch: tuple[torch.Tensor, torch.Tensor], timing: Timing):
        self.model = _model()
        self.opt = bench.factory(self.model)
        self.bench, self.batch, self.timing = bench, batch, timing

    def closure(self) -> torch.Tensor:
        self.timing.passes += 1
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(self.batch[0]), self.batch[1])
        loss.backward()
        return loss

    def iteration(self) -> float:
        start = time.perf_counter()
        self.opt.step(self.closure)
        self.timing.steps += 1
        return time.perf_counter() - start

    def update(self) -> float:
        start, start_cpu = time.perf_counter(), time.process_time()
        self.opt.step()
        self.timing.update_cpu.append(time.process_time() - start_cpu)
        return time.perf_counter() - start


def run(names: list[str], rounds: int, per_round: int, warmup: int) -> dict[str, Timing]:
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(BATCH, SIZES[0], generator=gen), torch.randint(0, SIZES[-1], (BATCH,), generator=gen))
    timings = {name: Timing([], []) for name in names}
    runners = {name: _Runner(BENCH[name], batch, timings[name]) for name in names}
    for runner in runners.values():
        for _ in range(warmup):
            runner.iteration()
        runner.timing.passes = runner.timing.steps = 0
    for _ in range(rounds):
        for name, runner in runners.items():
            timings[name].iteration.append(statistics.median(runner.iteration() for _ in range(per_round)))
            if runner.bench.update:
                timings[name].update.append(statistics.median(runner.update() for _ in range(per_round)))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="optimizer names (the baseline is always run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [BASELINE] + [n for n in BENCH if n != BASELINE and (args.only is None or n in args.only)]
    n_params = sum(p.numel() for p in _model().parameters())
    print(f"torch {torch.__version__}, {args.threads} threads, MLP {SIZES} ({n_params / 1e6:.2f}M params), "
          f"batch {BATCH}, median of {args.rounds} rounds x {args.per_round}")
    timings = run(names, args.rounds, args.per_round, args.warmup)
    base = timings[BASELINE]
    print(f"{'optimizer':<22}{'update ms':>10}{'x AdamW':>9}{'(min)':>7}{'(cpu)':>7}{'iter ms':>10}{'x AdamW':>9}"
          f"{'passes/step':>13}")
    for name in names:
        t = timings[name]
        it = statistics.median(t.iteration)
        upd = (f"{1e3 * statistics.median(t.update):>10.2f}"
               f"{statistics.median(t.update) / statistics.median(base.update):>9.2f}"
               f"{min(t.update) / min(base.update):>7.2f}"
               f"{statistics.median(t.update_cpu) / statistics.median(base.update_cpu):>7.2f}"
               ) if t.update else f"{'-':>10}{'-':>9}{'-':>7}{'-':>7}"
        print(f"{name:<22}{upd}{1e3 * it:>10.2f}{it / statistics.median(base.iteration):>9.2f}"
              f"{t.passes / max(t.steps, 1):>13.2f}")

if __name__ == "__main__":
    main()
