"""Reading optimizer statistics: the stepped parameters' state, and on the host one synchronisation per device,
on request only."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterator

import torch
from torch import Tensor


def to_host(values: list[Tensor]) -> list[float]:
    """Python numbers of 0-d tensors (any devices and dtypes), stacked per device so each device syncs once."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, value in enumerate(values):
        by_device[value.device].append(i)
    host: list[float] = [0.0] * len(values)
    for rows in by_device.values():
        stacked = torch.stack([values[i].to(torch.float64 if values[i].device.type != "mps" else torch.float32)
                               for i in rows])
        for i, value in zip(rows, stacked.tolist()):
            host[i] = value
    return host


def stepped(optimizer: torch.optim.Optimizer) -> Iterator[tuple[int, dict[str, Any], Tensor, dict[str, Any]]]:
    """(index in ``param_groups`` order, group, parameter, state) of each parameter that has taken a step."""
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and state.get("step", 0) > 0:
                yield index, group, p, state
            index += 1
