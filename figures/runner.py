"""Running many training runs: worker processes with one progress line per run, grid searches
on validation accuracy, and the compared configurations of a reproduction over its seeds."""
from __future__ import annotations

import itertools
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


class Runner:
    """Runs jobs (in ``workers`` processes when > 1), prints one line per finished run, and
    keeps every result so a job asked for twice (a search, then the comparison) runs once."""

    def __init__(self, size: Size, workers: int = 1, threads: int = 1):
        self.size, self.workers, self.threads = size, workers, threads
        self.done: dict[Job, dict] = {}
        self.pool = (ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                         initializer=_worker_init, initargs=(threads,))
                     if workers > 1 else None)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def run(self, jobs: Sequence[Job]) -> list[dict]:
        todo = list(dict.fromkeys(j for j in jobs if j not in self.done))
        for i, (jb, result) in enumerate(self._results(todo), 1):
            self.done[jb] = result
            print(f"  [{i}/{len(todo)}] {jb.group}: {jb.label}, seed {jb.seed}: val "
                  f"{result['final_val_acc']:.3f}, test {result['final_test_acc']:.3f} "
                  f"({result['seconds']:.1f} s)", flush=True)
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
    """A grid search on validation accuracy: the (final) axes, the mean final validation
    accuracy of every point, the best point and whether it is interior on every axis."""
    axes: dict[str, list[float]]
    scores: list[tuple[dict, float]]
    best: dict
    interior: dict[str, bool]
    extended: int = 0

    def summary(self) -> dict:
        return {"axes": self.axes, "best": self.best, "interior": self.interior,
                "extended": self.extended,
                "val_acc": [{**p, "val_acc": s} for p, s in self.scores]}


def search(runner: Runner, axes: dict[str, Sequence[float]], make: Callable[[dict, int], Job],
           fixed: Sequence[dict] = (), extend: int | None = None) -> Search:
    """Evaluate every point of the grid ``axes`` (plus the extra points ``fixed``) on
    ``select_seeds`` seeds; while the best grid point sits on an edge of an axis, extend that
    axis geometrically by one value (at most ``extend`` times, default ``size.extend``)."""
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
    """The JSON part of a result: its scalars, per-epoch curves and the ``history`` curves
    (keys, or prefixes ending in "/") that the figure or the rule reads."""
    keep = {k: v for k, v in result["history"].items()
            if k in history or any(h.endswith("/") and k.startswith(h) for h in history)}
    return {"seed": result["seed"], "curves": result["curves"], "history": keep,
            **{k: result[k] for k in SCALARS + ("arrays", "extra") if k in result}}


def trials(runner: Runner, group: str, configs: dict[str, tuple], *,
           history: Sequence[str] = (), **options) -> dict[str, list[dict]]:
    """Every configuration ``label -> (optimizer, hp[, job options])`` on seeds 0 ..
    size.seeds - 1 (the same initialisation and batches for every configuration within a
    seed), compacted."""
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
    return [float(r[key]) for r in runs]


ACCURACIES = ("final_test_acc", "best_epoch_test_acc", "test_acc_at_best_val")


def means(runs: dict[str, list[dict]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """``key -> label -> mean over seeds`` for every configuration of ``runs``."""
    return {k: {label: float(np.mean(per_seed(rs, k))) for label, rs in runs.items()}
            for k in keys}


def slashed(values: dict[str, float], names: Sequence[str], fmt: str) -> str:
    """``values`` of ``names`` formatted with ``fmt`` and joined by " / " (a headline entry)."""
    return " / ".join(format(values[n], fmt) for n in names)
