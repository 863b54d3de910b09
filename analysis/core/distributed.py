"""The one place where analysis talks to ``torch.distributed``.

When a process group is initialized, each rank holds a shard of the data; sums and sample
counts are all-reduced together so every rank gets the single-process result on the union of
the shards.
"""
from __future__ import annotations

import hashlib
import numbers
import struct
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def _all_reduce_(tensors: Sequence[Tensor], op) -> None:
    if not is_distributed() or not tensors:
        return
    buf = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    if dist.get_backend() == "nccl" and buf.device.type != "cuda":
        buf = buf.cuda()
    dist.all_reduce(buf, op=op)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(buf[offset:offset + n].view_as(t))
        offset += n


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """Sum ``tensors`` over all ranks, in place, with one collective call.

    A no-op without a process group. The tensors are packed into one float64 buffer so that
    sums of many small tensors cost one message.

    Args:
        tensors: The tensors, overwritten with the sums.
    """
    _all_reduce_(tensors, dist.ReduceOp.SUM)


def all_reduce_max_(tensors: Sequence[Tensor]) -> None:
    """The elementwise maximum of ``tensors`` over all ranks, in place, in one collective call.

    ``-max(-x)`` is the minimum. A no-op without a process group.

    Args:
        tensors: The tensors, overwritten with the maxima.
    """
    _all_reduce_(tensors, dist.ReduceOp.MAX)


def _digest(value: Any, h) -> None:
    """Feed a canonical encoding of ``value`` to the hash ``h``.

    Numbers, strings, None, tensors and arrays (shape, sum and sum of squares in float64),
    modules (their parameters) and containers of these; other objects (callables) are not
    compared. A DTensor (an FSDP2 shard) is compared by its global shape, dtype and placements
    only: its local values differ between ranks by design.
    """
    if value is None or isinstance(value, (bool, np.bool_)):
        h.update(repr(value if value is None else bool(value)).encode())
    elif isinstance(value, numbers.Real):
        h.update(b"n" + struct.pack("<d", float(value)))
    elif isinstance(value, str):
        h.update(b"s" + value.encode() + b"\0")
    elif hasattr(value, "device_mesh") and hasattr(value, "placements"):  # a DTensor
        h.update(b"D" + repr((tuple(value.shape), str(value.dtype),
                              [str(p) for p in value.placements])).encode())
    elif isinstance(value, np.ndarray) and value.dtype.kind not in "biuf":
        _digest(value.tolist(), h)
    elif isinstance(value, (Tensor, np.ndarray)):
        t = torch.as_tensor(value).detach()
        h.update(b"t" + repr(tuple(t.shape)).encode())
        if t.numel() and not t.is_complex():
            d = t.to(torch.float64)
            h.update(torch.stack([d.sum(), (d * d).sum()]).cpu().numpy().tobytes())
    elif isinstance(value, nn.Module):
        _digest(dict(value.named_parameters()), h)
    elif isinstance(value, Mapping):
        h.update(b"d%d" % len(value))
        for key in sorted(value, key=str):  # the same entries built in another order agree
            _digest(key, h)
            _digest(value[key], h)
    elif isinstance(value, (list, tuple)):
        h.update(b"l%d" % len(value))
        for v in value:
            _digest(v, h)
    else:
        h.update(b"?")


def fingerprint(value: Any) -> float:
    """A 48-bit hash of ``value`` as an exact float64.

    Equal values give equal fingerprints on every rank (see ``_digest`` for what is compared).

    Args:
        value: Numbers, strings, None, tensors, arrays, modules, or containers of these.

    Returns:
        The fingerprint, an integer-valued float below $2^{48}$.
    """
    h = hashlib.blake2b(digest_size=6)
    _digest(value, h)
    return float(int.from_bytes(h.digest(), "little"))


def check_same_on_ranks(values: Mapping[str, Any], failure: int = 0,
                        explain=lambda code: "") -> None:
    """Raise the same error on every rank if ``values`` differ between ranks or a rank failed.

    One all-reduce of ``2 len(values) + 1`` numbers (``max`` of each fingerprint and of its
    negation, and of the code), so no rank is left waiting in a collective that others skip.
    A no-op without a process group.

    Args:
        values: The arguments that must agree, by name.
        failure: This rank's failure code (0: none).
        explain: ``code -> str``, the message of the largest failure code.

    Raises:
        ValueError: Some values differ between ranks, or some rank reported a failure.
    """
    if not is_distributed():
        return
    names = list(values)
    prints = torch.tensor([fingerprint(values[n]) for n in names], dtype=torch.float64)
    buf = torch.cat([prints, -prints, torch.tensor([float(failure)], dtype=torch.float64)])
    all_reduce_max_([buf])
    k = len(names)
    differ = [n for i, n in enumerate(names) if buf[i] != -buf[k + i]]
    if differ:
        raise ValueError(f"{', '.join(differ)} must be the same on every rank (torch.distributed "
                         "runs one computation on the union of the shards), got values that "
                         "differ between ranks")
    code = int(buf[2 * k])
    if code:
        raise ValueError(explain(code) + " (on at least one rank)")


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (identity without a process group).

    Args:
        obj: A picklable object.
        src: The rank whose object is sent.

    Returns:
        Rank ``src``'s object.
    """
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
