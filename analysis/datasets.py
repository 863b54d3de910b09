"""The embedded data set: MNIST-1D, generated offline with ``mnist1d.data.make_dataset``."""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .core import check_choice, check_int

SPLITS = ("train", "test")


@dataclass(frozen=True)
class TensorDataset:
    """Train and test tensors of one data set.

    Attributes:
        x: The training inputs.
        y: The training targets.
        x_test: The test inputs.
        y_test: The test targets.
    """

    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor

    def batches(self, batch_size: int, *, split: str = "train", shuffle_seed: int | None = None,
                limit: int | None = None) -> list[tuple[Tensor, Tensor]]:
        """The split as a list of ``(x, y)`` batches (the last one may be smaller).

        Args:
            batch_size: Samples per batch (>= 1).
            split: "train" or "test".
            shuffle_seed: Shuffle the samples with this seed (None: in order).
            limit: Keep only the first ``limit`` samples (before shuffling; None: all).

        Returns:
            The batches.

        Raises:
            ValueError: ``batch_size`` below 1, or ``split`` not "train" or "test".
        """
        check_int("batch_size", batch_size, 1)
        check_choice("split", split, SPLITS)
        x, y = (self.x, self.y) if split == "train" else (self.x_test, self.y_test)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        if shuffle_seed is not None:
            gen = torch.Generator().manual_seed(shuffle_seed)
            perm = torch.randperm(len(y), generator=gen)
            x, y = x[perm], y[perm]
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


@lru_cache(maxsize=4)
def _make(num_samples: int, seed: int) -> dict:
    """The arrays of ``mnist1d.data.make_dataset`` (the caller's random states kept)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    # make_dataset seeds the global `random` and `numpy` generators: keep the caller's state.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        return make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def mnist1d(num_samples: int = 5000, seed: int = 42, dtype: torch.dtype = torch.float32
            ) -> TensorDataset:
    """MNIST-1D (40 features, 10 classes), 80/20 train/test split, generated offline.

    The default (5000 samples, seed 42) is the canonical data set: 4000 train, 1000 test.

    Args:
        num_samples: Samples in all (>= 10, one per class).
        seed: Seed of the generator (>= 0).
        dtype: The dtype of the inputs (the targets are ``torch.long``).

    Returns:
        A :class:`TensorDataset`.

    Raises:
        ValueError: ``num_samples`` below 10 or a negative ``seed``.
    """
    check_int("num_samples", num_samples, 10)  # one per class
    d = _make(int(num_samples), check_int("seed", seed, 0))
    return TensorDataset(
        x=torch.as_tensor(d["x"], dtype=dtype), y=torch.as_tensor(d["y"], dtype=torch.long),
        x_test=torch.as_tensor(d["x_test"], dtype=dtype),
        y_test=torch.as_tensor(d["y_test"], dtype=torch.long))
