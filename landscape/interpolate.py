"""Linear interpolation between two models and the loss barrier above the chord.

Goodfellow et al. 2015 (the loss along the segment), Frankle et al. 2020 and Entezari et al.
2022 (the barrier), with optional BatchNorm statistics recalibration at each point.
"""
from __future__ import annotations

import inspect
import os
from functools import partial
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from analysis.core import (all_reduce_sum_, BatchSizeFn, check_bool, check_data, check_loss,
                           check_model_mode, data_mean, failures_shared, guarded,
                           is_distributed, loss_reduction, LossFn, ParamSelection, preserved,
                           scalar_zeros, select_params, unwrap_compiled)

from analysis.core import is_sharded, local_like
from analysis.sharded import (check_sharded, forward_copy, functional_copy, sample_counts,
                              ShardedLoss)

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

    A model sharded with FSDP2's ``fully_shard`` (whose buffers are not sharded: every rank
    holds them whole): the forwards run on its hook-free copy
    (:func:`analysis.sharded.forward_copy`, at the stored precision whatever the
    mixed-precision policy; the FSDP2 model is not run), every rank passing the same number of
    batches of its shard, and every rank gets the statistics of one process on the union of
    the shards (the same all-reduced sums). ``nn.SyncBatchNorm`` is refused there: its
    train-mode forward pools each step's batches over the ranks, a statistic one process on
    the same batches does not compute.

    Args:
        model: the model whose BatchNorm statistics are recomputed.
        loss_fn: ``loss_fn(model, batch)``, run for its forward pass (its value is unused).
        data: the iterable of batches (this rank's shard under ``torch.distributed``).

    Returns:
        The number of forward passes on this rank (0 for a model without tracked BatchNorm
        statistics).

    Raises:
        ValueError: ``data`` is not an iterable of batches, or is empty (on every rank); for a
            sharded model, the ranks hold different numbers of batches.
        NotImplementedError: a sharded model with ``nn.SyncBatchNorm`` layers.
    """
    check_data(data)
    bns = _tracked_bns(model)
    if not bns:
        return 0
    if not is_sharded(model):
        return _recalibrate(model, bns, loss_fn, data, lambda: model)
    _check_sharded_bn(bns, data)
    return _recalibrate(model, bns, loss_fn, data, lambda: forward_copy(model, "train"))


def _tracked_bns(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers that track running statistics."""
    return [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]


def _check_sharded_bn(bns: list[nn.Module], data: Iterable) -> None:
    """Refuse what a sharded model's recalibration cannot reduce exactly; equal batch counts.

    Raises:
        NotImplementedError: ``nn.SyncBatchNorm`` layers.
        ValueError: the ranks hold different numbers of batches (the same error on every
            rank).
    """
    synced = sorted({type(m).__name__ for m in bns if isinstance(m, nn.SyncBatchNorm)})
    if synced:
        raise NotImplementedError(
            f"recalibrate_bn on a model sharded with fully_shard does not support {synced[0]} "
            "(its train-mode forward pools each step's batch statistics over the ranks, which "
            "one process on the same batches does not); convert those layers to BatchNorm "
            "for the analysis")
    sample_counts(data, lambda batch: 1)  # every forward gathers weights: equal batch counts


def _recalibrate(model: nn.Module, bns: list[nn.Module], loss_fn: LossFn, data: Iterable,
                 forward: Callable[[], nn.Module]) -> int:
    """:func:`recalibrate_bn`'s passes through ``forward()``, the module the batches run through.

    ``forward`` is called once the statistics are reset and the momenta set to None (a
    sharded model's copy copies its modules' attributes when it is built).
    """
    momenta = [m.momentum for m in bns]
    n = 0
    try:
        with preserved(model, "train", weights=False), torch.no_grad():
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
            run = forward()
            with failures_shared():  # one rank's error on every rank, before the all-reduce
                for batch in data:
                    loss_fn(run, batch)
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
    """The floating buffers the points move (BatchNorm statistics)."""
    if not buffers and bn_data is None:
        return []
    return state_buffers(model)


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

    Models sharded with FSDP2's ``fully_shard`` (``model_b`` a sharded model, its sharded
    state_dict, or full tensors): each rank passes its data shard (and its ``bn_data`` shard,
    the same number of batches on every rank) and gets the one-process answer. Their
    parameters are combined on the local shards and never written; their BatchNorm buffers,
    which FSDP2 does not shard, are interpolated (``buffers=True``) or recalibrated
    (``bn_data``, :func:`recalibrate_bn`) in place and restored; such points are evaluated
    one by one (``distribute="data"`` only).

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
    sharded = is_sharded(model_a)
    if bn_data is None and not (sharded and set(names) - set(dict(model_a.named_parameters()))):
        evaluate_points(model_a, loss_fn, data, [w_a, w_b], coords, store, describe,
                        model_mode=model_mode, batch_size_fn=batch_size_fn, progress=progress,
                        desc="interpolate", **evaluation)
    else:  # BatchNorm recalibrated, or a sharded model's buffers moved: point by point
        _check_one_by_one(model_a, bn_data, evaluation)
        _one_by_one(model_a, loss_fn, data, bn_data, [w_a, w_b], coords, store, describe,
                    model_mode, batch_size_fn)
    return store.result(complete=True)


def _check_one_by_one(model: nn.Module, bn_data: Iterable | None, evaluation: dict) -> None:
    """Refuse options that do not apply to the point-by-point evaluation (:func:`_one_by_one`).

    Raises:
        ValueError: an option other than its default with ``bn_data``; ``distribute="grid"``
            on a sharded model; a sharded model's ranks holding different numbers of batches
            of ``bn_data``.
        NotImplementedError: ``nn.SyncBatchNorm`` in a sharded model recalibrated.
    """
    if bn_data is None:  # a sharded model's buffers: its points are evaluated one by one anyway
        if evaluation["distribute"] != "data":
            raise ValueError('distribute must be "data" for a model sharded with fully_shard '
                             f"(each rank passes its data shard), got {evaluation['distribute']!r}")
        return
    changed = [k for k, v in evaluation.items()
               if v != inspect.signature(interpolate).parameters[k].default]
    if changed:
        raise ValueError(f"{', '.join(changed)} do not apply with bn_data= (points are "
                         "evaluated one by one)")
    check_data(bn_data)
    bns = _tracked_bns(model)
    if bns and is_sharded(model):
        _check_sharded_bn(bns, bn_data)


def _one_by_one(model, loss_fn, data, bn_data, vectors, coords, store: Progress, describe,
                model_mode: str, batch_size_fn: BatchSizeFn | None) -> None:
    """Point by point: set the weights, recalibrate BatchNorm on ``bn_data`` (if given), evaluate.

    An unsharded model's tensors are written (and restored). A ``fully_shard`` model's
    parameters are never written: they move on its hook-free copy (local shards combined,
    :class:`analysis.sharded.ShardedLoss`), and its (unsharded) buffers are written and
    restored like an unsharded model's.
    """
    targets = named_targets(model)
    sharded = is_sharded(model)
    params = dict(model.named_parameters()) if sharded else {}
    bns = _tracked_bns(model) if bn_data is not None else []
    with preserved(model, model_mode, weights=not sharded), torch.no_grad():
        loss = ShardedLoss(model, loss_fn, data, [], batch_size_fn=batch_size_fn,
                           model_mode=model_mode) if sharded else None
        units = check_sharded(model) if sharded else None
        for i in np.flatnonzero(np.isnan(store.losses)):
            c = torch.as_tensor(coords[i])
            moved = {}
            for n in vectors[0]:
                parts = [(0, vectors[0][n]), (1, vectors[1][n])]
                if n in params:  # a shard: combined locally, placed like the parameter
                    local = [(j, v.to_local()) for j, v in parts]
                    moved[n] = local_like(combine(local, c.to(local[0][1])), params[n])
                else:
                    targets[n].copy_(combine(parts, c.to(targets[n])))
            if sharded:
                loss.move(moved)
            if bns:
                forward = (lambda: functional_copy(model, units, loss.leaves, "train")) \
                    if sharded else (lambda: model)
                store.n_forward += _recalibrate(model, bns, loss_fn, bn_data, forward)
            store.losses[i], n_batches = _point_loss(model, loss_fn, data, loss, moved,
                                                     f" at {describe(i)}", model_mode,
                                                     batch_size_fn)
            store.n_forward += n_batches
            store.write(complete=not np.isnan(store.losses).any())


def _point_loss(model: nn.Module, loss_fn: LossFn, data: Iterable, sharded: ShardedLoss | None,
                moved: dict, where: str, model_mode: str, batch_size_fn: BatchSizeFn | None
                ) -> tuple[float, int]:
    """The full-data loss at the point loaded by :func:`_one_by_one`, and the batches passed."""
    if sharded is not None:
        before = sharded.n_forward
        value, _ = sharded(moved)
        return float(value), sharded.n_forward - before
    model.train(model_mode == "train")
    mean = data_mean(data, lambda batch: [check_loss(loss_fn(model, batch), where)],
                     batch_size_fn, reduction=loss_reduction(loss_fn), zeros=scalar_zeros(1))
    return float(mean.values[0]), mean.n_batches
