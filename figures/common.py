"""Shared pieces of the reproductions: sizes, data, models, the training loop, saving, plots."""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from analysis import mnist1d, supervised
from analysis import Tracker, evaluate

SEED = 0


class Missing(RuntimeError):
    """A module this reproduction composes has not landed (or does not import)."""


def need(module: str, *names: str):
    """``from module import names`` or ``Missing`` naming what is absent."""
    try:
        mod = importlib.import_module(module)
        return tuple(getattr(mod, n) for n in names)
    except (ImportError, AttributeError) as err:
        raise Missing(f"{module}.{'/'.join(names)} not available: {err}") from err


@dataclass(frozen=True)
class Size:
    """How big a run is. ``quick`` is the default; ``tiny`` is for CI; ``full`` is longer."""
    name: str
    num_samples: int          # MNIST-1D samples (80% train, 20% test)
    epochs: int               # training epochs of a standard run
    batch_size: int
    width: int                # hidden width of the MLP
    every: int                # Tracker interval (steps)
    curvature_samples: int    # training samples used for Hessian quantities
    lanczos_max_hvp: int      # per warm-started Lanczos run while training
    final_max_hvp: int        # for the converged lambda_max at the end
    trace_n_hvp: int
    sharpness_steps: int      # ascent steps of worst_case_sharpness
    grid: int                 # points per axis of 2D surfaces
    line_points: int          # points of 1D surfaces
    density_lanczos: int      # Lanczos steps per vector of the spectral density
    density_vectors: int
    speedup_steps: int        # iterations of each batch size in the AdaSAM speed-up study
    toy_steps: int            # iterations on the 2D test function
    seeds: int                # seeds (initialisation and batch order) of each compared run


SIZES = {
    "tiny": Size("tiny", num_samples=600, epochs=2, batch_size=64, width=16, every=4,
                 curvature_samples=128, lanczos_max_hvp=8, final_max_hvp=12, trace_n_hvp=6,
                 sharpness_steps=2, grid=5, line_points=7, density_lanczos=8, density_vectors=1,
                 speedup_steps=12, toy_steps=30, seeds=1),
    "quick": Size("quick", num_samples=5000, epochs=30, batch_size=128, width=100, every=32,
                  curvature_samples=1000, lanczos_max_hvp=20, final_max_hvp=100, trace_n_hvp=60,
                  sharpness_steps=20, grid=21, line_points=41, density_lanczos=60,
                  density_vectors=4, speedup_steps=600, toy_steps=1000, seeds=2),
    "full": Size("full", num_samples=5000, epochs=100, batch_size=128, width=100, every=64,
                 curvature_samples=4000, lanczos_max_hvp=30, final_max_hvp=200, trace_n_hvp=150,
                 sharpness_steps=50, grid=41, line_points=81, density_lanczos=100,
                 density_vectors=10, speedup_steps=2000, toy_steps=3000, seeds=3),
}


# -- data and models --------------------------------------------------------------------------
def dataset(size: Size):
    """MNIST-1D generated offline (seed 42, the canonical one at 5000 samples)."""
    return mnist1d(num_samples=size.num_samples)


def train_batches(ds, size: Size, epoch: int, batch_size: int | None = None, seed: int = SEED
                  ) -> list:
    """The shuffled training batches of one epoch: the same for every optimizer."""
    return ds.batches(batch_size or size.batch_size, shuffle_seed=1000 * seed + epoch)


def eval_batches(ds, size: Size) -> dict[str, list]:
    """Fixed batches for tracking: training loss/accuracy, test, and curvature data."""
    return {"eval_data": ds.batches(1000, limit=None),
            "test_data": ds.batches(1000, split="test"),
            "curvature_data": ds.batches(size.curvature_samples, limit=size.curvature_samples)}


def mlp(size: Size, *, seed: int = SEED, batchnorm: bool = False, head: nn.Module | None = None,
        dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """40 -> width -> width -> 10 ReLU MLP (optionally Linear-BN-ReLU blocks and a ``head``
    after the logits, e.g. ND-Adam's BN-softmax). The initialisation is drawn from ``seed``;
    the caller's global random state is left as it was."""
    layers: list[nn.Module] = []
    sizes = [40, size.width, size.width]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers.append(nn.Linear(a, b))
            if batchnorm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU())
        layers.append(nn.Linear(size.width, 10))
    if head is not None:
        layers.append(head)
    return nn.Sequential(*layers).to(dtype)


CROSS_ENTROPY = supervised(nn.CrossEntropyLoss())


# -- training ---------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run: its tracker, final metrics and cost."""
    name: str
    seed: int
    tracker: Tracker
    steps: int
    passes: int
    train_time: float
    test_loss: float = math.nan
    test_acc: float = math.nan
    train_loss: float = math.nan
    train_acc: float = math.nan
    extra: dict = field(default_factory=dict)
    trajectory: list = field(default_factory=list)
    artifacts: dict = field(default_factory=dict)

    @property
    def passes_per_step(self) -> float:
        return self.passes / max(self.steps, 1)

    def metrics(self) -> dict:
        return {"test_acc": self.test_acc, "test_loss": self.test_loss,
                "train_acc": self.train_acc, "train_loss": self.train_loss,
                "steps": self.steps, "passes": self.passes,
                "passes_per_step": self.passes_per_step, "train_time_s": self.train_time,
                "tracker_overhead_s": self.tracker.overhead, **self.extra}


def cosine_schedule(opt, total_steps: int):
    """Cosine decay of every group's lr to 0 over ``total_steps``, stepped per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps)))


def train(name: str, model: nn.Module, opt, ds, size: Size, *, seed: int = SEED,
          epochs: int | None = None,
          batch_size: int | None = None, steps: int | None = None, loss_fn=CROSS_ENTROPY,
          schedule: bool = False, tracker: Tracker | None = None, evaluator=None,
          checkpoint_every: int | None = None, **tracker_kwargs) -> Run:
    """Train with ``loss = opt.step(closure)``; the same batches in the same order for every
    optimizer (the order set by ``seed``). ``steps`` (if given) caps the iterations. The final
    metrics come from ``evaluator(model, opt)`` when given (SALA/Lookahead evaluate their slow
    weights).
    ``checkpoint_every``: keep a copy of the state_dict at step 0 and every that many steps."""
    data = eval_batches(ds, size)
    if tracker is None:
        kwargs = {"every": size.every, "eval_data": data["eval_data"],
                  "test_data": data["test_data"], "curvature_data": data["curvature_data"],
                  "lanczos_max_hvp": size.lanczos_max_hvp, "trace_n_hvp": size.trace_n_hvp,
                  "seed": SEED}
        kwargs.update(tracker_kwargs)
        tracker = Tracker(model, loss_fn, **kwargs)
    epochs = epochs or size.epochs
    batch_size = batch_size or size.batch_size
    per_epoch = len(train_batches(ds, size, 0, batch_size, seed))
    total = steps if steps is not None else epochs * per_epoch
    scheduler = cosine_schedule(opt, total) if schedule else None
    model.train()
    trajectory = []

    def checkpoint():
        trajectory.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    if checkpoint_every:
        checkpoint()
    tracker.start()
    done, epoch = 0, 0
    while done < total:
        for batch in train_batches(ds, size, epoch, batch_size, seed):
            def closure(batch=batch):
                opt.zero_grad()
                loss = loss_fn(model, batch)
                loss.backward()
                return loss
            loss = opt.step(tracker.count(closure))
            if scheduler is not None:
                scheduler.step()
            tracker.step(opt, loss)
            done += 1
            if checkpoint_every and done % checkpoint_every == 0:
                checkpoint()
            if done >= total:
                break
        epoch += 1
    if tracker.n_steps % tracker.every:
        tracker.log(opt)
    run = Run(name, seed, tracker, steps=tracker.n_steps, passes=tracker.passes,
              train_time=tracker.train_time, trajectory=trajectory)
    final = evaluator or (lambda m, o: _final_metrics(m, loss_fn, data))
    for key, value in final(model, opt).items():
        setattr(run, key, value)
    return run


@dataclass
class Trials:
    """The runs of one configuration, one per seed; curves are drawn from the first."""
    name: str
    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    def values(self, key: str) -> list[float]:
        """``key`` (a Run attribute or an ``extra`` entry) of each seed's run."""
        return [float(r.extra[key] if key in r.extra else getattr(r, key)) for r in self.runs]

    def mean(self, key: str) -> float:
        return float(np.mean(self.values(key)))

    @property
    def test_acc(self) -> float:
        return self.mean("test_acc")

    def curve_mean(self, key: str) -> float:
        """The mean over seeds of the mean of ``key`` over each run's records; records where it
        is undefined (NaN, e.g. a cosine with a zero update at the end of a decayed schedule)
        are left out."""
        return float(np.mean([np.nanmean(r.tracker.history(key)[1]) for r in self.runs]))


def trials(name: str, make_model: Callable[[int], nn.Module], make_opt: Callable[[nn.Module], Any],
           ds, size: Size, *, seeds: int | None = None,
           after: Callable[[nn.Module, Run], None] | None = None, **train_kwargs) -> Trials:
    """``train`` once per seed (model ``make_model(seed)``, batch order ``seed``); ``after(model,
    run)`` measures at the solution (slow weights for Lookahead/SALA), writing numbers to
    ``run.extra`` and other results to ``run.artifacts``."""
    runs = []
    for seed in range(SEED, SEED + (seeds or size.seeds)):
        model = make_model(seed)
        opt = make_opt(model)
        run = train(name, model, opt, ds, size, seed=seed, **train_kwargs)
        if after is not None:
            with solution(opt):
                after(model, run)
        runs.append(run)
    return Trials(name, runs)


def _final_metrics(model, loss_fn, data) -> dict:
    test_loss, test_acc = evaluate(model, loss_fn, data["test_data"], progress=False)
    train_loss, train_acc = evaluate(model, loss_fn, data["eval_data"], progress=False)
    return {"test_loss": test_loss, "test_acc": test_acc, "train_loss": train_loss,
            "train_acc": train_acc}


def final_metrics(model, ds, size: Size, loss_fn=CROSS_ENTROPY) -> dict:
    """Test and train loss/accuracy of ``model`` as it is."""
    return _final_metrics(model, loss_fn, eval_batches(ds, size))


@contextlib.contextmanager
def solution(opt):
    """The weights to evaluate: the slow weights of Lookahead/SALA, else the model as it is."""
    with opt.slow_weights() if hasattr(opt, "slow_weights") else contextlib.nullcontext():
        yield


def slow_evaluator(ds, size: Size, loss_fn=CROSS_ENTROPY):
    """Final metrics at ``solution(opt)``."""
    def evaluator(model, opt):
        with solution(opt):
            return final_metrics(model, ds, size, loss_fn)
    return evaluator


def sharpness_report(model, ds, size: Size, *, rho: float = 0.05, loss_fn=CROSS_ENTROPY) -> dict:
    """lambda_max (Lanczos), the Hessian trace (Hutch++) and the worst-case sharpness at rho,
    all on the curvature subset of the training data, and the HVPs spent."""
    (top_eigenvalues,) = need("analysis", "top_eigenvalues")
    data = eval_batches(ds, size)["curvature_data"]
    eig = top_eigenvalues(model, loss_fn, data, k=1, tol=1e-4, max_hvp=size.final_max_hvp,
                          seed=SEED, progress=False)
    (hessian_trace, worst_case_sharpness) = need("analysis", "hessian_trace",
                                                 "worst_case_sharpness")
    tr = hessian_trace(model, loss_fn, data, n_hvp=size.trace_n_hvp, seed=SEED, progress=False)
    wc = worst_case_sharpness(model, loss_fn, data, rho=rho, steps=size.sharpness_steps,
                              seed=SEED, progress=False)
    return {"lambda_max": float(eig.eigenvalues[0]), "lambda_max_converged": float(eig.converged),
            "trace": float(tr.estimate), "trace_stderr": float(tr.stderr),
            "worst_case_sharpness": float(wc.value), "n_hvp": int(eig.n_hvp) + int(tr.n_hvp)}


# -- saving and plotting -------------------------------------------------------------------------
def versions() -> dict:
    import matplotlib
    import scipy
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__,
            "matplotlib": matplotlib.__version__}


def save_result(out: Path, stem: str, arrays: dict[str, Any], config: dict) -> None:
    """``stem.npz`` (the arrays) + ``stem.json`` (seed, config, versions) for re-plotting."""
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"{stem}.npz", **{k: np.asarray(v) for k, v in arrays.items()})
    meta = {"seed": SEED, "config": config, "versions": versions(),
            "arrays": sorted(arrays)}
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=1, default=str))


def save_runs(out: Path, stem: str, groups: list[Trials], size: Size, config: dict) -> None:
    """Each run's tracker log (JSON+CSV) under ``out/logs`` and the final metrics."""
    logs = out / "logs"
    for run in (r for t in groups for r in t.runs):
        run.tracker.save(logs / f"{stem}_{slug(run.name)}_seed{run.seed}",
                         meta={"seed": run.seed, "size": asdict(size), "config": config,
                               "versions": versions(), "final": run.metrics()})


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def savefig(fig, out: Path, name: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    pyplot().close(fig)
    return name


def plot_histories(ax, runs: list[Run | Trials], key: str, ylabel: str, *, logy: bool = False
                   ) -> None:
    """``key`` against training step for each run (the first seed of a Trials), on one axis."""
    for run in runs:
        run = getattr(run, "first", run)
        steps, values = run.tracker.history(key)
        if steps:
            ax.plot(steps, values, label=run.name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def entry(claim: str, measured: dict, checks: dict[str, bool], figure: str, **extra) -> dict:
    """A summary.json entry: holds is true only when every check in the stated rule passes."""
    measured = {**measured, "checks": {k: bool(v) for k, v in checks.items()}}
    return {"claim": claim, "measured": _clean(measured), "holds": all(checks.values()),
            "figure": figure, **extra}


def not_available(claim: str, reason: str, figure: str | None = None) -> dict:
    """An entry whose measurement could not be made: holds is null with the reason."""
    return {"claim": claim, "measured": {}, "holds": None, "reason": reason, "figure": figure}


def _clean(obj):
    """JSON-friendly numbers (6 significant digits) in nested dicts/lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(f"{float(obj):.6g}")
    return obj
