"""Many grid points in one forward of a sequential model: stacked weights, a first layer once.

Applies to an ``nn.Sequential`` (nested ones are flattened) of sample-wise layers without hooks,
evaluated with a ``loss_fn`` made by ``analysis.supervised``. A point ``w = sum_j c_j V_j`` is
given by its coordinates ``c`` on the vectors ``V_j``; a group of points runs as one forward over
a leading points dimension:

* the first layer whose tensors move, when it is a Linear or convolution layer reading the
  batch's inputs, is linear in its weights: ``layer(x; sum_j c_j V_j) = sum_j c_j layer(x; V_j)``,
  so each ``layer(x; V_j)`` is computed once per batch and the points only combine them;
* a later Linear layer whose tensors move: one ``baddbmm`` with the points' stacked weights
  (formed by one product ``coords @ V``, once per chunk of points for all batches);
* a layer none of whose tensors move: once on all the points' samples together;
* any other layer whose tensors move: point by point (``functional_call``).

The loss is the user's criterion on each point's outputs (a mean cross-entropy or squared error
on all the points' outputs at once). Only the order of the sums differs from the plain
evaluation, so the values agree to rounding. The model is only read.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from analysis.core import LossFn, supervised

Parts = Mapping[str, Sequence[tuple[int, Tensor]]]

_SUPERVISED = supervised(nn.MSELoss()).__code__
GROUP_ACTIVATION_BYTES = 2 ** 19  # on a CPU: one activation tensor of a group of points
PRECOMPUTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # linear in their weights
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
               nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Hardswish,
               nn.Hardsigmoid, nn.Identity)
PER_SAMPLE = (nn.LayerNorm, nn.GroupNorm, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
              nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
# batch-mixing or random in training mode
EVAL_ONLY = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout)
# sample-wise unless they act on dim 0
DIM_ONE = (nn.Flatten, nn.Unflatten, nn.Softmax, nn.LogSoftmax)


def _samplewise(m: nn.Module) -> bool:
    """True when ``m`` acts on each sample alone, so it may run on the points' samples stacked."""
    kind = type(m)
    if kind in PRECOMPUTED or kind in ELEMENTWISE:
        return True
    if kind in PER_SAMPLE:
        return not getattr(m, "return_indices", False)
    if kind in EVAL_ONLY:
        return not m.training and getattr(m, "track_running_stats", True)
    if kind in DIM_ONE:
        dim = m.start_dim if kind is nn.Flatten else m.dim
        return isinstance(dim, int) and (dim >= 1 or dim == -1 and kind is not nn.Flatten)
    return False


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]] | None:
    """The layers of a (nested) ``nn.Sequential`` in call order, or None if it is not one."""
    if type(module) is not nn.Sequential or module._parameters or module._buffers:
        return None
    out = []
    for name, child in module.named_children():
        if type(child) is nn.Sequential:
            inner = _leaves(child, prefix + name + ".")
            if inner is None:
                return None
            out += inner
        elif child._modules or not _samplewise(child):
            return None
        else:
            out.append((prefix + name, child))
    return out


def _no_hooks(model: nn.Module) -> bool:
    from torch.nn.modules import module as torch_module
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class _Stack:
    """Vectors' values ``V_j`` of one tensor, stacked once; ``at(cs)`` gives every point's
    ``sum_j c_j V_j`` ([P, *shape]) as one product, written into a buffer reused by the next
    call (a fresh multi-megabyte tensor per group costs more than the product on a CPU)."""

    def __init__(self, parts: Sequence[tuple[int, Tensor]]):
        self.idx = [j for j, _ in parts]
        self.shape = parts[0][1].shape
        self.flat = torch.stack([t.reshape(-1) for _, t in parts])
        self.buffer = self.flat[:0]

    def at(self, cs: Tensor) -> Tensor:
        if len(self.buffer) != len(cs):
            self.buffer = self.flat.new_empty(len(cs), self.flat.shape[1])
        return torch.mm(cs[:, self.idx], self.flat, out=self.buffer).view(len(cs), *self.shape)

    def values(self) -> list[tuple[int, Tensor]]:
        return list(zip(self.idx, self.flat.view(len(self.idx), *self.shape)))


@dataclass
class _Layer:
    module: nn.Module
    moving: dict[str, _Stack]  # attribute -> the vectors' values for it


class SequentialPlan:
    """The layers of a sequential model with the vector parts of its moving tensors."""

    def __init__(self, layers: list[_Layer], criterion: Callable[[Tensor, Tensor], Tensor],
                 reuse: bool):
        self.layers, self.criterion, self.reuse = layers, criterion, reuse
        self.first = next((i for i, layer in enumerate(layers) if layer.moving), len(layers))
        self.precompute = (self.first < len(layers)
                           and type(layers[self.first].module) in PRECOMPUTED)
        self._chunk: Tensor | None = None  # the points whose stacked tensors are in _tensors
        self._tensors: list[dict[str, Tensor]] = []

    def _stacked(self, cs: Tensor) -> list[dict[str, Tensor]]:
        """Per layer, its moving tensors at the points ``cs`` ([P, *shape] each)."""
        return [{a: s.at(cs) for a, s in layer.moving.items()} for layer in self.layers]

    @staticmethod
    def cpu_group(largest: int, limit: int) -> int:
        """Points per forward on a CPU: at most ``limit``, with each activation tensor (one point's
        largest is ``largest`` bytes) within ``GROUP_ACTIVATION_BYTES`` (beyond, fresh
        allocations page-fault and miss the cache more than the batching saves)."""
        return max(1, min(limit, GROUP_ACTIVATION_BYTES // max(largest, 1)))

    def _first_terms(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """The first moving layer on the batch ``x``, as a function of the points' coordinates."""
        layer = self.layers[self.first]
        m = layer.module
        if type(m) is nn.Linear:
            def apply(w): return F.linear(x, w)
        else:
            def apply(w): return m._conv_forward(x, w, None)
        weight, bias = layer.moving.get("weight"), layer.moving.get("bias")
        shape = (-1,) if type(m) is nn.Linear else (-1,) + (1,) * (x.dim() - 2)  # a bias's view
        fixed = apply(m.weight) if weight is None else None  # a fixed weight's part
        terms = {} if weight is None else {j: apply(v) for j, v in weight.values()}
        size = (fixed if fixed is not None else next(iter(terms.values()))).shape
        for j, b in bias.values() if bias is not None else ():  # layer(x; W_j, b_j) per vector
            terms[j] = terms[j] + b.view(shape) if j in terms else b.view(shape).expand(size)
        stack = _Stack(sorted(terms.items()))

        def out(cs: Tensor) -> Tensor:
            h = stack.at(cs)
            if fixed is not None:
                h += fixed
            if bias is None and m.bias is not None:
                h += m.bias.view(shape)
            return h
        return out

    def losses(self, cs: Tensor, batch: Any, group: int, device: torch.device) -> list[Any]:
        """The criterion's value at each point ``cs[p]`` on ``batch``, ``group`` points per
        forward."""
        x, y = (t.to(device) if isinstance(t, Tensor) else t for t in (batch[0], batch[1]))
        if self.reuse and self._chunk is not cs:  # new points: stacked once for all batches
            self._chunk, self._tensors = cs, self._stacked(cs)
        for layer in self.layers[:self.first]:  # nothing moves yet: shared by all points
            x = layer.module(x)
        first = self._first_terms(x) if self.precompute else None
        skip = self.first + (first is not None)
        out = []
        for start in range(0, len(cs), group):
            c = cs[start:start + group]
            h = first(c) if first is not None else x.expand(len(c), *x.shape)
            stacked = ([{a: t[start:start + group] for a, t in ts.items()} for ts in self._tensors]
                       if self.reuse else self._stacked(c))  # per group: while in the cache
            for i, (layer, tensors) in enumerate(zip(self.layers[skip:], stacked[skip:])):
                h = _apply(layer, h, tensors, owned=first is not None or i > 0)
            out += _point_losses(self.criterion, h, y)
        return out


def _point_losses(criterion: Callable[[Tensor, Tensor], Tensor], h: Tensor, y: Any) -> list[Any]:
    """``criterion(h[p], y)`` for every point ``p``: one call on all points for a mean
    ``CrossEntropyLoss`` (class targets, no class weights) or ``MSELoss`` (the same means,
    summed in another order), one call per point for any other criterion."""
    P, N = h.shape[:2]
    kind = type(criterion)
    if kind is nn.CrossEntropyLoss and criterion.reduction == "mean" and criterion.weight is None \
            and h.dim() == 3 and isinstance(y, Tensor) and y.shape == (N,) \
            and not y.is_floating_point():
        if criterion.label_smoothing:
            per = F.cross_entropy(h.flatten(0, 1), y.repeat(P), reduction="none",
                                  ignore_index=criterion.ignore_index,
                                  label_smoothing=criterion.label_smoothing).view(P, N)
        else:  # -log_softmax(h)[y] = logsumexp(h) - h[y], without the log_softmax tensor
            valid = y != criterion.ignore_index
            picked = h.gather(2, torch.where(valid, y, 0).expand(P, N)[..., None])[..., 0]
            per = (h.logsumexp(2) - picked) * valid
        return list(per.sum(1) / (y != criterion.ignore_index).sum())
    if kind is nn.MSELoss and criterion.reduction == "mean" and isinstance(y, Tensor) \
            and y.shape == h.shape[1:]:
        return list(F.mse_loss(h, y.expand_as(h), reduction="none").flatten(1).mean(1))
    return [criterion(hp, y) for hp in h]


def _apply(layer: _Layer, h: Tensor, tensors: dict[str, Tensor], owned: bool) -> Tensor:
    """``layer`` on the activations ``h[p]`` ([P, N, ...]) of each point, with its moving
    tensors ``tensors[attr][p]``; ``owned``: ``h`` is this evaluation's temporary (a ReLU may
    overwrite it)."""
    m, P = layer.module, len(h)
    if type(m) is nn.ReLU and owned:
        return h.relu_()
    if not tensors:
        return m(h.flatten(0, 1)).unflatten(0, h.shape[:2])
    if type(m) is not nn.Linear:
        return torch.stack([functional_call(m, {a: t[p] for a, t in tensors.items()}, (h[p],))
                            for p in range(P)])
    flat = h.reshape(P, -1, h.shape[-1])
    bias = tensors["bias"].unsqueeze(1) if "bias" in tensors else m.bias
    if "weight" not in tensors:
        z = F.linear(flat, m.weight) + bias
    elif bias is None:
        z = torch.bmm(flat, tensors["weight"].transpose(1, 2))
    else:
        z = torch.baddbmm(bias, flat, tensors["weight"].transpose(1, 2))
    return z.view(*h.shape[:-1], z.shape[-1])


def sequential_plan(model: nn.Module, loss_fn: LossFn, parts: Parts, reuse: bool = True
                    ) -> SequentialPlan | None:
    """The plan for ``model`` and ``loss_fn`` moving ``parts`` (name -> [(j, V_j[name])]), or
    None when they are not a hook-free sequential model of sample-wise layers and a
    ``supervised`` loss (the caller then evaluates the points another way). ``reuse``: keep a
    chunk's stacked weights for all its batches (for one batch, they are formed per group of
    points instead, while they are in the cache)."""
    if getattr(loss_fn, "__code__", None) is not _SUPERVISED or not _no_hooks(model):
        return None
    leaves = _leaves(model)
    if leaves is None:
        return None
    owner = {f"{prefix}.{attr}": (i, attr) for i, (prefix, m) in enumerate(leaves)
             for attr in (*m._parameters, *m._buffers)}
    layers = [_Layer(m, {}) for _, m in leaves]
    for name, p in parts.items():
        if name not in owner:
            return None
        i, attr = owner[name]
        layers[i].moving[attr] = _Stack(p)
    return SequentialPlan(layers, inspect.getclosurevars(loss_fn).nonlocals["criterion"], reuse)
