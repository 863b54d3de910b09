"""The training harness of the reproductions.

Sizes, data splits, the model, losses, optimizers by name and one training run per ``Job``.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import platform
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import optim
from analysis import Tracker, mnist1d, supervised

from .measure import accuracy, sharpness, slices, vector_cosine

CROSS_ENTROPY = supervised(nn.CrossEntropyLoss())


def square_criterion(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r"""The square loss of Cohen et al. (2021, Sec. 3).

    $\frac{1}{n}\sum_i \frac{1}{2} \lVert f(x_i) - e_{y_i} \rVert^2$ with $e_y$ the one-hot
    vector of class $y$.

    Args:
        outputs: the network outputs, shape (n, classes).
        targets: the class indices, shape (n,).

    Returns:
        The mean over samples of half the squared distance to the one-hot target.
    """
    onehot = nn.functional.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
    return 0.5 * (outputs - onehot).pow(2).sum(dim=-1).mean()


SQUARE = supervised(square_criterion)
LOSSES = {"cross_entropy": CROSS_ENTROPY, "square": SQUARE}


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


def environment(jobs: int, threads: int) -> dict:
    """What produced a result.

    CPU model, ATen's CPU capability (the kernels' float path, set by ``ATEN_CPU_CAPABILITY``),
    worker processes, torch threads per worker and versions.

    Args:
        jobs: worker processes of the run.
        threads: torch CPU threads per worker.

    Returns:
        A JSON-friendly dict.
    """
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cpu_count": os.cpu_count(),
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
            "jobs": jobs, "threads_per_worker": threads, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


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


def pooled(size: Size, n: int) -> Split:
    """Training on the first ``n`` samples of the generated data in its order.

    The order is training, validation, then test samples; for ``n`` larger than the training
    split. The next ``n_val`` samples are the validation split and the rest the test data.
    """
    data = split(size)
    x = torch.cat([data.x, data.x_val, data.x_test])
    y = torch.cat([data.y, data.y_val, data.y_test])
    if n + size.n_val >= len(y):
        raise ValueError(f"subset must leave validation and test samples, got {n} of {len(y)}")
    return Split(x[:n], y[:n], x[n:n + size.n_val], y[n:n + size.n_val],
                 x[n + size.n_val:], y[n + size.n_val:])


def subset_split(size: Size, n: int | None) -> Split:
    """The split a job with ``subset=n`` trains on.

    The first ``n`` training samples, or ``pooled`` when ``n`` exceeds the training split
    (``None``: the whole split).
    """
    data = split(size)
    if n is None:
        return data
    return replace(data, x=data.x[:n], y=data.y[:n]) if n <= len(data.y) else pooled(size, n)


@lru_cache(maxsize=2)
def split(size: Size) -> Split:
    """MNIST-1D generated offline (seed 42), re-split.

    ``n_train + n_test`` samples re-split so that the test set is large (the generator's
    samples are i.i.d. and shuffled).
    """
    ds = mnist1d(num_samples=size.n_train + size.n_test)
    x, y = torch.cat([ds.x, ds.x_test]), torch.cat([ds.y, ds.y_test])
    fit = size.n_train - size.n_val
    return Split(x[:fit], y[:fit], x[fit:size.n_train], y[fit:size.n_train],
                 x[size.n_train:], y[size.n_train:])


def mlp(size: Size, seed: int, *, batchnorm: bool = False, head_scale: float | None = None
        ) -> nn.Sequential:
    """The 40 -> width -> width -> 10 ReLU MLP.

    Optionally Linear-BN-ReLU blocks and ND-Adam's BN-softmax head of scale ``head_scale``;
    initialised from ``seed``; the global random state is left as it was.
    """
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
    """One training run.

    Optimizer ``opt`` with hyperparameters ``hp`` from the initialisation and batch order of
    ``seed``. ``track``: Tracker curves ("lambda_max", "grad_norm", "layers",
    "vector_cosine", "tangent_cosine") and "trajectory" (a state_dict every ``every`` steps);
    ``measure``: at the solution, "sharpness", "slices", or "module:function" called as
    ``function(model, loss_fn, curvature_data, size, trajectory) -> (numbers, arrays)``.
    ``subset`` larger than the training split draws on the validation and test samples
    (``pooled``); ``loss``: "cross_entropy" or "square"; ``stop_acc`` ends the run after the
    step at whose starting weights the training accuracy of its batch (the whole subset at
    full batch) first reaches it, ``steps`` being then a cap; ``every``: the Tracker interval;
    ``curvature``: the training samples of the Hessian quantities (default
    ``size.curvature_samples``).
    """
    group: str = field(compare=False)
    label: str = field(compare=False)
    opt: str
    hp: tuple
    seed: int
    batch_size: int | None = None
    steps: int | None = None          # a fixed number of iterations instead of epochs
    subset: int | None = None         # train on the first ``subset`` training samples only
    schedule: str = "cosine"          # or "constant"
    batchnorm: bool = False
    head_scale: float | None = None
    loss: str = "cross_entropy"
    stop_acc: float | None = None
    every: int | None = None
    curvature: int | None = None
    track: tuple = ()
    measure: tuple = ()

    @property
    def params(self) -> dict:
        """The hyperparameters as a dict."""
        return dict(self.hp)


def job(group: str, label: str, opt: str, seed: int, hp: dict, **options) -> Job:
    """A ``Job`` with ``hp`` given as a dict (stored sorted, so equal jobs compare equal)."""
    return Job(group, label, opt, tuple(sorted(hp.items())), seed, **options)


def execute(jb: Job, size: Size) -> dict:
    """Train ``jb``.

    Returns its per-epoch validation/test accuracy, final metrics, counted passes, the tracked
    curves and the measurements at the solution (a picklable dict).
    """
    began = time.perf_counter()
    data = subset_split(size, jb.subset)
    loss_fn = LOSSES[jb.loss]
    model = mlp(size, jb.seed, batchnorm=jb.batchnorm, head_scale=jb.head_scale)
    opt = OPTIMIZERS[jb.opt](model, jb.params)
    curvature = data.curvature(jb.curvature or size.curvature_samples)
    every = jb.every or (max(1, jb.steps // 40) if jb.steps else size.every)
    tracker = Tracker(model, loss_fn, every=every, curvature_data=curvature,
                      lambda_max="lambda_max" in jb.track, grad_norm="grad_norm" in jb.track,
                      layers="layers" in jb.track, lanczos_max_hvp=size.lanczos_max_hvp, seed=0)
    batch_size = jb.batch_size or size.batch_size
    per_epoch = math.ceil(len(data.y) / batch_size)
    total = jb.steps or size.epochs * per_epoch
    scheduler = (torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total)))
        if jb.schedule == "cosine" else None)
    curves: dict[str, list] = {"epoch": [], "val_acc": [], "test_acc": [], "train_loss": []}
    cosines = {k: [[], []] for k in ("vector_cosine", "tangent_cosine") if k in jb.track}

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
    done, epoch, train_acc = 0, 0, []
    while done < total:
        losses = []
        for batch in data.batches(batch_size, jb.seed, epoch):
            def closure(batch=batch):
                opt.zero_grad()
                outputs = model(batch[0])
                loss = loss_fn.criterion(outputs, batch[1])
                loss.backward()
                train_acc.append(float((outputs.argmax(-1) == batch[1]).double().mean()))
                return loss
            probe = bool(cosines) and (done + 1) % every == 0
            before = [p.detach().clone() for p in model.parameters()] if probe else None
            first = len(train_acc)
            loss = opt.step(tracker.count(closure))
            for key, (at, values) in cosines.items() if probe else ():
                at.append(done + 1)
                values.append(vector_cosine(model, opt, before, tangent=key == "tangent_cosine"))
            if scheduler is not None:
                scheduler.step()
            tracker.step(opt, loss)
            losses.append(loss.detach())
            done += 1
            if done % every == 0:
                checkpoint()
            if jb.stop_acc is not None and train_acc[first] >= jb.stop_acc:
                total = done           # the step whose starting weights reached it ends the run
            if done >= total:
                break
        epoch += 1
        if not jb.steps or done >= total:
            evaluate(epoch, losses)
    history = {k: tracker.history(k) for k in tracker.keys() if k not in ("step",)}
    history.update(cosines)
    result = {"label": jb.label, "seed": jb.seed, "curves": curves, "history": history,
              "steps": done, "stop_train_acc": train_acc[first],
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
    result["threads"] = torch.get_num_threads()
    result["seconds"] = time.perf_counter() - began
    return result
