"""Result types of surfaces, and their ``.npz`` + JSON storage (provenance, resume, re-plotting).

A file holds the coordinate arrays, the losses (NaN where a point is not computed yet) and a
JSON string ``metadata`` with the kind of result, seed and direction info, a hash of the
directions and of the origin weights, the configuration, and the torch/numpy/sharpscape
versions. Files are written atomically and by rank 0 only.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import metadata as _pkg_metadata
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from analysis.distributed import broadcast_object, rank

FORMAT = 1


@dataclass
class LineResult:
    """Losses ``L(w + alpha d)`` at ``alphas``."""
    alphas: np.ndarray
    losses: np.ndarray
    n_forward: int = 0
    metadata: dict = field(default_factory=dict)


@dataclass
class PlaneResult:
    """Losses ``L(w + x d1 + y d2)``; ``losses[i, j]`` is at ``(xs[j], ys[i])``."""
    xs: np.ndarray
    ys: np.ndarray
    losses: np.ndarray
    n_forward: int = 0
    metadata: dict = field(default_factory=dict)


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


_ARRAYS = {"line": ("alphas", "losses"), "plane": ("xs", "ys", "losses"),
           "interpolate": ("alphas", "losses")}
_TYPES = {"line": LineResult, "plane": PlaneResult, "interpolate": InterpolationResult}


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


def versions() -> dict[str, str]:
    try:
        ours = _pkg_metadata.version("sharpscape")
    except _pkg_metadata.PackageNotFoundError:
        ours = "unknown (not installed)"
    return {"torch": torch.__version__, "numpy": np.__version__, "sharpscape": ours}


def _write_npz(path: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, metadata=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    os.replace(tmp, path)


def _read_npz(path: str) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files if k != "metadata"}
        meta = json.loads(str(f["metadata"]))
    return arrays, meta


def save_result(result, path: str | os.PathLike) -> None:
    """Write a result to ``path`` (.npz with JSON metadata); rank 0 only."""
    kind = result.metadata.get("kind")
    if kind not in _ARRAYS:
        raise ValueError(f"result metadata has no known kind: {kind!r}")
    if rank() == 0:
        meta = {**result.metadata, "n_forward": int(result.n_forward)}
        _write_npz(os.fspath(path), {k: getattr(result, k) for k in _ARRAYS[kind]}, meta)


def load_result(path: str | os.PathLike):
    """The result stored in ``path`` (LineResult, PlaneResult or InterpolationResult)."""
    arrays, meta = _read_npz(os.fspath(path))
    kind = meta.get("kind")
    if kind not in _TYPES:
        raise ValueError(f"{path} is not a sharpscape landscape file (kind={kind!r})")
    extra, keep = {}, None
    if kind == "interpolate":  # the file also holds the endpoints appended for the chord
        extra, keep = {k: meta[k] for k in ("barrier", "loss_a", "loss_b")}, meta["n_alphas"]
    return _TYPES[kind](**{k: arrays[k][:keep] for k in _ARRAYS[kind]}, **extra,
                        n_forward=int(meta.get("n_forward", 0)), metadata=meta)


class Progress:
    """The losses of a computation in progress, mirrored to an .npz file for resuming.

    ``losses`` starts as NaN (not computed). With a ``path`` that exists, finished points are
    read back, after checking that its fingerprint (kind, direction and origin hashes,
    coordinates, config) equals this computation's; a mismatch raises ValueError.
    """

    def __init__(self, path: str | os.PathLike | None, arrays: Mapping[str, np.ndarray],
                 shape: tuple[int, ...], meta: dict):
        self.path = None if path is None else os.fspath(path)
        self.arrays, self.meta = dict(arrays), meta
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
        arrays, old = _read_npz(self.path)
        keys = ("kind", "fingerprint")
        diff = [k for k in keys if json.dumps(old.get(k), sort_keys=True)
                != json.dumps(self.meta.get(k), sort_keys=True)]
        if diff:
            return (f"cannot resume from {self.path}: it holds a different computation "
                    f"({', '.join(diff)} differ: directions, origin weights, coordinates or config "
                    "changed); remove the file or pass another path")
        losses = arrays["losses"]
        if losses.shape != self.losses.shape:
            return f"cannot resume from {self.path}: losses have shape {losses.shape}"
        return losses.astype(np.float64), int(old.get("n_forward", 0))

    def write(self, complete: bool = False) -> None:
        if self.path is None or rank() != 0:
            return
        meta = {**self.meta, "complete": complete, "n_forward": self.n_forward,
                "written": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        _write_npz(self.path, {**self.arrays, "losses": self.losses}, meta)


def make_metadata(kind: str, vectors: Sequence[Mapping[str, Tensor]], origin: Mapping[str, Tensor],
                  coords: Sequence[np.ndarray], config: Mapping[str, Any],
                  extra: Mapping[str, Any] | None = None) -> dict:
    """Provenance of a surface: direction info and seed, hashes, config, versions."""
    infos = [dict(getattr(v, "info", {})) for v in vectors]
    seeds = [i["seed"] for i in infos if "seed" in i]
    fingerprint = {"directions": tensors_hash(vectors), "origin": tensors_hash([origin]),
                   "coordinates": array_hash(*coords), "config": dict(config)}
    return {"kind": kind, "format": FORMAT, "seed": seeds[0] if len(seeds) == 1 else seeds or None,
            "directions": infos, "directions_hash": fingerprint["directions"],
            "fingerprint": fingerprint, "config": dict(config), "versions": versions(),
            **(extra or {})}
