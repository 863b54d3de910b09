"""Recognising models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Their parameters are DTensors (local shards). The routines that support them say so to
:func:`analysis.core.guarded` (``guarded(sharded=True)``); every other public routine refuses
them with :func:`refuse_sharded` before touching the model, instead of failing inside torch
with "mixed torch.Tensor and DTensor" after a partial change.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from .distributed import all_reduce_max_, all_reduce_sum_
from .flat import unflatten
from .protocol import BatchSizeFn, check_data, default_batch_size

try:  # DTensor (torch >= 2.4)
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - torch without torch.distributed
    DTensor = Replicate = None

SUPPORTED = ("top_eigenvalues, hessian_trace, spectral_density and layerwise (curvature="
             "\"hessian\", \"ggn\", \"fisher\" or \"empirical_fisher\", with or without a "
             "preconditioner; the Hessian's hvp_method=\"reverse\" or \"finite_difference\"), "
             "hvp, analysis.curvature.curvature_operator, analysis.sharded.ShardedHessian and "
             "ShardedCurvature, full_grad_norm, "
             "worst_case_sharpness (m=None), average_sharpness, keskar_sharpness, "
             "pac_bayes_sigma, sharpness_vs_curvature, mean_loss, evaluate, Tracker, "
             "landscape.random_direction, update_direction, eigenvector_directions, line, "
             "plane, interpolate, recalibrate_bn, pca_directions and project_trajectory")
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


__all__ = ["sample_counts", "is_dtensor", "is_sharded", "refuse_sharded", "REFUSAL", "SUPPORTED",
           "shard_like", "as_sharded", "full_values", "local_like", "forward_model",
           "register_forward_copy", "local_values", "pieces_like"]

_FORWARD_COPY: list = []  # analysis.sharded.forward_copy, registered when analysis is imported


def register_forward_copy(fn) -> None:
    """Install the builder of :func:`forward_model`'s copies (``analysis.sharded`` does).

    The core cannot import :mod:`analysis.sharded` (it imports the core), so that module hands
    its builder over here when ``analysis`` is imported.

    Args:
        fn: ``fn(model, model_mode) -> nn.Module``, the hook-free copy of a sharded model.
    """
    _FORWARD_COPY[:] = [fn]


def forward_model(model: nn.Module, model_mode: str | None = None) -> nn.Module:
    """The module to run a forward-only pass of ``model`` through.

    ``model`` itself, or for a ``fully_shard`` model the hook-free copy of
    :func:`analysis.sharded.forward_copy` (each unit's full weights gathered from the shards
    during its forward, the FSDP2 model neither run nor written to; buffers shared). Every rank
    must then make the same forward passes (the gathers are collectives).

    Args:
        model: Any module.
        model_mode: "eval" or "train" for the copy (None: the model's flags as they are).

    Returns:
        A module to call like ``model``.
    """
    if not is_sharded(model):
        return model
    if not _FORWARD_COPY:  # pragma: no cover - analysis/__init__ imports analysis.sharded
        raise RuntimeError("analysis.sharded is not imported (import analysis first)")
    return _FORWARD_COPY[0](model, model_mode)


def shard_like(full: Tensor, param: Tensor) -> Tensor:
    """A full tensor (the same on every rank) as a DTensor placed like ``param``.

    Args:
        full: The unsharded values, ``param``'s shape.
        param: A DTensor parameter.

    Returns:
        This rank's shard of ``full`` in ``param``'s dtype, as a DTensor (no communication).
    """
    mesh = param.device_mesh
    whole = DTensor.from_local(full.detach().to(param.dtype).reshape(param.shape), mesh,
                               [Replicate()] * mesh.ndim, run_check=False)
    return whole.redistribute(mesh, param.placements)


def as_sharded(t: Tensor, param: Tensor) -> Tensor:
    """``t`` (full, or a DTensor) as a detached DTensor placed and typed like ``param``.

    Args:
        t: A plain tensor of ``param``'s shape (the same on every rank) or a DTensor.
        param: A DTensor parameter.

    Returns:
        The DTensor.
    """
    if not is_dtensor(t):
        return shard_like(t, param)
    return t.detach().to(param.dtype).redistribute(param.device_mesh, param.placements)


def full_values(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Detached full values: ``full_tensor()`` of each DTensor, the others as they are.

    Args:
        tensors: Tensors, DTensors among them.

    Returns:
        Plain tensors (a DTensor's gather is the same on every rank).
    """
    return [t.detach().full_tensor() if is_dtensor(t) else t.detach() for t in tensors]


def local_like(local: Tensor, param: Tensor) -> Tensor:
    """This rank's piece ``local`` as a DTensor placed like ``param`` (no communication).

    Args:
        local: The local values, the shape of ``param.to_local()``.
        param: A DTensor parameter.

    Returns:
        A DTensor with ``param``'s mesh, placements, global shape and stride.
    """
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def local_values(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Detached local values: each DTensor's local shard, the others as they are.

    The counterpart of :func:`full_values` that never communicates: on a ``fully_shard``
    model, the concatenation of the pieces (``analysis.core.flatten``) is this rank's row of
    :func:`analysis.sharded.sharded_space`.

    Args:
        tensors: Tensors, DTensors among them.

    Returns:
        Plain tensors (views of the shards, no copy).
    """
    return [t.detach().to_local() if is_dtensor(t) else t.detach() for t in tensors]


def pieces_like(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """A flat row of :func:`local_values` of ``params`` as one tensor per parameter.

    The inverse of ``flatten(local_values(params))``: views of ``flat`` shaped like each
    parameter's local values (:func:`analysis.core.unflatten`), as a DTensor placed like the
    parameter (:func:`local_like`) where the parameter is one, plain otherwise. No
    communication.

    Args:
        flat: 1-D, as many elements as this rank's local values of ``params``.
        params: The parameters (DTensors or plain tensors).

    Returns:
        One tensor per parameter (views of ``flat``).

    Raises:
        ValueError: ``flat`` is not 1-D, or its length is not this rank's.
    """
    pieces = unflatten(flat, local_values(params))
    return [local_like(v, p) if is_dtensor(p) else v for v, p in zip(pieces, params)]
