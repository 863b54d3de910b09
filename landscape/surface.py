r"""1D and 2D loss surfaces: the exact full-data $L(w + a d_1 + b d_2)$ on a grid.

Li et al. 2018, Sec. 3: $f(\alpha) = L(w + \alpha d)$ along one direction and
$f(\alpha, \beta) = L(w + \alpha d_1 + \beta d_2)$ on a plane.
"""
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
    """``direction`` restricted to the parameters ``params`` selects (all of it for None).

    Args:
        model: the model.
        params: the parameter selection (names, tensors, a predicate or None).
        direction: the validated direction.
        argname: the direction's name in the error message.

    Returns:
        The entries of ``direction`` that ``params`` selects.

    Raises:
        ValueError: none of the direction's entries is selected.
    """
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
        named = ", ".join(f"{lab}={fmt(c)}" for lab, c in zip(labels, coords[i, 1:]))
        return f"grid point ({named})"

    evaluate_points(model, loss_fn, data, [origin, *dirs], coords, store, describe,
                    model_mode=model_mode, desc=kind, **options)
    return store


@guarded(known_deterministic=fixed_passes, sharded=True)
def line(model: nn.Module, loss_fn: LossFn, data, direction: Mapping[str, Tensor], alphas, *,
         params: ParamSelection = None, model_mode: str = "eval",
         batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
         path: str | os.PathLike | None = None, chunk_size: int | None = None,
         max_memory: int = DEFAULT_MAX_MEMORY, vectorize: bool | str = "auto",
         distribute: str = "data", check_deterministic: bool = True) -> LineResult:
    r"""$f(\alpha) = L(w + \alpha d)$ for each alpha: the exact sample-weighted mean loss.

    Li et al. 2018, Sec. 3, at the model's weights $w$ along ``direction`` $d$, with $L$ the
    mean of ``loss_fn`` over all samples of ``data`` (the total loss for a sum-reduced
    ``loss_fn``). The model is left unchanged. A model sharded with FSDP2's ``fully_shard``:
    each rank passes its data shard, the directions are DTensors placed like the parameters
    (or full tensors, the same on every rank), each point is formed on the local shards and
    evaluated without writing to the model (:class:`landscape.points.ShardedPoints`).

    Args:
        model: the model; its weights are the origin $w$.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: the iterable of batches.
        direction: dict name -> tensor (e.g. ``random_direction``); names left out stay fixed.
        alphas: the coordinates, a non-empty 1-D sequence of finite numbers.
        params: only the selected parameters move (default: all the direction names).
        model_mode: "eval" (default; BatchNorm uses running statistics) or "train".
        batch_size_fn: the sample count of a batch (default: the leading dimension).
        progress: show a progress bar.
        path: an .npz result file written after every chunk; an existing file of the same
            computation is resumed (finished points are not recomputed). Resuming checks the
            directions, weights, coordinates, config, the data's sample count and first/last
            batches and the loss at the origin (one extra pass over the data, one forward),
            and refuses a file of another computation.
        chunk_size: points per chunk (default: sized by ``max_memory``; see
            :func:`landscape.points.evaluate_points`).
        max_memory: bytes of weights and activations per chunk of points.
        vectorize: "auto", True (vmap only) or False (point by point).
        distribute: under torch.distributed, "data" (each rank a data shard) or "grid" (each
            rank all the data and a share of the points).
        check_deterministic: first check that two passes over ``data`` agree (two forward
            passes: each chunk of points is one pass). Skipped where its answer is known:
            ``data`` a list or tuple of ``(x, y, ...)`` tensor batches, the default batch
            sizes, and a model and loss of the stacked path without randomness in
            ``model_mode`` (a hook-free ``nn.Sequential`` of its layers and a ``supervised``
            torch criterion, see ``landscape.stacked.fixed_passes``).

    Returns:
        The :class:`LineResult` (``losses[k]`` at ``alphas[k]``, ``n_forward``, metadata).

    Raises:
        ValueError: an invalid direction, coordinates, option or data, a non-finite loss
            (naming the point), a ``path`` file of another computation, or
            ``distribute="grid"`` on a ``fully_shard`` model.
        NotImplementedError: a direction over buffers of a ``fully_shard`` model.
    """
    alphas = check_coords(alphas, "alphas")
    options = dict(batch_size_fn=batch_size_fn, progress=progress, chunk_size=chunk_size,
                   max_memory=max_memory, vectorize=vectorize, distribute=distribute)
    store = _surface("line", model, loss_fn, data, [direction], [alphas], params, model_mode, path,
                     lambda losses, n, meta: LineResult(alphas, losses, n, meta), options)
    return store.result(complete=True)


@guarded(known_deterministic=fixed_passes, sharded=True)
def plane(model: nn.Module, loss_fn: LossFn, data, d1: Mapping[str, Tensor],
          d2: Mapping[str, Tensor], xs, ys, *, params: ParamSelection = None,
          model_mode: str = "eval",
          batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
          path: str | os.PathLike | None = None, chunk_size: int | None = None,
          max_memory: int = DEFAULT_MAX_MEMORY, vectorize: bool | str = "auto",
          distribute: str = "data", check_deterministic: bool = True) -> PlaneResult:
    r"""$f(x, y) = L(w + x d_1 + y d_2)$ on the grid ``xs`` x ``ys`` (Li et al. 2018, Sec. 3).

    ``losses[i, j]`` is at ``(xs[j], ys[i])``. Under torch.distributed,
    ``distribute="grid"`` splits the grid points across ranks (each rank holding all the
    data); the default splits the data. The model is left unchanged.

    Args:
        model: the model; its weights are the origin $w$.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: the iterable of batches.
        d1: the first direction (the x axis), dict name -> tensor.
        d2: the second direction (the y axis).
        xs: the x coordinates, a non-empty 1-D sequence of finite numbers.
        ys: the y coordinates, the same.
        params: only the selected parameters move (default: all the directions' names).
        model_mode: "eval" (default) or "train".
        batch_size_fn: the sample count of a batch (default: the leading dimension).
        progress: show a progress bar.
        path: an .npz result file, resumed as in :func:`line`.
        chunk_size: points per chunk, as in :func:`line`.
        max_memory: bytes of weights and activations per chunk of points.
        vectorize: "auto", True (vmap only) or False (point by point).
        distribute: "data" or "grid", as in :func:`line`.
        check_deterministic: as in :func:`line`.

    Returns:
        The :class:`PlaneResult`, ``losses`` of shape ``[len(ys), len(xs)]``.

    Raises:
        ValueError: as :func:`line`.
    """
    xs, ys = check_coords(xs, "xs"), check_coords(ys, "ys")
    options = dict(batch_size_fn=batch_size_fn, progress=progress, chunk_size=chunk_size,
                   max_memory=max_memory, vectorize=vectorize, distribute=distribute)
    store = _surface("plane", model, loss_fn, data, [d1, d2], [xs, ys], params, model_mode, path,
                     lambda losses, n, meta: PlaneResult(xs, ys, losses, n, meta), options)
    return store.result(complete=True)
