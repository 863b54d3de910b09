"""Many grid points in one forward of a sequential model: stacked weights, a first layer once.

Applies to an ``nn.Sequential`` (nested ones are flattened) of sample-wise layers without hooks,
evaluated with a ``loss_fn`` made by ``analysis.supervised``. A point ``w = sum_j c_j V_j`` is
given by its coordinates ``c`` on the vectors ``V_j``; a group of points runs as one forward over
a leading points dimension:

* the first layer whose tensors move, when it is a Linear or convolution layer reading the
  batch's inputs, is linear in its weights: ``layer(x; sum_j c_j V_j) = sum_j c_j layer(x; V_j)``,
  so each ``layer(x; V_j)`` is computed once per batch and chunk and the points only combine
  them;
* a later Linear layer whose tensors move: one ``baddbmm`` per tile of rows of the points'
  weights (each tile formed by one product ``coords @ V`` and used while in the cache; one tile
  unless the points' inputs are small and their weights large, see ``_tile_rows``), computed
  as ``z^T = W x^T``, into an output buffer reused by every group;
* a layer none of whose tensors move: once on all the points' samples together;
* any other layer whose tensors move: point by point (``functional_call``).

Where consecutive points differ in one coefficient only (a grid row: ``x`` changes, ``y`` does
not), the other vectors' sum is formed once per row and each point adds one vector to it
(``_rows``, ``_Stack.at``): one multiply-add per element and point instead of one per vector.

Consecutive batches of a list (inputs of one shape) run as one forward per chunk of points
(``SequentialPlan.bunch``): the layers are sample-wise, so each sample's outputs are those of its
own batch. The loss is the user's criterion on each point's outputs on each batch (a mean
cross-entropy or squared error on all the points and batches at once). Only the order of the
sums differs from the plain evaluation, so the values agree to rounding. The model is only read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.core import (BatchSizeFn, check_model_mode, LossFn, own_call, Supervised,
                           to_device)

Parts = Mapping[str, Sequence[tuple[int, Tensor]]]

GROUP_ACTIVATION_BYTES = 2 ** 21  # on a CPU: one activation tensor of a group of points
TILE_BYTES = 2 ** 22  # on a CPU: one tile of a group's formed Linear weights (see _tile_rows)
BUNCH_ACTIVATION_BYTES = 2 ** 24  # one point's largest activation on a bunch of batches
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
# criteria that are functions of their arguments alone (see fixed_passes)
DETERMINISTIC_CRITERIA = (nn.CrossEntropyLoss, nn.NLLLoss, nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss,
                          nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss)


def xy_batch(batch: Any, targets: bool = False) -> bool:
    """Whether ``batch`` is ``(x, y, ...)`` with ``x`` a tensor of at least one dimension.

    Args:
        batch: a batch of the data.
        targets: also require ``y`` to be a tensor of as many samples as ``x``.

    Returns:
        True for such a batch.
    """
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2
            and isinstance(batch[0], Tensor) and batch[0].dim()):
        return False
    y = batch[1]
    return not targets or (isinstance(y, Tensor) and bool(y.dim()) and len(y) == len(batch[0]))


def _samplewise(m: nn.Module, training: bool | None = None) -> bool:
    """True when ``m`` acts on each sample alone, so it may run on the points' samples stacked.

    In its own mode, or in training mode if ``training``.
    """
    kind = type(m)
    if kind in PRECOMPUTED or kind in ELEMENTWISE:
        return True
    if kind in PER_SAMPLE:
        return not getattr(m, "return_indices", False)
    if kind in EVAL_ONLY:
        return not (m.training if training is None else training) \
            and getattr(m, "track_running_stats", True)
    if kind in DIM_ONE:
        dim = m.start_dim if kind is nn.Flatten else m.dim
        return isinstance(dim, int) and (dim >= 1 or dim == -1 and kind is not nn.Flatten)
    return False


def _leaves(module: nn.Module, prefix: str = "", training: bool | None = None
            ) -> list[tuple[str, nn.Module]] | None:
    """The layers of a (nested) ``nn.Sequential`` in call order, or None if it is not one."""
    if type(module) is not nn.Sequential or module._parameters or module._buffers:
        return None
    out = []
    for name, child in module.named_children():
        if type(child) is nn.Sequential:
            inner = _leaves(child, prefix + name + ".", training)
            if inner is None:
                return None
            out += inner
        elif child._modules or not _samplewise(child, training):
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
    """Vectors' values ``V_j`` of one tensor, stacked once.

    ``at(cs)`` gives every point's ``sum_j c_j V_j`` ([P, *shape]) as one product, written
    into a buffer reused by the next call (a fresh multi-megabyte tensor per group costs more
    than the product on a CPU); ``at(cs, start, stop)`` gives rows ``start:stop`` of it (a
    tile) alone.

    ``along=(m, key)``: the points ``cs`` differ only in their coefficient on ``V_m``, ``key``
    being their other coefficients (the points of a grid row): the other vectors' sum, the
    base, is formed once per key and each point adds ``c_m V_m`` to it (one multiply-add per
    element instead of one per vector).
    """

    def __init__(self, idx: list[int], flat: Tensor, shape: torch.Size):
        self.idx, self.flat, self.shape = idx, flat, shape
        self.buffer = self.base = flat[0, :0]
        self.key: Any = None  # the ``along`` of the base: the varying index and the others' values

    @classmethod
    def of(cls, parts: Sequence[tuple[int, Tensor]]) -> "_Stack":
        return cls([j for j, _ in parts], torch.stack([t.reshape(-1) for _, t in parts]),
                   parts[0][1].shape)

    def at(self, cs: Tensor, start: int = 0, stop: int | None = None,
           along: tuple[int, Any] | None = None) -> Tensor:
        rows = self.shape[0] if self.shape else 1
        stop = rows if stop is None else stop
        row = self.flat.shape[1] // max(rows, 1)
        size = len(cs) * (stop - start) * row
        if self.buffer.numel() < size:
            self.buffer = self.flat.new_empty(size)
        out = self.buffer[:size].view(len(cs), -1)
        c, cols = cs[:, self.idx], slice(start * row, stop * row)
        if along is None or along[0] not in self.idx or len(self.idx) == 1:
            torch.mm(c, self.flat[:, cols], out=out)
        else:
            k = self.idx.index(along[0])
            if self.key != along:  # the vectors before and after V_m (views, not copies)
                if self.base.numel() < self.flat.shape[1]:
                    self.base = self.flat.new_empty(self.flat.shape[1])
                parts = [p for p in (slice(0, k), slice(k + 1, len(self.idx))) if p.start < p.stop]
                base = self.base[None]
                torch.mm(c[:1, parts[0]], self.flat[parts[0]], out=base)
                for p in parts[1:]:
                    base.addmm_(c[:1, p], self.flat[p])
                self.key = along
            torch.addcmul(self.base[cols], c[:, k, None], self.flat[k, cols], out=out)
        return out.view(len(cs), stop - start, *self.shape[1:])

    def values(self) -> list[tuple[int, Tensor]]:
        return list(zip(self.idx, self.flat.view(len(self.idx), *self.shape)))


def _rows(cs: Tensor, group: int) -> list[tuple[int, Any] | None]:
    """Per group of ``group`` consecutive points of ``cs``: ``(m, key)``, or None.

    ``(m, key)`` when the group's points differ only in their coefficient ``m`` (``key``: their
    other coefficients), else None. ``m`` is
    the coefficient that varies along the runs of consecutive points (a grid's fastest axis);
    None everywhere unless those runs hold two points on average (a base per run then pays).
    """
    host = cs.detach().cpu().double().numpy()
    best = None
    for m in range(host.shape[1]):
        others = np.delete(host, m, axis=1)
        run = np.concatenate([[0], np.cumsum((others[1:] != others[:-1]).any(1))])
        if best is None or run[-1] < best[2][-1]:
            best = (m, others, run)
    starts = range(0, len(host), group)
    if best is None or 2 * (best[2][-1] + 1) > len(host):
        return [None for _ in starts]
    m, others, run = best
    return [(m, tuple(others[i].tolist())) if run[i] == run[min(i + group, len(host)) - 1]
            else None for i in starts]


@dataclass
class _Layer:
    module: nn.Module
    moving: dict[str, _Stack]  # attribute -> the vectors' values for it


@dataclass
class _Bunch:
    """Consecutive batches run as one forward.

    Their inputs are concatenated (the layers are sample-wise, so every sample's outputs are
    those of its own batch's forward), the criterion applied on each batch's outputs;
    ``values`` are the losses at the points ``cs``.
    """
    batches: list[Any]
    group: int
    cs: Tensor | None = None
    values: list[list[Any]] = field(default_factory=list)


class SequentialPlan:
    """The layers of a sequential model with the vector parts of its moving tensors.

    Made by :func:`sequential_plan`; :meth:`losses` evaluates many points per forward.

    Args:
        layers: the model's layers in call order, each with the vectors' values of its moving
            tensors.
        criterion: ``criterion(outputs, targets)``, the ``supervised`` loss's criterion.
    """

    def __init__(self, layers: list[_Layer], criterion: Callable[[Tensor, Tensor], Tensor]):
        self.layers, self.criterion = layers, criterion
        self.first = next((i for i, layer in enumerate(layers) if layer.moving), len(layers))
        self.precompute = (self.first < len(layers)
                           and type(layers[self.first].module) in PRECOMPUTED)
        self._bunches: dict[int, tuple[_Bunch, int]] = {}  # id(batch) -> its bunch, position
        self._buffers: dict[Any, Tensor] = {}  # reused outputs (fresh ones page-fault on a CPU)

    @staticmethod
    def cpu_group(largest: int, limit: int) -> int:
        """Points per forward on a CPU.

        At most ``limit``, with each activation tensor within ``GROUP_ACTIVATION_BYTES``
        (beyond, the activations miss the cache more than the batching saves).

        Args:
            largest: bytes of one point's largest activation tensor.
            limit: the most points per forward.

        Returns:
            The points per forward, at least 1.
        """
        return max(1, min(limit, GROUP_ACTIVATION_BYTES // max(largest, 1)))

    def bunch(self, batches: Sequence[Any], size: Callable[[Any], int], device: torch.device,
              largest: int, group: int) -> None:
        """Run consecutive batches of ``batches`` as one forward, where they fit.

        Batches join while one point's largest activation on them stays within
        ``BUNCH_ACTIVATION_BYTES``: fewer, larger products, and each point's weights formed
        once for all of them. Only batches ``(x, y, ...)`` whose inputs ``x`` agree in shape
        past dim 0, dtype and device join. :meth:`losses` then finds each batch's bunch.

        Args:
            batches: the data, a list already in memory.
            size: the sample count of a batch.
            device: the device of the points' weights.
            largest: bytes of one point's largest activation on the first batch.
            group: points per forward on one batch.
        """
        live = [b for b in batches if size(b) > 0]
        if not live or live[0] is not batches[0] or not all(map(xy_batch, live)):
            return
        per_sample = largest / max(len(live[0][0]), 1)
        runs: list[list[Any]] = []
        for b in live:
            run = runs[-1] if runs else None
            if run is None or b[0].shape[1:] != run[0][0].shape[1:] \
                    or (b[0].dtype, b[0].device) != (run[0][0].dtype, run[0][0].device) \
                    or (sum(len(a[0]) for a in run) + len(b[0])) * per_sample \
                    > BUNCH_ACTIVATION_BYTES:
                runs.append([b])
            else:
                run.append(b)
        for run in (r for r in runs if len(r) > 1):
            shared = _Bunch(run, max(1, group * len(live[0][0]) // sum(len(b[0]) for b in run)))
            for k, b in enumerate(run):
                self._bunches[id(b)] = (shared, k)

    def losses(self, cs: Tensor, batch: Any, group: int, device: torch.device) -> list[Any]:
        """The criterion's value at each point ``cs[p]`` on ``batch``.

        Args:
            cs: the points' coordinates, [P, n_vectors].
            batch: ``(x, y, ...)``; if it is part of a bunch (:meth:`bunch`), the whole bunch
                is evaluated once for these points and its batches' values are kept.
            group: points per forward (a bunch has its own).
            device: the device of the points' weights.

        Returns:
            The P criterion values (0-d tensors).
        """
        shared, k = self._bunches.get(id(batch), (None, 0))
        if shared is None or shared.batches[k] is not batch:
            shared, k = _Bunch([batch], group), 0
        if shared.cs is not cs:  # new points: the whole bunch at once (concatenated per chunk)
            x = torch.cat([b[0] for b in shared.batches]) if len(shared.batches) > 1 \
                else shared.batches[0][0]
            ys = [to_device(b[1], device) for b in shared.batches]
            sizes = [len(b[0]) if isinstance(b[0], Tensor) and b[0].dim() else 0
                     for b in shared.batches]
            shared.cs, shared.values = cs, self._forward(cs, to_device(x, device), ys, sizes,
                                                         shared.group)
        return shared.values[k]

    def _forward(self, cs: Tensor, x: Tensor, ys: list[Any], sizes: list[int], group: int
                 ) -> list[list[Any]]:
        """Per target ``ys[b]`` (of the next ``sizes[b]`` samples of ``x``), the points' losses."""
        for layer in self.layers[:self.first]:  # nothing moves yet: shared by all points
            x = layer.module(x)
        first = self._first_terms(x) if self.precompute else None
        skip = self.first + (first is not None)
        loss = _point_losses(self.criterion, ys, sizes)
        out: list[list[Any]] = [[] for _ in ys]
        for start, along in zip(range(0, len(cs), group), _rows(cs, group)):
            c = cs[start:start + group]
            h = first(c, along) if first is not None else x.expand(len(c), *x.shape)
            for i in range(skip, len(self.layers)):
                h = self._apply(i, h, c, along, owned=first is not None or i > skip)
            for values, more in zip(out, loss(h)):
                values += more
        return out

    def _first_terms(self, x: Tensor) -> Callable[[Tensor, Any], Tensor]:
        """The first moving layer on the batch ``x``, a function of the points' coordinates.

        Its second argument is ``along`` (see ``_Stack.at``).
        """
        layer = self.layers[self.first]
        m = layer.module
        linear = type(m) is nn.Linear
        if linear:
            rows = x.reshape(-1, x.shape[-1])
            size = (*x.shape[:-1], m.out_features)

            def apply(w: Tensor, out: Tensor) -> Tensor:  # the layer without its bias, into out
                torch.mm(rows, w.T, out=out.view(-1, m.out_features))
                return out
        else:  # the output's shape, from one sample
            size = (len(x), *m._conv_forward(x[:1], m.weight, None).shape[1:])

            def apply(w: Tensor, out: Tensor) -> Tensor:
                return out.copy_(m._conv_forward(x, w, None))
        weight, bias = layer.moving.get("weight"), layer.moving.get("bias")
        shape = (-1,) if linear else (-1,) + (1,) * (x.dim() - 2)  # a bias's view
        fixed = apply(m.weight, x.new_empty(size)) if weight is None else None  # fixed weight
        weights = dict(weight.values()) if weight is not None else {}
        biases = dict(bias.values()) if bias is not None else {}
        idx = sorted(weights.keys() | biases.keys())
        flat = x.new_empty(len(idx), math.prod(size))  # layer(x; W_j, b_j) per vector, in place
        for k, j in enumerate(idx):
            term = flat[k].view(size)
            if j in weights:
                apply(weights[j], term)
                if j in biases:
                    term += biases[j].view(shape)
            else:
                term.copy_(biases[j].view(shape).expand(size))
        stack = _Stack(idx, flat, torch.Size(size))

        def out(cs: Tensor, along: tuple[int, Any] | None = None) -> Tensor:
            h = stack.at(cs, along=along)
            if fixed is not None:
                h += fixed
            if bias is None and m.bias is not None:
                h += m.bias.view(shape)
            return h
        return out

    def _buffer(self, key: Any, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A tensor of ``shape`` reused under ``key`` by every group (its values overwritten)."""
        size = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < size or (buf.dtype, buf.device) != (like.dtype,
                                                                             like.device):
            buf = self._buffers[key] = like.new_empty(size)
        return buf[:size].view(shape)

    def _apply(self, i: int, h: Tensor, c: Tensor, along: tuple[int, Any] | None, owned: bool
               ) -> Tensor:
        """Layer ``i`` on the activations ``h[p]`` ([P, N, ...]) of each point ``c[p]``.

        ``along``: see ``_Stack.at``; ``owned``: ``h`` is this evaluation's temporary (a ReLU
        may overwrite it).
        """
        layer = self.layers[i]
        m, P = layer.module, len(h)
        if type(m) is nn.ReLU and owned:
            return h.relu_()
        if not layer.moving:
            return m(h.flatten(0, 1)).unflatten(0, h.shape[:2])
        if type(m) is not nn.Linear:
            tensors = {a: s.at(c, along=along) for a, s in layer.moving.items()}
            return torch.stack([own_call(m, {a: t[p] for a, t in tensors.items()}, (h[p],))
                                for p in range(P)])
        flat = h.reshape(P, -1, h.shape[-1])
        weight, bias = layer.moving.get("weight"), layer.moving.get("bias")
        if weight is None:
            b = bias.at(c, along=along).unsqueeze(1)
            return (F.linear(flat, m.weight) + b).view(*h.shape[:-1], -1)
        # z^T = W x^T ([P, out, N]): as fast as x W^T or faster (3x for 10 outputs) on a CPU
        b = bias.at(c, along=along).unsqueeze(2) if bias is not None else m.bias
        b = b[:, None] if b is not None and b.dim() == 1 else b  # [P, out, 1] or [out, 1]
        n_out, inputs = m.out_features, flat.transpose(1, 2)
        out = self._buffer(i, (P, n_out, flat.shape[1]), flat)
        rows = _tile_rows(flat, n_out)
        for r0 in range(0, n_out, rows):  # the formed weights' tiles, each used while cached
            r1 = min(r0 + rows, n_out)
            w = weight.at(c, r0, r1, along)
            part = out if rows == n_out else self._buffer(("tile", i), (P, r1 - r0, flat.shape[1]),
                                                          flat)
            if b is None:
                torch.bmm(w, inputs, out=part)
            else:
                torch.baddbmm(b[..., r0:r1, :], w, inputs, out=part)
            if part is not out:
                out[:, r0:r1] = part
        out = out.transpose(1, 2)
        return out if h.dim() == 3 else out.reshape(*h.shape[:-1], n_out)


def _logsumexp(h: Tensor) -> Tensor:
    """``h.logsumexp(2)`` ([P, N, C] -> [P, N]), without slow reductions or subnormals.

    Reduced over the classes in a [P, C, N] copy (a reduction over the innermost 10 entries
    is slow), with the exponents clamped at -87: the largest term is 1 and the clamped ones
    stay below 10^-37, under the rounding of the sum in float32 and float64, so the value is
    unchanged while exp never returns a subnormal (which a CPU computes 3-6 times slower, as
    happens for the far points of a plane).
    """
    t = h.transpose(1, 2).contiguous()
    m = t.amax(1, keepdim=True)
    return (t - m).clamp_min_(-87).exp_().sum(1).log_().add_(m[:, 0])


def _tile_rows(flat: Tensor, n_out: int) -> int:
    """Rows of a Linear layer's weights formed at once for the points of ``flat`` ([P, N, in]).

    On a CPU, when the points' inputs are small (within ``GROUP_ACTIVATION_BYTES``) and their
    formed weights are not, tiles of ``TILE_BYTES``: each is formed and multiplied while in the
    cache, so the stored vectors are streamed once per group and the formed weights never go
    to memory. Otherwise all rows (the inputs would be re-read per tile).
    """
    P, N, n_in = flat.shape
    item = flat.element_size()
    rows = TILE_BYTES // max(P * n_in * item, 1)
    if flat.device.type != "cpu" or P * N * n_in * item > GROUP_ACTIVATION_BYTES or rows >= n_out:
        return n_out
    return max(1, rows)


def _point_losses(criterion: Callable[[Tensor, Tensor], Tensor], ys: list[Any], sizes: list[int]
                  ) -> Callable[[Tensor], list[list[Any]]]:
    """The function of the points' outputs ``h`` giving the criterion per target and point.

    ``h`` is [P, N, ...], ``sizes[b]`` samples for each target ``ys[b]`` in order; per target,
    the function gives ``criterion(h[p, its samples], ys[b])`` for every point ``p``: one
    evaluation on all points and targets for a mean
    ``CrossEntropyLoss`` (class targets, no class weights) or ``MSELoss`` (the same means,
    summed in another order), one call per point and target for any other criterion.
    """
    tensors = all(isinstance(yb, Tensor) and yb.dim() and len(yb) == n for yb, n in zip(ys, sizes))
    y = torch.cat(ys) if tensors and len(ys) > 1 else ys[0]

    def each(h: Tensor) -> list[list[Any]]:
        parts = h.split(sizes, 1) if len(ys) > 1 else (h,)
        return [[criterion(hp, yb) for hp in part] for part, yb in zip(parts, ys)]

    def means(per: Tensor, counts: Sequence[Tensor]) -> list[list[Any]]:
        return [list(part.flatten(1).sum(1) / n) for part, n in zip(per.split(sizes, 1), counts)]

    kind = type(criterion)
    if kind is nn.CrossEntropyLoss and criterion.reduction == "mean" and criterion.weight is None \
            and tensors and y.dim() == 1 and not y.is_floating_point():
        valid = y != criterion.ignore_index
        counts = [v.sum() for v in valid.split(sizes)]
        safe = torch.where(valid, y, 0)

        def cross_entropy(h: Tensor) -> list[list[Any]]:
            if h.dim() != 3 or h.shape[1] != len(y):
                return each(h)
            P, N = h.shape[:2]
            if criterion.label_smoothing:
                per = F.cross_entropy(h.flatten(0, 1), y.repeat(P), reduction="none",
                                      ignore_index=criterion.ignore_index,
                                      label_smoothing=criterion.label_smoothing).view(P, N)
            else:  # -log_softmax(h)[y] = logsumexp(h) - h[y], without the log_softmax tensor
                per = (_logsumexp(h) - h.gather(2, safe.expand(P, N)[..., None])[..., 0]) * valid
            return means(per, counts)
        return cross_entropy
    if kind is nn.MSELoss and criterion.reduction == "mean" and tensors \
            and all(yb.shape[1:] == ys[0].shape[1:] for yb in ys):
        def squared_error(h: Tensor) -> list[list[Any]]:
            if h.shape[1:] != y.shape:
                return each(h)
            per = F.mse_loss(h, y.expand_as(h), reduction="none")
            return means(per, [yb.numel() for yb in ys])
        return squared_error
    return each


def _planned_layers(model: nn.Module, loss_fn: LossFn, training: bool | None = None
                    ) -> list[tuple[str, nn.Module]] | None:
    """The layers of ``model`` when it and ``loss_fn`` fit the plan, else None.

    The layers in their modules' modes, or all in training mode if ``training``; the plan
    needs a hook-free sequential model of sample-wise layers and a ``supervised`` loss (a
    :class:`analysis.core.Supervised` whose call is not overridden: the plan computes
    ``criterion(model(x), y)`` its own way).
    """
    if not isinstance(loss_fn, Supervised) or type(loss_fn).__call__ is not Supervised.__call__ \
            or not _no_hooks(model):
        return None
    return _leaves(model, training=training)


def fixed_passes(model: nn.Module, loss_fn: LossFn, data: Any, batch_size_fn: BatchSizeFn | None,
                 model_mode: str) -> bool:
    """Whether two passes over ``data`` give the same losses by construction.

    The determinism check's verdict is then known (``guarded(known_deterministic=...)``):
    ``data`` is a list or tuple of batches ``(x, y, ...)`` of tensors (the same tensors on
    every pass, counted by the default batch size); ``model`` and ``loss_fn`` are those of the
    plan in ``model_mode`` (its layers have no randomness: Dropout and BatchNorm only in eval
    mode), with a criterion of ``DETERMINISTIC_CRITERIA`` without hooks and no in-place layer
    before the first Linear or convolution (it would change the batch's own tensor).

    Args:
        model: the model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: the iterable of batches.
        batch_size_fn: the caller's ``batch_size_fn`` (only None qualifies).
        model_mode: "eval" or "train", the mode of the passes.

    Returns:
        True when two passes give the same values; False when that is not known.

    Raises:
        ValueError: ``model_mode`` is neither "eval" nor "train".
    """
    if batch_size_fn is not None or type(data) not in (list, tuple) \
            or not all(xy_batch(b, targets=True) for b in data):
        return False
    leaves = _planned_layers(model, loss_fn, check_model_mode(model_mode) == "train")
    if leaves is None:
        return False
    criterion = loss_fn.criterion
    if type(criterion) not in DETERMINISTIC_CRITERIA or not _no_hooks(criterion):
        return False
    for _, m in leaves:
        if type(m) in PRECOMPUTED:  # a fresh output: in-place layers after it write their own
            return True
        if getattr(m, "inplace", False):
            return False
    return True


def sequential_plan(model: nn.Module, loss_fn: LossFn, parts: Parts) -> SequentialPlan | None:
    """The plan evaluating many points of ``model`` per forward, or None where none applies.

    Args:
        model: a hook-free ``nn.Sequential`` (nested ones flattened) of sample-wise layers.
        loss_fn: a ``supervised`` loss (:class:`analysis.core.Supervised`).
        parts: the moving tensors, name -> ``[(j, V_j[name])]``.

    Returns:
        The :class:`SequentialPlan`, or None when ``model``, ``loss_fn`` or ``parts`` do not fit
        it (the caller then evaluates the points another way).
    """
    leaves = _planned_layers(model, loss_fn)
    if leaves is None:
        return None
    owner = {f"{prefix}.{attr}": (i, attr) for i, (prefix, m) in enumerate(leaves)
             for attr in (*m._parameters, *m._buffers)}
    layers = [_Layer(m, {}) for _, m in leaves]
    for name, p in parts.items():
        if name not in owner:
            return None
        i, attr = owner[name]
        layers[i].moving[attr] = _Stack.of(p)
    return SequentialPlan(layers, loss_fn.criterion)
