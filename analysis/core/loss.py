"""The mean loss over data, the one full-data quantity of the core.

``landscape`` evaluates it at every point; the sharpness measures start from it.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .guards import guarded
from .params import ParamSelection, select_params
from .protocol import (BatchSizeFn, LossFn, check_loss, data_mean, loss_reduction,
                       scalar_zeros)
from .restore import preserved
from .sharding import forward_model


@guarded(sharded=True)
def mean_loss(model: nn.Module, loss_fn: LossFn, data: Iterable, *,
              params: ParamSelection = None, model_mode: str = "eval",
              batch_size_fn: BatchSizeFn | None = None, progress: bool = True) -> float:
    r"""The sample-weighted mean loss over all samples of ``data``.

    $$L(w) = \frac{\sum_b n_b L_b(w)}{\sum_b n_b},$$

    with $L_b$ the mean loss of batch $b$ and $n_b$ its sample count (over all ranks' shards
    under ``torch.distributed``); for a sum-reduced ``loss_fn``, the total loss
    $\sum_b L_b(w)$. Computed without gradients; the model is left unchanged.

    A model sharded with FSDP2's ``fully_shard``: each rank passes its data shard (the same
    number of batches on every rank) and gets the loss of the unsharded model on all the data,
    evaluated on a hook-free copy that gathers each unit's weights during its forward
    (:func:`analysis.sharded.forward_copy`, at the stored precision whatever the
    mixed-precision policy; the model itself is not run).

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the protocol of :mod:`.protocol`.
        data: A deterministic re-iterable of batches.
        params: The parameter selection, validated like everywhere (the loss itself does not
            depend on it).
        model_mode: The mode the model is evaluated in, "eval" or "train" (restored
            afterwards).
        batch_size_fn: ``batch -> int`` sample count (default: the leading dimension).
        progress: Show a progress bar over the batches (rank 0).

    Returns:
        The mean (or, sum-reduced, total) loss as a Python float.

    Raises:
        ValueError: ``data`` is not an iterable of batches or is empty, or ``loss_fn`` does not
            return a finite scalar.
    """
    select_params(model, params)

    with preserved(model, model_mode, weights=False), torch.no_grad():
        forward = forward_model(model)  # a fully_shard model: its hook-free copy

        def per_batch(batch):
            return [check_loss(loss_fn(forward, batch), " in mean_loss")]

        return float(data_mean(data, per_batch, batch_size_fn, reduction=loss_reduction(loss_fn),
                               zeros=scalar_zeros(1), progress=progress).values[0])


__all__ = ["mean_loss"]
