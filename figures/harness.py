"""The training harness of the reproductions: sizes, data splits, the model, optimizers by name,
one training run per ``Job``, runs in parallel over processes, and grid searches on validation."""
from __future__ import annotations

import contextlib
import importlib
import itertools
import math
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

import optim
from analysis import Tracker, mnist1d, supervised

from .measure import accuracy, sharpness, slices, vector_cosine

CROSS_ENTROPY = supervised(nn.CrossEntropyLoss())


@dataclass(frozen=True)
class Size:
    """How big a run is: ``quick`` (the default), ``tiny`` (CI) or ``full`` (more seeds)."""
    name: str
    n_train: int              # MNIST-1D training samples, of which the last n_val are validation
    n_val: int
    n_test: int
    epochs: int
    batch_size: int
    width: int                # hidden width of the MLP
    every: int                # Tracker interval (steps)
    curvature_samples: int    # training samples for Hessian quantities and gradient norms
    lanczos_max_hvp: int      # per warm-started Lanczos run while training
    final_max_hvp: int        # for lambda_max at the end
    trace_n_hvp: int
    sharpness_steps: int      # ascent steps of worst_case_sharpness
    grid: int                 # points per axis of 2D surfaces
    line_points: int          # points of 1D surfaces
    density_lanczos: int
    density_vectors: int
    speedup_steps: int        # iterations T of each batch size in the AdaSAM study
    toy_steps: int            # iterations on Beale's function
    select_seeds: int         # seeds of every grid point in a search on validation
    seeds: int                # seeds of each compared configuration
    extend: int               # how often a grid may grow past an optimum at its edge


SIZES = {
    "tiny": Size("tiny", n_train=600, n_val=200, n_test=1000, epochs=2, batch_size=64, width=16,
                 every=4, curvature_samples=128, lanczos_max_hvp=8, final_max_hvp=12,
                 trace_n_hvp=6, sharpness_steps=2, grid=5, line_points=7, density_lanczos=8,
                 density_vectors=1, speedup_steps=12, toy_steps=30, select_seeds=1, seeds=2,
                 extend=1),
    "quick": Size("quick", n_train=4000, n_val=800, n_test=20000, epochs=25, batch_size=128,
                  width=100, every=25, curvature_samples=1000, lanczos_max_hvp=20,
                  final_max_hvp=100, trace_n_hvp=60, sharpness_steps=10, grid=21, line_points=41,
                  density_lanczos=60, density_vectors=4, speedup_steps=400, toy_steps=1000,
                  select_seeds=2, seeds=8, extend=3),
    "full": Size("full", n_train=4000, n_val=800, n_test=20000, epochs=60, batch_size=128,
                 width=100, every=50, curvature_samples=2000, lanczos_max_hvp=30,
                 final_max_hvp=200, trace_n_hvp=150, sharpness_steps=20, grid=41, line_points=81,
                 density_lanczos=100, density_vectors=10, speedup_steps=1500, toy_steps=3000,
                 select_seeds=4, seeds=30, extend=3),
}


# -- data and model ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """Training (fit), validation (carved from the training data) and test tensors."""
    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def batches(self, batch_size: int, seed: int, epoch: int) -> list[tuple]:
        """The shuffled training batches of one epoch, the same for every optimizer of a seed."""
        gen = torch.Generator().manual_seed(1000 * seed + epoch)
        perm = torch.randperm(len(self.y), generator=gen)
        return [(self.x[perm[i:i + batch_size]], self.y[perm[i:i + batch_size]])
                for i in range(0, len(perm), batch_size)]

    def curvature(self, n: int) -> list[tuple]:
        """The first ``n`` training samples as one batch (Hessian quantities, gradient norms)."""
        return [(self.x[:n], self.y[:n])]


@lru_cache(maxsize=2)
def split(size: Size) -> Split:
    """MNIST-1D generated offline (seed 42): ``n_train + n_test`` samples re-split so that the
    test set is large (the generator's samples are i.i.d. and shuffled)."""
    ds = mnist1d(num_samples=size.n_train + size.n_test)
    x, y = torch.cat([ds.x, ds.x_test]), torch.cat([ds.y, ds.y_test])
    fit = size.n_train - size.n_val
    return Split(x[:fit], y[:fit], x[fit:size.n_train], y[fit:size.n_train],
                 x[size.n_train:], y[size.n_train:])


def mlp(size: Size, seed: int, *, batchnorm: bool = False, head_scale: float | None = None
        ) -> nn.Sequential:
    """40 -> width -> width -> 10 ReLU MLP (optionally Linear-BN-ReLU blocks and ND-Adam's
    BN-softmax head of scale ``head_scale``), initialised from ``seed``; the global random
    state is left as it was."""
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for a, b in ((40, size.width), (size.width, size.width)):
            layers += [nn.Linear(a, b)] + ([nn.BatchNorm1d(b)] if batchnorm else []) + [nn.ReLU()]
        layers.append(nn.Linear(size.width, 10))
    if head_scale is not None:
        layers.append(optim.BNSoftmax(10, scale=head_scale))
    return nn.Sequential(*layers)


# -- optimizers by name -----------------------------------------------------------------------
def _sgd(params, hp: dict):
    return torch.optim.SGD(params, lr=hp["lr"], momentum=hp.get("momentum", 0.9),
                           weight_decay=hp.get("weight_decay", 0.0))


def _ndadam(model: nn.Module, hp: dict):
    optim.normalize_vectors_(model.parameters())        # start on the unit sphere (Sec. 3)
    vectors = [p for p in model.parameters() if p.dim() >= 2]
    scalars = [p for p in model.parameters() if p.dim() < 2]
    return optim.NDAdam([{"params": vectors, "lr": hp["lr"]},
                         {"params": scalars, "lr": hp["scalar_lr"]}])


OPTIMIZERS: dict[str, Callable[[nn.Module, dict], Any]] = {
    "SGD": lambda m, hp: _sgd(m.parameters(), hp),
    "Adam": lambda m, hp: torch.optim.Adam(m.parameters(), lr=hp["lr"]),
    "AMSGrad": lambda m, hp: torch.optim.Adam(m.parameters(), lr=hp["lr"], amsgrad=True),
    "AGD": lambda m, hp: optim.AGD(m.parameters(), lr=hp["lr"], delta=hp["delta"]),
    "SAM": lambda m, hp: optim.SAM(_sgd(m.parameters(), hp), rho=hp["rho"]),
    "WSAM": lambda m, hp: optim.WSAM(_sgd(m.parameters(), hp), rho=hp["rho"], gamma=hp["gamma"]),
    "AdaSAM": lambda m, hp: optim.AdaSAM(m.parameters(), lr=hp["lr"], rho=hp["rho"]),
    "Lookahead": lambda m, hp: optim.Lookahead(_sgd(m.parameters(), hp), k=hp["k"],
                                               alpha=hp["alpha"]),
    "SALA": lambda m, hp: optim.SALA(_sgd(m.parameters(), hp), k=hp["k"], alpha=hp["alpha"],
                                     rho=hp["rho"]),
    "NDAdam": _ndadam,
}


@contextlib.contextmanager
def solution(opt):
    """The weights to evaluate: the slow weights of Lookahead/SALA, else the model as it is."""
    with opt.slow_weights() if hasattr(opt, "slow_weights") else contextlib.nullcontext():
        yield


# -- one training run -------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One training run: optimizer ``opt`` with hyperparameters ``hp`` from the initialisation
    and batch order of ``seed``. ``track``: Tracker curves ("lambda_max", "grad_norm",
    "layers", "vector_cosine") and "trajectory" (a state_dict every ``every`` steps);
    ``measure``: at the solution, "sharpness", "slices", or "module:function" called as
    ``function(model, loss_fn, curvature_data, size, trajectory) -> (numbers, arrays)``."""
    group: str = field(compare=False)
    label: str = field(compare=False)
    opt: str
    hp: tuple
    seed: int
    batch_size: int | None = None
    steps: int | None = None          # a fixed number of iterations instead of epochs
    schedule: str = "cosine"          # or "constant"
    batchnorm: bool = False
    head_scale: float | None = None
    track: tuple = ()
    measure: tuple = ()

    @property
    def params(self) -> dict:
        return dict(self.hp)


def job(group: str, label: str, opt: str, seed: int, hp: dict, **options) -> Job:
    return Job(group, label, opt, tuple(sorted(hp.items())), seed, **options)


def execute(jb: Job, size: Size) -> dict:
    """Train ``jb``; return its per-epoch validation/test accuracy, final metrics, counted
    passes, the tracked curves and the measurements at the solution (a picklable dict)."""
    began = time.perf_counter()
    data = split(size)
    model = mlp(size, jb.seed, batchnorm=jb.batchnorm, head_scale=jb.head_scale)
    opt = OPTIMIZERS[jb.opt](model, jb.params)
    curvature = data.curvature(size.curvature_samples)
    every = max(1, jb.steps // 40) if jb.steps else size.every
    tracker = Tracker(model, CROSS_ENTROPY, every=every, curvature_data=curvature,
                      lambda_max="lambda_max" in jb.track, grad_norm="grad_norm" in jb.track,
                      layers="layers" in jb.track, lanczos_max_hvp=size.lanczos_max_hvp, seed=0)
    batch_size = jb.batch_size or size.batch_size
    per_epoch = math.ceil(len(data.y) / batch_size)
    total = jb.steps or size.epochs * per_epoch
    scheduler = (torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total)))
        if jb.schedule == "cosine" else None)
    curves: dict[str, list] = {"epoch": [], "val_acc": [], "test_acc": [], "train_loss": []}
    cosines: list[list[float]] = [[], []]

    def evaluate(epoch: int, losses: list) -> None:
        with solution(opt):
            curves["val_acc"].append(accuracy(model, data.x_val, data.y_val))
            curves["test_acc"].append(accuracy(model, data.x_test, data.y_test))
        curves["epoch"].append(epoch)
        curves["train_loss"].append(float(np.mean([float(v) for v in losses])))

    trajectory: list[dict] = []

    def checkpoint() -> None:
        if "trajectory" in jb.track:
            trajectory.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    checkpoint()
    model.train()
    tracker.start()
    done, epoch = 0, 0
    while done < total:
        losses = []
        for batch in data.batches(batch_size, jb.seed, epoch):
            def closure(batch=batch):
                opt.zero_grad()
                loss = CROSS_ENTROPY(model, batch)
                loss.backward()
                return loss
            probe = "vector_cosine" in jb.track and (done + 1) % every == 0
            before = [p.detach().clone() for p in model.parameters()] if probe else None
            loss = opt.step(tracker.count(closure))
            if probe:
                cosines[0].append(done + 1)
                cosines[1].append(vector_cosine(model, opt, before))
            if scheduler is not None:
                scheduler.step()
            tracker.step(opt, loss)
            losses.append(loss.detach())
            done += 1
            if done % every == 0:
                checkpoint()
            if done >= total:
                break
        epoch += 1
        if not jb.steps or done >= total:
            evaluate(epoch, losses)
    history = {k: tracker.history(k) for k in tracker.keys() if k not in ("step",)}
    if cosines[0]:
        history["vector_cosine"] = cosines
    result = {"label": jb.label, "seed": jb.seed, "curves": curves, "history": history,
              "passes_per_step": tracker.passes / max(tracker.n_steps, 1),
              "final_val_acc": curves["val_acc"][-1], "final_test_acc": curves["test_acc"][-1],
              "best_epoch_test_acc": max(curves["test_acc"]),
              "test_acc_at_best_val": curves["test_acc"][int(np.argmax(curves["val_acc"]))]}
    with solution(opt):
        if "sharpness" in jb.measure:
            result.update(sharpness(model, CROSS_ENTROPY, curvature, size))
        if "slices" in jb.measure:
            result["arrays"] = slices(model, CROSS_ENTROPY, curvature, size)
        for name in (m for m in jb.measure if ":" in m):         # "module:function"
            module, function = name.split(":")
            numbers, arrays = getattr(importlib.import_module(module), function)(
                model, CROSS_ENTROPY, curvature, size, trajectory)
            result.setdefault("extra", {}).update(numbers)
            result.setdefault("arrays", {}).update(arrays)
    result["seconds"] = time.perf_counter() - began
    return result


def _worker_init() -> None:
    torch.set_num_threads(1)


class Runner:
    """Runs jobs (in ``workers`` processes when > 1), prints one line per finished run, and
    keeps every result so a job asked for twice (a search, then the comparison) runs once."""

    def __init__(self, size: Size, workers: int = 1):
        self.size, self.workers = size, workers
        self.done: dict[Job, dict] = {}
        self.pool = (ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                         initializer=_worker_init) if workers > 1 else None)

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
                yield jb, execute(jb, self.size)
            return
        futures = {self.pool.submit(execute, jb, self.size): jb for jb in todo}
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
           fixed: Sequence[dict] = ()) -> Search:
    """Evaluate every point of the grid ``axes`` (plus the extra points ``fixed``) on
    ``select_seeds`` seeds; while the best grid point sits on an edge of an axis, extend that
    axis geometrically by one value (at most ``size.extend`` times)."""
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
        if not any(edges.values()) or extended >= runner.size.extend:
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
