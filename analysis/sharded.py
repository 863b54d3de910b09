r"""Curvature products of models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every parameter is a DTensor shard (``Shard(0)`` over a 1-D device mesh); the
forward pass all-gathers each unit's weights into plain tensors and the gradients reach the
shards through hooks, so ``torch.autograd.grad`` w.r.t. the parameters, and with it every
double-backward product, does not see them (measured on torch 2.13, gloo, 2 and 4 ranks).

**Exact product** (:class:`ShardedHessian`). The loss is evaluated on a hook-free copy of the
module tree (the original classes, the same buffers, no FSDP hooks) whose parameters are, for
the duration of each unit's forward, the unit's full weights gathered *inside the autograd
graph* from detached copies of the local shards: ``shard.redistribute(mesh, [Replicate()])
.to_local(grad_placements=[Partial()])``. The ``Partial`` placement says that each rank's
gradient w.r.t. the gathered weight is its part of a sum over ranks (each rank sees its own
data), so the backward reduce-scatters it, and the double backward (Pearlmutter 1994) runs
through DTensor's collectives:

$$ H v = \nabla_w \langle \nabla_w \textstyle\sum_r \sum_b \tfrac{n_{rb}}{N} L_{rb}(w),
   v \rangle, $$

with $L_{rb}$ the mean loss of rank $r$'s batch $b$ and $N$ the total sample count.

**Memory.** Each unit that contains no other unit runs as one ``torch.autograd.Function``
(``_GatheredUnit``): its forward gathers the unit's full weights, runs the unit and frees them
(only the unit's inputs and shards are saved); its backward gathers them again,
differentiably, recomputes the unit and takes the unit's vector-Jacobian product, so the
reduce-scatter of the full weight gradient runs next to its consumers. Under ``create_graph``
that backward records its graph under saved-tensor hooks that keep a recipe instead of any
view of the gathered weights and gather again on unpack, so the double backward (the HVP, the
GGN's double-vjp) runs one unit at a time too. Per rank, one product holds the vector's and
the gradient's shards ($P/W$ each, $P$ the full parameter bytes, $W$ the ranks; the gradient
is contracted with the vectors and released before the second backward) and a few units'
full weights and full gradients at a time (the unit's weights, their gradient, and on gloo the
reduce-scatter's full-size copy): about $\max(P/W + 3U, 2P/W)$ with $U$ the largest unit,
against $P + 2P/W + U$ with the per-unit ``torch.utils.checkpoint`` gather used before (its
``create_graph`` backward kept every unit's recomputed weights). The units that enclose others
(the root) gather their weights in the graph and keep them during a product. Time: 1.3-1.4x
the checkpointed gather (2 gloo ranks, CPU; one more gather and recompute per unit in the
second backward, and the gathers on unpack).

Vectors are sharded like the parameters: a vector is a list of DTensors with the parameters'
shapes, mesh and placements (``full_tensor()`` gives the unsharded piece); ``local(...)`` /
``sharded(...)`` convert to and from the flat concatenation of the local shards, in which
inner products are a local dot plus one all-reduce (:func:`analysis.finite_difference.dot`).

Every rank passes its own data shard, with the same number of batches on every rank (each
batch's forward runs collectives that all ranks must join).

**Losses and gradients at other weights** (:class:`ShardedLoss`): the same copy with other
leaves, under ``no_grad`` for the loss alone (``landscape.line``/``plane``/``interpolate``
through ``landscape.points.ShardedPoints``) or with one backward for the exact gradient
(:class:`ShardedPerturbedLoss`, the objective of the sharpness measures, and
``analysis.full_grad_norm``). The model is only read.

**Other curvatures** (:class:`ShardedCurvature`, and :class:`ShardedCurvatureOperator` for the
routines): the GGN, the exact and Monte-Carlo Fisher and the empirical Fisher, $J^\top M J v$ on
the same copy by the double-vjp trick of :mod:`analysis.curvature` (:func:`output_products`),
with the output-space matrix $M$ of the one-process operator; and any of them, the Hessian
included, preconditioned: $P^{-1/2} A P^{-1/2}$ with $P$ sharded like the parameters
(:func:`sharded_inverse_sqrt`).

**Finite differences** (:func:`sharded_gradient`): the gradient by ordinary ``.backward()``
through the FSDP2 model itself (its hooks reduce-scatter the gradients), for
:class:`analysis.finite_difference.FiniteDifference`.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import get_device_states, set_device_states

from .core import (all_finite, all_reduce_max_, all_reduce_sum_, BatchSizeFn, check_choice,
                   check_data, check_loss, check_model_mode, default_batch_size, flatten,
                   loss_reduction, LossFn, own_call, ParamSelection, preserved, select_params,
                   unflatten, working_dtype)
from .core.sharding import (as_sharded, full_values, is_dtensor, is_sharded, local_values,
                            pieces_like, refuse_sharded, REFUSAL, sample_counts, shard_like)
from .core.sharding import register_forward_copy
from .core.space import ShardedSpace
from .derivatives import curvature_ops
from .finite_difference import check_fd_policy, dot, FiniteDifference, Pieces
from .preconditioning import inverse_sqrt, per_parameter, Preconditioner

try:  # FSDP2 and DTensor (torch >= 2.4)
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - torch without torch.distributed
    FSDPModule = DTensor = None

def _original_class(module: nn.Module) -> type:
    cls = type(module)
    if FSDPModule is not None and isinstance(module, FSDPModule):
        return cls.__mro__[cls._orig_cls_mro_index]
    return cls


def _hook_free(module: nn.Module, memo: dict) -> nn.Module:
    """A shallow, hook-free copy of the module tree.

    Original classes, the same parameter and buffer objects (so ties are kept), new
    containers, no hooks.
    """
    if id(module) in memo:
        return memo[id(module)]
    cls = _original_class(module)
    clone = cls.__new__(cls)
    clone.__dict__ = module.__dict__.copy()
    memo[id(module)] = clone
    for key, value in module.__dict__.items():
        if "hooks" in key and isinstance(value, dict):
            clone.__dict__[key] = OrderedDict()
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {k: None if m is None else _hook_free(m, memo)
                      for k, m in module._modules.items()}
    return clone


def _gather(shard: Tensor) -> Tensor:
    """The full weight of a DTensor shard, differentiably; the gradient reduce-scatters."""
    full = shard.redistribute(shard.device_mesh, [Replicate()] * shard.device_mesh.ndim)
    return full.to_local(grad_placements=[Partial()] * shard.device_mesh.ndim)


class _Regathered:
    """Saved-tensor hooks that keep no gathered full weight alive in a graph.

    Inside the ``with`` block, a saved tensor whose storage is one of ``fulls`` (a unit's
    gathered weights, alive for the whole block, so no other tensor has their storage) is
    packed as the weight's index and view geometry, and unpacked as that view of ``fulls``.
    After the block the weights are released, and unpacking gathers the shard again (no
    graph: autograd gives the unpacked tensor the saved one's ``grad_fn``, the differentiable
    gather next to its consumers). Every other saved tensor is kept as it is. The gathers of
    the unpacks are collectives: every rank unpacks the same tensors in the same order.
    """

    def __init__(self, shards: Sequence[Tensor], fulls: Sequence[Tensor]):
        self.shards, self.fulls = shards, list(fulls)
        self.storages = {f.untyped_storage().data_ptr(): (i, f.storage_offset(), f.dtype)
                         for i, f in enumerate(fulls)}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def __enter__(self) -> "_Regathered":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self.fulls, self.storages = None, {}

    def pack(self, t: Tensor) -> Any:
        """A recipe for a view of a gathered weight; any other tensor as it is."""
        if type(t) is not Tensor or t.device.type == "meta":  # DTensors: kept
            return t
        hit = self.storages.get(t.untyped_storage().data_ptr())
        if hit is None or hit[2] != t.dtype:
            return t
        i, offset, _ = hit
        return _Recipe(i, t.size(), t.stride(), t.storage_offset() - offset)

    def unpack(self, packed: Any) -> Tensor:
        """The saved tensor; a gathered weight's view from the live weights or gathered again."""
        if not isinstance(packed, _Recipe):
            return packed
        if self.fulls is not None:
            full = self.fulls[packed.index]
        else:
            with torch.no_grad():
                full = _gather(self.shards[packed.index])
        return full.as_strided(packed.size, packed.stride, full.storage_offset() + packed.offset)


class _Recipe:
    """A view of a unit's gathered weight, by the shard's index (see :class:`_Regathered`)."""

    __slots__ = ("index", "size", "stride", "offset")

    def __init__(self, index: int, size: torch.Size, stride: tuple, offset: int):
        self.index, self.size, self.stride, self.offset = index, size, stride, offset


class _GatheredUnit(torch.autograd.Function):
    r"""One innermost unit's forward with its weights gathered, and nothing full kept for backward.

    ``apply(run, n, *inputs, *shards)``: the forward gathers the full weights of ``shards``
    (no graph), runs ``run(inputs, fulls)`` (the unit's tensors out) and frees them; it saves
    the ``n`` tensor inputs and the shards (and the RNG state, for dropout). The backward
    gathers again, differentiably, next to the unit's recomputed forward and its backward (so
    the reduce-scatter of a full weight gradient runs as soon as that unit is done, in the
    first backward and, under ``create_graph``, in the second), under :class:`_Regathered` so
    that the graph a ``create_graph`` backward records keeps only the shards: the double
    backward (Pearlmutter 1994) stays exact and no rank holds more than one unit's full
    weights (and their full gradient) at a time.
    """

    @staticmethod
    def forward(ctx, run: Callable, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        """The unit's tensor outputs (no graph inside; the weights are gathered and freed)."""
        ctx.run, ctx.n = run, n
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors)
        ctx.rng = (torch.get_rng_state(), *get_device_states(*tensors[:n]))
        return tuple(run(tensors[:n], [_gather(s) for s in tensors[n:]]))

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        """The vector-Jacobian product of the recomputed unit (a graph under create_graph)."""
        tensors = ctx.saved_tensors
        inputs, shards = tensors[:ctx.n], tensors[ctx.n:]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        create = torch.is_grad_enabled()  # create_graph=True
        out: list[Tensor | None] = [None] * len(tensors)
        cpu, devices, states = ctx.rng
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(cpu)
            set_device_states(devices, states)
            fulls = [_gather(s) for s in shards]
            with _Regathered(shards, fulls) if create else nullcontext():
                outputs = ctx.run(inputs, fulls)
                pairs = [(o, g) for o, g in zip(outputs, grads)
                         if g is not None and o.requires_grad]
                if pairs and wanted:
                    got = torch.autograd.grad([o for o, _ in pairs], [tensors[i] for i in wanted],
                                              [g for _, g in pairs], create_graph=create,
                                              allow_unused=True)
                    for i, g in zip(wanted, got):
                        out[i] = g
        return (None, None, *out)


_OUT = object()  # a tensor output's place in a unit's outputs


class _OwnForward(nn.Module):
    """The unit's class ``forward`` as a module call (the copy's ``forward`` is its ``_Unit``)."""

    def __init__(self, unit: nn.Module, kwargs: dict):
        super().__init__()
        self.unit, self.kwargs = unit, kwargs

    def forward(self, *args):
        """``type(unit).forward(unit, *args, **kwargs)``."""
        return type(self.unit).forward(self.unit, *args, **self.kwargs)


class _Unit:
    """The forward of one FSDP unit on the hook-free copy.

    It gathers the unit's own weights from the leaves and runs the original forward; a unit
    that encloses no other unit does so inside :class:`_GatheredUnit` when a gradient may be
    taken (no full weight kept for the backward).
    """

    def __init__(self, clone: nn.Module, names: dict[str, str], leaves: dict[str, Tensor],
                 innermost: bool):
        self.clone, self.names, self.leaves, self.innermost = clone, names, leaves, innermost

    def _run(self, args: tuple, kwargs: dict, fulls: Sequence[Tensor]) -> Any:
        # own_call, not _reparametrize_module(tie_weights=True): with a module registered
        # under two names (self.alias = self.block) the latter left the gathered full weight
        # in the copy's slot after the forward (the unit's weights stayed alive, and the
        # loss_fn saw a plain tensor for the parameter)
        full = {"unit." + local: w for local, w in zip(self.names, fulls)}
        return own_call(_OwnForward(self.clone, kwargs), full, args)

    def __call__(self, *args, **kwargs):
        shards = [self.leaves[name] for name in self.names.values()]
        flat, spec = tree_flatten((args, kwargs))
        where = [i for i, a in enumerate(flat) if isinstance(a, Tensor)]
        inputs = [flat[i] for i in where]
        if not (self.innermost and torch.is_grad_enabled()
                and any(t.requires_grad for t in inputs + shards)):
            return self._run(args, kwargs, [_gather(s) for s in shards])
        box: dict = {}

        def run(tensors: Sequence[Tensor], fulls: Sequence[Tensor]) -> list[Tensor]:
            given = list(flat)
            for i, t in zip(where, tensors):
                given[i] = t
            leaves, box["spec"] = tree_flatten(self._run(*tree_unflatten(given, spec), fulls))
            box["leaves"] = [_OUT if isinstance(x, Tensor) else x for x in leaves]
            return [x for x in leaves if isinstance(x, Tensor)]

        outs = iter(_GatheredUnit.apply(run, len(inputs), *inputs, *shards))
        leaves = [next(outs) if x is _OUT else x for x in box["leaves"]]
        return tree_unflatten(leaves, box["spec"])


def functional_copy(model: nn.Module, units: Sequence[tuple[str, nn.Module]],
                    leaves: dict[str, Tensor], model_mode: str | None = None) -> nn.Module:
    """The hook-free copy of ``model`` whose units gather their weights from ``leaves``.

    The copy shares the model's parameter and buffer objects but never reads its parameters:
    each unit's forward gathers, inside the autograd graph, the full weights of the DTensors
    ``leaves[name]`` holds at the time of the call (so a caller may replace the entries of
    ``leaves`` between calls). The model itself is not touched.

    Args:
        model: A ``fully_shard`` model.
        units: Its units (:func:`check_sharded`).
        leaves: Parameter name -> DTensor placed like that parameter, for every parameter.
        model_mode: "eval" or "train" for the copy (None: the model's flags as they are).

    Returns:
        The copy (call it as the model).
    """
    memo: dict = {}
    root = _hook_free(model, memo)
    names = [u for u, _ in units]
    own: dict[str, dict[str, str]] = {u: {} for u in names}
    for name, _ in model.named_parameters():
        unit = _owner(name, names)
        own[unit][name[len(unit) + 1:] if unit else name] = name
    for unit, module in units:
        clone = memo[id(module)]
        innermost = not any(u != unit and (unit == "" or u.startswith(unit + "."))
                            for u in names)
        clone.forward = _Unit(clone, own[unit], leaves, innermost)
    if model_mode is not None:
        root.train(model_mode == "train")
    return root


def fsdp_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The FSDP2 units of ``model`` (modules passed to ``fully_shard``), outermost first.

    Args:
        model: a module.

    Returns:
        ``(qualified name, module)`` pairs.
    """
    return [(n, m) for n, m in model.named_modules()
            if FSDPModule is not None and isinstance(m, FSDPModule)]


def _owner(name: str, units: Sequence[str]) -> str | None:
    """The innermost unit whose subtree holds the parameter ``name``."""
    owners = [u for u in units if u == "" or name.startswith(u + ".")]
    return max(owners, key=len) if owners else None


def check_sharded(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The FSDP2 units of ``model``; a clear error for what the engine does not support.

    Args:
        model: a model sharded with ``fully_shard``.

    Returns:
        Its units (:func:`fsdp_units`).

    Raises:
        ValueError: no ``fully_shard`` unit, a parameter outside every unit or not a DTensor
            sharded on a 1-D mesh over all ranks, or the root not wrapped.
    """
    units = fsdp_units(model)
    if not units:
        raise ValueError("model has DTensor parameters but no fully_shard (FSDP2) unit: tensor "
                         "parallel and other DTensor layouts are not supported")
    world = dist.get_world_size() if dist.is_initialized() else 1
    names = [u for u, _ in units]
    for name, p in model.named_parameters():
        mesh = getattr(p, "device_mesh", None)
        if _owner(name, names) is None or mesh is None:
            raise ValueError(f"parameter {name} is not sharded by fully_shard: wrap the root "
                             "module too (fully_shard(model) after its submodules)")
        if mesh.ndim != 1 or mesh.size() != world or list(p.placements) != [Shard(0)]:
            raise ValueError(f"parameter {name} is placed {p.placements} on a {mesh.ndim}-D mesh "
                             f"of {mesh.size()} ranks; only fully_shard's Shard(0) over all "
                             f"{world} ranks (a 1-D mesh) is supported")
    return units


class ShardedHessian:
    r"""Exact Hessian-vector products of a ``fully_shard`` model, on sharded vectors.

    The Hessian of the sample-weighted mean loss over the union of the ranks' data (the total
    loss for a sum-reduced ``loss_fn``) w.r.t. the selected parameters; every rank calls each
    method with its own shard of the data (same number of batches) and the same vectors.
    The model is left exactly as found (shards, grads, modes, FSDP state; buffers restored).

    Args:
        model: a model whose parameters are sharded by ``fully_shard`` (the root wrapped).
        loss_fn: ``loss_fn(model, batch) -> Tensor``; it is called with a hook-free copy of
            the model (same classes, attributes and buffers).
        data: this rank's batches.
        params: the selection (``analysis.core.select_params``); the others are constants.
        model_mode: "eval" or "train" during the products.
        batch_size_fn: sample count of a batch (default: the leading dimension).

    Attributes:
        names, params: the selected parameters (DTensor shards).
        shape: ``(n, n)``, ``n`` the number of elements of the full selected parameters.
        n_local: the number of elements of this rank's shards.
        n_hvp: products so far.

    Raises:
        ValueError: the model is not a supported ``fully_shard`` model (:func:`check_sharded`),
            or bad arguments.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable, *,
                 params: ParamSelection = None, model_mode: str = "eval",
                 batch_size_fn: BatchSizeFn | None = None):
        self.units = check_sharded(model)
        check_data(data)
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.model_mode, self.batch_size_fn = check_model_mode(model_mode), batch_size_fn
        self.reduction = loss_reduction(loss_fn)
        self.names, self.params = select_params(model, params)
        n = sum(p.numel() for p in self.params)
        self.shape = (n, n)
        self.n_local = sum(p.to_local().numel() for p in self.params)
        self.n_hvp = 0
        self._counts: tuple[list[int], float] | None = None

    def counts(self) -> tuple[list[int], float]:
        """This rank's batch sizes and the total sample count (:func:`sample_counts`, once).

        Returns:
            ``(sizes, total)``.
        """
        if self._counts is None:
            self._counts = sample_counts(self.data, self.batch_size_fn)
        return self._counts

    # -- vectors -----------------------------------------------------------------------
    def local(self, vector: Pieces) -> Tensor:
        """The flat concatenation of a sharded vector's local shards.

        Args:
            vector: DTensors placed like the selected parameters.

        Returns:
            A 1-D tensor of ``n_local`` elements.
        """
        return torch.cat([v.to_local().reshape(-1) for v in vector])

    def sharded(self, flat: Tensor) -> Pieces:
        """The sharded vector (DTensors placed like the parameters) of local shards ``flat``.

        Args:
            flat: a 1-D tensor of ``n_local`` elements (:meth:`local`).

        Returns:
            DTensors shaped and placed like the selected parameters (views of ``flat``).
        """
        out, offset = [], 0
        for p in self.params:
            shape = p.to_local().shape
            piece = flat[offset:offset + shape.numel()].view(shape)
            out.append(DTensor.from_local(piece, p.device_mesh, p.placements, run_check=False,
                                          shape=p.shape, stride=p.stride()))
            offset += shape.numel()
        return out

    def distribute(self, full: Tensor) -> Pieces:
        """A full flat vector (the same on every rank) as a sharded vector.

        Args:
            full: 1-D, ``n`` elements, in ``names`` order (as a one-process operator's).

        Returns:
            The sharded vector.
        """
        out, offset = [], 0
        for p in self.params:
            piece = full[offset:offset + p.numel()].view(p.shape).to(p.dtype)
            local = DTensor.from_local(piece, p.device_mesh, [Replicate()], run_check=False)
            out.append(local.redistribute(p.device_mesh, p.placements))
            offset += p.numel()
        return out

    # -- products ----------------------------------------------------------------------
    def _copy(self, leaves: dict[str, Tensor]) -> nn.Module:
        """The hook-free copy whose units gather their weights from ``leaves``."""
        return functional_copy(self.model, self.units, leaves, self.model_mode)

    def _leaves(self) -> dict[str, Tensor]:
        chosen = {id(p) for p in self.params}
        return {name: p.detach().requires_grad_(id(p) in chosen)
                for name, p in self.model.named_parameters()}

    def matmat(self, vectors: Sequence[Pieces]) -> list[Pieces]:
        """``H v`` for each sharded vector of ``vectors``, in one pass over the data.

        Args:
            vectors: sharded vectors (lists of DTensors placed like the selected parameters),
                the same on every rank.

        Returns:
            The products, sharded like the parameters.
        """
        out: list[list[Tensor | None]] = [[None] * len(self.params) for _ in vectors]
        self._products(vectors, lambda j, hv: _accumulate(out[j], hv))
        return [[torch.zeros_like(p) if h is None else h for h, p in zip(vec, self.params)]
                for vec in out]

    def _products(self, vectors: Sequence[Pieces],
                  sink: Callable[[int, Sequence[Tensor | None]], None]) -> None:
        """Each batch's products ``sink(j, pieces)`` for each vector ``j`` (None: no product)."""
        sizes, total = self.counts()
        with preserved(self.model, self.model_mode, weights=False, trainable=self.params), \
                torch.enable_grad():
            leaves = self._leaves()
            clone = self._copy(leaves)
            selected = [leaves[n] for n in self.names]
            for batch, n in zip(self.data, sizes):
                weight = n / total if self.reduction == "mean" else 1.0
                loss = check_loss(self.loss_fn(clone, batch), " in the Hessian-vector product")
                dots = _directional(loss * weight, selected, vectors)
                for j, dot in enumerate(dots):
                    if dot is not None:
                        sink(j, torch.autograd.grad(dot, selected,
                                                    retain_graph=j < len(dots) - 1,
                                                    allow_unused=True))
        self.n_hvp += len(vectors)

    def matvec(self, vector: Pieces) -> Pieces:
        """``H v`` for one sharded vector.

        Args:
            vector: DTensors placed like the selected parameters.

        Returns:
            The product, sharded like the parameters.
        """
        return self.matmat([vector])[0]

    def matmat_local(self, vs: Tensor) -> Tensor:
        """``H v`` for each row of ``vs`` given as local shards (``[k, n_local]``).

        Args:
            vs: rows of local shards (:meth:`local`), the same global vectors on every rank.

        Returns:
            ``[k, n_local]``, the products' local shards (written in place: no other copy of
            the products is made).
        """
        rows: list[Tensor] = []

        def add(j: int, products: Sequence[Tensor | None]) -> None:
            if not rows:  # allocated once the first products exist (the gradient is gone)
                rows.append(vs.new_zeros((vs.shape[0], self.n_local)))
            _accumulate(self.sharded(rows[0][j]), products)

        self._products([self.sharded(v) for v in vs], add)
        return rows[0] if rows else vs.new_zeros((vs.shape[0], self.n_local))


def _directional(loss: Tensor, leaves: Sequence[Tensor], vectors: Sequence[Pieces]
                 ) -> list[Tensor | None]:
    r"""Per vector $v$, this rank's part of $\langle \nabla_w L, v \rangle$, with its graph.

    The gradient (``create_graph``) is contracted with each vector on the local shards and
    released, so the second backward, $\nabla_w$ of the contraction, runs without it: the
    same product as ``autograd.grad(gradient, leaves, v)`` (the local shards' backward is the
    vector with the gradient's placements) with one parameter-sized shard less alive. None
    where the gradient does not depend on the leaves.
    """
    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:
        return [None] * len(vectors)
    local = [grads[i].to_local() if is_dtensor(grads[i]) else grads[i] for i in live]
    return [sum((g * (v[i].to_local() if is_dtensor(v[i]) else v[i]).to(g.dtype)).sum()
                for g, i in zip(local, live)) for v in vectors]


def _accumulate(acc: list[Tensor | None], got: Sequence[Tensor | None]) -> None:
    """Add the products ``got`` to ``acc`` in place (an empty slot takes a copy).

    A copy, not the product itself: on gloo a reduce-scattered shard may be a view that keeps
    the collective's full-size buffer alive until it is read.
    """
    for i, h in enumerate(got):
        if h is not None:
            if acc[i] is None:
                acc[i] = h.detach().clone()
            else:
                acc[i].add_(h.detach())


def norms_squared(pieces: Sequence[Tensor]) -> Tensor:
    """The squared L2 norm of a vector given as pieces (DTensors: a global norm).

    Args:
        pieces: Tensors or DTensors (each DTensor's local shards summed, then all-reduced).

    Returns:
        A float64 scalar on the CPU, the same on every rank.
    """
    local = torch.zeros((), dtype=torch.float64)
    shared = torch.zeros((), dtype=torch.float64)
    for t in pieces:
        if is_dtensor(t):
            shared += t.to_local().double().pow(2).sum().cpu()
        else:
            local += t.detach().double().pow(2).sum().cpu()
    all_reduce_sum_([shared])
    return local + shared


class ShardedLoss:
    r"""The full-data loss of a ``fully_shard`` model at sharded weights, and its gradient.

    $$L(w') = \sum_r \sum_b \tfrac{n_{rb}}{N} L_{rb}(w'),$$

    with $L_{rb}$ the mean loss of rank $r$'s batch $b$ and $N$ the total sample count (the
    total loss for a sum-reduced ``loss_fn``), evaluated on :func:`functional_copy` (the model
    is never written to or run). The gradient is exact: each unit's weights are gathered in the
    autograd graph with a ``Partial`` gradient placement, so the backward reduce-scatters it.
    Every rank calls it with the same weights and its own data (the same number of batches).

    Args:
        model: A ``fully_shard`` model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: This rank's batches.
        params: The parameters the gradient is taken for (DTensors of ``model``).
        batch_size_fn: Sample count of a batch.
        model_mode: "eval" or "train" for the copy (None: the model's flags as they are).

    Attributes:
        names: The names of ``params``.
        n_forward: Per-batch forward passes so far.
        n_backward: Per-batch backward passes so far.

    Raises:
        ValueError: As :func:`check_sharded`, or bad data.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable,
                 params: Sequence[Tensor], *, batch_size_fn: BatchSizeFn | None = None,
                 model_mode: str | None = None):
        units = check_sharded(model)
        check_data(data)
        self.loss_fn, self.data, self.batch_size_fn = loss_fn, data, batch_size_fn
        self.reduction = loss_reduction(loss_fn)
        ids = {id(p) for p in params}
        self.names = [n for n, p in model.named_parameters() if id(p) in ids]
        self.weights = {n: p.detach() for n, p in model.named_parameters()}
        self.leaves = dict(self.weights)
        self.copy = functional_copy(model, units, self.leaves, model_mode)
        self.n_forward = self.n_backward = 0
        self._counts: tuple[list[int], float] | None = None

    def move(self, moved: Mapping[str, Tensor] | None, grad: bool = False) -> list[Tensor]:
        """Put the copy at the model's weights with ``moved`` replacing some of them.

        Args:
            moved: Name -> DTensor placed like that parameter (None: the model's weights).
            grad: Make the leaves of ``names`` require gradients.

        Returns:
            The leaves of ``names``.
        """
        self.leaves.update(self.weights)
        self.leaves.update({n: t.detach() for n, t in (moved or {}).items()})
        for n in self.names:
            self.leaves[n] = self.leaves[n].detach().requires_grad_(grad)
        return [self.leaves[n] for n in self.names]

    def batch_loss(self, batch: Any) -> Tensor:
        """``loss_fn`` on ``batch`` at the weights of the last :meth:`move`.

        Args:
            batch: One batch.

        Returns:
            The loss (a scalar tensor).
        """
        self.n_forward += 1
        return check_loss(self.loss_fn(self.copy, batch), " at a perturbed point")

    def __call__(self, moved: Mapping[str, Tensor] | None = None, grad: bool = False
                 ) -> tuple[Tensor, list[Tensor] | None]:
        """$L(w')$ over all ranks' data, and its gradient (DTensors) when ``grad``.

        Args:
            moved: Name -> DTensor: the weights that differ from the model's.
            grad: Also return the gradient w.r.t. ``names``.

        Returns:
            The loss (a float64 scalar tensor, the same on every rank) and the gradient,
            sharded like the parameters (None unless ``grad``).
        """
        if self._counts is None:
            self._counts = sample_counts(self.data, self.batch_size_fn)
        sizes, total = self._counts
        leaves = self.move(moved, grad)
        value, grads = torch.zeros((), dtype=torch.float64), None
        with torch.set_grad_enabled(grad):
            for batch, n in zip(self.data, sizes):
                loss = self.batch_loss(batch) * (n / total if self.reduction == "mean" else 1.0)
                value = value + loss.detach().to("cpu", torch.float64)
                if grad:
                    self.n_backward += 1
                    got = torch.autograd.grad(loss, leaves, allow_unused=True)
                    got = [torch.zeros_like(w) if g is None else g for g, w in zip(got, leaves)]
                    grads = got if grads is None else [a + b for a, b in zip(grads, got)]
        all_reduce_sum_([value])
        return value, grads


class ShardedPerturbedLoss:
    r"""$\delta \mapsto L(w + \delta)$ of a ``fully_shard`` model on this rank's shards.

    The interface of :class:`analysis.sharpness.perturbation.PerturbedLoss` (``base``,
    ``space``, ``__call__``) on local rows: a perturbation, the base point $w$ and the gradient
    are the concatenation, in ``params`` order, of this rank's local shards (the rows of
    :func:`sharded_space`, which :attr:`space` is), so the sharpness measures do all their
    vector algebra on shards (inner products and maxima all-reduced by the space, random draws
    sliced from the one-process stream) and return the one-process answer. Evaluated by
    :class:`ShardedLoss` on :func:`functional_copy`, without writing to the model.

    Args:
        model: A ``fully_shard`` model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: This rank's batches.
        params: The selected parameters (DTensors).
        batch_size_fn: Sample count of a batch.
        batch: Must be None (m-sharpness evaluates one rank's batch alone).
        base: $w$ as a local row (default: the local shards of ``params`` now).

    Attributes:
        base: $w$, this rank's local row.
        space: The vector space of the rows (:func:`sharded_space` of ``params``).
        n_forward: Per-batch forward passes so far.
        n_backward: Per-batch backward passes so far.

    Raises:
        NotImplementedError: ``batch`` given (m-sharpness).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable | None,
                 params: Sequence[Tensor], batch_size_fn: BatchSizeFn | None = None,
                 batch: Any = None, base: Tensor | None = None):
        if batch is not None:
            raise NotImplementedError("model " + REFUSAL.format(what="m-sharpness (m=...)"))
        self.params = list(params)
        self.objective = ShardedLoss(model, loss_fn, data, self.params,
                                     batch_size_fn=batch_size_fn)
        self.space = sharded_space(self.params)
        self.base = flatten(local_values(self.params)) if base is None else base

    @property
    def n_forward(self) -> int:
        """Per-batch forward passes so far."""
        return self.objective.n_forward

    @property
    def n_backward(self) -> int:
        """Per-batch backward passes so far."""
        return self.objective.n_backward

    def __call__(self, delta: Tensor | None, grad: bool = False) -> tuple[float, Tensor | None]:
        r"""Evaluate $L(w + \delta)$ (every rank with its local row of the same $\delta$).

        Args:
            delta: This rank's local row of the perturbation (None: $\delta = 0$).
            grad: Also compute the gradient with respect to $\delta$.

        Returns:
            The loss (the same on every rank) and this rank's local row of the gradient
            (None unless ``grad``).
        """
        point = self.base if delta is None else self.base + delta
        moved = dict(zip(self.objective.names, pieces_like(point, self.params)))
        value, grads = self.objective(moved, grad)
        flat = None
        if grad:
            flat = flatten([as_sharded(g, p).to_local()
                            for g, p in zip(grads, self.params)]).to(self.base)
        return float(value), flat


def _divide_factors(model: nn.Module) -> dict[int, float]:
    """Per parameter (by id), the factor FSDP2 divides its reduced gradient by.

    That is the ``set_gradient_divide_factor`` value, else the data-parallel world size.
    """
    factors = {}
    for _, unit in fsdp_units(model):
        for group in unit._get_fsdp_state()._fsdp_param_groups:
            factor = group.gradient_divide_factor or group.mesh_info.mesh.size()
            for fsdp_param in group.fsdp_params:
                factors[id(fsdp_param.sharded_param)] = float(factor)
    return factors


def sharded_gradient(model: nn.Module, loss_fn: LossFn, data: Iterable,
                     params: Sequence[nn.Parameter], sizes: Sequence[int], total: float,
                     reduction: str = "mean") -> Pieces:
    """The full-data gradient of a ``fully_shard`` model by ordinary ``.backward()`` passes.

    Each batch's loss is weighted by ``n_b / N`` (mean) and multiplied by FSDP2's divide
    factor, which the reduce-scatter of its hooks divides out again, so the accumulated
    sharded ``.grad`` is the gradient of the mean loss over all ranks' data. Grads are
    cleared before and after (the caller restores the user's, see ``preserved``).

    Args:
        model: the FSDP2 model (its forward hooks run: this is a training-style pass).
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: this rank's batches, with sizes ``sizes`` (:func:`sample_counts`).
        params: the parameters whose gradients are returned.
        sizes: the batches' sample counts.
        total: the total sample count over all ranks.
        reduction: "mean" or "sum" (``loss_reduction(loss_fn)``).

    Returns:
        The gradient, sharded like ``params`` (zeros where none arrives).
    """
    factors = _divide_factors(model)
    for p in model.parameters():
        p.grad = None
    for batch, n in zip(data, sizes):
        weight = n / total if reduction == "mean" else 1.0
        loss = check_loss(loss_fn(model, batch), " in the finite-difference product")
        (loss * weight).backward()
    out = []
    for p in params:
        g = torch.zeros_like(p) if p.grad is None else p.grad * factors.get(id(p), 1.0)
        out.append(g)
    for p in model.parameters():
        p.grad = None
    return out


def sharded_fd_matmat(fd: FiniteDifference, model: nn.Module, loss_fn: LossFn, data: Iterable,
                      vectors: Sequence[Pieces], *, batch_size_fn: BatchSizeFn | None = None,
                      model_mode: str = "eval",
                      counts: tuple[list[int], float] | None = None) -> list[Pieces]:
    """Finite-difference ``H v`` of a ``fully_shard`` model for sharded vectors.

    Args:
        fd: the differencer over the selected (sharded) parameters.
        model: the FSDP2 model (left exactly as found).
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: this rank's batches (the same number on every rank).
        vectors: sharded vectors placed like ``fd.params``.
        batch_size_fn: sample count of a batch (default: the leading dimension).
        model_mode: "eval" or "train" during the products.
        counts: :func:`sample_counts` of ``data`` when known.

    Returns:
        The products, sharded like the parameters; ``fd`` records steps and error estimates.
    """
    sizes, total = counts or sample_counts(data, batch_size_fn)
    reduction = loss_reduction(loss_fn)
    with preserved(model, model_mode, weights=False, trainable=fd.params):
        return fd.products(lambda vs, steps, scales: fd.differences(
            lambda: sharded_gradient(model, loss_fn, data, fd.params, sizes, total, reduction),
            vs, steps, scales), vectors)


def sharded_space(params: Sequence[Tensor]) -> ShardedSpace:
    """The solvers' vector space of sharded vectors placed like ``params``.

    A local row is the concatenation, in ``params`` order, of this rank's shards
    (:meth:`ShardedHessian.local`); under ``Shard(0)`` each is one contiguous range of its
    parameter's flattened elements in the full flat vector (:mod:`analysis.core.space`).

    Args:
        params: DTensors sharded ``Shard(0)`` over a 1-D mesh of all ranks
            (:func:`check_sharded`).

    Returns:
        The space (``n`` the full length, ``n_local`` this rank's).
    """
    ranges, offset = [], 0
    for p in params:
        local = p.to_local()
        shape, start = compute_local_shape_and_global_offset(p.shape, p.device_mesh,
                                                             p.placements)
        if local.numel():
            first = offset + start[0] * (p.numel() // p.shape[0])
            ranges.append((first, first + local.numel()))
        offset += p.numel()
    mesh = params[0].device_mesh
    return ShardedSpace(offset, ranges, rank=mesh.get_local_rank(), world=mesh.size())


class ShardedOperator:
    r"""The Hessian of a ``fully_shard`` model as the routines' operator (on local shards).

    What :func:`analysis.top_eigenvalues`, :func:`analysis.hessian_trace` and
    :func:`analysis.spectral_density` build for a sharded model (through
    ``analysis.operator.curvature_operator``): the interface of a
    :class:`~analysis.operator.CurvatureOperator` (``matmat``/``matvec`` on flat vectors in
    ``names`` order, ``shape``, ``like``, ``with`` blocks), each product computed on shards by
    :class:`ShardedHessian` (``hvp_method="reverse"``) or by finite differences through the
    FSDP2 backward (``"finite_difference"``). The vectors it takes and returns are this rank's
    local shards (``[b, n_local]`` rows, :meth:`ShardedHessian.local`): the solvers run in
    :attr:`space` (:mod:`analysis.core.space`: inner products all-reduced, random vectors
    sliced from the one-process ones), so no rank holds a full parameter-sized vector and every
    rank gets the one-process answer; :meth:`hand_back` turns the rows a routine returns into
    DTensors placed like the parameters, :meth:`take` turns them back into rows.

    Args:
        model: A ``fully_shard`` model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: This rank's batches (the same number on every rank).
        params: The selection (as :class:`ShardedHessian`).
        model_mode: "eval" or "train".
        batch_size_fn: Sample count of a batch.
        progress: Accepted for the routines' signature (no bar).
        hvp_method: "reverse" (exact, the default) or "finite_difference".
        preconditioner: Must be None (not supported on sharded models yet).
        fd_richardson: As :class:`analysis.HessianOperator`.
        fd_step: As :class:`analysis.HessianOperator`.

    Attributes:
        space: The solvers' vector space (:func:`sharded_space`); any operator on sharded
            vectors provides one under this name.
        shape: ``(n, n)``, ``n`` the full number of selected elements.

    Raises:
        NotImplementedError: A preconditioner or ``hvp_method="forward"``.
        ValueError: As :class:`ShardedHessian`; ``"finite_difference"`` under a
            ``MixedPrecisionPolicy`` that rounds below the parameters' dtype
            (:func:`analysis.finite_difference.check_fd_policy`).
    """

    curvature = "hessian"
    preconditioned = False

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable, *,
                 params: ParamSelection = None, model_mode: str = "eval",
                 batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
                 hvp_method: str = "reverse", preconditioner=None,
                 fd_richardson: bool = False, fd_step: float | None = None):
        if preconditioner is not None or hvp_method == "forward":
            what = "a preconditioner" if preconditioner is not None else 'hvp_method="forward"'
            raise NotImplementedError("model " + REFUSAL.format(what=what))
        check_choice("hvp_method", hvp_method, ("reverse", "finite_difference"))
        self.engine = ShardedHessian(model, loss_fn, data, params=params,
                                     model_mode=model_mode, batch_size_fn=batch_size_fn)
        self.names, self.params, self.shape = self.engine.names, self.engine.params, \
            self.engine.shape
        if hvp_method == "finite_difference":  # not under a policy that rounds below
            check_fd_policy(model, self.params[0].dtype)
        self.fd = None if hvp_method == "reverse" else \
            FiniteDifference(self.params, richardson=fd_richardson, step=fd_step)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].to_local().device
        self.like = torch.empty((), dtype=working_dtype(self.dtype), device=self.device)
        self.space = sharded_space(self.params)
        self.n_hvp = 0

    def __enter__(self) -> "ShardedOperator":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def matmat(self, vs: Tensor) -> Tensor:
        """``H v`` for each row of ``vs``, this rank's local shards of the vectors.

        Args:
            vs: ``[b, n_local]`` (``space.n_local``), rows of :meth:`ShardedHessian.local`.

        Returns:
            ``[b, n_local]``, the products' local shards.

        Raises:
            ValueError: ``vs`` is not ``[b, n_local]`` or not finite (on any rank).
        """
        n_local = self.space.n_local
        if not isinstance(vs, Tensor) or vs.dim() != 2 or vs.shape[1] != n_local:
            raise ValueError(f"vectors must have shape [b, {n_local}] (this rank's local shards "
                             f"of the {self.shape[0]} selected parameter elements)")
        if not all_finite(vs):
            raise ValueError("vectors must be finite (they hold NaN or inf)")
        if not len(vs):
            return vs.new_zeros(vs.shape, dtype=self.like.dtype)
        rows = vs.to(self.device, self.dtype)
        if self.fd is None:  # the products written into one [b, n_local] block
            self.n_hvp += len(rows)
            return self.engine.matmat_local(rows).to(self.like.dtype)
        products = self._products([self.engine.sharded(v) for v in rows])
        return torch.stack([self.engine.local(p) for p in products]).to(self.like.dtype)

    def full_matmat(self, vs: Tensor) -> Tensor:
        """``H v`` for full vectors, the same on every rank (``analysis.hvp``'s interface).

        Each rank holds the full vectors and products here (the caller gave them); the
        routines use :meth:`matmat` on local shards instead.

        Args:
            vs: ``[b, n]`` or one vector ``[n]``.

        Returns:
            The products, shaped like ``vs``, the same on every rank.

        Raises:
            ValueError: ``vs`` is not ``[n]`` or ``[b, n]``, or not finite.
        """
        n = self.shape[0]
        if not isinstance(vs, Tensor) or vs.dim() not in (1, 2) or vs.shape[-1] != n:
            raise ValueError(f"vectors must have shape [b, {n}] or [{n}] (the number of selected "
                             "parameter elements)")
        if not all_finite(vs):
            raise ValueError("vectors must be finite (they hold NaN or inf)")
        rows = vs.reshape(-1, n).to(self.device, self.dtype)
        products = self._products([self.engine.distribute(v) for v in rows])
        out = torch.stack([torch.cat([h.full_tensor().reshape(-1) for h in p])
                           for p in products]).to(self.like.dtype)
        return out.reshape(vs.shape)

    def _products(self, vectors: list[Pieces]) -> list[Pieces]:
        """The products of sharded vectors, exact or by finite differences; counted."""
        if self.fd is None:
            products = self.engine.matmat(vectors)
        else:
            e = self.engine
            products = sharded_fd_matmat(self.fd, e.model, e.loss_fn, e.data, vectors,
                                         model_mode=e.model_mode, counts=e.counts())
        self.n_hvp += len(vectors)
        return products

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for one vector's local shards.

        Args:
            v: 1-D, ``n_local`` elements.

        Returns:
            1-D, the product's local shards.
        """
        return self.matmat(v.reshape(1, -1))[0]

    def hand_back(self, U: Tensor) -> list[Pieces]:
        """Rows of local shards (``[k, n_local]``) as sharded vectors placed like the parameters.

        Args:
            U: ``[k, n_local]`` (a routine's result in :attr:`space`).

        Returns:
            ``k`` lists of DTensors in the parameters' dtype (``full_tensor()`` gives each
            piece unsharded).
        """
        return [self.engine.sharded(u.to(self.dtype).clone()) for u in U]

    def take(self, vectors: Tensor | Sequence[Pieces] | None) -> Tensor | None:
        """Vectors given to a routine (``v0``) as rows of this rank's local shards.

        Args:
            vectors: None, full vectors (``[n]`` or ``[k, n]``, the same on every rank, in
                ``names`` order), or a list of sharded vectors (as :meth:`hand_back` returns).

        Returns:
            None, or ``[k, n_local]`` rows (a full tensor of another length is returned as
            given, for the routine's check to name).
        """
        if vectors is None:
            return vectors
        if isinstance(vectors, Tensor):
            rows = vectors if vectors.dim() == 2 else vectors.reshape(1, -1)
            return self.space.local(rows) if rows.shape[-1] == self.shape[0] else vectors
        return torch.stack([self.engine.local(u) for u in vectors])

    def product_metadata(self) -> dict:
        """``{"hvp": ..., "sharded": True}``: how the products were computed.

        Returns:
            The finite-difference record under ``"hvp"`` (when used) and ``"sharded"``.
        """
        out = {"sharded": "fully_shard"}
        if self.fd is not None:
            out["hvp"] = self.fd.metadata()
        return out


def sharded_inverse_sqrt(preconditioner: Preconditioner, model: nn.Module, names: Sequence[str],
                         params: Sequence[Tensor]) -> list[Tensor] | None:
    r"""$P^{-1/2}$ sharded like the selected parameters, or None without a preconditioner.

    The forms of :mod:`analysis.preconditioning` (a flat tensor over the selected parameters,
    a ``{name: tensor}`` dict whose tensors may be DTensors, an optimizer of the sharded
    parameters, whose state is sharded), validated as
    :func:`analysis.preconditioning.inverse_sqrt` validates them, one parameter at a time
    (a dict's or an optimizer's $P$ is gathered for one parameter only), each piece then
    sharded like its parameter.

    Args:
        preconditioner: Any accepted form (the same on every rank, or DTensors).
        model: The ``fully_shard`` model.
        names: The selected parameters' names.
        params: The selected parameters (DTensors).

    Returns:
        DTensors placed like ``params``, or None.

    Raises:
        ValueError: As :func:`analysis.preconditioning.inverse_sqrt` (a missing entry, a wrong
            shape or length, a value that is not finite and positive).
        TypeError: For an optimizer without a diagonal preconditioner.
    """
    named = per_parameter(preconditioner, model)
    if named is None:
        return None
    if isinstance(named, Tensor):
        flat = inverse_sqrt(full_values([named])[0], model, names, params)
        return [shard_like(t, p) for t, p in zip(unflatten(flat, params), params)]
    if any(n not in named for n in names):
        inverse_sqrt(named, model, names, params)  # raises, naming every missing parameter
    return [shard_like(inverse_sqrt({n: full_values([named[n]])[0]}, model, [n], [p]), p)
            for n, p in zip(names, params)]


def _shared(t: Tensor, pieces: Pieces) -> bool:
    """Whether ``t`` may not be overwritten: a view of a local shard of ``pieces``, or expanded.

    (Where the output is linear in a parameter, $J v$ is the gathered $v$, broadcast.)
    """
    ptr = t.untyped_storage().data_ptr()
    return not t.is_contiguous() or any(p.to_local().untyped_storage().data_ptr() == ptr
                                        for p in pieces)


def output_products(out: list[Pieces], outputs: Tensor, product: Callable[[Tensor], Tensor],
                    leaves: Sequence[Tensor], vectors: Sequence[Pieces], weight: float) -> None:
    r"""Add ``weight`` $\cdot J^\top M J v$ to ``out`` for each sharded vector $v$ of ``vectors``.

    $J$ is the Jacobian of this rank's ``outputs`` w.r.t. the shard ``leaves`` (the gathered
    weights carry ``Partial`` gradient placements, so a vector-Jacobian product w.r.t. the
    leaves is the sum over ranks of each rank's $J_r^\top u_r$). $J_r v$ is the double-vjp
    trick of the one-process GGN, $J_r v = \partial_u \langle \sum_r J_r^\top u_r, v \rangle$,
    local to the rank; $M$ (``product``) is applied locally; the last vector-Jacobian product
    $\sum_r J_r^\top (\mathrm{weight}\, M_r J_r v)$ reduce-scatters the ranks' terms. Every rank
    calls it with the same vectors, in the same order (each backward runs collectives).

    Args:
        out: Per vector, the accumulators (DTensors placed like ``leaves``), added to in place.
        outputs: This rank's output (with its graph to ``leaves``).
        product: ``w -> M w`` for ``w`` shaped like ``outputs`` (it may overwrite ``w``).
        leaves: The selected shard leaves (requiring gradients).
        vectors: Sharded vectors placed like ``leaves``.
        weight: The batch's weight ($n_b / N$ for a mean loss).
    """
    if not outputs.requires_grad:  # the output does not depend on the selected parameters
        return
    dummy = torch.zeros((), dtype=outputs.dtype, device=outputs.device,
                        requires_grad=True).expand(outputs.shape)
    pullback = torch.autograd.grad(outputs, leaves, dummy, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(pullback) if g is not None and g.requires_grad]
    if not live:
        return
    chosen = [leaves[i] for i in live]
    for j, v in enumerate(vectors):
        jv = torch.autograd.grad([pullback[i] for i in live], dummy,
                                 [v[i].to(pullback[i].dtype) for i in live], retain_graph=True)[0]
        w = product(jv.clone() if _shared(jv, v) else jv)
        del jv
        w = w * weight if weight != 1.0 else w
        jtw = torch.autograd.grad(outputs, chosen, w, retain_graph=j < len(vectors) - 1,
                                  allow_unused=True)
        del w
        for i, h in zip(live, jtw):
            if h is not None:
                out[j][i].add_(h.detach())


class ShardedCurvature(ShardedHessian):
    r"""Exact products of any built-in curvature of a ``fully_shard`` model, on sharded vectors.

    The Hessian (:class:`ShardedHessian`, or finite differences through the FSDP2 backward),
    the GGN $J^\top H_L J$, the exact or Monte-Carlo Fisher $J^\top F_R J$ and the empirical
    Fisher of :mod:`analysis.curvature`, each the sample-weighted mean over the union of the
    ranks' data,

    $$A = \frac{1}{N} \sum_r \sum_b n_{rb} A_{rb},$$

    optionally preconditioned, $P^{-1/2} A P^{-1/2}$ with $P^{-1/2}$ sharded like the
    parameters (:func:`sharded_inverse_sqrt`). The output-space curvatures run the products
    $J^\top M J v$ of :class:`analysis.curvature.OutputCurvatureOperator` on
    :func:`functional_copy` (:func:`output_products`), with the output-space matrix $M$ of the
    one-process operator (``output_side``, built by its ``output_side`` class method). The
    empirical Fisher without a likelihood (curvlinops' outer products of per-datum gradients
    $g_i$ of ``loss_fn``) takes the per-datum losses as the output, $M = I / n_b$: a loop of
    one-datum forward passes, as many on every rank (the ranks with fewer data in a batch
    repeat a datum at weight zero), since per-sample gradients by ``torch.func.vmap`` do not
    run through the DTensor collectives of the gathers.

    Every rank calls each method with its own data shard (the same number of batches) and the
    same vectors; the model is left exactly as found.

    Args:
        model: A ``fully_shard`` model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: This rank's batches.
        output_side: The one-process operator's output side
            (``OutputCurvatureOperator.output_side``), None for the Hessian.
        params: The selection (as :class:`ShardedHessian`).
        model_mode: "eval" or "train".
        batch_size_fn: Sample count of a batch.
        preconditioner: A diagonal $P$ in any form of :mod:`analysis.preconditioning`.
        fd: A :class:`analysis.finite_difference.FiniteDifference` over the selected
            parameters: the Hessian by finite differences (None: exact).

    Attributes:
        scale: $P^{-1/2}$ sharded like the parameters, or None.

    Raises:
        ValueError: As :class:`ShardedHessian` and :func:`sharded_inverse_sqrt`.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable, *,
                 output_side: Any = None, params: ParamSelection = None,
                 model_mode: str = "eval", batch_size_fn: BatchSizeFn | None = None,
                 preconditioner: Preconditioner = None, fd: FiniteDifference | None = None):
        super().__init__(model, loss_fn, data, params=params, model_mode=model_mode,
                         batch_size_fn=batch_size_fn)
        self.output_side, self.fd = output_side, fd
        self.scale = sharded_inverse_sqrt(preconditioner, model, self.names, self.params)
        self.per_sample = (getattr(output_side, "kind", None) == "empirical"
                           and output_side.likelihood is None)
        self._padded: list[int] | None = None

    def matmat(self, vectors: Sequence[Pieces]) -> list[Pieces]:
        """The curvature times each sharded vector of ``vectors``, in one pass over the data.

        Args:
            vectors: Sharded vectors placed like the selected parameters, the same on every
                rank.

        Returns:
            The products, sharded like the parameters.
        """
        if self.scale is not None:
            vectors = [[v * s for v, s in zip(vec, self.scale)] for vec in vectors]
        if self.output_side is not None:
            out = self._output_matmat(vectors)
        elif self.fd is not None:
            out = sharded_fd_matmat(self.fd, self.model, self.loss_fn, self.data, vectors,
                                    model_mode=self.model_mode, counts=self.counts())
            self.n_hvp += len(vectors)
        else:
            out = super().matmat(vectors)
        if self.scale is not None:
            out = [[h * s for h, s in zip(vec, self.scale)] for vec in out]
        return out

    def matmat_local(self, vs: Tensor) -> Tensor:
        """The curvature times each row of ``vs`` given as local shards (``[k, n_local]``).

        Args:
            vs: Rows of local shards (:meth:`local`), the same global vectors on every rank.

        Returns:
            ``[k, n_local]``, the products' local shards.
        """
        products = self.matmat([self.sharded(v) for v in vs])
        return torch.stack([self.local(p) for p in products])

    def _output_matmat(self, vectors: Sequence[Pieces]) -> list[Pieces]:
        r"""$J^\top M J v$ summed over the batches of all ranks (class docstring)."""
        sizes, total = self.counts()
        padded = self.padded() if self.per_sample else sizes
        out = [[torch.zeros_like(p) for p in self.params] for _ in vectors]
        with preserved(self.model, self.model_mode, weights=False, trainable=self.params), \
                torch.enable_grad(), curvature_ops():
            leaves = self._leaves()
            clone = self._copy(leaves)
            selected = [leaves[n] for n in self.names]
            for batch, n, m in zip(self.data, sizes, padded):
                weight = n / total if self.reduction == "mean" else 1.0
                outputs, product = (self._datum_losses(clone, batch, m) if self.per_sample
                                    else self._batch_outputs(clone, batch))
                output_products(out, outputs, product, selected, vectors, weight)
        self.n_hvp += len(vectors)
        return out

    def _batch_outputs(self, clone: nn.Module, batch: Any) -> tuple[Tensor, Callable]:
        """The batch's output (the split's forward on the copy) and its ``w -> M w``."""
        outputs = self.output_side.forward(clone, batch)
        if not isinstance(outputs, Tensor):
            raise ValueError("the forward of loss_fn.split must return the output tensor, got "
                             f"{type(outputs).__name__}")
        return outputs, self.output_side.output_product(outputs, batch)

    def padded(self) -> list[int]:
        """Per batch, the largest number of data over the ranks (the per-datum loop's length).

        Returns:
            One count per batch, the same on every rank.
        """
        if self._padded is None:
            counts = torch.tensor([float(default_batch_size(b)) for b in self.data],
                                  dtype=torch.float64)
            all_reduce_max_([counts])
            self._padded = [int(c) for c in counts]
        return self._padded

    def _datum_losses(self, clone: nn.Module, batch: Any, m: int) -> tuple[Tensor, Callable]:
        """The ``m`` per-datum losses of a batch (repeats at weight 0) and ``w -> w / n_b``."""
        datums = self.output_side.datum_batches(batch)
        losses = [check_loss(self.loss_fn(clone, d), " in the per-sample gradients of the "
                             "empirical Fisher") for d in datums]
        losses += [self.loss_fn(clone, datums[0]) for _ in range(m - len(datums))]
        outputs = torch.stack(losses)
        mask = torch.zeros(m, dtype=outputs.dtype, device=outputs.device)
        mask[:len(datums)] = 1.0 / len(datums)
        return outputs, lambda w: w * mask


class ShardedCurvatureOperator(ShardedOperator):
    r"""Any built-in curvature of a ``fully_shard`` model as the routines' operator.

    :class:`ShardedOperator` (rows of this rank's local shards in and out, the solvers'
    algebra through its ``space``; every rank gets the one-process answer) whose products
    are those of :class:`ShardedCurvature`: the GGN, the Fisher (exact or Monte Carlo) and
    the empirical Fisher, and the Hessian with a preconditioner, $P^{-1/2} A P^{-1/2}$. What
    ``analysis.operator.curvature_operator`` builds for a sharded model in those cases (the
    plain Hessian stays a :class:`ShardedOperator`).

    Args:
        model: A ``fully_shard`` model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: This rank's batches (the same number on every rank).
        output_side: As :class:`ShardedCurvature` (None: the Hessian).
        curvature: The registered name, recorded in the results.
        params: The selection.
        model_mode: "eval" or "train".
        batch_size_fn: Sample count of a batch.
        progress: Accepted for the routines' signature (no bar).
        hvp_method: "reverse", or "finite_difference" for the Hessian.
        preconditioner: A diagonal $P$ (:mod:`analysis.preconditioning`) or None.
        fd_richardson: As :class:`analysis.HessianOperator`.
        fd_step: As :class:`analysis.HessianOperator`.

    Raises:
        NotImplementedError: ``hvp_method="forward"``.
        ValueError: As :class:`ShardedCurvature`.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable, *,
                 output_side: Any = None, curvature: str = "hessian",
                 params: ParamSelection = None, model_mode: str = "eval",
                 batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
                 hvp_method: str = "reverse", preconditioner: Preconditioner = None,
                 fd_richardson: bool = False, fd_step: float | None = None):
        super().__init__(model, loss_fn, data, params=params, model_mode=model_mode,
                         batch_size_fn=batch_size_fn, progress=progress, hvp_method=hvp_method,
                         fd_richardson=fd_richardson, fd_step=fd_step)
        self.engine = ShardedCurvature(model, loss_fn, data, output_side=output_side,
                                       params=params, model_mode=model_mode,
                                       batch_size_fn=batch_size_fn,
                                       preconditioner=preconditioner, fd=self.fd)
        self.fd = None  # the engine takes the differences (inside the preconditioner)
        self.curvature = curvature
        self.preconditioned = self.engine.scale is not None

    def product_metadata(self) -> dict:
        """As :meth:`ShardedOperator.product_metadata` (the engine's finite differences).

        Returns:
            ``{"sharded": "fully_shard"}`` and the finite-difference record under ``"hvp"``.
        """
        out = super().product_metadata()
        if self.engine.fd is not None:
            out["hvp"] = self.engine.fd.metadata()
        return out


__all__ = ["is_sharded", "refuse_sharded", "check_sharded", "fsdp_units", "sample_counts",
           "ShardedHessian", "ShardedOperator", "sharded_space", "sharded_gradient",
           "sharded_fd_matmat", "dot",
           "functional_copy", "norms_squared",
           "ShardedLoss",
           "ShardedPerturbedLoss", "ShardedCurvature", "ShardedCurvatureOperator",
           "sharded_inverse_sqrt", "output_products"]


# -- forward-only passes at the model's own weights (mean_loss, evaluate, the Tracker,
#    landscape.recalibrate_bn) ----------------------------------------------------------------

def forward_copy(model: nn.Module, model_mode: str | None = None) -> nn.Module:
    """The hook-free copy of a ``fully_shard`` model at its own weights, for forward passes.

    :func:`functional_copy` with the model's detached shards as leaves: each unit gathers its
    full weights during its forward (no autograd graph to the model), so the FSDP2 model is
    neither run (its state, e.g. the root's weights kept unsharded after a forward, stays as
    found) nor written to. The buffers are the model's own objects: a train-mode BatchNorm
    updates them (callers restore them, ``analysis.core.preserved``, or mean to change them,
    ``landscape.recalibrate_bn``). A mixed-precision policy is not applied: the copy computes
    at the precision of the stored (master) shards, as every routine on a sharded model does.
    Every rank must make the same forward passes (each unit's gather is a collective).

    Args:
        model: A ``fully_shard`` model.
        model_mode: "eval" or "train" for the copy (None: the model's flags as they are).

    Returns:
        The copy (call it as the model).

    Raises:
        ValueError: As :func:`check_sharded`.
    """
    units = check_sharded(model)
    leaves = {n: p.detach() for n, p in model.named_parameters()}
    return functional_copy(model, units, leaves, model_mode)


register_forward_copy(forward_copy)  # analysis.core.forward_model builds copies with it

__all__ += ["forward_copy"]
