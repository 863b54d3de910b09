"""Result types of surfaces, and the resumable computation that fills them.

The results follow ``analysis.core.results`` (save with ``save_result``, read with
``load_result``). Their ``metadata`` holds the kind of result, seed and direction info, a hash
of the directions and of the origin weights, the configuration, and the torch/numpy/sharpscape
versions. A surface computed with ``path=`` is mirrored to that file after every chunk (NaN
where a point is not computed yet), so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from analysis.core import (broadcast_object, load_result, make_metadata, rank, register_result,
                           save_result)

FORMAT = 1


@register_result
@dataclass
class LineResult:
    """Losses ``L(w + alpha d)`` at ``alphas``."""
    alphas: np.ndarray
    losses: np.ndarray
    n_forward: int = 0
    metadata: dict = field(default_factory=dict)


@register_result
@dataclass
class PlaneResult:
    """Losses ``L(w + x d1 + y d2)``; ``losses[i, j]`` is at ``(xs[j], ys[i])``."""
    xs: np.ndarray
    ys: np.ndarray
    losses: np.ndarray
    n_forward: int = 0
    metadata: dict = field(default_factory=dict)


@register_result
@dataclass
class InterpolationResult:
    """Losses along ``(1 - alpha) w_a + alpha w_b`` and the barrier above the chord."""
    alphas: np.ndarray
    losses: np.ndarray
    barrier: float
    loss_a: float
    loss_b: float
    n_forward: int = 0
    metadata: dict = field(default_factory=dict)


def tensors_hash(vectors: Sequence[Mapping[str, Tensor]]) -> str:
    """SHA-256 of names, shapes and float64 values of a list of directions (device-independent)."""
    h = hashlib.sha256()
    for vec in vectors:
        h.update(b"|")
        for name in sorted(vec):
            t = vec[name].detach().to("cpu", torch.float64).contiguous()
            h.update(f"{name}:{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def array_hash(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes() + b"|")
    return h.hexdigest()


class Progress:
    """The losses of a computation in progress, mirrored to a result file for resuming.

    ``losses`` starts as NaN (not computed). ``build(losses, n_forward, metadata)`` makes the
    result written to ``path`` and returned by :meth:`result`; ``losses_of(result)`` reads the
    losses back from a file. With a ``path`` that exists, finished points are read back, after
    checking that its fingerprint (kind, direction and origin hashes, coordinates, config)
    equals this computation's; a mismatch raises ValueError.
    """

    def __init__(self, path: str | os.PathLike | None, shape: tuple[int, ...], meta: dict,
                 build: Callable[[np.ndarray, int, dict], Any],
                 losses_of: Callable[[Any], np.ndarray] = lambda result: result.losses):
        self.path = None if path is None else os.fspath(path)
        self.meta, self.build, self.losses_of = meta, build, losses_of
        self.losses = np.full(shape, np.nan)
        self.n_forward = 0
        if self.path is not None:
            loaded = self._resume() if rank() == 0 else None
            loaded = broadcast_object(loaded)
            if isinstance(loaded, str):
                raise ValueError(loaded)
            if loaded is not None:
                self.losses, self.n_forward = loaded

    def _resume(self):
        if not os.path.exists(self.path):
            return None
        old_result = load_result(self.path)
        old = old_result.metadata
        keys = ("kind", "fingerprint")
        diff = [k for k in keys if json.dumps(old.get(k), sort_keys=True)
                != json.dumps(self.meta.get(k), sort_keys=True)]
        if diff:
            return (f"cannot resume from {self.path}: it holds a different computation "
                    f"({', '.join(diff)} differ: directions, origin weights, coordinates or config "
                    "changed); remove the file or pass another path")
        losses = self.losses_of(old_result)
        if losses.shape != self.losses.shape:
            return f"cannot resume from {self.path}: losses have shape {losses.shape}"
        return losses.astype(np.float64), int(old_result.n_forward)

    def result(self, complete: bool = False) -> Any:
        """The result as computed so far."""
        meta = {**self.meta, "complete": complete,
                "written": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        return self.build(self.losses.copy(), self.n_forward, meta)

    def write(self, complete: bool = False) -> None:
        if self.path is not None and rank() == 0:
            save_result(self.result(complete), self.path)


def surface_metadata(kind: str, vectors: Sequence[Mapping[str, Tensor]],
                     origin: Mapping[str, Tensor], coords: Sequence[np.ndarray],
                     config: Mapping[str, Any]) -> dict:
    """Provenance of a surface: direction info and seed, hashes, config, versions."""
    infos = [dict(getattr(v, "info", {})) for v in vectors]
    seeds = [i["seed"] for i in infos if "seed" in i]
    fingerprint = {"directions": tensors_hash(vectors), "origin": tensors_hash([origin]),
                   "coordinates": array_hash(*coords), "config": dict(config)}
    return make_metadata(seeds[0] if len(seeds) == 1 else seeds or None, config, kind=kind,
                         format=FORMAT, directions=infos, directions_hash=fingerprint["directions"],
                         fingerprint=fingerprint)
