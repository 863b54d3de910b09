"""Hyperparameter validation shared by the optimizers: a ValueError naming the value and its valid range."""
from __future__ import annotations

import math
from typing import Sequence


def _finite(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_nonnegative(name: str, value: float) -> None:
    """`name` must satisfy value >= 0 (lr, eps, weight_decay, ...)."""
    if _finite(name, value) < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_positive(name: str, value: float) -> None:
    """`name` must satisfy value > 0 (delta, clip, rho, ...)."""
    if _finite(name, value) <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_betas(betas: Sequence[float]) -> None:
    """betas must be a pair with 0 <= beta1 < 1 and 0 <= beta2 < 1."""
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas, start=1):
        if not 0.0 <= _finite(f"beta{i}", beta) < 1.0:
            raise ValueError(f"beta{i} (betas[{i - 1}]) must be in [0, 1), got {beta}")
