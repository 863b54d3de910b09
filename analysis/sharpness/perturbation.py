r"""The perturbation model shared by the sharpness measures.

The loss at perturbed weights, the scale of adaptive perturbations and the constraint sets.

A perturbation $\delta$ of the selected parameters $w$ is written in scaled coordinates
$u = \delta / c$, with $c = 1$ (plain), $c = |w|$ (elementwise adaptive, as ASAM, Kwon et al.
2021) or $c_i = \|w_f\|_2$ for the filter $f$ (slice along dim 0) that holds element $i$
(filter-wise). In these coordinates the constraint set is a plain L2 ball or L-infinity box
$\|u\|_p \le \rho$, so the projection onto the adaptive "ellipsoid" is exact.

The measures hold $u$, $\delta$, $c$, $w$ and the gradients as rows of the objective's
``space`` (:mod:`analysis.core.space`): in one process the full flat vectors (``Space``); on a
model sharded with FSDP2's ``fully_shard`` this rank's local shards (``ShardedSpace``), where
norms and maxima are a local reduction plus one all-reduce, random draws are this rank's slice
of the one-process stream, and $c$ is computed elementwise on the shards (a filter, a slice
along dim 0, is never split by ``fully_shard``'s ``Shard(0)``). No rank then holds a full
parameter-sized vector, and every rank gets the one-process answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..core import (ArgumentTypeError, BatchSizeFn, LossFn, check_loss, data_mean, flatten,
                    loss_reduction, unflatten)
from ..core.sharding import is_dtensor, is_sharded, local_values
from ..core.space import Space
from ..derivatives import explained_errors, gradients
from ..sharded import ShardedPerturbedLoss, sharded_space

NORMS = ("l2", "linf")
ADAPTIVE = ("elementwise", "filter")


def adaptivity(adaptive: bool | str | None) -> str | None:
    """Read ``adaptive=`` as None (plain), "elementwise" (True) or "filter".

    Args:
        adaptive: False or None (plain), True or "elementwise", or "filter".

    Returns:
        None, "elementwise" or "filter".

    Raises:
        ArgumentTypeError: Neither None, a bool nor a string.
        ValueError: Another string.
    """
    if adaptive is None or adaptive is False:
        return None
    if adaptive is True:
        return "elementwise"
    if isinstance(adaptive, str) and adaptive in ADAPTIVE:
        return adaptive
    error = ValueError if isinstance(adaptive, str) else ArgumentTypeError
    raise error(f"adaptive must be False, True, 'elementwise' or 'filter', got {adaptive!r}")


def weight_scale(params: Sequence[Tensor], kind: str | None) -> Tensor | None:
    r"""The scale $c$ of the adaptive perturbation model, as a row of the objective's space.

    Args:
        params: The selected parameters (of a ``fully_shard`` model: this rank's local shards
            are read; each filter, a slice along dim 0, lies whole on one rank).
        kind: None (plain), "elementwise" ($c_i = |w_i|$) or "filter" ($c_i$ the L2 norm of
            the slice along dim 0 holding $w_i$: a row of a Linear weight, an output channel
            of a Conv weight, one entry of a bias).

    Returns:
        The flat scale (this rank's local row for DTensors), or None when plain.
    """
    if kind is None:
        return None
    params = local_values(params)
    if kind == "elementwise":
        return flatten([p.abs() for p in params])
    parts = []
    for p in params:
        rows = p.reshape(1, 1) if p.dim() == 0 else p.reshape(p.shape[0], -1) if p.numel() \
            else p.reshape(0, 1)
        parts.append(torch.linalg.vector_norm(rows, dim=1, keepdim=True).expand_as(rows))
    return flatten(parts)


class PerturbedLoss:
    r"""The loss at perturbed weights, $\delta \mapsto L(w + \delta)$, and its gradient.

    Writes $w + \delta$ into the parameters (and leaves the last point there), so the caller
    must hold ``preserved(model, weights=True)``. With ``batch`` given, the loss is that one
    batch on this rank alone (m-sharpness); otherwise the sample-weighted mean over ``data``
    and all ranks.

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: The batches (unused when ``batch`` is given).
        params: The selected parameters $w$.
        batch_size_fn: ``batch -> int`` sample count (default: the leading dimension).
        batch: One batch to evaluate instead of ``data``.
        base: $w$ flattened (default: the parameters' values now).

    Attributes:
        base: $w$, flat.
        space: The vector space of the flat vectors (``Space``: full vectors, one process).
        n_forward: The per-batch forward passes spent.
        n_backward: The per-batch backward passes spent.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable | None,
                 params: Sequence[nn.Parameter], batch_size_fn: BatchSizeFn | None = None,
                 batch: Any = None, base: Tensor | None = None):
        self.model, self.loss_fn, self.data, self.params = model, loss_fn, data, list(params)
        self.batch_size_fn, self.batch = batch_size_fn, batch
        self.base = flatten([p.detach() for p in self.params]) if base is None else base
        self.space = weight_space(self.params)
        self.reduction = loss_reduction(loss_fn)
        self.n_forward = self.n_backward = 0

    def _per_batch(self, batch: Any, grad: bool) -> list[Tensor]:
        self.n_forward += 1
        with torch.set_grad_enabled(grad), explained_errors(grad):
            loss = check_loss(self.loss_fn(self.model, batch), " at a perturbed point")
            if not grad:
                return [loss]
            self.n_backward += 1
            grads = gradients(loss, self.params)
        return [loss, flatten([torch.zeros_like(p) if g is None else g
                               for g, p in zip(grads, self.params)])]

    def __call__(self, delta: Tensor | None, grad: bool = False) -> tuple[float, Tensor | None]:
        r"""Evaluate $L(w + \delta)$.

        Args:
            delta: The flat perturbation (None: $\delta = 0$).
            grad: Also compute the gradient with respect to $\delta$.

        Returns:
            The loss and the flat gradient (None unless ``grad``).
        """
        point = self.base if delta is None else self.base + delta
        with torch.no_grad():
            for p, v in zip(self.params, unflatten(point, self.params)):
                p.copy_(v)
        if self.batch is not None:
            out = [t.detach() for t in self._per_batch(self.batch, grad)]
        else:
            def zeros():  # an empty shard's share: the loss and, with grad, the gradient
                return [self.base.new_zeros(())] + ([torch.zeros_like(self.base)] if grad else [])

            out = data_mean(self.data, lambda b: self._per_batch(b, grad), self.batch_size_fn,
                            reduction=self.reduction, zeros=zeros).values
        return float(out[0]), (out[1] if grad else None)


def perturbed_loss(model: nn.Module, loss_fn: LossFn, data: Iterable | None,
                   params: Sequence[nn.Parameter], batch_size_fn: BatchSizeFn | None = None,
                   batch: Any = None, base: Tensor | None = None
                   ) -> PerturbedLoss | ShardedPerturbedLoss:
    r"""The objective $\delta \mapsto L(w + \delta)$ for ``model``.

    :class:`PerturbedLoss`, or for a model sharded with FSDP2's ``fully_shard``
    :class:`analysis.sharded.ShardedPerturbedLoss` (the same interface on this rank's local
    rows, in its ``space``; the model never written to).

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: The batches.
        params: The selected parameters.
        batch_size_fn: ``batch -> int`` sample count.
        batch: One batch instead of ``data`` (m-sharpness; refused on a sharded model).
        base: $w$ as a row of the objective's space (:func:`flat_weights`; default: the
            parameters' values now).

    Returns:
        The objective.
    """
    cls = ShardedPerturbedLoss if is_sharded(model) else PerturbedLoss
    return cls(model, loss_fn, data, params, batch_size_fn, batch, base)


def weight_space(params: Sequence[Tensor]) -> Space:
    """The space of the objectives' rows for ``params`` (:mod:`analysis.core.space`).

    Args:
        params: The selected parameters.

    Returns:
        ``Space`` over their elements, or for DTensors (``fully_shard``)
        :func:`analysis.sharded.sharded_space`.
    """
    if any(is_dtensor(p) for p in params):
        return sharded_space(params)
    return Space(sum(p.numel() for p in params))


def flat_weights(params: Sequence[Tensor]) -> Tensor:
    """The selected weights $w$ as a row of the objectives' space (a copy).

    Args:
        params: The selected parameters.

    Returns:
        Their flat values; of DTensors, this rank's local shards concatenated.
    """
    return flatten(local_values(params))


@dataclass(frozen=True)
class Ball:
    r"""The L2 ball or L-infinity box $\|u\|_p \le \rho$ (in the scaled coordinates).

    Its points are rows of ``space`` (:mod:`analysis.core.space`): norms and maxima are local
    reductions completed by the space (one all-reduce on shards), random points are the
    space's slices of the one-process draws. Every rank calls each method with its row of the
    same vector, in the same order.

    Attributes:
        norm: "l2" or "linf".
        rho: The radius $\rho$.
        space: The objective's space (None: full vectors in one process, ``Space``).
    """

    norm: str
    rho: float
    space: Space | None = None

    def _space(self, u: Tensor) -> Space:
        return Space(u.numel()) if self.space is None else self.space

    def size(self, u: Tensor) -> float:
        r"""The norm $\|u\|_p$ of the whole vector.

        Args:
            u: A point in the scaled coordinates (a row of the space).

        Returns:
            The norm as a float (the same on every rank).
        """
        space = self._space(u)
        if self.norm == "l2":
            return float(space.norm(u))
        return float(space.amax(u.abs().amax() if u.numel() else u.new_zeros(())))

    def project(self, u: Tensor) -> Tensor:
        """The Euclidean projection of ``u`` onto the set.

        Args:
            u: A point in the scaled coordinates.

        Returns:
            The nearest point of the set.
        """
        if self.norm == "linf":
            return u.clamp(-self.rho, self.rho)
        size = self.size(u)
        return u * (self.rho / size) if size > self.rho else u

    def direction(self, g: Tensor) -> Tensor:
        r"""The steepest-ascent unit step for this norm: $g / \|g\|_2$ or $\mathrm{sign}(g)$.

        Args:
            g: A gradient in the scaled coordinates.

        Returns:
            The step (zero where ``g`` is zero).
        """
        if self.norm == "linf":
            return torch.sign(g)
        size = float(self._space(g).norm(g))
        return g / size if size > 0 else torch.zeros_like(g)

    def noise(self, gen: torch.Generator, like: Tensor) -> Tensor:
        """Unit-scale noise: standard normal for L2, uniform on [-1, 1] for L-infinity.

        Args:
            gen: The generator.
            like: A row of the space whose device and dtype the noise takes.

        Returns:
            The noise (this rank's slice of the one-process draw of the whole vector).
        """
        space = self._space(like)
        draw = space.randn if self.norm == "l2" else space.uniform
        return draw(1, gen, like=like)[0]

    def random_point(self, gen: torch.Generator, like: Tensor) -> Tensor:
        """A random start in the set: on the L2 sphere, or uniform in the box.

        Args:
            gen: The generator.
            like: A row of the space whose device and dtype the point takes.

        Returns:
            The point.
        """
        u = self.noise(gen, like)
        if self.norm == "l2":
            return u * (self.rho / max(self.size(u), torch.finfo(u.dtype).tiny))
        return u * self.rho
