"""Fused updates: one tensor's whole element-wise update compiled by ``torch.compile`` into one kernel.

``FusedKernel(fn)`` compiles ``fn`` on first use with dynamic shapes, so one compiled kernel serves every
parameter of a dtype and device; the step's scalars travel in one float64 tensor (``scalars``), so a new
learning rate or step count never recompiles. Tensors are passed flattened (contiguous ones only). When
compiling fails (no C++ compiler or Triton, an unsupported backend), ``__call__`` returns False once with a
``RuntimeWarning`` naming the cause and the optimizer takes its eager per-tensor path from then on.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor


def scalars_tensor(values: tuple[float, ...]) -> Tensor:
    """The step's Python scalars as one float64 CPU tensor (no host-to-device copy, no recompilation)."""
    return torch.tensor(values, dtype=torch.float64)


class FusedKernel:
    """A per-tensor update function, compiled on first call; falls back (returns False) if it cannot be."""

    def __init__(self, fn: Callable[..., Any], name: str):
        self.fn, self.name = fn, name
        self._compiled: Callable[..., Any] | None = None
        self.error: str | None = None

    def __call__(self, *args: Any, **flags: Any) -> tuple[bool, Any]:
        """(True, what the kernel returns), or (False, None) when it is not available (the caller then
        runs its eager path)."""
        if self.error is not None:
            return False, None
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
            return True, self._compiled(*args, **flags)
        except Exception as exc:  # noqa: BLE001  (any compiler failure: the eager path is the fallback)
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(f"{self.name}(fused=True): torch.compile failed ({self.error}); using the eager "
                          "per-tensor update instead", RuntimeWarning, stacklevel=3)
            return False, None


def fusable(*tensors: Tensor | None) -> bool:
    """Dense, contiguous tensors (flattened views of them are what the kernels take)."""
    return all(t is None or (t.is_contiguous() and t.layout == torch.strided) for t in tensors)


def flat(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.view(-1)
