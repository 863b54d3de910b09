"""Reusable work buffers (workspace) for the per-tensor update paths.

On the CPU a fresh multi-megabyte temporary costs more than the arithmetic done in it (the kernel
hands out zeroed pages on first touch), so the per-tensor paths write their temporaries into
buffers kept here, sized for the largest parameter and reused by every parameter and step. They
are workspace, not optimizer state: never saved, and rebuilt on demand.
"""
from __future__ import annotations

import torch
from torch import Tensor


class Scratch:
    """Work buffers by (slot, device, dtype)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}

    def like(self, t: Tensor, slot: int = 0) -> Tensor:
        """A contiguous work tensor shaped as ``t``.

        Args:
            t: The tensor whose shape, device and dtype the buffer takes.
            slot: Which of several buffers alive at the same time.

        Returns:
            A view of the slot's buffer (its contents are arbitrary).
        """
        key = (slot, t.device, t.dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < t.numel():
            buf = self._buffers[key] = torch.empty(t.numel(), device=t.device, dtype=t.dtype)
        return buf[:t.numel()].view(t.shape)


def scratch(optimizer: object) -> Scratch:
    """The optimizer's work buffers, created on first use (also after unpickling)."""
    return optimizer.__dict__.setdefault("_scratch", Scratch())
