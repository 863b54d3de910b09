r"""Parameters sharded over ranks: FSDP2 (``fully_shard``) and tensor-parallel DTensors.

The optimizers update each rank's local piece of a ``DTensor`` parameter (``p.to_local()``, a
view: writes reach the parameter) with the same per-tensor and multi-tensor functions as plain
tensors; their state is made with ``torch.zeros_like(p)`` and the like, so it is a ``DTensor``
placed like ``p`` (what ``state_dict()`` and ``torch.distributed.checkpoint`` save). Every
quantity that reduces over elements of a parameter is summed over the ranks that hold its other
pieces with ``torch.distributed.all_reduce`` over the device mesh's groups:

- the global norms (SAM's and WSAM's gradient norm, AdaSAM's, SALA's distance): over every mesh
  dimension on which the parameter is ``Shard(d)``;
- ND-Adam's per-vector dot products and norms (a vector is a slice along dim 0): over the mesh
  dimensions that split the vectors (``Shard(d)`` with $d \ge 1$); sums over the vectors (its
  diagnostics) over the mesh dimensions that split dim 0.

``Replicate()`` dimensions hold whole copies and are not summed. Other placements (``Partial``,
strided shards) and FSDP1 (``FullyShardedDataParallel``, whose flat parameters hide which
elements form a vector or a norm) are refused with an error naming ``fully_shard``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch.distributed.tensor is absent from builds without distributed support
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = Replicate = Shard = None

_FSDP1 = ("optimizer parameters of FullyShardedDataParallel (FSDP1, flat parameters) are not "
          "supported: the global norms and ND-Adam's weight vectors span elements FSDP1 "
          "flattens over ranks; shard the model with torch.distributed.fsdp.fully_shard (FSDP2) "
          "instead")


def is_dtensor(t: Tensor | None) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The rank's piece of ``t`` (a view that writes reach) for a ``DTensor``, else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def _placement_ok(placement: object) -> bool:
    return type(placement) in (Shard, Replicate)


def check_sharding(owner: str, params: list[Tensor]) -> None:
    """Refuse parameters whose sharding the optimizers cannot reduce over exactly.

    Args:
        owner: The optimizer's class name, for the message.
        params: The parameters of a param group.

    Raises:
        ValueError: a parameter belongs to an FSDP1 (``FullyShardedDataParallel``) model, or is
            a ``DTensor`` with a placement other than ``Shard(d)`` and ``Replicate()``.
    """
    for p in params:
        if getattr(p, "_fsdp_flattened", False):
            raise ValueError(f"{owner}: {_FSDP1}")
        if is_dtensor(p) and not all(_placement_ok(pl) for pl in p.placements):
            raise ValueError(f"{owner}: DTensor parameters must be placed with Shard(d) and "
                             f"Replicate() only (as torch.distributed.fsdp.fully_shard and "
                             f"tensor parallelism place them), got {p.placements}")


def check_grad(owner: str, p: Tensor) -> None:
    """Refuse a ``DTensor`` gradient placed otherwise than its parameter.

    Raises:
        ValueError: the placements differ (e.g. a ``Partial`` gradient).
    """
    g = p.grad
    if is_dtensor(p) and (not is_dtensor(g) or g.placements != p.placements):
        got = g.placements if is_dtensor(g) else type(g).__name__
        raise ValueError(f"{owner}: the gradient of a DTensor parameter placed {p.placements} "
                         f"must be a DTensor placed alike (as fully_shard leaves it), got {got}")


def _groups(t: Tensor, dims: str) -> list:
    """The mesh groups of ``t``'s ``Shard`` placements.

    ``dims``: ``"all"``, ``"vectors"`` (``Shard(d)``, d >= 1) or ``"rows"`` (``Shard(0)``).
    """
    if not is_dtensor(t):
        return []
    mesh = t.device_mesh
    out = []
    for i, pl in enumerate(t.placements):
        if isinstance(pl, Shard) and (dims == "all" or (pl.dim == 0) == (dims == "rows")):
            out.append(mesh.get_group(i) if mesh.ndim > 1 else mesh.get_group())
    return out


def sum_over(t: Tensor, like: Tensor, dims: str = "all") -> Tensor:
    """Sum ``t`` in place over the ranks holding the other pieces of ``like`` (no-op if plain).

    Args:
        t: A partial sum computed from this rank's piece of ``like``.
        like: The (possibly ``DTensor``) parameter it comes from.
        dims: Which ``Shard`` placements to sum over: ``"all"``, ``"vectors"`` (the pieces of
            one weight vector, ``Shard(d)`` with d >= 1) or ``"rows"`` (``Shard(0)``).

    Returns:
        ``t``.
    """
    for group in _groups(like, dims):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def splits_vectors(p: Tensor) -> bool:
    """Whether ``p`` is a ``DTensor`` whose slices along dim 0 are split over ranks."""
    return bool(_groups(p, "vectors"))


def is_sharded(p: Tensor) -> bool:
    """Whether ``p`` is a ``DTensor`` with at least one ``Shard`` placement."""
    return bool(_groups(p, "all"))


def global_square_sum(squares: Tensor, params: list[Tensor]) -> Tensor:
    """The sum of ``squares`` (one per parameter, of its local piece) over all the pieces.

    Args:
        squares: A 1-d tensor, entry i from ``params[i]``'s local piece.
        params: The parameters.

    Returns:
        A 0-d tensor, the same on every rank; ``squares.sum()`` for plain tensors.
    """
    if not any(is_sharded(p) for p in params):
        return squares.sum()
    keys: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        keys.setdefault(tuple(id(g) for g in _groups(p, "all")), []).append(i)
    total = squares.new_zeros(())
    for rows in keys.values():
        total += sum_over(squares[rows].sum(), params[rows[0]])
    return total


def global_norm(norms: list[Tensor], params: list[Tensor]) -> Tensor:
    r"""$\sqrt{\sum_p n_p^2}$ over the parameters, each $n_p$ its local piece's norm.

    Args:
        norms: 0-d norms of the local pieces, one per parameter, on one device and dtype.
        params: The parameters they come from.

    Returns:
        The global norm, the same on every rank; for plain tensors
        ``vector_norm(stack(norms))`` exactly (no collective).
    """
    stacked = torch.stack(norms)
    if not any(is_sharded(p) for p in params):
        return torch.linalg.vector_norm(stacked)
    return global_square_sum(stacked.square(), params).sqrt()


def vector_state(p: Tensor, dtype: torch.dtype) -> Tensor:
    """Zeros shaped ``[len(p), 1, ..., 1]``: one number per weight vector of ``p``.

    For a ``DTensor`` ``p``, a ``DTensor`` whose rows are split as ``p``'s (``Shard(0)``) and
    replicated over the ranks that split the vectors.
    """
    shape = (p.shape[0],) + (1,) * (p.dim() - 1)
    if not is_dtensor(p):
        return p.new_zeros(shape, dtype=dtype)
    rows = p.to_local().shape[0]
    placements = [pl if isinstance(pl, Shard) and pl.dim == 0 else Replicate()
                  for pl in p.placements]
    piece = torch.zeros((rows,) + shape[1:], dtype=dtype, device=p.to_local().device)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(piece, p.device_mesh, placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


def like_param(piece: Tensor, p: Tensor) -> Tensor:
    """``piece`` (shaped as ``p``'s local piece) as a tensor placed like ``p``.

    Returns:
        ``piece`` for a plain ``p``; for a ``DTensor``, the ``DTensor`` of the same global
        shape and placements whose local piece is ``piece``.
    """
    if not is_dtensor(p):
        return piece
    return DTensor.from_local(piece, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())
