r"""Exact full-data losses at many points $w = \sum_j c_j V_j$ of weight space, vectorised.

Every surface of the package is a set of points, each a linear combination of a few weight
vectors (the origin and one or two directions for ``line``/``plane``; two endpoints for
``interpolate``). :func:`evaluate_points` is a driver: it plans the chunks of points
(:func:`plan_chunks`, a pure function of the sizes measured by one probe forward), shares them
between ranks (:func:`point_chunks`, :func:`owned_points`) and hands each chunk to one of three
point evaluators, each a callable ``evaluator(cs, batch) -> losses``:

* :class:`StackedPoints`: a hook-free ``nn.Sequential`` of sample-wise layers and a
  ``supervised`` loss, with ``vectorize="auto"``: :mod:`landscape.stacked` (stacked weights, the
  first Linear/convolution layer computed once per batch), the same values to rounding;
* :class:`VmappedPoints`: ``torch.func.vmap`` over the points of a chunk, ``functional_call``
  for the forward;
* :class:`LoopedPoints`: point by point, the weights written into the model (models that
  cannot be vmapped: random layers, in-place buffer updates, data-dependent control flow).

All three give the same values; ``analysis.core.data_mean`` makes the sample-weighted mean over
the data (all-reduced over ranks).

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
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap
from tqdm.auto import tqdm

from analysis.core import (own_call, all_reduce_max_, ArgumentTypeError, BatchSizeFn, check_choice,
                           check_data, check_int, check_number, check_positive, data_mean,
                           default_batch_size, loss_reduction, LossFn, LossModule, preserved, rank,
                           world_size)

from analysis.sharded import ShardedLoss
from analysis.core import is_sharded, local_like

from .directions import named_targets
from .results import Progress
from .stacked import SequentialPlan, sequential_plan, xy_batch

VECTORIZE = ("auto", True, False)
DISTRIBUTE = ("data", "grid")
EVALUATORS = ("stacked", "vmap", "loop")
DEFAULT_MAX_MEMORY = 2 ** 28  # bytes of weights and activations per chunk of points
CPU_TENSOR_BYTES = 2 ** 21    # on a CPU: the largest activation tensor of a vmapped chunk
MIN_CPU_CHUNK = 8             # fewer points per vmap call than this: the loop is faster on a CPU

Parts = Mapping[str, Sequence[tuple[int, Tensor]]]  # name -> [(j, V_j[name])]


class LossShapeError(ValueError):
    """``loss_fn`` returned something other than a scalar tensor.

    Never a reason to fall back from one evaluator to another: every evaluator would fail.
    """


def _scalar(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise LossShapeError("loss_fn must return a scalar tensor (the mean loss over the batch), "
                             f"got {shape}")
    return loss.reshape(())


def combine(parts: Sequence[tuple[int, Tensor]], c: Tensor) -> Tensor:
    r"""$\sum_j c_j V_j$ in a fixed order (the same arithmetic with and without vmap).

    Args:
        parts: ``[(j, V_j)]``, the vectors' values for one tensor (at least one).
        c: the point's coordinates, indexed by ``j``.

    Returns:
        ``c[j0] * V_j0 + c[j1] * V_j1 + ...``, summed in the order of ``parts``.
    """
    j, t = parts[0]
    out = t * c[j]
    for j, t in parts[1:]:
        out = out + t * c[j]
    return out


class StackedPoints:
    """The points evaluated by a :class:`landscape.stacked.SequentialPlan`.

    Args:
        plan: the model's sequential plan (:func:`landscape.stacked.sequential_plan`).
        group: points per forward.
        device: the device the points' weights live on.
    """

    kind = "stacked"

    def __init__(self, plan: SequentialPlan, group: int, device: torch.device):
        self.plan, self.group, self.device = plan, group, device

    def __call__(self, cs: Tensor, batch: Any) -> Tensor:
        """The loss at each point ``cs[p]`` ([P, n_vectors]) on ``batch``, shape [P]."""
        return torch.stack([_scalar(v) for v in self.plan.losses(cs, batch, self.group,
                                                                 self.device)])


class VmappedPoints:
    """The points of a chunk evaluated by one ``torch.func.vmap`` call.

    Each point's tensors are given to ``functional_call`` on :class:`analysis.core.LossModule`,
    so ``loss_fn`` sees them wherever it reads the model.

    Args:
        model: the model (only read).
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        parts: name -> ``[(j, V_j[name])]`` for every tensor that moves.
    """

    kind = "vmap"

    def __init__(self, model: nn.Module, loss_fn: LossFn, parts: Parts):
        self.caller, self.parts = LossModule(model, loss_fn), parts

    def __call__(self, cs: Tensor, batch: Any) -> Tensor:
        """The loss at each point ``cs[p]`` ([P, n_vectors]) on ``batch``, shape [P]."""
        def one(c: Tensor) -> Tensor:
            mapping = {f"model.{n}": combine(p, c) for n, p in self.parts.items()}
            return _scalar(own_call(self.caller, mapping, (batch,)))
        return vmap(one)(cs)


class LoopedPoints:
    """The points evaluated one by one, each point's weights written into the model.

    The caller restores the model (``analysis.core.preserved``).

    Args:
        model: the model, whose moving tensors are overwritten.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        vectors: the weight vectors ``V_j`` (dicts name -> tensor).
        parts: name -> ``[(j, V_j[name])]`` for every tensor that moves.
    """

    kind = "loop"

    def __init__(self, model: nn.Module, loss_fn: LossFn, vectors: Sequence[Mapping[str, Tensor]],
                 parts: Parts):
        targets = named_targets(model)
        # per vector j: the model tensors it moves and its values for them
        terms = [(j, [targets[n] for n in parts if n in v], [v[n] for n in parts if n in v])
                 for j, v in enumerate(vectors)]
        self.terms = [term for term in terms if term[1]]
        self.model, self.loss_fn = model, loss_fn

    def __call__(self, cs: Tensor, batch: Any) -> Tensor:
        """The loss at each point ``cs[p]`` ([P, n_vectors]) on ``batch``, shape [P]."""
        out = []
        for c in cs:  # combine's arithmetic, one multi-tensor op per vector
            (j, moving, values), *rest = self.terms
            torch._foreach_copy_(moving, torch._foreach_mul(values, c[j]))
            for j, moved, values in rest:
                torch._foreach_add_(moved, torch._foreach_mul(values, c[j]))
            out.append(_scalar(self.loss_fn(self.model, batch)))
        return torch.stack(out)


class ShardedPoints:
    """The points of a model sharded with FSDP2's ``fully_shard``, one by one.

    Each point's weights are formed on the local shards ($w + a d + b e$ on every rank's
    piece) and evaluated on :func:`analysis.sharded.functional_copy`, which gathers each
    unit's full weights during its forward; the model is never written to.

    Args:
        model: the ``fully_shard`` model (only read).
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: this rank's batches.
        parts: name -> ``[(j, V_j[name])]``, DTensors placed like the parameters.

    Raises:
        NotImplementedError: a vector moves a buffer (only parameters are sharded).
    """

    kind = "sharded"

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable, parts: Parts):
        params = dict(model.named_parameters())
        buffers = [n for n in parts if n not in params]
        if buffers:
            raise NotImplementedError("directions over buffers of a fully_shard model are not "
                                      f"supported ({buffers[:3]}); move only parameters")
        self.loss = ShardedLoss(model, loss_fn, data, [])
        self.params = params
        self.local = {n: [(j, v.to_local()) for j, v in p] for n, p in parts.items()}

    def __call__(self, cs: Tensor, batch: Any) -> Tensor:
        """The loss at each point ``cs[p]`` ([P, n_vectors]) on ``batch``, shape [P]."""
        out = []
        for c in cs:
            moved = {n: local_like(combine(p, c), self.params[n]) for n, p in self.local.items()}
            self.loss.move(moved)
            out.append(_scalar(self.loss.batch_loss(batch)))
        return torch.stack(out)


@dataclass(frozen=True)
class Footprint:
    """The bytes that size a chunk of points.

    Attributes:
        weights: one point's moving tensors.
        activations: all module outputs of one forward on the largest batch of any rank.
        largest: the largest of those outputs.
    """

    weights: int
    activations: int
    largest: int


@dataclass(frozen=True)
class ChunkPlan:
    """How the points are evaluated: chunks of ``size`` points, by the ``evaluator``.

    Attributes:
        size: points per chunk on each rank (per vmap call, per data pass of the loop).
        group: points per forward of :class:`StackedPoints`.
        evaluator: "stacked", "vmap" or "loop".
    """

    size: int
    group: int
    evaluator: str


def plan_chunks(n_points: int, evaluator: str, footprint: Footprint | None = None, *,
                chunk_size: int | None = None, max_memory: int = DEFAULT_MAX_MEMORY,
                cpu: bool = False, forced: bool = False) -> ChunkPlan:
    r"""The chunks for ``n_points`` points: a pure function of the sizes measured.

    Without ``chunk_size``, a chunk holds as many points as fit in ``max_memory``, each taking
    three copies of its weights and one forward's activations:
    $\text{size} = \max(1, \min(n, \lfloor M / (3 W + A) \rfloor))$. The stacked evaluator
    holds one group's weights only, so its chunks grow to $\min(n, \lfloor M / W \rfloor)$
    points (a chunk sets how often its first layer runs), with groups of that first size (on
    a CPU, within ``stacked.GROUP_ACTIVATION_BYTES`` per activation tensor). On a CPU, vmapped
    chunks keep their largest activation tensor within ``CPU_TENSOR_BYTES``; when fewer than
    ``MIN_CPU_CHUNK`` points (or all of them, if fewer) then fit, the loop evaluates them
    unless vmap is ``forced``.

    Args:
        n_points: the number of points still to evaluate (at least 1).
        evaluator: "stacked", "vmap" or "loop", the evaluator asked for.
        footprint: the measured sizes; needed unless ``chunk_size`` is given.
        chunk_size: the user's points per chunk (and per group); then nothing is sized.
        max_memory: bytes of weights and activations per chunk.
        cpu: whether the points are evaluated on a CPU.
        forced: vmap was asked for explicitly (``vectorize=True``): never the loop.

    Returns:
        The :class:`ChunkPlan`.
    """
    if chunk_size is not None:
        return ChunkPlan(chunk_size, chunk_size, evaluator)
    weights, largest = footprint.weights, footprint.largest
    size = max(1, min(n_points, max_memory // (3 * weights + footprint.activations)))
    group = size
    if evaluator == "stacked":
        if cpu:
            group = SequentialPlan.cpu_group(largest, size)
        size = max(size, min(n_points, max_memory // max(weights, 1)))
    elif evaluator == "vmap" and cpu:
        cached = min(size, CPU_TENSOR_BYTES // max(largest, 1))
        if cached >= min(MIN_CPU_CHUNK, n_points) or forced:
            size = max(1, cached)
        else:
            evaluator = "loop"
    return ChunkPlan(size, group, evaluator)


def point_chunks(todo: np.ndarray, size: int, share: int = 1) -> list[np.ndarray]:
    """The points ``todo`` in chunks of ``size`` points per rank.

    Args:
        todo: the flat indices of the points to evaluate.
        size: points per chunk on each rank.
        share: the number of ranks the points are shared between (1: every rank evaluates
            every point, ``distribute="data"``).

    Returns:
        Consecutive slices of ``todo`` of ``size * share`` points (the last may be shorter).
    """
    step = int(size) * share
    return [todo[start:start + step] for start in range(0, len(todo), step)]


def owned_points(n: int, share: int = 1, me: int = 0) -> np.ndarray:
    """Which of a chunk's ``n`` points rank ``me`` of ``share`` evaluates: every ``share``-th.

    Args:
        n: the chunk's number of points.
        share: the number of ranks sharing the points.
        me: this rank, in ``range(share)``.

    Returns:
        A boolean mask of length ``n``.
    """
    return np.arange(n) % share == me


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
    """``_activation_bytes`` of ``batch`` (for the plan, of its first sample, scaled).

    For the sequential plan's sample-wise layers, the sizes are those of a forward of the
    batch's first sample times the batch's samples (the same sizes, one forward of one sample).
    """
    n = len(batch[0]) if xy_batch(batch, targets=True) else 0
    if plan is None or n < 2:
        return _activation_bytes(model, loss_fn, batch)
    one = (batch[0][:1], batch[1][:1], *batch[2:])
    return tuple(n * size for size in _activation_bytes(model, loss_fn, one))


def _footprint(model: nn.Module, loss_fn: LossFn, data: Iterable, moving: Mapping[str, Tensor],
               plan: SequentialPlan | None, store: Progress) -> tuple[Footprint, bool]:
    """The :class:`Footprint`, and whether this rank's shard holds a batch.

    One probe forward, counted in ``store``; the activations are the largest over ranks (every
    rank must make the same passes over its shard).
    """
    weights = sum(v.numel() * v.element_size() for v in moving.values())
    first = next(iter(data), None)  # None: this rank's shard is empty
    act, largest = (0, 0) if first is None else _probe(model, loss_fn, first, plan)
    store.n_forward += first is not None
    sizes = torch.tensor([float(act), float(largest)], dtype=torch.float64)
    all_reduce_max_([sizes])
    act, largest = (int(x) for x in sizes.tolist())
    return Footprint(weights, act, largest), first is not None


class _ChunkLosses:
    """The full-data losses at a chunk's points, one pass over the data.

    This rank evaluates its share of the points (every point for ``distribute="data"``) on its
    data; the sums are all-reduced over ranks; forwards are counted in ``store``.
    """

    def __init__(self, data: Iterable, coords: np.ndarray, store: Progress,
                 batch_size_fn: BatchSizeFn | None, reduction: str, like: Tensor,
                 share: int, me: int):
        self.data, self.coords, self.store = data, coords, store
        self.batch_size_fn, self.reduction = batch_size_fn, reduction
        self.dtype, self.device, self.share, self.me = like.dtype, like.device, share, me

    def __call__(self, chunk: np.ndarray, evaluate: Callable[[Tensor, Any], Tensor]
                 ) -> np.ndarray:
        dtype, device, n = self.dtype, self.device, len(chunk)
        mine = torch.as_tensor(owned_points(n, self.share, self.me), device=device)
        cs = torch.as_tensor(self.coords[chunk], dtype=dtype, device=device)[mine]

        def per_batch(batch):  # the loss's dtype may differ from the weights'
            values = torch.zeros(n, dtype=torch.float64, device=device)
            if len(cs):
                values[mine] = evaluate(cs, batch).to(values.dtype)
                self.store.n_forward += len(cs)
            return [values, mine.to(dtype)]

        def zeros():
            return [torch.zeros(n, dtype=dtype, device=device) for _ in range(2)]

        total, owned = data_mean(self.data, per_batch, self.batch_size_fn,
                                 reduction=self.reduction, zeros=zeros).values
        # a mean: owned == 1 unless distribute="grid"; a sum is the owner's alone already
        return (total / owned if self.reduction == "mean" else total).cpu().double().numpy()


def _check_options(vectorize: Any, distribute: str, chunk_size: int | None, max_memory: int,
                   data: Iterable) -> bool | str:
    """``vectorize`` as "auto", True or False, after checking every option of the driver."""
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
    return vectorize


def _check_sharded(model: nn.Module, distribute: str) -> bool:
    """Whether ``model`` is sharded with ``fully_shard`` (its points: :class:`ShardedPoints`).

    Raises:
        ValueError: ``distribute="grid"`` on a sharded model (every forward of a sharded
            model runs collectives, so all ranks evaluate every point on their data shard).
    """
    if not is_sharded(model):
        return False
    if distribute != "data":
        raise ValueError('distribute must be "data" for a model sharded with fully_shard '
                         f"(each rank passes its data shard), got {distribute!r}")
    return True


def _fill(store: Progress, chunks: list[np.ndarray], run: _ChunkLosses,
          evaluator: Callable[[Tensor, Any], Tensor],
          fallback: Callable[[], LoopedPoints] | None, describe: Callable[[int], str],
          bar: tqdm) -> None:
    """Evaluate the chunks in order, writing ``store`` after each.

    If the first chunk fails and a ``fallback`` is given, warn and evaluate it and the rest
    with the fallback's evaluator (never for a loss that is not a scalar).
    """
    flat = store.losses.reshape(-1)
    for k, chunk in enumerate(chunks):
        try:
            values = run(chunk, evaluator)
        except Exception as err:
            if fallback is None or k > 0 or isinstance(err, LossShapeError):
                raise
            warnings.warn(f"the model cannot be vmapped ({type(err).__name__}: {err}); "
                          "evaluating the points one by one", RuntimeWarning)
            evaluator, fallback = fallback(), None
            values = run(chunk, evaluator)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise ValueError(f"non-finite loss {values[bad[0]]} at {describe(chunk[bad[0]])}"
                             + ("" if store.path is None else
                                f"; finished points are saved in {store.path}"))
        flat[chunk] = values
        store.write(complete=k == len(chunks) - 1)
        bar.update(len(chunk))


def evaluate_points(model: nn.Module, loss_fn: LossFn, data,
                    vectors: Sequence[Mapping[str, Tensor]], coords: np.ndarray, store: Progress,
                    describe: Callable[[int], str], *, model_mode: str = "eval",
                    batch_size_fn: BatchSizeFn | None = None, chunk_size: int | None = None,
                    max_memory: int = DEFAULT_MAX_MEMORY, vectorize: bool | str = "auto",
                    distribute: str = "data", progress: bool = True,
                    desc: str = "landscape") -> None:
    r"""Fill the NaN entries of ``store.losses`` (flattened) with $L(\sum_j c_{ij} V_j)$.

    The losses are written to ``store`` (and its file) after every chunk. ``store.n_forward``
    counts forward passes: one per point and batch, plus one probe sizing the chunks when
    ``chunk_size`` is None (of one sample, scaled, for the sequential plan).

    Args:
        model: the model (left as found).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the mean (or summed) loss of a batch.
        data: the iterable of batches.
        vectors: weight vectors ``V_j`` (dicts name -> tensor, validated); ``vectors[0]`` names
            every tensor that moves.
        coords: [n_points, len(vectors)], the points' coefficients ``c_ij``.
        store: the :class:`landscape.results.Progress` whose ``losses`` are filled.
        describe: ``describe(i)`` names point ``i`` in error messages.
        model_mode: "eval" or "train", the mode the model is evaluated in.
        batch_size_fn: the sample count of a batch (default: the leading dimension).
        chunk_size: points per vmap call, or per data pass in the loop (default: as many as
            fit in ``max_memory`` bytes of weights and activations, see :func:`plan_chunks`).
        max_memory: bytes of weights and activations per chunk; on a CPU, vmapped chunks are
            also kept to ``CPU_TENSOR_BYTES`` per activation tensor.
        vectorize: "auto" (the stacked path where it applies, else vmap, falling back to a loop
            if the model cannot be vmapped; on a CPU, the loop when fewer than
            ``MIN_CPU_CHUNK`` points fit, see the module docstring), True (vmap only), False
            (loop only).
        distribute: under torch.distributed, "data": each rank holds a shard of the data and
            evaluates every point on it (sums all-reduced); "grid": each rank holds all the
            data and evaluates its share of the points (results gathered on every rank).
        progress: show a progress bar (rank 0).
        desc: the progress bar's label.

    Raises:
        ValueError: an option outside its range, a loss that is not a scalar, or a non-finite
            loss (naming the point, ``describe(index)``).
        ArgumentTypeError: ``vectorize`` is neither a bool nor "auto".
    """
    vectorize = _check_options(vectorize, distribute, chunk_size, max_memory, data)
    todo = np.flatnonzero(np.isnan(store.losses.reshape(-1)))
    if len(todo) == 0:
        return
    parts = {n: [(j, v[n]) for j, v in enumerate(vectors) if n in v] for n in vectors[0]}
    share, me = (world_size(), rank()) if distribute == "grid" else (1, 0)
    reduction = loss_reduction(loss_fn)
    like = next(iter(vectors[0].values()))
    sharded = _check_sharded(model, distribute)
    with preserved(model, model_mode, weights=not sharded), torch.no_grad():
        plan = sequential_plan(model, loss_fn, parts) if vectorize == "auto" and not sharded \
            else None
        kind = "stacked" if plan else "loop" if vectorize is False else "vmap"
        footprint, has_data = (None, False) if chunk_size is not None or sharded else \
            _footprint(model, loss_fn, data, vectors[0], plan, store)
        chunks = ChunkPlan(chunk_size or 1, 1, "sharded") if sharded else \
            plan_chunks(len(todo), kind, footprint, chunk_size=chunk_size,
                        max_memory=max_memory, cpu=like.device.type == "cpu",
                        forced=vectorize is True)
        if plan and has_data and isinstance(data, (list, tuple)):
            plan.bunch(data, batch_size_fn or default_batch_size, like.device, footprint.largest,
                       chunks.group)
        evaluator = (StackedPoints(plan, chunks.group, like.device) if chunks.evaluator == "stacked"
                     else VmappedPoints(model, loss_fn, parts) if chunks.evaluator == "vmap"
                     else ShardedPoints(model, loss_fn, data, parts) if sharded
                     else LoopedPoints(model, loss_fn, vectors, parts))
        fallback = None if chunks.evaluator in ("loop", "sharded") or vectorize is True else \
            (lambda: LoopedPoints(model, loss_fn, vectors, parts))
        run = _ChunkLosses(data, coords, store, batch_size_fn, reduction, like, share, me)
        bar = tqdm(total=len(todo), desc=desc, disable=not progress or rank() != 0)
        try:
            _fill(store, point_chunks(todo, chunks.size, share), run, evaluator, fallback,
                  describe, bar)
        finally:
            bar.close()


def check_coords(values: Any, name: str) -> np.ndarray:
    """Coordinates as a non-empty 1-D float64 array of finite numbers.

    Each entry must be a real number: never a bool, a string or None, which numpy would
    silently convert.

    Args:
        values: a number, a sequence, an array or a tensor of coordinates.
        name: the argument's name, for the error messages.

    Returns:
        The coordinates, a new float64 array.

    Raises:
        ValueError: ``values`` is empty or not 1-D, or an entry is not finite.
        ArgumentTypeError: an entry is not a real number.
    """
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of coordinates, got shape "
                         f"{arr.shape}")
    entries = values if isinstance(values, (list, tuple)) else arr
    return np.array([check_number(name + " entries", x.item() if isinstance(x, Tensor) else x)
                     for x in entries], dtype=np.float64)


def fmt(x: float) -> str:
    """``x`` with 6 significant digits (``inf``, ``nan`` as they are), for messages."""
    return f"{x:.6g}" if math.isfinite(x) else str(x)
