"""Flattening a list of parameter-shaped tensors to one vector and back."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def numel(tensors: Sequence[Tensor]) -> int:
    """The total number of elements of ``tensors``.

    Args:
        tensors: Tensors of any shapes.

    Returns:
        The sum of their ``numel()``.
    """
    return sum(t.numel() for t in tensors)


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate ``tensors`` into one 1-D tensor (a copy).

    Args:
        tensors: Tensors of any shapes, one dtype and device.

    Returns:
        The 1-D concatenation of their flattened values.
    """
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a 1-D ``vector`` into views shaped like ``like`` (the inverse of :func:`flatten`).

    Args:
        vector: A 1-D tensor with ``numel(like)`` elements.
        like: Tensors whose shapes the pieces take.

    Returns:
        Views of ``vector``, one per tensor of ``like``.

    Raises:
        ValueError: ``vector`` is not 1-D, or its length does not match.
    """
    if vector.dim() != 1:
        raise ValueError(f"vector must be 1-D, got shape {tuple(vector.shape)}")
    total = numel(like)
    if vector.numel() != total:
        raise ValueError(
            f"vector has {vector.numel()} elements, but the selected parameters have {total}"
        )
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[offset:offset + n].view_as(t))
        offset += n
    return out
