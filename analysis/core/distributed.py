"""The one place where analysis talks to ``torch.distributed``.

When a process group is initialized, each rank holds a shard of the data; sums and sample
counts are all-reduced together so every rank gets the single-process result on the union of
the shards.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """Sum ``tensors`` over all ranks, in place, with one collective call.

    A no-op without a process group. The tensors are packed into one float64 buffer so that
    sums of many small tensors cost one message.
    """
    if not is_distributed() or not tensors:
        return
    buf = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    if dist.get_backend() == "nccl" and buf.device.type != "cuda":
        buf = buf.cuda()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(buf[offset:offset + n].view_as(t))
        offset += n


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (identity without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
