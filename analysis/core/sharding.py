"""Recognising models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Their parameters are DTensors (local shards). The routines that support them say so to
:func:`analysis.core.guarded` (``guarded(sharded=True)``); every other public routine refuses
them with :func:`refuse_sharded` before touching the model, instead of failing inside torch
with "mixed torch.Tensor and DTensor" after a partial change.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .distributed import all_reduce_max_, all_reduce_sum_
from .protocol import BatchSizeFn, check_data, default_batch_size

SUPPORTED = ("top_eigenvalues, hessian_trace, spectral_density and hvp of the Hessian "
             "(curvature=\"hessian\", no preconditioner, hvp_method=\"reverse\" or "
             "\"finite_difference\"), analysis.sharded.ShardedHessian, full_grad_norm, "
             "worst_case_sharpness (m=None), average_sharpness, keskar_sharpness, "
             "pac_bayes_sigma, sharpness_vs_curvature, landscape.random_direction, "
             "update_direction, eigenvector_directions, line, plane and interpolate "
             "(parameters only)")
REFUSAL = ("is sharded with torch.distributed.fsdp.fully_shard (FSDP2), which {what} does not "
           "support yet; supported on fully_shard models: " + SUPPORTED)


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (it has a device mesh and placements).

    Args:
        t: Any object.

    Returns:
        True for a DTensor (an FSDP2 shard, a tensor-parallel weight).
    """
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds DTensor parameters (FSDP2 ``fully_shard``, tensor parallel).

    Args:
        model: Any module.

    Returns:
        True if some parameter is a DTensor.
    """
    return isinstance(model, nn.Module) and any(is_dtensor(p) for p in model.parameters())


def refuse_sharded(model: nn.Module, what: str) -> None:
    """Raise a clear error if ``model`` is sharded (call it before anything touches the model).

    Args:
        model: The user's model.
        what: The routine's name, for the message.

    Raises:
        NotImplementedError: ``model`` has DTensor parameters (``fully_shard``).
    """
    if is_sharded(model):
        raise NotImplementedError("model " + REFUSAL.format(what=what))


def sample_counts(data: Iterable, batch_size_fn: BatchSizeFn | None) -> tuple[list[int], float]:
    """This rank's batch sizes and the total sample count over all ranks.

    Args:
        data: this rank's batches.
        batch_size_fn: sample count of a batch (default: the leading dimension).

    Returns:
        ``(sizes, total)``.

    Raises:
        ValueError: ranks hold different numbers of batches, or a batch is empty (every
            forward pass of a sharded model runs collectives that all ranks must join).
    """
    check_data(data)
    sizes = [(batch_size_fn or default_batch_size)(b) for b in data]
    counts = torch.tensor([len(sizes), -len(sizes), float(min(sizes, default=0) <= 0)],
                          dtype=torch.float64)
    total = torch.tensor([float(sum(sizes))], dtype=torch.float64)
    all_reduce_max_([counts])
    all_reduce_sum_([total])
    if counts[0] != -counts[1]:
        raise ValueError("data must hold the same number of batches on every rank for a model "
                         "sharded with fully_shard (each forward pass gathers weights from all "
                         f"ranks), got between {int(-counts[1])} and {int(counts[0])}")
    if counts[2] > 0:
        raise ValueError("data holds an empty batch (on at least one rank); a model sharded "
                         "with fully_shard needs samples in every batch on every rank")
    return sizes, float(total)


__all__ = ["sample_counts", "is_dtensor", "is_sharded", "refuse_sharded", "REFUSAL", "SUPPORTED"]
