"""Seeded random draws from a private ``torch.Generator``.

Draws are made on the CPU and then moved, so a seed gives the same numbers on every device
and on every rank of a process group.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .validation import check_int


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``.

    Args:
        seed: A non-negative int.

    Returns:
        A fresh ``torch.Generator`` on the CPU.

    Raises:
        ValueError: ``seed`` is negative (``ArgumentTypeError`` if it is not an int).
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(check_int("seed", seed, 0))
    return gen


def randn(shape, generator: torch.Generator, *, like: Tensor) -> Tensor:
    """Standard normal draws with the device and dtype of ``like``.

    Args:
        shape: The shape of the draws.
        generator: The generator (drawn from in float64 on the CPU).
        like: A tensor whose device and dtype the draws take.

    Returns:
        The draws.
    """
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(like)


def rademacher(shape, generator: torch.Generator, *, like: Tensor) -> Tensor:
    """Uniform +-1 (Rademacher) draws with the device and dtype of ``like``.

    Args:
        shape: The shape of the draws.
        generator: The generator (drawn from on the CPU).
        like: A tensor whose device and dtype the draws take.

    Returns:
        The draws.
    """
    bits = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return (bits * 2 - 1).to(like)


def uniform(shape, generator: torch.Generator, *, like: Tensor, low: float = -1.0,
            high: float = 1.0) -> Tensor:
    """Uniform draws on ``[low, high)`` with the device and dtype of ``like``.

    Args:
        shape: The shape of the draws.
        generator: The generator (drawn from in float64 on the CPU).
        like: A tensor whose device and dtype the draws take.
        low: The lower end.
        high: The upper end.

    Returns:
        The draws.
    """
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return (low + (high - low) * u).to(like)
