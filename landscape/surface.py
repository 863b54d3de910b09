"""1D and 2D loss surfaces: the exact full-data ``L(w + a d1 + b d2)`` on a grid (Li et al. 2018)."""
from __future__ import annotations

import os
from functools import partial
from typing import Mapping, Sequence

import numpy as np
from torch import Tensor, nn

from analysis.core import (BatchSizeFn, check_model_mode, guarded, LossFn, ParamSelection,
                           select_params, unwrap_compiled)

from .directions import Direction, check_direction, named_targets
from .points import DEFAULT_MAX_MEMORY, check_coords, evaluate_points, fmt
from .stacked import fixed_passes
from .results import data_probe, LineResult, PlaneResult, Progress, surface_metadata


def moving(model: nn.Module, params: ParamSelection, direction: dict[str, Tensor], argname: str
           ) -> dict[str, Tensor]:
    """``direction`` restricted to the parameters ``params`` selects (all of it for None)."""
    if params is None:
        return direction
    chosen = set(select_params(model, params)[0])
    out = {n: t for n, t in direction.items() if n in chosen}
    if not out:
        raise ValueError(f"{argname} moves none of the parameters params selects")
    return out


def _surface(kind: str, model: nn.Module, loss_fn: LossFn, data,
             directions: Sequence[Mapping[str, Tensor]], axes: Sequence[np.ndarray],
             params: ParamSelection, model_mode: str, path, build, options: dict) -> Progress:
    """Evaluate ``L(w + sum_k x_k d_k)`` on the grid ``axes`` (last axis fastest)."""
    check_model_mode(model_mode)
    model = unwrap_compiled(model)
    labels = [f"d{k + 1}" if len(directions) > 1 else "direction" for k in range(len(directions))]
    dirs = [Direction(moving(model, params, check_direction(model, d, lab), lab),
                      getattr(d, "info", None)) for d, lab in zip(directions, labels)]
    names = list(dict.fromkeys(n for d in dirs for n in d))
    targets = named_targets(model)
    origin = {n: targets[n].detach().clone() for n in names}
    grid = np.meshgrid(*axes[::-1], indexing="ij")[::-1]  # [len(ys), len(xs)] for a plane
    coords = np.stack([np.ones(grid[0].size)] + [g.reshape(-1) for g in grid], axis=1)
    config = {"model_mode": model_mode, "names": names,
              "shape": [len(a) for a in axes[::-1]]}
    meta = surface_metadata(kind, dirs, origin, axes, config)
    probe = partial(data_probe, model, loss_fn, data, model_mode, options["batch_size_fn"])
    store = Progress(path, tuple(len(a) for a in axes[::-1]), meta, build, probe=probe)
    labels = ("alpha",) if kind == "line" else ("x", "y")

    def describe(i: int) -> str:
        return "grid point (" + ", ".join(f"{lab}={fmt(c)}" for lab, c in zip(labels, coords[i, 1:])) + ")"

    evaluate_points(model, loss_fn, data, [origin, *dirs], coords, store, describe,
                    model_mode=model_mode, desc=kind, **options)
    return store


@guarded(known_deterministic=fixed_passes)
def line(model: nn.Module, loss_fn: LossFn, data, direction: Mapping[str, Tensor], alphas, *,
         params: ParamSelection = None, model_mode: str = "eval",
         batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
         path: str | os.PathLike | None = None, chunk_size: int | None = None,
         max_memory: int = DEFAULT_MAX_MEMORY, vectorize: bool | str = "auto",
         distribute: str = "data", check_deterministic: bool = True) -> LineResult:
    """``L(w + alpha d)`` for each alpha: the exact sample-weighted mean loss over ``data``.

    direction: dict name -> tensor (e.g. ``random_direction``); names left out stay fixed.
    params: only the selected parameters move (default: all the direction names).
    model_mode: "eval" (default; BatchNorm uses running statistics) or "train".
    path: an .npz result file written after every chunk; an existing file of the same
        computation is resumed (finished points are not recomputed). Resuming checks the
        directions, weights, coordinates, config, the data's sample count and first/last
        batches and the loss at the origin (one extra pass over the data, one forward), and
        refuses a file of another computation.
    chunk_size, max_memory, vectorize, distribute: how points are batched and shared
        (see ``landscape.points.evaluate_points``).
    check_deterministic: first check that two passes over ``data`` agree (two forward passes:
        each chunk of points is one pass). Skipped where its answer is known: ``data`` a list
        or tuple of ``(x, y, ...)`` tensor batches, the default batch sizes, and a model and
        loss of the stacked path without randomness in ``model_mode`` (a hook-free
        ``nn.Sequential`` of its layers and a ``supervised`` torch criterion, see
        ``landscape.stacked.fixed_passes``).
    The model is left unchanged.
    """
    alphas = check_coords(alphas, "alphas")
    options = dict(batch_size_fn=batch_size_fn, progress=progress, chunk_size=chunk_size,
                   max_memory=max_memory, vectorize=vectorize, distribute=distribute)
    store = _surface("line", model, loss_fn, data, [direction], [alphas], params, model_mode, path,
                     lambda losses, n, meta: LineResult(alphas, losses, n, meta), options)
    return store.result(complete=True)


@guarded(known_deterministic=fixed_passes)
def plane(model: nn.Module, loss_fn: LossFn, data, d1: Mapping[str, Tensor], d2: Mapping[str, Tensor],
          xs, ys, *, params: ParamSelection = None, model_mode: str = "eval",
          batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
          path: str | os.PathLike | None = None, chunk_size: int | None = None,
          max_memory: int = DEFAULT_MAX_MEMORY, vectorize: bool | str = "auto",
          distribute: str = "data", check_deterministic: bool = True) -> PlaneResult:
    """``L(w + x d1 + y d2)`` on the grid ``xs`` x ``ys``; ``losses[i, j]`` is at ``(xs[j], ys[i])``.

    Same keywords as :func:`line`. Under torch.distributed, ``distribute="grid"`` splits the
    grid points across ranks (each rank holding all the data); the default splits the data.
    """
    xs, ys = check_coords(xs, "xs"), check_coords(ys, "ys")
    options = dict(batch_size_fn=batch_size_fn, progress=progress, chunk_size=chunk_size,
                   max_memory=max_memory, vectorize=vectorize, distribute=distribute)
    store = _surface("plane", model, loss_fn, data, [d1, d2], [xs, ys], params, model_mode, path,
                     lambda losses, n, meta: PlaneResult(xs, ys, losses, n, meta), options)
    return store.result(complete=True)
