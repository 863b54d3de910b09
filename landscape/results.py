"""Result types of surfaces, and the resumable computation that fills them.

The results follow ``analysis.core.results`` (save with ``save_result``, read with
``load_result``). Their ``metadata`` holds the kind of result, seed and direction info, a hash
of the directions and of the origin weights, the configuration, and the torch/numpy/sharpscape
versions. A surface computed with ``path=`` is mirrored to that file after every chunk (NaN
where a point is not computed yet), so an interrupted run resumes where it stopped; its
fingerprint then also holds what :func:`data_probe` can tell about the data and ``loss_fn``, and
resuming from a file of another computation is refused (:class:`Progress`).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from analysis.core import full_values
from analysis.core import (BatchSizeFn, broadcast_object, check_data, check_loss,
                           default_batch_size, load_result, LossFn, make_metadata, preserved, rank,
                           register_result, save_result)

FORMAT = 1


@register_result
@dataclass
class LineResult:
    r"""Losses $L(w + \alpha d)$ at ``alphas`` (:func:`landscape.line`).

    Attributes:
        alphas: the coordinates.
        losses: ``losses[k]`` at ``alphas[k]``.
        n_forward: forward passes spent (one per point and batch, plus probes).
        metadata: seed, direction info, hashes, config and versions.
    """
    alphas: np.ndarray
    losses: np.ndarray
    n_forward: int = 0
    metadata: dict = field(default_factory=dict)


@register_result
@dataclass
class PlaneResult:
    """Losses $L(w + x d_1 + y d_2)$ on a grid (:func:`landscape.plane`).

    Attributes:
        xs: the x coordinates (along ``d1``).
        ys: the y coordinates (along ``d2``).
        losses: [len(ys), len(xs)]; ``losses[i, j]`` is at ``(xs[j], ys[i])``.
        n_forward: forward passes spent.
        metadata: seed, direction info, hashes, config and versions.
    """
    xs: np.ndarray
    ys: np.ndarray
    losses: np.ndarray
    n_forward: int = 0
    metadata: dict = field(default_factory=dict)


@register_result
@dataclass
class InterpolationResult:
    r"""Losses along $(1 - \alpha) w_a + \alpha w_b$ and the barrier above the chord.

    Attributes:
        alphas: the coordinates.
        losses: ``losses[k]`` at ``alphas[k]``.
        barrier: $\max_\alpha L(\alpha) - ((1 - \alpha) L(w_a) + \alpha L(w_b))$ over
            ``alphas`` (:func:`landscape.interpolate`).
        loss_a: $L(w_a)$.
        loss_b: $L(w_b)$.
        n_forward: forward passes spent.
        metadata: hashes, config and versions.
    """
    alphas: np.ndarray
    losses: np.ndarray
    barrier: float
    loss_a: float
    loss_b: float
    n_forward: int = 0
    metadata: dict = field(default_factory=dict)


def tensors_hash(vectors: Sequence[Mapping[str, Tensor]]) -> str:
    """SHA-256 of names, shapes and float64 values of a list of directions.

    Device-independent: the values are hashed on the CPU in float64.

    Args:
        vectors: dicts name -> tensor.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    for vec in vectors:
        h.update(b"|")
        for name in sorted(vec):
            t = full_values([vec[name]])[0].to("cpu", torch.float64).contiguous()
            h.update(f"{name}:{tuple(t.shape)};".encode())
            h.update(t.numpy())  # its buffer: the same bytes as tobytes(), without a copy
    return h.hexdigest()


def array_hash(*arrays: np.ndarray) -> str:
    """SHA-256 of the float64 values of ``arrays`` (coordinates), in order.

    Args:
        *arrays: the arrays.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes() + b"|")
    return h.hexdigest()


class Progress:
    """The losses of a computation in progress, mirrored to a result file for resuming.

    ``losses`` starts as NaN (not computed). ``build(losses, n_forward, metadata)`` makes the
    result written to ``path`` and returned by :meth:`result`; ``losses_of(result)`` reads the
    losses back from a file. With a ``path`` that exists, finished points are read back, after
    checking that its fingerprint equals this computation's: kind, direction and origin
    hashes, coordinates, config, and (from ``probe()``, run only with a path) the data's
    sample count and first/last batch checksums and the loss at the origin; a mismatch, or
    a file that is not a readable result, raises ValueError. The path is checked (its
    directory must exist) before anything is computed.

    Args:
        path: the result file, or None (nothing written).
        shape: the shape of ``losses``.
        meta: the computation's metadata, with its ``fingerprint``.
        build: ``build(losses, n_forward, metadata)``, the result.
        losses_of: ``losses_of(result)``, the losses of a result read back.
        probe: ``probe() -> (fingerprint entries, forwards spent)`` (:func:`data_probe`).

    Raises:
        ValueError: ``path`` cannot be written, or holds another computation or an
            unreadable file.
    """

    def __init__(self, path: str | os.PathLike | None, shape: tuple[int, ...], meta: dict,
                 build: Callable[[np.ndarray, int, dict], Any],
                 losses_of: Callable[[Any], np.ndarray] = lambda result: result.losses,
                 probe: Callable[[], tuple[dict, int]] | None = None):
        self.path = None if path is None else _check_path(path)
        self.meta, self.build, self.losses_of = meta, build, losses_of
        self.losses = np.full(shape, np.nan)
        self.n_forward = 0
        if self.path is not None:
            old = self._read() if rank() == 0 else None  # before anything is computed
            refused = broadcast_object(old if isinstance(old, str) else None)
            if refused is not None:
                raise ValueError(refused)
            if probe is not None:
                extra, self.n_forward = probe()
                self.meta = {**meta, "fingerprint": {**meta["fingerprint"], **extra}}
            loaded = broadcast_object(self._resume(old) if old is not None else None)
            if isinstance(loaded, str):
                raise ValueError(loaded)
            if loaded is not None:
                losses, n_forward = loaded
                self.losses, self.n_forward = losses, self.n_forward + n_forward

    def _read(self) -> Any:
        """The result in the file (rank 0), None without a file, or why it cannot be resumed.

        Why: the file is unreadable, or holds another kind of result.
        """
        if not os.path.exists(self.path):
            return None
        try:
            old = load_result(self.path)
            kind = dict(old.metadata).get("kind")
        except (ValueError, TypeError, AttributeError) as err:
            return f"cannot resume from {self.path}: {err}; {AGAIN}"
        if kind != self.meta.get("kind"):
            return (f"cannot resume from {self.path}: it holds a different computation (kind "
                    f"{kind!r}, not {self.meta.get('kind')!r}); {AGAIN}")
        return old

    def _resume(self, old: Any):
        """The finished losses and cost of ``old``, or why they cannot be resumed.

        They resume only when ``old``'s fingerprint is this computation's.
        """
        cannot = f"cannot resume from {self.path}"
        mine, theirs = self.meta["fingerprint"], old.metadata.get("fingerprint") or {}
        diff = [_PARTS.get(k, k) for k in mine if not _same(k, theirs.get(k), mine[k])]
        if diff:
            return f"{cannot}: it holds a different computation ({', '.join(diff)} differ); {AGAIN}"
        losses = self.losses_of(old)
        if losses.shape != self.losses.shape:
            return f"{cannot}: losses have shape {losses.shape}; {AGAIN}"
        return losses.astype(np.float64), int(old.n_forward)

    def result(self, complete: bool = False) -> Any:
        """The result as computed so far (NaN where a point is not computed yet).

        Args:
            complete: whether every point is computed (recorded in the metadata).

        Returns:
            ``build(losses, n_forward, metadata)``.
        """
        meta = {**self.meta, "complete": complete,
                "written": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        return self.build(self.losses.copy(), self.n_forward, meta)

    def write(self, complete: bool = False) -> None:
        """Mirror the result so far to ``path`` (rank 0), through ``save_result``.

        The write is atomic (``analysis.core.files.atomic_write``, shared with ``figures``): a
        run killed while writing leaves the previous complete file to resume from, and a
        symbolic link at ``path`` is replaced by the file, not written through.

        Args:
            complete: Whether every point is computed (recorded in the metadata).
        """
        if self.path is not None and rank() == 0:
            save_result(self.result(complete), self.path)


AGAIN = "remove the file or choose another path"
LOSS_RTOL = 1e-6   # the loss at the origin may differ in its last bits (threads, devices)
_PARTS = {"origin": "origin weights", "config": "configuration",
          "data": "data (sample count or first/last batch; a shuffled DataLoader changes them)",
          "loss": "loss at the origin (another loss_fn, data or model mode)"}


def _same(key: str, old: Any, new: Any) -> bool:
    if key == "loss" and isinstance(old, float) and isinstance(new, float):
        return math.isclose(old, new, rel_tol=LOSS_RTOL, abs_tol=1e-12)
    return json.dumps(old, sort_keys=True) == json.dumps(new, sort_keys=True)


def _check_path(path: str | os.PathLike) -> str:
    """``path`` as a string, if a result file can be written there (checked up front)."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise ValueError(f"path {path!r} is a directory; pass a file name (e.g. surface.npz)")
    if not os.path.isdir(folder):
        raise ValueError(f"path {path!r}: the directory {folder!r} does not exist; create it or "
                         "choose another path")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"path {path!r}: the directory {folder!r} is not writable; choose "
                         "another path")
    return path


def _batch_hash(batch: Any) -> str:
    """SHA-256 of the tensors (dtype, shape, bytes) and plain values of a batch."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(x.shape)};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, Mapping):
            for k in sorted(x, key=str):
                feed(str(k))
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                feed(v)
        else:
            h.update((repr(x) if isinstance(x, (str, int, float, bool, type(None)))
                      else type(x).__name__).encode() + b";")

    feed(batch)
    return h.hexdigest()


def data_probe(model: nn.Module, loss_fn: LossFn, data: Iterable, model_mode: str,
               batch_size_fn: BatchSizeFn | None) -> tuple[dict, int]:
    """What resuming checks about ``data`` and ``loss_fn``: one pass over the data, one forward.

    Args:
        model: the model (left as found).
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: the iterable of batches.
        model_mode: the mode of the forward.
        batch_size_fn: the sample count of a batch (default: the leading dimension).

    Returns:
        ``{"data": {n_batches, n_samples, first, last}, "loss": loss on the first batch at
        the model's weights}`` and the number of forward passes spent (1, or 0 for no data).

    Raises:
        ValueError: ``data`` is not an iterable of batches, or the loss is not a finite
            scalar.
    """
    check_data(data)
    size = batch_size_fn or default_batch_size
    n_batches, n_samples, first, last = 0, 0, None, None
    for batch in data:
        n_batches, n_samples = n_batches + 1, n_samples + size(batch)
        last = batch
        if first is None:
            first = batch
            with preserved(model, model_mode, weights=False), torch.no_grad():
                loss = float(check_loss(loss_fn(model, batch), " at the origin"))
    described = {"n_batches": n_batches, "n_samples": int(n_samples),
                 "first": None if first is None else _batch_hash(first),
                 "last": None if last is None else _batch_hash(last)}
    return {"data": described, "loss": None if first is None else loss}, int(first is not None)


def surface_metadata(kind: str, vectors: Sequence[Mapping[str, Tensor]],
                     origin: Mapping[str, Tensor], coords: Sequence[np.ndarray],
                     config: Mapping[str, Any]) -> dict:
    """Provenance of a surface: direction info and seed, hashes, config, versions.

    Args:
        kind: "line", "plane" or "interpolate".
        vectors: the directions (their ``info`` is recorded).
        origin: the weights at the origin.
        coords: the coordinate arrays.
        config: the options that change the losses.

    Returns:
        The metadata dict, with the ``fingerprint`` a resumed file must match.
    """
    infos = [dict(getattr(v, "info", {})) for v in vectors]
    seeds = [i["seed"] for i in infos if "seed" in i]
    fingerprint = {"directions": tensors_hash(vectors), "origin": tensors_hash([origin]),
                   "coordinates": array_hash(*coords), "config": dict(config)}
    return make_metadata(seeds[0] if len(seeds) == 1 else seeds or None, config, kind=kind,
                         format=FORMAT, directions=infos, directions_hash=fingerprint["directions"],
                         fingerprint=fingerprint)
