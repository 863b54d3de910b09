"""Linear interpolation between two models and the loss barrier above the chord.

Goodfellow et al. 2015 (the loss along the segment), Frankle et al. 2020 and Entezari et al.
2022 (the barrier), with optional BatchNorm statistics recalibration at each point.
"""
from __future__ import annotations

import inspect
import os
from functools import partial
from typing import Iterable

import numpy as np
import torch
from torch import nn

from analysis.core import (all_reduce_sum_, BatchSizeFn, check_bool, check_data, check_loss,
                           check_model_mode, data_mean, failures_shared, guarded,
                           is_distributed, loss_reduction, LossFn, ParamSelection, preserved,
                           scalar_zeros, select_params, unwrap_compiled)

from analysis.core import refuse_sharded

from .directions import load_state, named_targets, state_buffers, state_tensors
from .points import DEFAULT_MAX_MEMORY, check_coords, combine, evaluate_points, fmt
from .results import data_probe, InterpolationResult, Progress, surface_metadata
from .stacked import fixed_passes

_BN = nn.modules.batchnorm._BatchNorm


def recalibrate_bn(model: nn.Module, loss_fn: LossFn, data: Iterable) -> int:
    r"""Recompute BatchNorm running statistics of ``model`` as the average over ``data``'s batches.

    The statistics are reset and re-estimated in train mode with a cumulative average
    (``momentum=None``), one forward per batch through ``loss_fn``: each buffer is the mean
    over the $B$ batches of the batch's statistic $s_b$ (its mean, its unbiased variance),

    $$\bar s = \frac{1}{B} \sum_{b=1}^{B} s_b .$$

    Under ``torch.distributed`` each rank passes over its shard and the sums
    $\sum_b s_b$ and batch counts are all-reduced, so every rank gets the statistics of one
    process on the union of the shards; a rank's shard may be empty (``data=[]``). The
    model's weights are used as they are; on success its BatchNorm buffers hold the new
    statistics (callers that want them back wrap this in ``analysis.core.preserved``); on any
    error (e.g. empty ``data``) the model is left exactly as it was, and an error on one rank
    is raised on every rank (:class:`analysis.core.RankError` on the others).

    Args:
        model: the model whose BatchNorm statistics are recomputed.
        loss_fn: ``loss_fn(model, batch)``, run for its forward pass (its value is unused).
        data: the iterable of batches (this rank's shard under ``torch.distributed``).

    Returns:
        The number of forward passes on this rank (0 for a model without tracked BatchNorm
        statistics).

    Raises:
        ValueError: ``data`` is not an iterable of batches, or is empty (on every rank).
    """
    refuse_sharded(model, "recalibrate_bn")
    check_data(data)
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    n = 0
    try:
        with preserved(model, "train", weights=False), torch.no_grad():
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
            with failures_shared():  # one rank's error on every rank, before the all-reduce
                for batch in data:
                    loss_fn(model, batch)
                    n += 1
            fresh = _batch_average(bns, n)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    with torch.no_grad():  # preserved put the old statistics back: install the new ones
        for m, values in zip(bns, fresh):
            for name, value in values.items():
                getattr(m, name).copy_(value)
    return n


def _batch_average(bns: list[nn.Module], n: int) -> list[dict[str, torch.Tensor]]:
    """The BatchNorm statistics averaged over the batches of every rank.

    Each module holds the average over this rank's ``n`` batches; the sums (average times
    ``n``, in float64) and the counts are all-reduced in one call.

    Raises:
        ValueError: No rank had a batch.
    """
    sums = [getattr(m, name).to(torch.float64) * n for m in bns
            for name in ("running_mean", "running_var")]
    count = torch.tensor([float(n)], dtype=torch.float64)
    all_reduce_sum_([*sums, count])
    total = int(count.item())
    if total == 0:
        raise ValueError("bn_data is empty" + (" on every rank" if is_distributed() else "")
                         + ": BatchNorm statistics cannot be recalibrated")
    return [{"running_mean": mean / total, "running_var": var / total,
             "num_batches_tracked": torch.tensor(total)}
            for mean, var in zip(sums[::2], sums[1::2])]


def _moved_buffers(model: nn.Module, buffers: bool, bn_data: Iterable | None) -> list[str]:
    """The floating buffers the points move (BatchNorm statistics), refused on a sharded model.

    Raises:
        NotImplementedError: ``model`` is sharded with ``fully_shard`` and has such buffers
            to interpolate, or ``bn_data`` is given (its points move parameters only).
    """
    if not buffers and bn_data is None:
        return []
    names = state_buffers(model)
    if names or bn_data is not None:
        refuse_sharded(model, "interpolate with bn_data= or buffers=True (BatchNorm statistics)")
    return names


@guarded(known_deterministic=fixed_passes, sharded=True)
def interpolate(model_a: nn.Module, model_b, loss_fn: LossFn, data, alphas, *,
                params: ParamSelection = None, model_mode: str = "eval",
                batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
                buffers: bool = True, bn_data: Iterable | None = None,
                path: str | os.PathLike | None = None, chunk_size: int | None = None,
                max_memory: int = DEFAULT_MAX_MEMORY, vectorize: bool | str = "auto",
                distribute: str = "data", check_deterministic: bool = True
                ) -> InterpolationResult:
    r"""Losses at $w(\alpha) = (1 - \alpha) w_a + \alpha w_b$ and the barrier above the chord.

    The barrier (Entezari et al. 2022, Sec. 2; Frankle et al. 2020 measure it above the
    endpoints' mean instead) is taken over the given alphas:

    $$B = \max_{\alpha} \; L(w(\alpha)) - \big((1 - \alpha) L(w_a) + \alpha L(w_b)\big),$$

    with $L(w_a)$, $L(w_b)$ evaluated the same way (at alpha = 0 and 1, added to the points
    when absent). Both models are left unchanged.

    Args:
        model_a: the first model ($\alpha = 0$); its tensors are written and restored.
        model_b: a model of the same architecture, a state_dict or a checkpoint path
            ($\alpha = 1$).
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: the iterable of batches.
        alphas: the coordinates, a non-empty 1-D sequence of finite numbers (any real
            number: outside [0, 1] extrapolates).
        params: the parameters interpolated (default all); the others stay at model_a's
            values.
        model_mode: "eval" (default) or "train".
        batch_size_fn: the sample count of a batch (default: the leading dimension).
        progress: show a progress bar.
        buffers: interpolate floating buffers (BatchNorm running statistics) along with the
            parameters (Li et al.'s "states" directions); otherwise model_a's buffers are used.
        bn_data: if given, BatchNorm statistics are recalibrated on these batches at each
            point (:func:`recalibrate_bn`; under torch.distributed this rank's shard, possibly
            empty, the statistics all-reduced) before the loss is evaluated; points are then
            evaluated one by one (chunk_size, max_memory, vectorize and distribute must keep
            their defaults).
        path: an .npz result file, resumed as in :func:`landscape.line`.
        chunk_size: as in :func:`landscape.line`.
        max_memory: as in :func:`landscape.line`.
        vectorize: as in :func:`landscape.line`.
        distribute: as in :func:`landscape.line`.
        check_deterministic: as in :func:`landscape.line` (skipped in the same case, with
            model_a).

    Returns:
        The :class:`InterpolationResult` (``losses``, ``barrier``, ``loss_a``, ``loss_b``).

    Raises:
        ValueError: models of different architectures, invalid coordinates, options or data,
            an option other than its default with ``bn_data``, or a non-finite loss.
    """
    check_model_mode(model_mode)
    buffers = check_bool("buffers", buffers)
    alphas = check_coords(alphas, "alphas")
    model_a = unwrap_compiled(model_a, "model_a")
    names = list(dict(model_a.named_parameters())) if params is None else \
        select_params(model_a, params)[0]
    names += _moved_buffers(model_a, buffers, bn_data)
    targets = named_targets(model_a)
    state_b = unwrap_compiled(model_b, "model_b").state_dict() \
        if isinstance(model_b, nn.Module) else load_state(model_b)
    w_a = {n: targets[n].detach().clone() for n in names}
    w_b = state_tensors(model_a, state_b, names, "model_b")
    if not buffers:  # BN statistics of model_a at every point (recalibration overrides them)
        w_b.update({n: w_a[n] for n in names if n not in dict(model_a.named_parameters())})
    points = np.concatenate([alphas, [a for a in (0.0, 1.0) if a not in alphas]])
    coords = np.stack([1.0 - points, points], axis=1)
    config = {"model_mode": model_mode, "buffers": buffers, "recalibrate_bn": bn_data is not None}
    meta = surface_metadata("interpolate", [w_b], w_a, [points], config)
    keep = len(alphas)
    ends = [int(np.flatnonzero(points == a)[0]) for a in (0.0, 1.0)]

    def build(losses: np.ndarray, n_forward: int, metadata: dict) -> InterpolationResult:
        loss_a, loss_b = (float(losses[i]) for i in ends)
        barrier = float(np.max(losses[:keep] - ((1.0 - alphas) * loss_a + alphas * loss_b)))
        return InterpolationResult(alphas, losses[:keep], barrier, loss_a, loss_b, n_forward,
                                   metadata)

    def losses_of(result: InterpolationResult) -> np.ndarray:
        losses = np.full(len(points), np.nan)
        losses[:len(result.losses)] = result.losses
        losses[ends] = result.loss_a, result.loss_b
        return losses

    store = Progress(path, (len(points),), meta, build, losses_of,
                     partial(data_probe, model_a, loss_fn, data, model_mode, batch_size_fn))

    def describe(i: int) -> str:
        return f"alpha={fmt(points[i])}"

    evaluation = dict(chunk_size=chunk_size, max_memory=max_memory, vectorize=vectorize,
                      distribute=distribute)
    if bn_data is None:
        evaluate_points(model_a, loss_fn, data, [w_a, w_b], coords, store, describe,
                        model_mode=model_mode, batch_size_fn=batch_size_fn, progress=progress,
                        desc="interpolate", **evaluation)
    else:
        changed = [k for k, v in evaluation.items()
                   if v != inspect.signature(interpolate).parameters[k].default]
        if changed:
            raise ValueError(f"{', '.join(changed)} do not apply with bn_data= (points are "
                             "evaluated one by one)")
        _recalibrated(model_a, loss_fn, data, bn_data, [w_a, w_b], coords, store, describe,
                      model_mode, batch_size_fn)
    return store.result(complete=True)


def _recalibrated(model, loss_fn, data, bn_data, vectors, coords, store: Progress, describe,
                  model_mode: str, batch_size_fn: BatchSizeFn | None) -> None:
    """Point by point: load the weights, recalibrate BatchNorm on ``bn_data``, evaluate."""
    targets = named_targets(model)
    with preserved(model, model_mode), torch.no_grad():
        for i in np.flatnonzero(np.isnan(store.losses)):
            c = torch.as_tensor(coords[i])
            for n in vectors[0]:
                parts = [(0, vectors[0][n]), (1, vectors[1][n])]
                targets[n].copy_(combine(parts, c.to(targets[n])))
            store.n_forward += recalibrate_bn(model, loss_fn, bn_data)
            model.train(model_mode == "train")
            where = f" at {describe(i)}"
            mean = data_mean(data, lambda batch: [check_loss(loss_fn(model, batch), where)],
                             batch_size_fn, reduction=loss_reduction(loss_fn),
                             zeros=scalar_zeros(1))
            store.losses[i] = float(mean.values[0])
            store.n_forward += mean.n_batches
            store.write(complete=not np.isnan(store.losses).any())
