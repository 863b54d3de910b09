r"""Hessian-vector products of the full-data mean loss, as a small linear operator.

$H = \nabla^2_\theta \frac{1}{N} \sum_b n_b L_b(\theta)$ for the selected parameters $\theta$,
where $L_b$ = ``loss_fn(model, batch_b)`` is the batch mean and $N = \sum_b n_b$.
:class:`HessianOperator` is a :class:`~analysis.operator.CurvatureOperator` (registered as
``curvature="hessian"``), so each product is reduced with :func:`analysis.core.data_mean`:
sample-weighted and, under ``torch.distributed``, all-reduced over the ranks' shards.

Two products are available (``hvp_method=``):

* ``"reverse"`` (default, reverse-over-reverse, Pearlmutter 1994): per batch one forward and a
  ``create_graph`` backward build the gradient graph; each vector then costs one more backward
  through it ($H v = \nabla_\theta (\nabla_\theta L \cdot v)$). A block
  of vectors (:meth:`HessianOperator.matmat`) shares the forward pass.
  When ``data`` is a one-element list, the gradient graph is kept for the lifetime of a
  ``with operator:`` block, so every later product costs a single backward (PyHessian's trick).
* ``"forward"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` through
  ``functional_call``, ``vmap``-ed over the vectors of a block.
* ``"finite_difference"``: central differences of ordinary ``.backward()`` gradients
  (:mod:`analysis.finite_difference`: the step rule, the optional Richardson step and the
  error estimate, which the results of the routines record in ``metadata["hvp"]``). It works
  where double backward does not (any op with a first derivative; DDP and FSDP2 wrappers run
  their own hooks), at four to eight gradients per product (the step chosen per product) and
  a truncation/rounding error of about $\epsilon^{2/3}$ relative; the exact methods stay the
  default.

``benchmarks/curvature.py`` measures both against a gradient (figures in
``benchmarks/README.md``): on CPU the double backward is faster for single vectors and for
blocks, and it works for every ``loss_fn`` and for train-mode BatchNorm, so it is the default.
The forward-over-reverse product needs a ``loss_fn`` that ``torch.func`` can transform (no
``.item()``, no in-place updates of buffers, hence no train-mode BatchNorm).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .core import (BatchSizeFn, check_choice, check_loss, flatten, guarded, LossFn,
                   LossModule, own_call, ParamSelection, unflatten)
from .finite_difference import (backward_gradient, check_fd_options, fd_matmat,
                                FiniteDifference)
from .operator import CurvatureOperator, register_curvature
from .derivatives import gradients
from .preconditioning import Preconditioner
from .sharded import is_sharded, ShardedOperator

HVP_METHODS = ("reverse", "forward", "finite_difference")


class HessianOperator(CurvatureOperator):
    r"""The Hessian $H = \nabla^2_\theta \frac{1}{N} \sum_b n_b L_b(\theta)$ of the mean loss.

    W.r.t. the selected parameters, over ``data``.
    A :class:`~analysis.operator.CurvatureOperator` (vectors, restoration, ``with`` semantics,
    preconditioning as there) whose batch product is a Hessian-vector product
    (module docstring); registered as ``curvature="hessian"``. For a sum-reduced ``loss_fn``
    (``loss_fn.reduction == "sum"``) it is the Hessian of the total loss $\sum_b L_b$.

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the batch's mean loss.
        data: An iterable of batches.
        params: ``None`` (all with requires_grad), names, parameters or a predicate
            ``f(name, parameter)``; the operator is the matching block of the full Hessian.
        model_mode: ``"eval"`` or ``"train"``, the mode during the products.
        batch_size_fn: Sample count of a batch (default
            :func:`analysis.core.default_batch_size`).
        progress: Show a bar over the batches of each product.
        hvp_method: ``"reverse"`` (double backward), ``"forward"`` (forward-over-reverse) or
            ``"finite_difference"`` (central differences of gradients, module docstring).
        fd_richardson: With ``"finite_difference"``, Richardson-extrapolate each product.
        fd_step: With ``"finite_difference"``, a fixed step $h$ instead of the rule of
            :func:`analysis.finite_difference.fd_step`.
        reuse_graph: Keep the gradient graph of a one-batch ``data`` inside ``with`` blocks.
        preconditioner: A diagonal $P$ (see :mod:`analysis.preconditioning`); the operator
            is then $P^{-1/2} H P^{-1/2}$, read from an optimizer once, at construction.
        check_deterministic: First check that two passes over ``data`` give the same sample
            counts and loss (``analysis.core.guards``); False skips the two forward passes.

    Raises:
        ValueError: For an unknown ``hvp_method``, ``hvp_method="forward"`` with
            ``model_mode="train"`` on a model with buffers, ``fd_richardson=True`` or an
            ``fd_step`` with another method than ``"finite_difference"``, and as
            :class:`~analysis.operator.CurvatureOperator`.
    """

    curvature = "hessian"

    @guarded
    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable, *,
                 params: ParamSelection = None, model_mode: str = "eval",
                 batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
                 hvp_method: str = "reverse", reuse_graph: bool = True,
                 preconditioner: Preconditioner = None, check_deterministic: bool = True,
                 fd_richardson: bool = False, fd_step: float | None = None):
        check_choice("hvp_method", hvp_method, HVP_METHODS)
        check_fd_options(hvp_method, fd_richardson, fd_step)
        if hvp_method == "forward" and model_mode == "train" and any(True for _ in model.buffers()):
            raise ValueError('hvp_method="forward" cannot run model_mode="train" on a model with '
                             'buffers (BatchNorm updates them in place inside torch.func '
                             'transforms); use hvp_method="reverse"')
        super().__init__(model, loss_fn, data, params=params, model_mode=model_mode,
                         batch_size_fn=batch_size_fn, progress=progress,
                         reuse_graph=reuse_graph, preconditioner=preconditioner,
                         check_deterministic=check_deterministic)
        self.hvp_method = hvp_method
        self.fd = None if hvp_method != "finite_difference" else \
            FiniteDifference(self.params, richardson=fd_richardson, step=fd_step)

    def reduced_product(self, vs: Tensor) -> Tensor:
        """The full-data product (the base's), or the finite-difference one.

        Args:
            vs: ``[b, n]`` vectors.

        Returns:
            ``[b, n]``, the products.
        """
        if self.fd is None:
            return super().reduced_product(vs)
        with self:
            return fd_matmat(self.fd, self.model, self.loss_fn, self.data, vs,
                             batch_size_fn=self.batch_size_fn, reduction=self.reduction,
                             progress=self.progress)

    def product_metadata(self) -> dict:
        """``{"hvp": ...}``: the finite-difference record (empty for the exact methods).

        Returns:
            :meth:`analysis.finite_difference.FiniteDifference.metadata` under ``"hvp"``.
        """
        return {} if self.fd is None else {"hvp": self.fd.metadata()}

    def batch_product(self, batch: Any, V: Tensor) -> Tensor:
        r"""$H_b V$, the Hessian of the batch's mean loss times the columns of ``V``.

        Args:
            batch: One batch of ``data``.
            V: ``[n, k]``, flat over the selected parameters.

        Returns:
            ``[n, k]``.
        """
        vs = V.T.contiguous()  # a view in `matmat`: its rows are the vectors
        if self.fd is not None:
            return self._differences(batch, vs).T
        return (self._reverse if self.hvp_method == "reverse" else self._forward)(batch, vs).T

    def _differences(self, batch: Any, vs: Tensor) -> Tensor:
        """The finite-difference product of one batch (not recorded in the error estimate)."""
        vectors = [unflatten(v, self.params) for v in vs]
        steps = self.fd.steps_for(vectors)

        def loss() -> Tensor:
            return check_loss(self.loss_fn(self.model, batch), " in the Hessian-vector product")

        rows = self.fd.differences(lambda: backward_gradient(self.model, loss, self.params),
                                   vectors, steps)
        return torch.stack([flatten(p) for p in self.fd.combine(rows, steps, record=False)])

    def _gradient_graph(self, batch: Any) -> list[Tensor | None]:
        loss = check_loss(self.loss_fn(self.model, batch), " in the Hessian-vector product")
        grads = gradients(loss, self.params, create_graph=True)
        return [g if g is not None and g.requires_grad else None for g in grads]

    def _reverse(self, batch: Any, vs: Tensor) -> Tensor:
        grads = self.cached(lambda: self._gradient_graph(batch))
        kept = self._graph is grads  # reused by later products of this `with` block
        live = [i for i, g in enumerate(grads) if g is not None]
        if not live:  # the loss is at most linear in the selected parameters: H = 0
            return torch.zeros_like(vs)
        out = None
        for row, v in enumerate(vs):
            pieces = unflatten(v, self.params)
            last = row == len(vs) - 1
            hv = torch.autograd.grad([grads[i] for i in live], self.params,
                                     grad_outputs=[pieces[i] for i in live],
                                     retain_graph=kept or not last, allow_unused=True)
            if last and not kept:
                grads = None  # the graph is freed before the output is allocated
            if out is None:  # after the first backward, whose peak then excludes it
                out = torch.empty_like(vs)
            for r, h in zip(unflatten(out[row], self.params), hv):
                if h is None:  # a parameter the loss does not reach
                    r.zero_()
                else:
                    r.copy_(h)
        return out if out is not None else torch.zeros_like(vs)  # (no rows)

    def _forward(self, batch: Any, vs: Tensor) -> Tensor:
        wrapper = LossModule(self.model, self.loss_fn)
        primals = {"model." + n: p.detach() for n, p in zip(self.names, self.params)}

        def loss(theta: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            value = own_call(wrapper, theta, (batch,))
            return value, value.detach()

        def product(v: Tensor) -> tuple[Tensor, Tensor]:
            tangent = dict(zip(primals, unflatten(v, self.params)))
            _, hv, value = jvp(grad(loss, has_aux=True), (primals,), (tangent,), has_aux=True)
            return flatten(list(hv.values())), value

        with ConstantPaddingRows():
            hvs, values = vmap(product, randomness="same")(vs)
        check_loss(values[0], " in the Hessian-vector product")
        return hvs


register_curvature("hessian", HessianOperator)


class ConstantPaddingRows(TorchFunctionMode):
    """Embedding lookups with ``padding_idx`` read the padding row as a constant.

    PyTorch's embedding backward gives the padding row no gradient through the lookup (the
    row is a constant of training there), so the reverse product differentiates the loss with
    that use of the row held fixed. Forward mode would differentiate the lookup as well, a
    non-symmetric product; where the row is also used elsewhere (an output layer tied to the
    embedding, as Gemma2's), masking the tangent would drop that use instead. Inside this mode
    ``F.embedding`` reads the row through ``detach``: the same function as the reverse
    product, in every use of the row. Values are unchanged.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        """Detach the padding row of ``F.embedding``'s weight; other functions run unchanged."""
        kwargs = dict(kwargs or {})
        if func is F.embedding:
            names = ("input", "weight", "padding_idx", "max_norm")
            bound = dict(zip(names, args), **kwargs)
            pad, weight = bound.get("padding_idx"), bound.get("weight")
            if pad is not None and bound.get("max_norm") is None:
                keep = torch.ones(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
                keep[pad] = 0
                weight = weight * keep + (weight * (1 - keep)).detach()
                args = (args[0], weight, *args[2:]) if len(args) > 1 else args
                if len(args) < 2:
                    kwargs["weight"] = weight
        return func(*args, **kwargs)


@guarded(sharded=True)
def hvp(model: nn.Module, loss_fn: LossFn, data: Iterable, v: Tensor, *,
        params: ParamSelection = None, model_mode: str = "eval",
        batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
        hvp_method: str = "reverse", fd_richardson: bool = False) -> Tensor:
    r"""$H v$ (or $H v_i$ for each row of a 2-D ``v``) of the mean loss over ``data``.

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the batch's mean loss.
        data: An iterable of batches (one pass).
        v: A 1-D tensor of length ``n`` (the selected parameter elements) or ``[b, n]``.
        params: The parameters of the Hessian block (as :class:`HessianOperator`).
        model_mode: ``"eval"`` or ``"train"``, the mode during the product.
        batch_size_fn: Sample count of a batch.
        progress: Show a bar over the batches.
        hvp_method: ``"reverse"``, ``"forward"`` or ``"finite_difference"``
            (:class:`HessianOperator`).
        fd_richardson: With ``"finite_difference"``, Richardson-extrapolate the product
            (:mod:`analysis.finite_difference`); refused with another ``hvp_method``.

    Returns:
        $H v$, shaped like ``v``.

    Raises:
        ValueError: For a ``v`` of the wrong shape or not finite, and as
            :class:`HessianOperator`.
    """
    # a fully_shard model: the products on shards, full vectors in and out (analysis.sharded)
    make = ShardedOperator if is_sharded(model) else HessianOperator
    fd = {"fd_richardson": True} if check_fd_options(hvp_method, fd_richardson) else {}
    op = make(model, loss_fn, data, params=params, model_mode=model_mode,
              batch_size_fn=batch_size_fn, progress=progress, hvp_method=hvp_method, **fd)
    if make is ShardedOperator:  # its matmat takes local shards (the solvers' rows)
        return op.full_matmat(v)
    if isinstance(v, Tensor) and v.dim() == 2:
        return op.matmat(v)
    return op.matvec(v)
