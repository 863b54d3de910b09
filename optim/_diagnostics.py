"""Helpers of the optimizers' diagnostics: the stepped parameters' state, and host transfers.

Diagnostics (AGD's ``sgd_fraction``, NDAdam's ``angular_step``, the ``preconditioner`` methods)
are computed on request only; reading them synchronises once per device.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterator

import torch
from torch import Tensor


def to_host(values: list[Tensor]) -> list[float]:
    """Python numbers of 0-d tensors (any devices and dtypes), one synchronisation per device.

    Args:
        values: 0-d tensors.

    Returns:
        Their values as floats, in order.
    """
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, value in enumerate(values):
        by_device[value.device].append(i)
    host: list[float] = [0.0] * len(values)
    for rows in by_device.values():
        wide = [values[i].to(torch.float64 if values[i].device.type != "mps" else torch.float32)
                for i in rows]
        for i, value in zip(rows, torch.stack(wide).tolist()):
            host[i] = value
    return host


def stepped(optimizer: torch.optim.Optimizer
            ) -> Iterator[tuple[int, dict[str, Any], Tensor, dict[str, Any]]]:
    """The parameters of ``optimizer`` that have taken a step.

    Args:
        optimizer: An optimizer whose per-parameter state counts ``step``.

    Yields:
        (index in ``param_groups`` order, group, parameter, state) per stepped parameter.
    """
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and state.get("step", 0) > 0:
                yield index, group, p, state
            index += 1
