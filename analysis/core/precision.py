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
    """The dtype results computed in ``dtype`` are accumulated in.

    Args:
        dtype: A model's dtype.

    Returns:
        float32 for bfloat16/float16, ``dtype`` itself otherwise.
    """
    return torch.float32 if dtype in LOW_PRECISION else dtype


def accumulable(t: Tensor) -> Tensor:
    """``t`` in its working dtype (no copy unless it is bfloat16/float16).

    Args:
        t: A tensor.

    Returns:
        ``t`` converted to :func:`working_dtype` of its dtype.
    """
    return t.to(working_dtype(t.dtype))


def product_eps(dtype: torch.dtype) -> float:
    """The relative accuracy of a product computed in ``dtype``, if coarser than the working one.

    Args:
        dtype: The dtype the product is computed in.

    Returns:
        ``finfo(dtype).eps`` for bfloat16/float16; 0 for float32 and wider.
    """
    return torch.finfo(dtype).eps if dtype in LOW_PRECISION else 0.0
