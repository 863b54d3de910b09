"""Fused updates: a param group's whole update compiled by ``torch.compile`` into one call.

``FusedKernel(fn)`` compiles ``fn(*args, **flags)`` on first use; ``fn`` applies one tensor's
update to every tuple of tensors it is given (one Python call per param group, so the per-call
overhead does not grow with the number of tensors); ``update`` gathers a group's tensors and
scalar rows in one pass, calls it and hands back the parameters left for the eager path.
``nn.Parameter`` shapes are compiled as static (torch.compile's default), so a new model
compiles again. Each optimizer module defines its own ``fn``: ``torch.compile`` caches per
function, and its recompilation limit (8) then counts one optimizer's variants (flags, dtypes,
thread counts, models) only; past it, ``fn`` runs uncompiled (unfused). The step's scalars
travel in one float64 CPU tensor, a row per tensor, so a new learning rate or step count never
recompiles. When compiling fails (no C++ compiler or Triton, an unsupported backend), the call
returns ``(False, None)`` once with a ``RuntimeWarning`` naming the cause, and the optimizer
takes its eager per-tensor path from then on.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor


#: Inductor options: no per-call re-checks of the sizes and alignment it compiled for (the
#: guards have checked them)
_OPTIONS = {"size_asserts": False, "alignment_asserts": False}


def scalars_tensor(rows: list[tuple[float, ...]]) -> Tensor:
    """The step's Python scalars, one row per tensor, as one float64 CPU tensor.

    No host-to-device copy, no recompilation.
    """
    return torch.tensor(rows, dtype=torch.float64)


class FusedKernel:
    """A param group's update function, compiled on first call.

    Args:
        fn: The update of a param group's tensors.
        name: The optimizer's name, for the warning when compiling fails.
    """

    def __init__(self, fn: Callable[..., Any], name: str):
        self.fn, self.name = fn, name
        self._compiled: Callable[..., Any] | None = None
        self.error: str | None = None

    def __call__(self, *args: Any, **flags: Any) -> tuple[bool, Any]:
        """Run the compiled ``fn``.

        Returns:
            (True, what the compiled ``fn`` returns), or (False, None) when no kernel is
            available (the caller then runs its eager path).
        """
        if self.error is not None:
            return False, None
        try:
            if self._compiled is None:
                self._compiled = torch.compile(
                    self.fn, dynamic=True, fullgraph=True, options=_OPTIONS
                )
            return True, self._compiled(*args, **flags)
        except Exception as exc:  # noqa: BLE001  (any compiler failure: eager path)
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(
                f"{self.name}(fused=True): torch.compile failed ({self.error}); using the eager "
                "per-tensor update instead",
                RuntimeWarning,
                stacklevel=3,
            )
            return False, None

    def update(
        self,
        params: list[Tensor],
        states: list[dict[str, Any]],
        tensors_of: Callable[[Tensor, dict[str, Any]], tuple[Tensor | None, ...]],
        row_of: Callable[[int], tuple[float, ...]],
        **flags: Any,
    ) -> tuple[list[Tensor], list[dict[str, Any]]]:
        """A group's update in one call on the params whose tensors are all fusable.

        One pass, and ``row_of(step)`` once per distinct ``state["step"]``: one row object for
        the whole group unless some parameters missed steps.

        Args:
            params: The group's parameters with a gradient.
            states: Their states.
            tensors_of: ``(p, state) -> tensors`` given to ``fn``.
            row_of: The scalars of a step count.
            **flags: Static flags of ``fn``.

        Returns:
            The (params, states) left for the eager path (all of them when no kernel is
            available).
        """
        tensors, rows, left, left_states, by_step = [], [], [], [], {}
        for p, state in zip(params, states):
            ts = tensors_of(p, state)
            if not fusable(*ts):
                left.append(p)
                left_states.append(state)
                continue
            step = state["step"]
            row = by_step.get(step)
            if row is None:
                row = by_step[step] = row_of(step)
            tensors.append(ts)
            rows.append(row)
        if tensors and not self(tensors, scalars_tensor(rows), **flags)[0]:
            return params, states
        return left, left_states


def fusable(*tensors: Tensor | None) -> bool:
    """Dense, contiguous tensors of one element or more dimensions (what the kernels take).

    0-dim tensors go to the eager path: inductor (CPU, ``dynamic=True``) dropped the in-place
    update of a 0-dim float64 input, leaving such parameters at their initial value.
    """
    for t in tensors:  # a plain loop: this runs for every tensor of every step
        if t is not None and (t.dim() == 0 or not (t.is_contiguous()
                                                   and t.layout == torch.strided)):
            return False
    return True
