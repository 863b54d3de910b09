r"""Curvature matrices beyond the Hessian: the generalised Gauss-Newton and the Fisher.

With $f(\theta)$ the model output of a batch, $J = \partial f / \partial \theta$ and $L(f)$ the
criterion (the batch mean), every operator here is a
:class:`~analysis.operator.CurvatureOperator` like :class:`~analysis.hvp.HessianOperator`: the
sample-weighted mean over the batches $\frac{1}{N} \sum_b n_b A_b$ (one
:func:`analysis.core.data_mean` reduction, all-reduced under ``torch.distributed``). Each is
registered for ``curvature=`` (:func:`~analysis.operator.register_curvature`):

* ``"ggn"``, :class:`GGNOperator` (Schraudolph 2002; Martens 2020, JMLR 21(146)):
  $A_b = J^\top H_L J$ with $H_L = \nabla^2_f L$ the Hessian of the criterion w.r.t. the output.
  Each product is a Jacobian-vector product $J v$ (the double-vjp trick:
  $J v = \partial_u \langle J^\top u, v \rangle$), $H_L$ applied by autograd on the criterion
  alone, and a vector-Jacobian product; no Jacobian is formed.
* ``"fisher"``, :class:`FisherOperator` with ``kind="exact"``: $A_b = J^\top F_R J$ with $F_R$
  the Fisher of the predictive distribution $r(y \mid f)$ in the output,
  $F_R = \mathbb{E}_{y \sim r(\cdot \mid f)}[\nabla_f \log r \, \nabla_f \log r^\top]$, in
  closed form: $\mathrm{diag}(p) - p p^\top$ per observation for the softmax of cross-entropy,
  $2 I$ for the mean squared error (a Gaussian of variance 1/2), $\sigma(f)(1 - \sigma(f))$ per
  element for BCE-with-logits. For these three (natural-parameter exponential families) it
  equals the GGN (Martens 2020), which the tests check.
* :class:`FisherOperator` with ``kind="mc"``: $F_R$ replaced by
  $\frac{1}{S} \sum_s r_s r_s^\top$, $r_s$ the output gradient of the negative log-likelihood
  at labels sampled from the model (``mc_samples=S``, ``seed=``).
* ``"empirical_fisher"``, :class:`EmpiricalFisherOperator` (also
  ``FisherOperator(kind="empirical")``), curvlinops' ``EFLinearOperator`` convention:
  $A_b = \frac{1}{c} \sum_i g_i g_i^\top$ with $g_i$ the gradient of datum $i$'s loss summed
  over its observations and $c$ the criterion's normalisation (the number of observations), so
  that with labels drawn from the model it estimates the Fisher (Kunstner et al. 2019 discuss
  its limits).

Ignored targets (``ignore_index``) are not observations in the Fisher, the empirical Fisher or
the GGN (curvlinops' convention; the GGN differentiates the criterion, which already skips
them).

The GGN and the two Fishers of the predictive distribution share
:class:`OutputCurvatureOperator`, the products $J^\top M J v$ for an output-space matrix $M$;
a subclass of it supplies $M$ (:meth:`OutputCurvatureOperator.output_product`).

**The loss split.** The GGN and the Fisher need $f$ and $L$ separately. ``loss_fn`` declares
them with an attribute ``loss_fn.split = (forward, criterion)``: ``forward(model, batch)`` returns
the output tensor and ``criterion(outputs, batch)`` the batch-mean loss.
:func:`~analysis.core.supervised` sets it; :func:`~analysis.core.split_loss` builds
such a ``loss_fn`` from any two functions. The exact and Monte-Carlo Fisher also need the
likelihood: read from ``loss_fn.criterion`` (``nn.CrossEntropyLoss``/``F.cross_entropy``,
``nn.MSELoss``/``F.mse_loss``, with mean reduction), or declared on the loss
(``split_loss(forward, criterion, likelihood=...)``, or a ``loss_fn.likelihood`` attribute: the
way for ``curvature="fisher"`` in the routines) or with ``FisherOperator(likelihood=)``
(``"categorical"``: softmax over dim 1 of the output; ``"gaussian"``: unit-scaled squared error;
``"bernoulli"``: sigmoid of each output element, ``nn.BCEWithLogitsLoss``).
"""
from __future__ import annotations

import abc
import copy
import hashlib
import math
from collections import UserDict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .core import (BatchSizeFn, check_choice, check_int, check_loss, default_batch_size, guarded,
                   LIKELIHOODS, likelihood_error, loss_reduction, LossFn, LossModule,
                   make_generator, own_call, ParamSelection, unflatten)
from .core import loss_ce
from .core.loss_ce import (CROSS_ENTROPY_ARGS, linear_head_product, LinearRecorder,
                           softmax_hessian_product)
from .operator import (CurvatureOperator, curvature_operator, register_curvature,
                       registered_curvatures)
from .preconditioning import Preconditioner

__all__ = ["CurvatureOperator", "OutputCurvatureOperator", "GGNOperator", "FisherOperator",
           "EmpiricalFisherOperator", "register_curvature", "registered_curvatures",
           "curvature_operator", "loss_split", "FISHER_KINDS", "LIKELIHOODS"]

FISHER_KINDS = ("exact", "mc", "empirical")
OutputProduct = Callable[[Tensor], Tensor]


def loss_split(loss_fn: LossFn) -> tuple[Callable, Callable]:
    """The split of ``loss_fn`` into model output and criterion (module docstring).

    Args:
        loss_fn: A ``loss_fn`` built by :func:`~analysis.core.supervised` or
            :func:`~analysis.core.split_loss` (or with its own ``split`` attribute).

    Returns:
        ``(forward, criterion)`` declared by ``loss_fn.split``.

    Raises:
        ValueError: When ``loss_fn`` declares no split.
    """
    split = getattr(loss_fn, "split", None)
    if not (isinstance(split, tuple) and len(split) == 2 and all(map(callable, split))):
        raise ValueError("loss_fn must declare its split into model output and criterion "
                         "(loss_fn.split = (forward, criterion)) for the GGN and the Fisher: "
                         "build it with analysis.supervised(criterion) or "
                         "analysis.split_loss(forward, criterion)")
    return split


def _read_likelihood(criterion: Any) -> str | None:
    """The likelihood whose negative log is ``criterion`` (mean-reduced), None when unknown."""
    if criterion is F.cross_entropy or (
            isinstance(criterion, nn.CrossEntropyLoss) and criterion.weight is None
            and criterion.label_smoothing == 0 and criterion.reduction == "mean"):
        return "categorical"
    if criterion is F.mse_loss or (isinstance(criterion, nn.MSELoss)
                                   and criterion.reduction == "mean"):
        return "gaussian"
    if criterion is F.binary_cross_entropy_with_logits or (
            isinstance(criterion, nn.BCEWithLogitsLoss) and criterion.weight is None
            and criterion.pos_weight is None and criterion.reduction == "mean"):
        return "bernoulli"
    return None


def _declared_likelihood(loss_fn: LossFn) -> str | None:
    """``loss_fn.likelihood`` (``split_loss(likelihood=)``), else read from ``.criterion``."""
    declared = getattr(loss_fn, "likelihood", None)
    if declared is not None:
        return check_choice("loss_fn.likelihood", declared, LIKELIHOODS)
    return _read_likelihood(getattr(loss_fn, "criterion", None))


def _likelihood(loss_fn: LossFn, likelihood: str | None) -> str:
    """The likelihood whose negative log is the criterion: the keyword, else as declared.

    Raises:
        LikelihoodError: It is neither given, declared nor readable (the message names the
            ways out of ``FisherOperator``; the routines' ``curvature=`` rewrites it).
    """
    if likelihood is not None:
        return check_choice("likelihood", likelihood, LIKELIHOODS)
    found = _declared_likelihood(loss_fn)
    if found is None:
        raise likelihood_error(getattr(loss_fn, "criterion", None))
    return found


def _observations(likelihood: str, criterion: Callable, f: Tensor, batch: Any) -> tuple:
    r"""The observations of a batch's output ``f``, as a 0/1 mask, and their number.

    For the categorical likelihood an observation is a position (classes on dim 1): those
    whose target the criterion ignores (``ignore_index``: padding, Hugging Face collators'
    ``-100``) are not observations. Where the criterion is one ``F.cross_entropy`` call on
    ``f`` itself, they are read from its targets; otherwise from the criterion's gradient at
    zero logits, $(1/C - e_y)/n_{obs}$, non-zero at every counted position and exactly zero at
    ignored ones. For the Gaussian and Bernoulli likelihoods every output element is one.

    Returns:
        ``(mask, count)``: the mask broadcastable to ``f`` (``[N, 1, ...]`` for the
        categorical) and the number of observations (the criterion's mean normalisation).
    """
    if likelihood != "categorical":
        return torch.ones((), dtype=f.dtype, device=f.device), f.numel()
    if f.dim() < 2:
        raise ValueError("the categorical likelihood needs outputs [N, C, ...] (classes on "
                         f"dim 1), got shape {tuple(f.shape)}")
    mask = _targets_mask(criterion, f, batch)
    if mask is None:
        with torch.enable_grad():
            zero = torch.zeros((), dtype=f.dtype, device=f.device,
                               requires_grad=True).expand(f.shape)
            g = torch.autograd.grad(criterion(zero, batch), zero)[0]
        mask = (g != 0).any(1, keepdim=True).to(f.dtype)
    return mask, int(mask.sum())


class _CrossEntropyCalls(TorchFunctionMode):
    """Record the arguments of ``F.cross_entropy`` calls instead of computing them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        """Record ``F.cross_entropy`` (returning a zero); run every other function."""
        kwargs = kwargs or {}
        if func is F.cross_entropy:
            self.calls.append(dict(zip(CROSS_ENTROPY_ARGS, args), **kwargs))
            return torch.zeros(())
        return func(*args, **kwargs)


def _targets_mask(criterion: Callable, f: Tensor, batch: Any) -> Tensor | None:
    """``[N, 1, ...]`` 0/1, the targets not ignored, or None.

    Read from the targets (without computing the loss) when the criterion is one
    ``F.cross_entropy`` call on ``f`` with class-index targets; None otherwise.
    """
    recorder = _CrossEntropyCalls()
    try:
        with torch.no_grad(), recorder:
            criterion(f, batch)
    except Exception:  # the criterion needs the real value: ask its gradient instead
        return None
    if len(recorder.calls) != 1:
        return None
    call = recorder.calls[0]
    z, target = call.get("input"), call.get("target")
    try:
        same = isinstance(z, Tensor) and z.data_ptr() == f.data_ptr()
    except RuntimeError:  # a tensor without storage
        return None
    if not (same and isinstance(target, Tensor) and z.shape == f.shape
            and z.stride() == f.stride()
            and target.dtype == torch.long and target.shape == f.shape[:1] + f.shape[2:]
            and call.get("weight") is None and not call.get("label_smoothing", 0.0)):
        return None
    keep = target.to(f.device) != call.get("ignore_index", -100)
    return keep.unsqueeze(1).to(f.dtype)


def _observation_dot(likelihood: str, a: Tensor, b: Tensor) -> Tensor:
    """Per observation ``<a, b>``: over the class dim (1) for the categorical, elementwise else."""
    return (a * b).sum(1, keepdim=True) if likelihood == "categorical" else a * b



class OutputCurvatureOperator(CurvatureOperator):
    r"""The curvature $J^\top M J$ of a matrix $M$ in the model's output space.

    The shared base of :class:`GGNOperator` ($M = H_L$) and :class:`FisherOperator`
    ($M = F_R$ or its Monte-Carlo estimate). Per batch, with $f$ the output of
    ``forward(model, batch)`` (``loss_fn.split``) and $J = \partial f / \partial \theta$, the
    product is $J^\top (M (J v))$: $J v$ by the double-vjp trick, $M$ by
    :meth:`output_product`, $J^\top w$ by a vector-Jacobian product. Inside ``with op:`` a
    one-batch ``data`` keeps its forward graph, so each later product costs two backward
    passes through it. A subclass implements :meth:`output_product`.

    A language model's output, ``[M, V]`` logits above one chunk
    (:data:`~analysis.core.loss_ce.CHUNK_BYTES`) returned by a recognised linear head
    $f = h W^\top + b$ (:class:`~analysis.core.loss_ce.LinearRecorder`), with the built-in
    cross-entropy products (GGN, exact Fisher), is not kept: $J v$, $M$ and $J^\top$ are
    applied to the head chunk by chunk over the tokens from $h$, $W$, $b$
    (:func:`~analysis.core.loss_ce.linear_head_product`), so no ``[M, V]`` tensor outlives the
    forward; any other output, or a head that is not recognised unambiguously, takes the
    path above. Values are the same to rounding.

    Args:
        model: The model.
        loss_fn: A ``loss_fn`` that declares its split (module docstring).
        data: An iterable of batches.
        params: The parameters of the block (as :class:`~analysis.operator.CurvatureOperator`).
        model_mode: ``"eval"`` or ``"train"``, the mode during the products.
        batch_size_fn: Sample count of a batch.
        progress: Show a bar over the batches of each product.
        reuse_graph: Keep the forward graph of a one-batch ``data`` inside ``with`` blocks.
        preconditioner: A diagonal $P$; the operator is then $P^{-1/2} J^\top M J P^{-1/2}$.
        check_deterministic: First check that two passes over ``data`` agree.

    Raises:
        ValueError: When ``loss_fn`` declares no split, and as
            :class:`~analysis.operator.CurvatureOperator`.
    """

    @guarded
    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable, *,
                 params: ParamSelection = None, model_mode: str = "eval",
                 batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
                 reuse_graph: bool = True, preconditioner: Preconditioner = None,
                 check_deterministic: bool = True):
        self._output_setup(model, loss_fn, model_mode)
        super().__init__(model, loss_fn, data, params=params, model_mode=model_mode,
                         batch_size_fn=batch_size_fn, progress=progress, reuse_graph=reuse_graph,
                         preconditioner=preconditioner, check_deterministic=check_deterministic)

    def _output_setup(self, model: nn.Module, loss_fn: LossFn, model_mode: str) -> None:
        """The output side's state (what :meth:`output_product` reads): ``loss_fn``'s split."""
        self.loss_fn = loss_fn
        self.forward, self.criterion = loss_split(loss_fn)

    @classmethod
    def output_side(cls, model: nn.Module, loss_fn: LossFn, model_mode: str = "eval",
                    options: dict[str, Any] | None = None) -> "OutputCurvatureOperator":
        r"""An instance holding the output side only: ``forward``, ``criterion``, $M$.

        For engines that run the products $J^\top M J v$ themselves (on the shards of a
        ``fully_shard`` model: :class:`analysis.sharded.ShardedCurvature`): the instance has no
        parameters, data or model state; only :meth:`output_product` and the attributes it
        reads are set, validated as the constructor validates them.

        Args:
            model: The model (read only for checks that depend on it).
            loss_fn: As the constructor's.
            model_mode: As the constructor's.
            options: The class's own keywords (``kind``, ``mc_samples``, ``seed``,
                ``likelihood`` of :class:`FisherOperator`), ``{name: value}``.

        Returns:
            The instance.

        Raises:
            ValueError: As the constructor, for the output side's arguments.
        """
        op = object.__new__(cls)
        op._output_setup(model, loss_fn, model_mode, **(options or {}))
        return op

    @abc.abstractmethod
    def output_product(self, outputs: Tensor, batch: Any) -> OutputProduct:
        r"""The output-space matrix $M$ of one batch, as a function ``w -> M w``.

        Args:
            outputs: The batch's output $f$ (with its graph; detach it for $M$).
            batch: The batch (e.g. for its targets).

        Returns:
            ``w -> M w`` for ``w`` shaped like ``outputs``; ``w`` is a tensor of the product's
            own, which ``M w`` may overwrite (the built-ins do, to hold one output-sized
            tensor per product).
        """

    def _linearise(self, batch: Any) -> tuple:
        """The batch's linearisation, built once per batch (or ``with`` block).

        Returns the output with its graph, ``J^T u`` as a function of a dummy ``u`` (for the
        double-vjp ``J v``), the parameters it depends on, and ``w -> M w``.
        """
        recorder = LinearRecorder()
        with recorder:
            outputs = self.forward(self.model, batch)
        if not isinstance(outputs, Tensor):
            raise ValueError("the forward of loss_fn.split must return the output tensor, got "
                             f"{type(outputs).__name__}")
        product = self.output_product(outputs, batch)
        if not outputs.requires_grad:  # the output does not depend on the selected parameters
            return outputs, None, [], [], product
        head = _linear_head(recorder, outputs, product)
        if head is not None:  # the output is not kept: products through the head's operands
            return _HeadLinearisation(self.params, head, product.chunk)
        # J^T u for a dummy u: an expanded scalar (no [N, ...] zeros held while the graph lives)
        dummy = torch.zeros((), dtype=outputs.dtype, device=outputs.device,
                            requires_grad=True).expand(outputs.shape)
        pullback = torch.autograd.grad(outputs, self.params, dummy, create_graph=True,
                                       allow_unused=True)
        live = [i for i, g in enumerate(pullback) if g is not None and g.requires_grad]
        return outputs, dummy, [pullback[i] for i in live], live, product

    def batch_product(self, batch: Any, V: Tensor) -> Tensor:
        r"""$J_b^\top M_b J_b V$ for one batch.

        Args:
            batch: One batch of ``data``.
            V: ``[n, k]``, flat over the selected parameters.

        Returns:
            ``[n, k]``.
        """
        linearised = self.cached(lambda: self._linearise(batch))
        if isinstance(linearised, _HeadLinearisation):
            return linearised.product(V, self.params)
        vs = V.T.contiguous()  # a view in `matmat`: its rows are the vectors
        outputs, dummy, pullback, live, product = linearised
        if not live:
            return torch.zeros_like(vs).T
        chosen, out = [self.params[i] for i in live], None
        for row, v in enumerate(vs):
            pieces = unflatten(v, self.params)
            jv = torch.autograd.grad(pullback, dummy, [pieces[i] for i in live],
                                     retain_graph=True)[0]
            if jv.untyped_storage().data_ptr() == vs.untyped_storage().data_ptr():
                jv = jv.clone()  # the output is linear in a parameter: J v is a view of v
            w = product(jv)
            del jv  # (the built-in products overwrite it: w is then the one output-sized tensor)
            jtw = torch.autograd.grad(outputs, chosen, w, retain_graph=True, allow_unused=True)
            del w
            if out is None:  # after the first products, whose peak then excludes it
                out = torch.zeros_like(vs)
            rows = unflatten(out[row], self.params)
            for i, h in zip(live, jtw):
                if h is not None:
                    rows[i].copy_(h)
        return out.T


class _Rowwise:
    r"""An output-space product $w \mapsto M w$ with $M$ block-diagonal over the output's rows.

    ``chunk(rows, z, u)`` is $M_r u$ for the rows ``rows`` (a slice of dim 0), computed from
    their outputs ``z`` alone (it may overwrite ``u``). Called, the object applies it to all
    rows of ``outputs``; :class:`_HeadLinearisation` applies ``chunk`` to one chunk of a
    linear head's rows at a time instead, from logits it recomputes.
    """

    def __init__(self, outputs: Tensor, chunk: Callable[[slice, Tensor, Tensor], Tensor]):
        self.outputs, self.chunk = outputs, chunk

    def __call__(self, w: Tensor) -> Tensor:
        """$M w$ for ``w`` shaped like the outputs (overwritten)."""
        return self.chunk(slice(None), self.outputs, w)


def _softmax_rows(f: Tensor, mask: Tensor, scale: float) -> _Rowwise:
    r"""$s\, m (\mathrm{diag}(p) - p p^\top)$ per observation of the logits ``f``, rowwise."""
    return _Rowwise(f, lambda rows, z, u: softmax_hessian_product(z, u, scale, mask[rows]))


def _linear_head(recorder: LinearRecorder, outputs: Tensor, product: OutputProduct
                 ) -> tuple | None:
    r"""``(h, W, b)`` when ``outputs`` $= h W^\top + b$ is worth chunking through, else None.

    That is: a ``[M, V]`` output above one chunk (:data:`~analysis.core.loss_ce.CHUNK_BYTES`),
    recognised as the last ``F.linear``'s output by ``recorder``
    (:meth:`~analysis.core.loss_ce.LinearRecorder.head`), and an output product of the
    built-ins that is block-diagonal over the rows (:class:`_Rowwise`). Anything else (or
    anything ambiguous) takes the generic path.
    """
    if (not isinstance(product, _Rowwise) or outputs.dim() != 2
            or outputs.numel() * outputs.element_size() <= loss_ce.CHUNK_BYTES):
        return None
    return recorder.head(outputs)


class _HeadLinearisation:
    r"""$J^\top M J$ for an output $f = h W^\top + b$ through the head's operands.

    With $J_h, J_W, J_b$ the Jacobians of the operands w.r.t. the selected parameters, the
    output's is $J v = (J_h v) W^\top + h (J_W v)^\top + J_b v$, per row. An operand that is a
    selected parameter itself has its piece of $v$ as its direction (and its pullback goes
    into the result directly); one computed from parameters is linearised by the double-vjp
    trick (``[M, d]``-sized, not ``[M, V]``); one that depends on none is constant. The
    output-space product and the head's $J$ and $J^\top$ are applied chunk by chunk over the
    rows (:func:`~analysis.core.loss_ce.linear_head_product`), from logits recomputed per
    chunk: no ``[M, V]`` tensor is kept (the forward's output is freed).
    """

    def __init__(self, params: list[Tensor], head: tuple, chunk: Callable):
        index = {id(p): i for i, p in enumerate(params)}
        self.direct = [None if t is None else index.get(id(t)) for t in head]
        h = head[0]
        self.operands = (h.reshape(-1, h.shape[-1]), *head[1:])
        self.chunk = chunk
        self.traced = [k for k, t in enumerate(self.operands) if self.direct[k] is None
                       and t is not None and t.requires_grad and t.grad_fn is not None]
        self.dummies = [torch.zeros((), dtype=t.dtype, device=t.device, requires_grad=True)
                        .expand(t.shape) for t in self._traced()]
        pullback = torch.autograd.grad(self._traced(), params, self.dummies, create_graph=True,
                                       allow_unused=True) if self.traced else []
        self.live = [i for i, g in enumerate(pullback) if g is not None and g.requires_grad]
        self.pullback = [pullback[i] for i in self.live]

    def _traced(self) -> list[Tensor]:
        """The operands linearised by autograd."""
        return [self.operands[k] for k in self.traced]

    def product(self, V: Tensor, params: list[Tensor]) -> Tensor:
        r"""$J^\top M J V$ (``V``: ``[n, k]``, flat over ``params``; returns ``[n, k]``)."""
        vs = V.T.contiguous()
        out = torch.zeros_like(vs)
        chosen = [params[i] for i in self.live]
        for row, v in enumerate(vs):
            pieces, rows = unflatten(v, params), unflatten(out[row], params)
            directions: list = [None if i is None else pieces[i].view(t.shape) for i, t in
                                zip(self.direct, self.operands)]
            grads: list = [None if i is None else rows[i].view(t.shape) for i, t in
                           zip(self.direct, self.operands)]
            if self.live:
                jv = torch.autograd.grad(self.pullback, self.dummies,
                                         [pieces[i] for i in self.live], retain_graph=True,
                                         allow_unused=True)
                for k, d in zip(self.traced, jv):
                    directions[k], grads[k] = d, torch.zeros_like(self.operands[k])
            linear_head_product(*self.operands, directions, self.chunk, grads)
            if self.live:
                jtw = torch.autograd.grad(self._traced(), chosen,
                                          [grads[k] for k in self.traced],
                                          retain_graph=True, allow_unused=True)
                for i, g in zip(self.live, jtw):
                    if g is not None:
                        rows[i].add_(g)
        return out.T


class GGNOperator(OutputCurvatureOperator):
    r"""The generalised Gauss-Newton $G = J^\top H_L J$ of the mean loss over ``data``.

    $H_L = \nabla^2_f L$ is the Hessian of the criterion w.r.t. the model output (Schraudolph
    2002; Martens 2020). Same constructor keywords, vectors, restoration and ``with``
    semantics as :class:`~analysis.hvp.HessianOperator` (inside ``with op:`` a one-batch
    ``data`` keeps its forward graph, so each later product costs two backward passes through
    it). ``loss_fn`` must declare its split (module docstring). Positive semi-definite for
    criteria convex in the output (cross-entropy, squared error). Registered as
    ``curvature="ggn"``.

    Args:
        model: The model.
        loss_fn: A ``loss_fn`` that declares its split.
        data: An iterable of batches.
        params: The parameters of the block (as :class:`~analysis.hvp.HessianOperator`).
        model_mode: ``"eval"`` or ``"train"``, the mode during the products.
        batch_size_fn: Sample count of a batch.
        progress: Show a bar over the batches of each product.
        reuse_graph: Keep the forward graph of a one-batch ``data`` inside ``with`` blocks.
        preconditioner: A diagonal $P$; the operator is then $P^{-1/2} G P^{-1/2}$.
        check_deterministic: First check that two passes over ``data`` agree.

    Raises:
        ValueError: When ``loss_fn`` declares no split, and as
            :class:`~analysis.operator.CurvatureOperator`.
    """

    curvature = "ggn"

    def output_product(self, outputs: Tensor, batch: Any) -> OutputProduct:
        r"""``w -> H_L w`` for the criterion's Hessian w.r.t. the (detached) outputs.

        Args:
            outputs: The batch's output.
            batch: The batch, passed to the criterion.

        Returns:
            $w \mapsto H_L w$ (zero when the criterion is linear in the output). For a
            mean cross-entropy (``loss_fn.criterion`` as the exact Fisher reads it) it is the
            closed form $\frac{1}{n_{obs}} (\mathrm{diag}(p) - p p^\top)$ per observation,
            applied in place chunk by chunk over the rows (:mod:`analysis.core.loss_ce`);
            otherwise autograd differentiates the criterion twice.
        """
        if _read_likelihood(getattr(self.loss_fn, "criterion", None)) == "categorical":
            f = outputs.detach()
            mask, count = _observations("categorical", self.criterion, f, batch)
            if count:
                return _softmax_rows(f, mask, 1.0 / count)
        o = outputs.detach().requires_grad_()
        loss = check_loss(self.criterion(o, batch), " in the GGN product")
        g = torch.autograd.grad(loss, o, create_graph=True)[0]
        if not g.requires_grad:  # the criterion is linear in the output: H_L = 0
            return torch.zeros_like
        return lambda w: torch.autograd.grad(g, o, w, retain_graph=True)[0]


class FisherOperator(OutputCurvatureOperator):
    r"""The Fisher information $J^\top F_R J$ of the model's predictive distribution.

    $F_R = \mathbb{E}_{y \sim r(\cdot \mid f)}[\nabla_f \log r(y \mid f)\,
    \nabla_f \log r(y \mid f)^\top]$, exact (closed form; equals the GGN for cross-entropy and
    MSE, Martens 2020) or by Monte Carlo. ``FisherOperator(..., kind="empirical")``
    builds an :class:`EmpiricalFisherOperator` instead (the same call shape as before the
    curvature registry). Registered as ``curvature="fisher"`` (the exact Fisher). The Fisher is
    that of the mean loss: a sum-reduced ``loss_fn`` is refused.

    Args:
        model: The model.
        loss_fn: A ``loss_fn`` that declares its split (module docstring).
        data: An iterable of batches.
        kind: ``"exact"``, ``"mc"`` (``mc_samples`` labels per observation sampled from the
            model; the draws of a batch depend only on ``seed`` and the batch's contents, so
            the operator is the same matrix at every product, whatever the order of the
            batches or their sharding over ranks) or ``"empirical"``
            (:class:`EmpiricalFisherOperator`).
        params: The parameters of the block (as :class:`~analysis.hvp.HessianOperator`).
        model_mode: ``"eval"`` or ``"train"``, the mode during the products.
        batch_size_fn: Sample count of a batch.
        seed: Seed of the draws (``kind="mc"``); a batch's seed is hashed from its tensors, one
            host copy of the batch per product.
        progress: Show a bar over the batches of each product.
        mc_samples: Draws per observation (``kind="mc"``), at least 1.
        likelihood: ``"categorical"``, ``"gaussian"`` or ``"bernoulli"`` (default:
            ``loss_fn.likelihood`` as declared by ``split_loss``, else read from
            ``loss_fn.criterion``).
        reuse_graph: Keep the forward graph of a one-batch ``data`` inside ``with`` blocks.
        preconditioner: A diagonal $P$; the operator is then $P^{-1/2} F P^{-1/2}$.
        check_deterministic: First check that two passes over ``data`` agree.

    Raises:
        ValueError: For a sum-reduced ``loss_fn``, an unknown ``kind`` or ``likelihood``, a
            likelihood that cannot be read from the criterion, ``mc_samples < 1``, and as
            :class:`OutputCurvatureOperator`.
    """

    curvature = "fisher"

    def __new__(cls, model: nn.Module, loss_fn: LossFn, data: Iterable, kind: str = "exact", *,
                params: ParamSelection = None, model_mode: str = "eval",
                batch_size_fn: BatchSizeFn | None = None, seed: int = 0, progress: bool = True,
                mc_samples: int = 1, likelihood: str | None = None, reuse_graph: bool = True,
                preconditioner: Preconditioner = None, check_deterministic: bool = True
                ) -> "FisherOperator | EmpiricalFisherOperator":
        """``kind="empirical"`` on this class builds an :class:`EmpiricalFisherOperator`."""
        if cls is not FisherOperator or check_choice("kind", kind, FISHER_KINDS) != "empirical":
            return super().__new__(cls)
        check_int("mc_samples", mc_samples, low=1)  # validated, unused, as before
        make_generator(seed)
        return EmpiricalFisherOperator(
            model, loss_fn, data, params=params, model_mode=model_mode,
            batch_size_fn=batch_size_fn, progress=progress, reuse_graph=reuse_graph,
            preconditioner=preconditioner, check_deterministic=check_deterministic,
            likelihood=likelihood)

    def __getnewargs__(self) -> tuple:
        """The arguments :meth:`__new__` needs again for ``copy`` and ``pickle``."""
        return self.model, self.loss_fn, self.data, self.kind

    @guarded
    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable, kind: str = "exact", *,
                 params: ParamSelection = None, model_mode: str = "eval",
                 batch_size_fn: BatchSizeFn | None = None, seed: int = 0, progress: bool = True,
                 mc_samples: int = 1, likelihood: str | None = None, reuse_graph: bool = True,
                 preconditioner: Preconditioner = None, check_deterministic: bool = True):
        self._output_setup(model, loss_fn, model_mode, kind=kind, seed=seed,
                           mc_samples=mc_samples, likelihood=likelihood)
        CurvatureOperator.__init__(
            self, model, loss_fn, data, params=params, model_mode=model_mode,
            batch_size_fn=batch_size_fn, progress=progress, reuse_graph=reuse_graph,
            preconditioner=preconditioner, check_deterministic=check_deterministic)

    def _output_setup(self, model: nn.Module, loss_fn: LossFn, model_mode: str,
                      kind: str = "exact", seed: int = 0, mc_samples: int = 1,
                      likelihood: str | None = None) -> None:
        """The kind, the draws and the likelihood, then the split."""
        _refuse_sum(loss_fn)
        self.kind = check_choice("kind", kind, FISHER_KINDS[:2])
        self.mc_samples = check_int("mc_samples", mc_samples, low=1)
        self.seed = make_generator(seed).initial_seed()
        self.likelihood = _likelihood(loss_fn, likelihood)
        super()._output_setup(model, loss_fn, model_mode)

    @classmethod
    def output_side(cls, model: nn.Module, loss_fn: LossFn, model_mode: str = "eval",
                    options: dict[str, Any] | None = None) -> "OutputCurvatureOperator":
        """As :meth:`OutputCurvatureOperator.output_side`; ``kind="empirical"`` gives the EF's.

        Args:
            model: The model.
            loss_fn: As the constructor's.
            model_mode: As the constructor's.
            options: ``kind``, ``seed``, ``mc_samples``, ``likelihood`` (``{name: value}``).

        Returns:
            The instance (an :class:`EmpiricalFisherOperator` for ``kind="empirical"``).
        """
        options = options or {}
        if cls is FisherOperator and check_choice(
                "kind", options.get("kind", "exact"), FISHER_KINDS) == "empirical":
            check_int("mc_samples", options.get("mc_samples", 1), low=1)  # as __new__
            make_generator(options.get("seed", 0))
            return EmpiricalFisherOperator.output_side(
                model, loss_fn, model_mode, {"likelihood": options.get("likelihood")})
        return super().output_side(model, loss_fn, model_mode, options)

    def output_product(self, outputs: Tensor, batch: Any) -> OutputProduct:
        r"""``w -> F_R w``, exact or from ``mc_samples`` sampled labels, per observation.

        Ignored targets (``ignore_index``) are not observations: $F_R$ is zero there and the
        scale is one over the number of counted observations, the criterion's own mean
        (curvlinops' convention, where the GGN, which differentiates the criterion, has it by
        construction).

        Args:
            outputs: The batch's output (detached here).
            batch: The batch (its targets say which positions are observations; its contents
                seed the Monte-Carlo draws).

        Returns:
            $w \mapsto F_R w$, scaled by one over the number of observations.

        Raises:
            ValueError: For a categorical likelihood on outputs with fewer than 2 dims.
        """
        f = outputs.detach()
        mask, count = _observations(self.likelihood, self.criterion, f, batch)
        scale = 1.0 / max(count, 1)
        if self.kind == "exact":
            if self.likelihood == "gaussian":
                return lambda w: w * (2.0 * scale)
            if self.likelihood == "bernoulli":
                q = torch.sigmoid(f)
                return lambda w: q * (1 - q) * w * scale
            return _softmax_rows(f, mask, scale)
        scores = [r * mask for r in self._sampled_scores(f, batch)]
        return lambda w: sum(r * _observation_dot(self.likelihood, r, w) for r in scores) * (
            scale / self.mc_samples)

    def _sampled_scores(self, f: Tensor, batch: Any) -> list[Tensor]:
        """Output gradients of the negative log-likelihood at ``mc_samples`` label draws."""
        gen = make_generator(_batch_seed(self.seed, batch))
        shape = (self.mc_samples, *f.shape)
        if self.likelihood == "gaussian":   # y = f + e / sqrt(2): d/df (f - y)^2 = -sqrt(2) e
            noise = torch.randn(shape, generator=gen, dtype=torch.float64).to(f)
            return list(noise * -math.sqrt(2.0))
        if self.likelihood == "bernoulli":  # y ~ Bernoulli(sigmoid f): d/df BCE = sigmoid f - y
            q = torch.sigmoid(f)
            u = torch.rand(shape, generator=gen, dtype=torch.float64).to(f)
            return list(q - (u < q).to(f))
        p = torch.softmax(f, dim=1)
        cdf = p.movedim(1, -1).cumsum(-1)
        u = torch.rand((self.mc_samples, *cdf.shape[:-1], 1), generator=gen,
                       dtype=torch.float64).to(f)
        labels = torch.searchsorted(cdf.expand(self.mc_samples, *cdf.shape).contiguous(),
                                    u * cdf[..., -1:]).clamp_(max=f.shape[1] - 1)
        onehot = cdf.new_zeros((self.mc_samples, *cdf.shape)).scatter_(-1, labels, 1.0)
        return [p - h.movedim(-1, 1) for h in onehot]


class EmpiricalFisherOperator(OutputCurvatureOperator):
    r"""The empirical Fisher: outer products of per-datum gradients, curvlinops' scale.

    Follows curvlinops' ``EFLinearOperator``: with $\ell_{it}$ the criterion's terms of datum
    $i$ (its observations: output elements for the squared error and the Bernoulli
    likelihood, positions for the categorical, ignored targets excluded) and $c$ their number
    in the batch (the criterion's mean normalisation),

    $$A_b = \frac{1}{c} \sum_i g_i g_i^\top, \qquad g_i = \nabla_\theta \sum_t \ell_{it},$$

    so that with labels drawn from the model its expectation is the exact Fisher
    (:class:`FisherOperator`; the cross terms of a datum's observations vanish in
    expectation). A datum is a row of the output (its leading dim). curvlinops flattens the
    positions of a sequence into separate rows; here a datum's positions are summed first
    (the per-datum gradient; for ``[N, C]`` outputs the two agree). The product is reverse
    mode only:
    $J^\top (c\, g g^\top) J v$ per datum, with $g = \partial L / \partial f$ the output
    gradient of the batch's mean criterion (a GGN of curvlinops' pseudo-loss), so any model
    the GGN works on works here (``UserDict`` batches, attention fast paths, in-place layers).

    When the likelihood is unknown (no ``loss_fn.split``, or a criterion other than
    cross-entropy, squared error or BCE-with-logits and no ``likelihood=``), each datum is one
    observation: $A_b = \frac{1}{n_b} \sum_i g_i g_i^\top$ with $g_i$ the gradient of
    ``loss_fn`` on datum $i$ as a batch of one (``torch.func`` per-sample gradients; an exact
    per-datum loop when ``torch.func`` cannot transform the model; the ``[n_b, P]`` per-sample
    gradients are formed once per batch). Registered as
    ``curvature="empirical_fisher"``; also built by ``FisherOperator(..., kind="empirical")``.
    Defined for the mean loss: a sum-reduced ``loss_fn`` is refused. Kunstner et al. (2019)
    discuss its limits.

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the batch's mean loss.
        data: An iterable of batches.
        params: The parameters of the block (as :class:`~analysis.hvp.HessianOperator`).
        model_mode: ``"eval"`` or ``"train"`` (a model with buffers only in ``"eval"``).
        batch_size_fn: Sample count of a batch.
        progress: Show a bar over the batches of each product.
        reuse_graph: Keep the linearisation of a one-batch ``data`` inside ``with`` blocks.
        preconditioner: A diagonal $P$; the operator is then $P^{-1/2} F P^{-1/2}$.
        check_deterministic: First check that two passes over ``data`` agree.
        likelihood: ``"categorical"``, ``"gaussian"`` or ``"bernoulli"`` for a ``split_loss``
            criterion (default: ``loss_fn.likelihood``, else read from ``loss_fn.criterion``).

    Raises:
        ValueError: For a sum-reduced ``loss_fn``, ``model_mode="train"`` on a model with
            buffers, an unknown ``likelihood``, and as
            :class:`~analysis.operator.CurvatureOperator`.
    """

    curvature = "empirical_fisher"
    kind = "empirical"

    @guarded
    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable, *,
                 params: ParamSelection = None, model_mode: str = "eval",
                 batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
                 reuse_graph: bool = True, preconditioner: Preconditioner = None,
                 check_deterministic: bool = True, likelihood: str | None = None):
        self._output_setup(model, loss_fn, model_mode, likelihood=likelihood)
        CurvatureOperator.__init__(
            self, model, loss_fn, data, params=params, model_mode=model_mode,
            batch_size_fn=batch_size_fn, progress=progress, reuse_graph=reuse_graph,
            preconditioner=preconditioner, check_deterministic=check_deterministic)

    def _output_setup(self, model: nn.Module, loss_fn: LossFn, model_mode: str,
                      likelihood: str | None = None) -> None:
        """The split and the likelihood (None: per-sample gradients of ``loss_fn``)."""
        _refuse_sum(loss_fn)
        if model_mode == "train" and any(True for _ in model.buffers()):
            raise ValueError('the empirical Fisher (kind="empirical") cannot run '
                             'model_mode="train" on a model with buffers (per-sample gradients '
                             'cannot update BatchNorm statistics); use model_mode="eval"')
        self.loss_fn = loss_fn
        split = getattr(loss_fn, "split", None)
        self.forward, self.criterion = split if isinstance(split, tuple) else (None, None)
        if likelihood is not None:
            self.likelihood = check_choice("likelihood", likelihood, LIKELIHOODS)
            loss_split(loss_fn)  # a declared likelihood needs the split
        else:
            found = _declared_likelihood(loss_fn)
            self.likelihood = found if self.forward is not None else None

    @staticmethod
    def datum_batches(batch: Any) -> list:
        """The batch as one-datum batches (the data the per-sample gradients are taken on).

        Args:
            batch: One batch; a datum is a row of each tensor whose leading dimension is the
                batch size (:func:`~analysis.core.default_batch_size`).

        Returns:
            One batch of one datum per row, in order.
        """
        n, leaves, rows, datum = _datum_splitter(batch)
        return [datum([leaves[i] for i in rows], slice(j, j + 1)) for j in range(n)]

    def output_product(self, outputs: Tensor, batch: Any) -> OutputProduct:
        r"""``w -> c\, g_i \langle g_i, w_i \rangle`` per datum $i$ (a row of the output).

        Args:
            outputs: The batch's output (detached here).
            batch: The batch, passed to the criterion.

        Returns:
            The output-space matrix of the empirical Fisher, $c \sum_i g_i g_i^\top$.
        """
        o = outputs.detach().requires_grad_()
        loss = check_loss(self.criterion(o, batch), " in the empirical Fisher")
        g = torch.autograd.grad(loss, o)[0].detach()
        count = _observations(self.likelihood, self.criterion, o.detach(), batch)[1]
        dims = tuple(range(1, g.dim()))

        def product(w: Tensor) -> Tensor:
            inner = (g * w).sum(dims, keepdim=True) if dims else g * w
            return g * inner * count
        return product

    def batch_product(self, batch: Any, V: Tensor) -> Tensor:
        r"""The batch's empirical Fisher times ``V`` (class docstring).

        Args:
            batch: One batch of ``data``.
            V: ``[n, k]``, flat over the selected parameters.

        Returns:
            ``[n, k]``.
        """
        if self.likelihood is not None:
            return super().batch_product(batch, V)
        G = self.cached(lambda: _per_sample_gradients(self, batch))
        return G.T @ (G @ V) / G.shape[0]


def _split_batch(batch: Any) -> tuple[list, Callable[[list], Any]]:
    """The leaves of ``batch`` and a function rebuilding it from new leaves.

    A ``collections.UserDict`` (transformers' ``BatchEncoding``) is opened (pytree would keep
    it as one leaf) and rebuilt as a shallow copy of the same type.
    """
    if isinstance(batch, UserDict):
        leaves, spec = tree_flatten(dict(batch.data))

        def rebuild(new: list) -> Any:
            out = copy.copy(batch)
            out.data = tree_unflatten(new, spec)
            return out
        return leaves, rebuild
    leaves, spec = tree_flatten(batch)
    return leaves, lambda new: tree_unflatten(new, spec)


def _datum_splitter(batch: Any) -> tuple[int, list, list[int], Callable[[list, Any], Any]]:
    """The batch size, the batch's leaves, those with a row per datum, and ``datum``.

    ``datum(xs, index)`` rebuilds the batch with the row leaves replaced by ``xs[k][index]``.
    """
    n = default_batch_size(batch)
    leaves, rebuild = _split_batch(batch)
    rows = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.dim() > 0
            and t.shape[0] == n]

    def datum(xs: list[Tensor], index: Any) -> Any:
        full = list(leaves)
        for i, x in zip(rows, xs):
            full[i] = x[index]
        return rebuild(full)
    return n, leaves, rows, datum


def _per_sample_gradients(op: EmpiricalFisherOperator, batch: Any) -> Tensor:
    """``[n, P]``: the gradient of ``loss_fn`` on each datum of the batch as a batch of one.

    ``torch.func`` (``vmap`` of ``grad``) when it can transform the model; an exact loop over
    the data by autograd when it cannot (data-dependent control flow, in-place layers, fused
    attention paths).
    """
    n, leaves, rows, datum = _datum_splitter(batch)
    wrapper = LossModule(op.model, op.loss_fn)
    primals = {"model." + name: p.detach() for name, p in zip(op.names, op.params)}

    def one(theta: dict[str, Tensor], xs: list[Tensor]) -> Tensor:
        return own_call(wrapper, theta, (datum([x.unsqueeze(0) for x in xs], ...),))

    try:
        grads = vmap(grad(one), in_dims=(None, 0))(primals, [leaves[i] for i in rows])
        G = torch.cat([grads[k].reshape(n, -1) for k in primals], 1)
    except (RuntimeError, NotImplementedError, ValueError, TypeError):
        G = torch.stack([_datum_gradient(op, b) for b in op.datum_batches(batch)])
    check_loss(G.sum(), " in the per-sample gradients of the empirical Fisher")
    return G


def _datum_gradient(op: EmpiricalFisherOperator, batch: Any) -> Tensor:
    """The flat gradient of ``loss_fn`` on a one-datum batch, by autograd."""
    loss = check_loss(op.loss_fn(op.model, batch), " in the empirical Fisher")
    grads = torch.autograd.grad(loss, op.params, allow_unused=True)
    return torch.cat([torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                      for g, p in zip(grads, op.params)])


def _refuse_sum(loss_fn: LossFn) -> None:
    """The Fisher is that of the mean loss: ValueError for a sum-reduced ``loss_fn``."""
    if loss_reduction(loss_fn) == "sum":
        raise ValueError("the Fisher is defined for the mean loss: loss_fn.reduction must be "
                         "'mean', got 'sum' (use a mean-reduced loss_fn and multiply by the "
                         "number of samples, or the GGN)")


def _batch_seed(seed: int, batch: Any) -> int:
    """A seed from ``seed`` and the bytes of the batch's tensors (so draws follow the data)."""
    h = hashlib.blake2b(str(seed).encode(), digest_size=8)
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, Tensor):
            h.update(leaf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return int.from_bytes(h.digest(), "little") >> 1


register_curvature("ggn", GGNOperator)
register_curvature("fisher", FisherOperator)
register_curvature("empirical_fisher", EmpiricalFisherOperator)
