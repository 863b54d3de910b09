"""1D and 2D loss surfaces: the exact full-data ``L(w + a d1 + b d2)`` on a grid (Li et al. 2018)."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from torch import Tensor, nn

from analysis.compiled import unwrap_compiled
from analysis.protocol import LossFn
from analysis.restore import check_model_mode

from .directions import Direction, check_direction, named_targets
from .evaluate import check_coords, evaluate_points, fmt
from .results import LineResult, PlaneResult, Progress, make_metadata


def _surface(kind: str, model: nn.Module, loss_fn: LossFn, data,
             directions: Sequence[Mapping[str, Tensor]], axes: Sequence[np.ndarray],
             model_mode: str, path, options: dict) -> Progress:
    """Evaluate ``L(w + sum_k x_k d_k)`` on the grid ``axes`` (last axis fastest)."""
    check_model_mode(model_mode)
    model = unwrap_compiled(model)
    dirs = [Direction(check_direction(model, d, f"d{k + 1}" if len(directions) > 1 else "direction"),
                      getattr(d, "info", None)) for k, d in enumerate(directions)]
    names = list(dict.fromkeys(n for d in dirs for n in d))
    targets = named_targets(model)
    origin = {n: targets[n].detach().clone() for n in names}
    grid = np.meshgrid(*axes[::-1], indexing="ij")[::-1]  # [len(ys), len(xs)] for a plane
    coords = np.stack([np.ones(grid[0].size)] + [g.reshape(-1) for g in grid], axis=1)
    config = {"model_mode": model_mode, "names": names,
              "shape": [len(a) for a in axes[::-1]]}
    arrays = dict(zip(("alphas",) if kind == "line" else ("xs", "ys"), axes))
    meta = make_metadata(kind, dirs, origin, axes, config)
    store = Progress(path, arrays, tuple(len(a) for a in axes[::-1]), meta)
    labels = ("alpha",) if kind == "line" else ("x", "y")

    def describe(i: int) -> str:
        return "grid point (" + ", ".join(f"{lab}={fmt(c)}" for lab, c in zip(labels, coords[i, 1:])) + ")"

    evaluate_points(model, loss_fn, data, [origin, *dirs], coords, store, describe,
                    model_mode=model_mode, desc=kind, **options)
    return store


def line(model: nn.Module, loss_fn: LossFn, data, direction: Mapping[str, Tensor], alphas, *,
         model_mode: str = "eval", path: str | os.PathLike | None = None, **options) -> LineResult:
    """``L(w + alpha d)`` for each alpha: the exact sample-weighted mean loss over ``data``.

    direction: dict name -> tensor (e.g. ``random_direction``); names left out stay fixed.
    model_mode: "eval" (default; BatchNorm uses running statistics) or "train".
    path: an .npz file written after every chunk; an existing file of the same computation
        is resumed (finished points are not recomputed).
    options: chunk_size, max_memory, vectorize, distribute, batch_size_fn, progress
        (see ``landscape.evaluate.evaluate_points``).
    The model is left unchanged.
    """
    alphas = check_coords(alphas, "alphas")
    store = _surface("line", model, loss_fn, data, [direction], [alphas], model_mode, path, options)
    return LineResult(alphas, store.losses, store.n_forward, store.meta)


def plane(model: nn.Module, loss_fn: LossFn, data, d1: Mapping[str, Tensor], d2: Mapping[str, Tensor],
          xs, ys, *, model_mode: str = "eval", path: str | os.PathLike | None = None,
          **options) -> PlaneResult:
    """``L(w + x d1 + y d2)`` on the grid ``xs`` x ``ys``; ``losses[i, j]`` is at ``(xs[j], ys[i])``.

    Same keywords as :func:`line`. Under torch.distributed, ``distribute="grid"`` splits the
    grid points across ranks (each rank holding all the data); the default splits the data.
    """
    xs, ys = check_coords(xs, "xs"), check_coords(ys, "ys")
    store = _surface("plane", model, loss_fn, data, [d1, d2], [xs, ys], model_mode, path, options)
    return PlaneResult(xs, ys, store.losses, store.n_forward, store.meta)
