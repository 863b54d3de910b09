"""Running many training runs.

Worker processes with one progress line per run (and the job's overall progress and time left),
grid searches on validation accuracy, and the compared configurations of a reproduction over its
seeds.
"""
from __future__ import annotations

import itertools
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Callable, Sequence

import numpy as np
import torch

from . import harness
from .harness import Job, Size, job


def _worker_init(threads: int = 1) -> None:
    torch.set_num_threads(threads)


def parallel_share(workers: int, cores: int, others: float) -> float:
    """How many CPU seconds per wall second ``workers`` processes get.

    Each runnable process gets ``cores / (others + workers)`` of a core when the machine is
    oversubscribed, at most one.

    Args:
        workers: Our processes.
        cores: The machine's cores.
        others: Runnable processes of other programs (the load they add).

    Returns:
        CPU seconds per wall second, over all our processes.
    """
    return workers * min(1.0, cores / max(others + workers, 1e-9))


def other_load(cpu: float, wall: float, cores: int | None = None,
               average: float | None = None) -> float:
    """The runnable processes of other programs, from one of ours measured alone.

    A process that got ``cpu / wall`` of a core shares the cores with about
    ``cores * wall / cpu - 1`` others; the 1-minute load average (less ourselves) is used too,
    whichever is larger.

    Args:
        cpu: CPU seconds of our process over the measurement.
        wall: Wall seconds of the measurement.
        cores: The cores (default: ``os.cpu_count()``).
        average: The 1-minute load average (default: ``os.getloadavg()``; 0 where there is
            none).

    Returns:
        The load of other programs (>= 0).
    """
    cores = cores or os.cpu_count() or 1
    share = cpu / wall if wall > 0 else 1.0
    measured = cores / share - 1 if share < 0.9 else 0.0
    if average is None:
        try:
            average = os.getloadavg()[0]
        except OSError:
            average = 0.0
    return max(0.0, measured, average - 1)


class Progress:
    """Overall progress of a job in standard training runs, and the time left.

    The total is the sum of the reproductions' ``cost`` in plain training runs (an upper bound:
    grid extensions at their limit; a run that also tracks curvature counts more than one), and
    each finished run counts one. The time left starts as the CPU time left (``unit``, the CPU
    seconds of one plain run measured on this machine, per run) over the CPU share our
    processes get (:func:`parallel_share`), plus the start of the worker processes; as runs
    finish it moves to the wall time per run measured since the first one finished (so the
    workers' start does not count).

    Args:
        total: Standard runs to do.
        unit: CPU seconds of one plain run.
        share: CPU seconds per wall second our processes get.
        startup: Wall seconds until the first run can finish besides its own work (the worker
            processes' start), dropped once a run has finished.
        overhead: Wall seconds each reproduction spends besides its runs (rule, figure, files).
        reproductions: The reproductions to do.
        clock: The wall clock (``time.perf_counter``).
    """

    def __init__(self, total: float, unit: float, share: float, startup: float = 0.0,
                 overhead: float = 0.0, reproductions: int = 0, clock=time.perf_counter):
        self.total, self.unit, self.share = total, max(unit, 1e-6), share
        self.startup, self.clock = startup, clock
        self.each, self.reproductions = overhead, reproductions
        self.done, self._mark = 0.0, 0.0                  # runs done, at the last reproduction
        self._first: tuple[float, float] | None = None   # (time, done) at the first finished run

    def reproduction_done(self, cost: float) -> None:
        """Count a finished reproduction: its overhead is spent, its unused runs dropped.

        Args:
            cost: The runs it was counted for in ``total`` (its ``cost``); the runs it did
                replace them.
        """
        self.reproductions = max(self.reproductions - 1, 0)
        self.total += (self.done - self._mark) - cost
        self._mark = self.done

    def add(self, runs: float = 1.0) -> None:
        """Count ``runs`` finished runs."""
        self.done += runs
        if self._first is None:
            self._first, self.startup = (self.clock(), self.done), 0.0

    def seconds_left(self) -> float:
        """The wall seconds left: the CPU-calibrated plan, blended into the measured rate."""
        left = max(self.total - self.done, 0.0)
        planned = left * self.unit / self.share
        fixed = self.startup + self.each * self.reproductions
        if self._first is None:
            return planned + fixed
        since, runs = self.clock() - self._first[0], self.done - self._first[1]
        if runs <= 0 or since <= 0:
            return planned + fixed
        trust = runs / (runs + max(self.share, 1.0))   # a few runs in: mostly the measurement
        return trust * left * since / runs + (1 - trust) * planned + fixed

    def line(self) -> str:
        """``"k of n runs, about m min left"``."""
        total = max(self.total, self.done)
        return (f"{self.done:.0f} of {total:.0f} runs, about "
                f"{self.seconds_left() / 60:.1f} min left")


class Runner:
    """Runs jobs, one printed line per finished run, each result kept.

    Jobs run in ``workers`` processes when > 1; a job asked for twice (a search, then the
    comparison) runs once. With a :class:`Progress` in ``progress``, each line ends with the
    job's overall progress and the time left.

    Args:
        size: The ``Size`` of every run.
        workers: Processes.
    """

    def __init__(self, size: Size, workers: int = 1, threads: int = 1):
        self.size, self.workers, self.threads = size, workers, threads
        self.done: dict[Job, dict] = {}
        self.progress: Progress | None = None
        self.pool = (ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                         initializer=_worker_init, initargs=(threads,))
                     if workers > 1 else None)

    def close(self) -> None:
        """Shut the worker processes down."""
        if self.pool is not None:
            self.pool.shutdown()

    def run(self, jobs: Sequence[Job]) -> list[dict]:
        """The results of ``jobs`` (in order), running those not run yet."""
        todo = list(dict.fromkeys(j for j in jobs if j not in self.done))
        for i, (jb, result) in enumerate(self._results(todo), 1):
            self.done[jb] = result
            overall = ""
            if self.progress is not None:
                self.progress.add()
                overall = f" | {self.progress.line()}"
            print(f"  [{i}/{len(todo)}] {jb.group}: {jb.label}, seed {jb.seed}: val "
                  f"{result['final_val_acc']:.3f}, test {result['final_test_acc']:.3f} "
                  f"({result['seconds']:.1f} s){overall}", flush=True)
        return [self.done[j] for j in jobs]

    def _results(self, todo: list[Job]):
        if self.pool is None:
            for jb in todo:
                yield jb, harness.execute(jb, self.size)
            return
        futures = {self.pool.submit(harness.execute, jb, self.size): jb for jb in todo}
        for future in as_completed(futures):
            yield futures[future], future.result()


# -- grid searches on validation --------------------------------------------------------------
@dataclass
class Search:
    """A grid search on validation accuracy.

    The (final) axes, the mean final validation accuracy of every point, the best point and
    whether it is interior on every axis.
    """
    axes: dict[str, list[float]]
    scores: list[tuple[dict, float]]
    best: dict
    interior: dict[str, bool]
    extended: int = 0

    def summary(self) -> dict:
        """The search as JSON: axes, best point, interiority, extensions, every score."""
        return {"axes": self.axes, "best": self.best, "interior": self.interior,
                "extended": self.extended,
                "val_acc": [{**p, "val_acc": s} for p, s in self.scores]}


def search(runner: Runner, axes: dict[str, Sequence[float]], make: Callable[[dict, int], Job],
           fixed: Sequence[dict] = (), extend: int | None = None) -> Search:
    """Evaluate every point of the grid ``axes`` (plus the extra points ``fixed``).

    Each on ``select_seeds`` seeds; while the best grid point sits on an edge of an axis, that
    axis is extended geometrically by one value (at most ``extend`` times, default
    ``size.extend``).
    """
    axes = {k: sorted(float(v) for v in vs) for k, vs in axes.items()}
    seeds = range(runner.size.select_seeds)
    extended = 0
    while True:
        grid = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
        points = grid + [dict(p) for p in fixed]
        results = runner.run([make(p, s) for p in points for s in seeds])
        n = len(seeds)
        scores = [(p, float(np.mean([r["final_val_acc"] for r in results[i * n:(i + 1) * n]])))
                  for i, p in enumerate(points)]
        best = max(scores, key=lambda ps: ps[1])[0]
        # the best grid point decides the extension (an extra point is never on an edge)
        top = max(scores[:len(grid)], key=lambda ps: ps[1])[0]
        edges = {k: len(vs) > 1 and top[k] in (vs[0], vs[-1]) for k, vs in axes.items()}
        limit = runner.size.extend if extend is None else extend
        if not any(edges.values()) or extended >= limit:
            return Search(axes, scores, best, {k: not e for k, e in edges.items()}, extended)
        for k, vs in axes.items():
            if edges[k]:
                axes[k] = ([vs[0] ** 2 / vs[1]] + vs) if top[k] == vs[0] else \
                    (vs + [vs[-1] ** 2 / vs[-2]])
        extended += 1




# -- compared configurations ------------------------------------------------------------------
SCALARS = ("final_val_acc", "final_test_acc", "best_epoch_test_acc", "test_acc_at_best_val",
           "passes_per_step", "lambda_max", "trace", "worst_case_sharpness", "seconds")


def compact(result: dict, history: Sequence[str] = ()) -> dict:
    """The JSON part of a result.

    Its scalars, per-epoch curves and the ``history`` curves (keys, or prefixes ending in "/")
    that the figure or the rule reads.
    """
    keep = {k: v for k, v in result["history"].items()
            if k in history or any(h.endswith("/") and k.startswith(h) for h in history)}
    return {"seed": result["seed"], "curves": result["curves"], "history": keep,
            **{k: result[k] for k in SCALARS + ("arrays", "extra") if k in result}}


def trials(runner: Runner, group: str, configs: dict[str, tuple], *,
           history: Sequence[str] = (), **options) -> dict[str, list[dict]]:
    """Every configuration ``label -> (optimizer, hp[, job options])``, compacted.

    On seeds 0 .. size.seeds - 1 (the same initialisation and batches for every configuration
    within a seed).
    """
    jobs = {label: [job(group, label, c[0], s, c[1], **{**options, **(c[2:] or [{}])[0]})
                    for s in range(runner.size.seeds)] for label, c in configs.items()}
    results = runner.run([j for js in jobs.values() for j in js])
    n = runner.size.seeds
    return {label: [compact(r, history) for r in results[i * n:(i + 1) * n]]
            for i, label in enumerate(jobs)}


def pop_arrays(runs: dict[str, list[dict]]) -> dict[str, np.ndarray]:
    """Move the measured arrays out of ``runs`` into arrays named ``LABEL__seedS__KEY``."""
    return {f"{label}__seed{r['seed']}__{k}": v for label, rs in runs.items() for r in rs
            for k, v in r.pop("arrays", {}).items()}


def per_seed(runs: list[dict], key: str) -> list[float]:
    """The value of ``key`` in each run."""
    return [float(r[key]) for r in runs]


ACCURACIES = ("final_test_acc", "best_epoch_test_acc", "test_acc_at_best_val")


def means(runs: dict[str, list[dict]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """``key -> label -> mean over seeds`` for every configuration of ``runs``."""
    return {k: {label: float(np.mean(per_seed(rs, k))) for label, rs in runs.items()}
            for k in keys}


def slashed(values: dict[str, float], names: Sequence[str], fmt: str) -> str:
    """``values`` of ``names`` formatted with ``fmt`` and joined by " / " (a headline entry)."""
    return " / ".join(format(values[n], fmt) for n in names)
