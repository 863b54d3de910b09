"""Exact full-data losses at many points ``sum_j c_j V_j`` of weight space, vectorised.

Every surface of the package is a set of points, each a linear combination of a few weight
vectors (the origin and one or two directions for ``line``/``plane``; two endpoints for
``interpolate``). Points are evaluated in chunks: ``torch.func.vmap`` over the points of a
chunk, ``functional_call`` for the forward, and ``analysis.core.data_mean`` for the
sample-weighted mean over the data (all-reduced over ranks). Models that cannot be vmapped
(random layers, in-place buffer updates, data-dependent control flow) are evaluated point by
point with the weights written into the model; both paths give the same values. With
``vectorize="auto"``, a hook-free ``nn.Sequential`` of sample-wise layers and a ``supervised``
loss take a faster path with the same values to rounding: :mod:`landscape.stacked` (stacked
weights, the first Linear/convolution layer computed once per batch).

On a CPU, batching points pays only for small per-point work: a vmap call has a fixed
overhead, and once one of a chunk's activation tensors outgrows about 2 MiB, every call
page-faults its fresh allocations and runs slower per point than one point at a time (MNIST-1D
MLP: with 4000 samples, vmapped chunks of 4-38 points take 1.5-3.3 times the loop's time per
point; with 32 samples, about a quarter of it; see benchmarks/README.md). So
``vectorize="auto"`` on a CPU vmaps chunks whose largest activation tensor stays within
``CPU_TENSOR_BYTES``, and loops when fewer than ``MIN_CPU_CHUNK`` points fit.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from analysis.core import (all_reduce_max_, ArgumentTypeError, BatchSizeFn, check_choice,
                           check_data, check_int, check_number, check_positive, data_mean,
                           default_batch_size, loss_reduction, LossFn, preserved, rank,
                           world_size)

from .directions import named_targets
from .results import Progress
from .stacked import SequentialPlan, sequential_plan, xy_batch

VECTORIZE = ("auto", True, False)
DISTRIBUTE = ("data", "grid")
DEFAULT_MAX_MEMORY = 2 ** 28  # bytes of weights and activations per chunk of points
CPU_TENSOR_BYTES = 2 ** 21    # on a CPU: the largest activation tensor of a vmapped chunk
MIN_CPU_CHUNK = 8             # fewer points per vmap call than this: the loop is faster on a CPU


class _LossCall(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that ``functional_call`` on it swaps the
    model's tensors for the whole loss computation (attribute access and ``parameters()``
    inside ``loss_fn`` see the point's weights, not only ``model.forward``)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.training = model.training  # not .train(): that would recurse into model

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


class LossShapeError(ValueError):
    """loss_fn returned something other than a scalar tensor (never a reason to fall back)."""


def _scalar(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise LossShapeError("loss_fn must return a scalar tensor (the mean loss over the batch), "
                         f"got {shape}")
    return loss.reshape(())


def combine(parts: Sequence[tuple[int, Tensor]], c: Tensor) -> Tensor:
    """``sum_j c[j] * V_j`` in a fixed order (the same arithmetic with and without vmap)."""
    j, t = parts[0]
    out = t * c[j]
    for j, t in parts[1:]:
        out = out + t * c[j]
    return out


def _activation_bytes(model: nn.Module, loss_fn: LossFn, batch: Any) -> tuple[int, int]:
    """Bytes of all module outputs of one forward on ``batch``, and of the largest one."""
    total = largest = 0

    def hook(_module, _inputs, output):
        nonlocal total, largest
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, Tensor):
                size = t.numel() * t.element_size()
                total, largest = total + size, max(largest, size)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    return total, largest


def _probe(model: nn.Module, loss_fn: LossFn, batch: Any, plan: SequentialPlan | None
           ) -> tuple[int, int]:
    """``_activation_bytes`` of ``batch``; for the sequential plan's sample-wise layers, from
    its first sample times the batch's samples (the same sizes, for a forward of one sample)."""
    n = len(batch[0]) if xy_batch(batch, targets=True) else 0
    if plan is None or n < 2:
        return _activation_bytes(model, loss_fn, batch)
    one = (batch[0][:1], batch[1][:1], *batch[2:])
    return tuple(n * size for size in _activation_bytes(model, loss_fn, one))


def evaluate_points(model: nn.Module, loss_fn: LossFn, data, vectors: Sequence[Mapping[str, Tensor]],
                    coords: np.ndarray, store: Progress, describe: Callable[[int], str], *,
                    model_mode: str = "eval", batch_size_fn: BatchSizeFn | None = None,
                    chunk_size: int | None = None, max_memory: int = DEFAULT_MAX_MEMORY,
                    vectorize: bool | str = "auto", distribute: str = "data",
                    progress: bool = True, desc: str = "landscape") -> None:
    """Fill the NaN entries of ``store.losses`` (flattened) with ``L(sum_j coords[i, j] V_j)``.

    vectors: weight vectors (dicts name -> tensor, validated); ``vectors[0]`` names every
        tensor that moves. coords: [n_points, len(vectors)].
    chunk_size: points per vmap call, or per data pass in the loop (default: as many as fit
        in ``max_memory`` bytes of weights and activations).
    max_memory: bytes of weights and activations per chunk (default ``DEFAULT_MAX_MEMORY``);
        on a CPU, vmapped chunks are also kept to ``CPU_TENSOR_BYTES`` per activation tensor.
    vectorize: "auto" (vmap, falling back to a loop if the model cannot be vmapped; on a CPU,
        the loop when fewer than ``MIN_CPU_CHUNK`` points fit, see the module docstring), True
        (vmap only), False (loop only).
    distribute: under torch.distributed, "data": each rank holds a shard of the data and
        evaluates every point on it (sums all-reduced); "grid": each rank holds all the data
        and evaluates its share of the points (results gathered on every rank).
    The losses are written to ``store`` (and its file) after every chunk. A non-finite loss
    raises ValueError naming the point (``describe(index)``). ``store.n_forward`` counts
    forward passes: one per point and batch, plus one probe sizing the chunks when
    ``chunk_size`` is None (of one sample, scaled, for the sequential plan).
    """
    if not (isinstance(vectorize, (bool, np.bool_)) or (isinstance(vectorize, str)
                                                        and vectorize == "auto")):
        error = ValueError if isinstance(vectorize, str) else ArgumentTypeError
        raise error(f"vectorize must be one of {VECTORIZE}, got {vectorize!r}")
    vectorize = vectorize if isinstance(vectorize, str) else bool(vectorize)
    check_choice("distribute", distribute, DISTRIBUTE)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    check_positive("max_memory", max_memory)
    check_data(data)
    flat = store.losses.reshape(-1)
    todo = np.flatnonzero(np.isnan(flat))
    if len(todo) == 0:
        return
    parts = {n: [(j, v[n]) for j, v in enumerate(vectors) if n in v] for n in vectors[0]}
    share, me = (world_size(), rank()) if distribute == "grid" else (1, 0)
    reduction = loss_reduction(loss_fn)

    with preserved(model, model_mode), torch.no_grad():
        targets = named_targets(model)
        dtype = next(iter(vectors[0].values())).dtype
        device = next(iter(vectors[0].values())).device

        caller = _LossCall(model, loss_fn)

        def vmapped(cs: Tensor, batch) -> Tensor:
            def one(c):
                mapping = {f"model.{n}": combine(p, c) for n, p in parts.items()}
                return _scalar(functional_call(caller, mapping, (batch,)))
            return vmap(one)(cs)

        # per vector j: the model tensors it moves and its values for them
        terms = [(j, [targets[n] for n in parts if n in v], [v[n] for n in parts if n in v])
                 for j, v in enumerate(vectors)]
        terms = [term for term in terms if term[1]]

        def looped(cs: Tensor, batch) -> Tensor:
            out = []
            for c in cs:  # combine's arithmetic, one multi-tensor op per vector
                (j, moving, values), *rest = terms
                torch._foreach_copy_(moving, torch._foreach_mul(values, c[j]))
                for j, moved, values in rest:
                    torch._foreach_add_(moved, torch._foreach_mul(values, c[j]))
                out.append(_scalar(loss_fn(model, batch)))
            return torch.stack(out)

        def run(chunk: np.ndarray, fn) -> np.ndarray:
            mine = torch.as_tensor(np.arange(len(chunk)) % share == me, device=device)
            cs = torch.as_tensor(coords[chunk], dtype=dtype, device=device)[mine]

            def per_batch(batch):  # the loss's dtype may differ from the weights'
                values = torch.zeros(len(chunk), dtype=torch.float64, device=device)
                if len(cs):
                    values[mine] = fn(cs, batch).to(values.dtype)
                    store.n_forward += len(cs)
                return [values, mine.to(dtype)]

            def zeros():
                return [torch.zeros(len(chunk), dtype=dtype, device=device) for _ in range(2)]

            total, owned = data_mean(data, per_batch, batch_size_fn, reduction=reduction,
                                     zeros=zeros).values
            # a mean: owned == 1 unless distribute="grid"; a sum is the owner's alone already
            return (total / owned if reduction == "mean" else total).cpu().double().numpy()

        plan = sequential_plan(model, loss_fn, parts) if vectorize == "auto" else None
        group = chunk_size  # points per forward of the sequential plan

        def stacked(cs: Tensor, batch) -> Tensor:
            return torch.stack([_scalar(v) for v in plan.losses(cs, batch, group, device)])

        mode = stacked if plan else looped if vectorize is False else vmapped
        if chunk_size is None:
            weight_bytes = sum(v.numel() * v.element_size() for v in vectors[0].values())
            first = next(iter(data), None)  # None: this rank's shard is empty
            act, largest = (0, 0) if first is None else _probe(model, loss_fn, first, plan)
            store.n_forward += first is not None
            # every rank must make the same passes over its shard: size for the largest batch
            sizes = torch.tensor([float(act), float(largest)], dtype=torch.float64)
            all_reduce_max_([sizes])
            act, largest = (int(x) for x in sizes.tolist())
            chunk_size = max(1, min(len(todo), max_memory // (3 * weight_bytes + act)))
            group = chunk_size
            if plan and device.type == "cpu":
                group = plan.cpu_group(largest, chunk_size)
            if plan:  # it holds one group's weights: a chunk sets how often the first layer runs
                chunk_size = max(chunk_size, min(len(todo), max_memory // max(weight_bytes, 1)))
                if isinstance(data, (list, tuple)) and first is not None:
                    plan.bunch(data, batch_size_fn or default_batch_size, device, largest, group)
            if mode is vmapped and device.type == "cpu":
                cached = min(chunk_size, CPU_TENSOR_BYTES // max(largest, 1))
                if cached >= min(MIN_CPU_CHUNK, len(todo)) or vectorize is True:
                    chunk_size = max(1, cached)
                else:
                    mode = looped
        step = int(chunk_size) * share
        bar = tqdm(total=len(todo), desc=desc, disable=not progress or rank() != 0)
        try:
            for start in range(0, len(todo), step):
                chunk = todo[start:start + step]
                try:
                    values = run(chunk, mode)
                except Exception as err:
                    if (mode is looped or vectorize is True or start > 0
                            or isinstance(err, LossShapeError)):
                        raise
                    warnings.warn(f"the model cannot be vmapped ({type(err).__name__}: {err}); "
                                  "evaluating the points one by one", RuntimeWarning)
                    mode = looped
                    values = run(chunk, mode)
                bad = np.flatnonzero(~np.isfinite(values))
                if len(bad):
                    raise ValueError(f"non-finite loss {values[bad[0]]} at {describe(chunk[bad[0]])}"
                                     + ("" if store.path is None else
                                        f"; finished points are saved in {store.path}"))
                flat[chunk] = values
                store.write(complete=start + step >= len(todo))
                bar.update(len(chunk))
        finally:
            bar.close()


def check_coords(values, name: str) -> np.ndarray:
    """A non-empty 1-D float64 array of finite coordinates (each entry a real number: never
    a bool, a string or None, which numpy would silently convert)."""
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of coordinates, got shape {arr.shape}")
    entries = values if isinstance(values, (list, tuple)) else arr
    return np.array([check_number(name + " entries", x.item() if isinstance(x, Tensor) else x)
                     for x in entries], dtype=np.float64)


def fmt(x: float) -> str:
    return f"{x:.6g}" if math.isfinite(x) else str(x)
