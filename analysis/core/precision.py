"""Working precision for low-precision (bfloat16, float16) models.

A model's products are computed in its own dtype, but everything accumulated from them (the
Krylov basis and projected matrix, sample-weighted reductions over batches, trace and density
sums) is kept in float32 or wider: a bfloat16 Lanczos basis loses orthogonality after a few
vectors (8 mantissa bits) and returns eigenvalues tens of percent off. The products themselves
carry a relative error of about ``eps`` of the model's dtype, so a residual below that cannot be
certified (:func:`product_eps`).
"""
from __future__ import annotations

import torch
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bfloat16/float16, the dtype itself otherwise."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def accumulable(t: Tensor) -> Tensor:
    """``t`` in its working dtype (no copy unless it is bfloat16/float16)."""
    return t.to(working_dtype(t.dtype))


def product_eps(dtype: torch.dtype) -> float:
    """Relative accuracy of a product computed in ``dtype`` when it is coarser than the
    working precision (``finfo(dtype).eps``); 0 for float32 and wider."""
    return torch.finfo(dtype).eps if dtype in LOW_PRECISION else 0.0
