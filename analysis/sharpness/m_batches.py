"""The batches of m-sharpness (Foret et al. 2021).

The data cut into consecutive batches of ``m`` samples.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from ..core import BatchSizeFn, check_data, default_batch_size


def _slice(batch: Any, start: int, stop: int, n: int) -> Any:
    if (start, stop) == (0, n):
        return batch
    if isinstance(batch, Tensor):
        if len(batch) != n:
            raise ValueError(f"m-sharpness splits batches along dim 0, but a tensor of the batch "
                             f"has {len(batch)} rows for {n} samples")
        return batch[start:stop]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(x, start, stop, n) for x in batch)
    if isinstance(batch, Mapping):
        return {k: _slice(v, start, stop, n) for k, v in batch.items()}
    raise ValueError(f"m-sharpness cannot split a batch holding a {type(batch).__name__}: use "
                     "tensors, or tuples/lists/dicts of tensors, or pass data batched by m")


def _concat(pieces: list) -> Any:
    first = pieces[0]
    if len(pieces) == 1:
        return first
    if isinstance(first, Tensor):
        return torch.cat(pieces)
    if isinstance(first, (tuple, list)):
        return type(first)(_concat(list(xs)) for xs in zip(*pieces))
    return {k: _concat([p[k] for p in pieces]) for k in first}


def split_batches(data: Iterable, m: int, batch_size_fn: BatchSizeFn | None = None
                  ) -> tuple[list, list[int]]:
    """Consecutive batches of ``m`` samples (the last one may be smaller) cut from ``data``.

    A batch of exactly ``m`` samples is passed through untouched, so
    ``DataLoader(batch_size=m)`` costs no copy.

    Args:
        data: An iterable of batches (tensors, or tuples/lists/dicts of tensors).
        m: The samples per batch.
        batch_size_fn: ``batch -> int`` sample count (default: the leading dimension).

    Returns:
        ``(batches, sizes)``: the new batches and their sample counts.

    Raises:
        ValueError: ``data`` is not an iterable of batches, or a batch cannot be split.
    """
    check_data(data)
    size = batch_size_fn or default_batch_size
    out, sizes, pending, have = [], [], [], 0
    for batch in data:
        n, start = size(batch), 0
        while start < n:
            take = min(m - have, n - start)
            pending.append(_slice(batch, start, start + take, n))
            have, start = have + take, start + take
            if have == m:
                out.append(_concat(pending))
                sizes.append(m)
                pending, have = [], 0
    if pending:
        out.append(_concat(pending))
        sizes.append(have)
    return out, sizes
