"""Recognising models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Their parameters are DTensors (local shards). The routines that support them say so to
:func:`analysis.core.guarded` (``guarded(sharded=True)``); every other public routine refuses
them with :func:`refuse_sharded` before touching the model, instead of failing inside torch
with "mixed torch.Tensor and DTensor" after a partial change.
"""
from __future__ import annotations

from torch import nn

SUPPORTED = ("top_eigenvalues, hessian_trace and spectral_density of the Hessian "
             "(curvature=\"hessian\", no preconditioner, hvp_method=\"reverse\" or "
             "\"finite_difference\") and analysis.sharded.ShardedHessian")
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


__all__ = ["is_dtensor", "is_sharded", "refuse_sharded", "REFUSAL", "SUPPORTED"]
