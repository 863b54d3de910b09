"""Reading device-side optimizer statistics on the host: one synchronisation per device, on request only."""
from __future__ import annotations

from collections import defaultdict

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
