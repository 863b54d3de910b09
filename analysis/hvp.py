"""Hessian-vector products of the full-data mean loss, as a small linear operator.

``H = d^2/dtheta^2 (1/N) sum_b n_b L_b(theta)`` for the selected parameters ``theta``, where
``L_b = loss_fn(model, batch_b)`` is the batch mean. Each product is reduced with
:func:`analysis.core.data_mean`, so it is sample-weighted and, under ``torch.distributed``,
all-reduced over the ranks' shards.

Two products are available (``hvp_method=``):

* ``"reverse"`` (default, reverse-over-reverse, Pearlmutter 1994): per batch one forward and a
  ``create_graph`` backward build the gradient graph; each vector then costs one more backward
  through it. A block of vectors (:meth:`HessianOperator.matmat`) shares the forward pass.
  When ``data`` is a one-element list, the gradient graph is kept for the lifetime of a
  ``with operator:`` block, so every later product costs a single backward (PyHessian's trick).
* ``"forward"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` through
  ``functional_call``, ``vmap``-ed over the vectors of a block.

``benchmarks/curvature.py`` measures both against a gradient (figures in
``benchmarks/README.md``): on CPU the double backward is faster for single vectors and for
blocks, and it works for every ``loss_fn`` and for train-mode BatchNorm, so it is the default.
The forward-over-reverse product needs a ``loss_fn`` that ``torch.func`` can transform (no
``.item()``, no in-place updates of buffers, hence no train-mode BatchNorm).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from .core import (all_finite, BatchSizeFn, check_bool, check_choice, check_data, check_loss,
                   check_model_mode, data_mean, flatten, guarded, loss_reduction, LossFn, numel,
                   ParamSelection, preserved, select_params, unflatten, unwrap_compiled,
                   working_dtype)
from .derivatives import curvature_ops, gradients
from .preconditioning import Preconditioner, inverse_sqrt

HVP_METHODS = ("reverse", "forward")


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so ``functional_call`` can swap the
    parameters of ``model`` while ``loss_fn`` keeps its ``(model, batch)`` signature."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


class HessianOperator:
    """The Hessian of the mean loss over ``data`` w.r.t. the selected parameters.

    Vectors are flat, in ``model.named_parameters()`` order of the selected parameters
    (``.names``). Every call restores the model (mode, grads, buffers, requires_grad) before
    returning; inside ``with operator:`` the model stays in analysis mode until the block
    exits, which saves the per-call snapshot and allows reuse of a single batch's gradient
    graph.

    Args:
        params: ``None`` (all with requires_grad), names, parameters or a predicate
            ``f(name, parameter)``; the operator is the matching block of the full Hessian.
        model_mode: ``"eval"`` or ``"train"``, the mode during the products.
        batch_size_fn: sample count of a batch (default :func:`analysis.core.default_batch_size`,
            the leading dimension of its first tensor).
        hvp_method: ``"reverse"`` (double backward) or ``"forward"`` (forward-over-reverse).
        reuse_graph: keep the gradient graph of a one-batch ``data`` inside ``with`` blocks.
        preconditioner: a diagonal ``P`` (see :mod:`analysis.preconditioning`); the operator
            is then ``P^-1/2 H P^-1/2``, read from an optimizer once, at construction.
        check_deterministic: first check that two passes over ``data`` give the same sample
            counts and loss (``analysis.core.guards``); False skips the two forward passes.

    For a sum-reduced ``loss_fn`` (``loss_fn.reduction == "sum"``) it is the Hessian of the
    total loss ``sum_b L_b``.
    """

    curvature = "hessian"

    @guarded
    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable, *,
                 params: ParamSelection = None, model_mode: str = "eval",
                 batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
                 hvp_method: str = "reverse", reuse_graph: bool = True,
                 preconditioner: Preconditioner = None, check_deterministic: bool = True):
        model = unwrap_compiled(model)
        check_data(data)
        check_model_mode(model_mode)
        check_choice("hvp_method", hvp_method, HVP_METHODS)
        if hvp_method == "forward" and model_mode == "train" and any(True for _ in model.buffers()):
            raise ValueError('hvp_method="forward" cannot run model_mode="train" on a model with '
                             'buffers (BatchNorm updates them in place inside torch.func '
                             'transforms); use hvp_method="reverse"')
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.reduction = loss_reduction(loss_fn)
        self.model_mode, self.batch_size_fn, self.hvp_method = model_mode, batch_size_fn, hvp_method
        self.progress = check_bool("progress", progress)
        self.names, self.params = select_params(model, params)
        n = numel(self.params)
        self.shape = (n, n)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.scale = inverse_sqrt(preconditioner, model, self.names, self.params)
        # products come back in the working precision (float32 for bfloat16/float16 models)
        self.like = torch.empty((), dtype=working_dtype(self.dtype), device=self.device)
        self.n_hvp = 0
        self._reuse = (check_bool("reuse_graph", reuse_graph) and isinstance(data, (list, tuple))
                       and len(data) == 1)
        self._graph: Any = None  # the cached per-batch state of `_cached`
        self._context = None
        self._depth = 0
        self._mask = self._padding_mask() if hvp_method == "forward" else None

    @property
    def preconditioned(self) -> bool:
        """Whether the operator is ``P^-1/2 H P^-1/2`` (a ``preconditioner`` was given)."""
        return self.scale is not None

    # -- model restoration -------------------------------------------------------------
    def __enter__(self) -> "HessianOperator":
        if self._depth == 0:
            self._context = preserved(self.model, self.model_mode, weights=False,
                                      trainable=self.params)
            self._context.__enter__()
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._graph = None
            context, self._context = self._context, None
            context.__exit__(*exc)

    # -- products ----------------------------------------------------------------------
    def matvec(self, v: Tensor) -> Tensor:
        """``H @ v`` for a 1-D ``v`` of length ``shape[0]``."""
        if not isinstance(v, Tensor) or v.dim() != 1:
            raise ValueError(f"v must be a 1-D tensor of length {self.shape[0]}")
        return self.matmat(v.unsqueeze(0))[0]

    def matmat(self, vs: Tensor) -> Tensor:
        """``H @ v`` for each row of ``vs`` (shape ``[b, n]``), in one pass over the data."""
        if not isinstance(vs, Tensor) or vs.dim() != 2 or vs.shape[1] != self.shape[0]:
            shape = tuple(vs.shape) if isinstance(vs, Tensor) else type(vs).__name__
            raise ValueError(f"vectors must have shape [b, {self.shape[0]}] (the number of "
                             f"selected parameter elements), got {shape}")
        if not all_finite(vs):
            raise ValueError("vectors must be finite (they hold NaN or inf)")
        vs = vs.to(self.device, self.dtype)
        if self.scale is not None:
            vs = vs * self.scale
        with self, torch.enable_grad(), curvature_ops():
            out = data_mean(self.data, lambda batch: [self._product(batch, vs)],
                            self.batch_size_fn, reduction=self.reduction,
                            zeros=lambda: [torch.zeros_like(vs)],
                            progress=self.progress).values[0]
        self.n_hvp += vs.shape[0]
        return out if self.scale is None else out.mul_(self.scale)

    def _product(self, batch: Any, vs: Tensor) -> Tensor:
        """The curvature matrix of one batch's mean loss times each row of ``vs``."""
        return (self._reverse if self.hvp_method == "reverse" else self._forward)(batch, vs)

    def _cached(self, build: Callable[[], Any]) -> Any:
        """``build()``, kept for the rest of a ``with`` block when ``data`` is one batch."""
        if self._reuse and self._graph is not None:
            return self._graph
        value = build()
        if self._reuse and self._depth > 1:  # inside a user's or a routine's `with` block
            self._graph = value
        return value

    def _gradient_graph(self, batch: Any) -> list[Tensor | None]:
        loss = check_loss(self.loss_fn(self.model, batch), " in the Hessian-vector product")
        grads = gradients(loss, self.params, create_graph=True)
        return [g if g is not None and g.requires_grad else None for g in grads]

    def _reverse(self, batch: Any, vs: Tensor) -> Tensor:
        grads = self._cached(lambda: self._gradient_graph(batch))
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

    def _padding_mask(self) -> Tensor | None:
        """Zeros at the padding rows of ``nn.Embedding(padding_idx=...)`` weights, ones
        elsewhere; None when there are none. PyTorch gives those rows no gradient (they are
        constants of training), so the reverse product has zero rows and columns there; forward
        mode would differentiate their use in the forward pass, a non-symmetric product."""
        rows = {id(m.weight): m.padding_idx for m in self.model.modules()
                if isinstance(m, nn.Embedding) and m.padding_idx is not None}
        if not any(id(p) in rows for p in self.params):
            return None
        parts = [torch.ones_like(p) for p in self.params]
        for part, p in zip(parts, self.params):
            if id(p) in rows:
                part[rows[id(p)]] = 0
        return flatten(parts)

    def _forward(self, batch: Any, vs: Tensor) -> Tensor:
        if self._mask is not None:
            vs = vs * self._mask
        wrapper = _LossModule(self.model, self.loss_fn)
        primals = {"model." + n: p.detach() for n, p in zip(self.names, self.params)}

        def loss(theta: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            value = functional_call(wrapper, theta, (batch,))
            return value, value.detach()

        def product(v: Tensor) -> tuple[Tensor, Tensor]:
            tangent = dict(zip(primals, unflatten(v, self.params)))
            _, hv, value = jvp(grad(loss, has_aux=True), (primals,), (tangent,), has_aux=True)
            return flatten(list(hv.values())), value

        hvs, values = vmap(product, randomness="same")(vs)
        check_loss(values[0], " in the Hessian-vector product")
        return hvs

    def to_scipy(self) -> LinearOperator:
        """A scipy ``LinearOperator`` (float64 numpy in and out) for ``eigsh``, CG and friends."""
        def apply(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, dtype=np.float64)
            vs = torch.from_numpy(x.reshape(self.shape[0], -1).T.copy())
            return self.matmat(vs).to(torch.float64).cpu().numpy().T.reshape(x.shape)

        return LinearOperator(self.shape, matvec=apply, matmat=apply, rmatvec=apply,
                              dtype=np.float64)


@guarded
def hvp(model: nn.Module, loss_fn: LossFn, data: Iterable, v: Tensor, *,
        params: ParamSelection = None, model_mode: str = "eval",
        batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
        hvp_method: str = "reverse") -> Tensor:
    """``H @ v`` (or ``H @ v_i`` for each row of a 2-D ``v``) of the mean loss over ``data``."""
    op = HessianOperator(model, loss_fn, data, params=params, model_mode=model_mode,
                         batch_size_fn=batch_size_fn, progress=progress, hvp_method=hvp_method)
    if isinstance(v, Tensor) and v.dim() == 2:
        return op.matmat(v)
    return op.matvec(v)
