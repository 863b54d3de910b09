"""Curvature matrices beyond the Hessian: the generalised Gauss-Newton and the Fisher.

With ``f(theta)`` the model output of a batch, ``J = df/dtheta`` and ``L(f)`` the criterion (the
batch mean), every operator here is, like :class:`~analysis.hvp.HessianOperator`, the
sample-weighted mean over the batches ``sum_b n_b A_b / N`` (one
:func:`analysis.core.data_mean` reduction, all-reduced under ``torch.distributed``):

* GGN (Schraudolph 2002; Martens 2020, JMLR 21(146)): ``A_b = J^T H_L J`` with ``H_L`` the
  Hessian of the criterion w.r.t. the output. Each product is a Jacobian-vector product ``J v``
  (the double-vjp trick: ``J v = d/du <J^T u, v>``), ``H_L`` applied by autograd on the
  criterion alone, and a vector-Jacobian product; no Jacobian is formed.
* Fisher, ``kind="exact"``: ``J^T F_R J`` with ``F_R`` the Fisher of the
  predictive distribution in the output, in closed form: ``diag(p) - p p^T`` per observation for
  the softmax of cross-entropy, ``2 I`` for the mean squared error (a Gaussian of variance 1/2).
  For these two (natural-parameter exponential families) it equals the GGN (Martens 2020), which
  the tests check.
* Fisher, ``kind="mc"``: ``F_R`` replaced by ``(1/S) sum_s r_s r_s^T``, ``r_s`` the output gradient
  of the negative log-likelihood at labels sampled from the model (``mc_samples=S``, ``seed=``).
* Fisher, ``kind="empirical"``: ``(1/n_b) sum_i g_i g_i^T`` with ``g_i`` the gradient of
  ``loss_fn`` on the single sample ``i`` (per-sample gradients by ``torch.func``: ``G v`` is a
  JVP and ``G^T w`` a VJP of the ``vmap``-ed per-sample losses, so ``G`` is never formed), so
  that over all data it is the **mean** ``(1/N) sum_i g_i g_i^T`` of the outer products, on the
  scale of the Hessian of the mean loss (Kunstner et al. 2019 discuss its limits).

**The loss split.** The GGN and the Fisher need ``f`` and ``L`` separately. ``loss_fn`` declares
them with an attribute ``loss_fn.split = (forward, criterion)``: ``forward(model, batch)`` returns
the output tensor and ``criterion(outputs, batch)`` the batch-mean loss.
:func:`~analysis.core.supervised` sets it; :func:`~analysis.core.split_loss` builds
such a ``loss_fn`` from any two functions. The exact and Monte-Carlo Fisher also need the
likelihood: read from ``loss_fn.criterion`` (``nn.CrossEntropyLoss``/``F.cross_entropy``,
``nn.MSELoss``/``F.mse_loss``, with mean reduction), or declared with ``likelihood=``
(``"categorical"``: softmax over dim 1 of the output; ``"gaussian"``: unit-scaled squared error).
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap
from torch.nn import functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from .core import (BatchSizeFn, check_choice, check_int, check_loss, default_batch_size, guarded,
                   loss_reduction, LossFn, LossModule, make_generator, ParamSelection,
                   unflatten)
from .hvp import HessianOperator
from .preconditioning import Preconditioner

FISHER_KINDS = ("exact", "mc", "empirical")
LIKELIHOODS = ("categorical", "gaussian")
CURVATURES = ("hessian", "ggn", "fisher", "empirical_fisher")
OutputProduct = Callable[[Tensor], Tensor]


def loss_split(loss_fn: LossFn) -> tuple[Callable, Callable]:
    """``(forward, criterion)`` declared by ``loss_fn.split``; ValueError if it has none."""
    split = getattr(loss_fn, "split", None)
    if not (isinstance(split, tuple) and len(split) == 2 and all(map(callable, split))):
        raise ValueError("loss_fn must declare its split into model output and criterion "
                         "(loss_fn.split = (forward, criterion)) for the GGN and the Fisher: "
                         "build it with analysis.supervised(criterion) or "
                         "analysis.split_loss(forward, criterion)")
    return split


def _likelihood(loss_fn: LossFn, likelihood: str | None) -> str:
    """The likelihood whose negative log is the criterion, declared or read from ``.criterion``."""
    if likelihood is not None:
        return check_choice("likelihood", likelihood, LIKELIHOODS)
    criterion = getattr(loss_fn, "criterion", None)
    if criterion is F.cross_entropy or (
            isinstance(criterion, nn.CrossEntropyLoss) and criterion.weight is None
            and criterion.label_smoothing == 0 and criterion.reduction == "mean"):
        return "categorical"
    if criterion is F.mse_loss or (isinstance(criterion, nn.MSELoss)
                                   and criterion.reduction == "mean"):
        return "gaussian"
    raise ValueError("the exact and Monte-Carlo Fisher need the likelihood: loss_fn.criterion must "
                     "be nn.CrossEntropyLoss (no weight, no label smoothing) or nn.MSELoss with "
                     f"reduction='mean', got {criterion!r}; declare it with likelihood= "
                     f"(one of {LIKELIHOODS}) or use curvature='ggn' / kind='empirical'")


def _observation_dot(likelihood: str, a: Tensor, b: Tensor) -> Tensor:
    """Per observation ``<a, b>``: over the class dim (1) for the categorical, elementwise else."""
    return (a * b).sum(1, keepdim=True) if likelihood == "categorical" else a * b


class GGNOperator(HessianOperator):
    """The generalised Gauss-Newton ``J^T H_L J`` of the mean loss over ``data``.

    Same constructor keywords, vectors, restoration and ``with`` semantics as
    :class:`~analysis.hvp.HessianOperator` (inside ``with op:`` a one-batch ``data`` keeps its
    forward graph, so each later product costs two backward passes through it). ``loss_fn``
    must declare its split (module docstring). Positive semi-definite for criteria convex in
    the output (cross-entropy, squared error).
    """

    curvature = "ggn"

    @guarded
    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable, *,
                 params: ParamSelection = None, model_mode: str = "eval",
                 batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
                 reuse_graph: bool = True, preconditioner: Preconditioner = None,
                 check_deterministic: bool = True):
        self.forward, self.criterion = loss_split(loss_fn)
        super().__init__(model, loss_fn, data, params=params, model_mode=model_mode,
                         batch_size_fn=batch_size_fn, progress=progress, reuse_graph=reuse_graph,
                         preconditioner=preconditioner, check_deterministic=check_deterministic)

    def _output_product(self, outputs: Tensor, batch: Any) -> OutputProduct:
        """``w -> H_L w`` for the criterion's Hessian w.r.t. the (detached) outputs."""
        o = outputs.detach().requires_grad_()
        loss = check_loss(self.criterion(o, batch), " in the GGN product")
        g = torch.autograd.grad(loss, o, create_graph=True)[0]
        if not g.requires_grad:  # the criterion is linear in the output: H_L = 0
            return torch.zeros_like
        return lambda w: torch.autograd.grad(g, o, w, retain_graph=True)[0]

    def _linearise(self, batch: Any) -> tuple:
        """The batch's output with its graph, ``J^T u`` as a function of a dummy ``u`` (for the
        double-vjp ``J v``), the parameters it depends on, and ``w -> H_L w``."""
        outputs = self.forward(self.model, batch)
        if not isinstance(outputs, Tensor):
            raise ValueError("the forward of loss_fn.split must return the output tensor, got "
                             f"{type(outputs).__name__}")
        product = self._output_product(outputs, batch)
        if not outputs.requires_grad:  # the output does not depend on the selected parameters
            return outputs, None, [], [], product
        dummy = torch.zeros_like(outputs, requires_grad=True)
        pullback = torch.autograd.grad(outputs, self.params, dummy, create_graph=True,
                                       allow_unused=True)
        live = [i for i, g in enumerate(pullback) if g is not None and g.requires_grad]
        return outputs, dummy, [pullback[i] for i in live], live, product

    def _product(self, batch: Any, vs: Tensor) -> Tensor:
        outputs, dummy, pullback, live, product = self._cached(lambda: self._linearise(batch))
        out = torch.zeros_like(vs)
        if not live:
            return out
        chosen = [self.params[i] for i in live]
        for row, v in zip(out, vs):
            pieces = unflatten(v, self.params)
            jv = torch.autograd.grad(pullback, dummy, [pieces[i] for i in live],
                                     retain_graph=True)[0]
            jtw = torch.autograd.grad(outputs, chosen, product(jv), retain_graph=True,
                                      allow_unused=True)
            rows = unflatten(row, self.params)
            for i, h in zip(live, jtw):
                if h is not None:
                    rows[i].copy_(h)
        return out


class FisherOperator(GGNOperator):
    """The Fisher information of the model's predictive distribution, or the empirical Fisher.

    kind: ``"exact"`` (``J^T F_R J``, closed form; equals the GGN for cross-entropy and MSE),
        ``"mc"`` (``mc_samples`` labels per observation sampled from the model; the draws of a
        batch depend only on ``seed`` and the batch's contents, so the operator is the same
        matrix at every product, whatever the order of the batches or their sharding over
        ranks) or ``"empirical"`` (mean of per-sample gradient outer products, through
        ``torch.func``: ``loss_fn`` must be ``torch.func``-transformable; it needs no split).
    mc_samples, seed: draws per observation and their seed (``kind="mc"``); a batch's seed is
        hashed from its tensors, one host copy of the batch per product.
    likelihood: ``"categorical"`` or ``"gaussian"`` (default: read from ``loss_fn.criterion``).
    Other keywords as :class:`GGNOperator`. ``curvature="fisher"`` on the routines is ``"exact"``.
    The Fisher is that of the mean loss: a sum-reduced ``loss_fn`` is refused.
    """

    @guarded
    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable, kind: str = "exact", *,
                 params: ParamSelection = None, model_mode: str = "eval",
                 batch_size_fn: BatchSizeFn | None = None, seed: int = 0, progress: bool = True,
                 mc_samples: int = 1, likelihood: str | None = None, reuse_graph: bool = True,
                 preconditioner: Preconditioner = None, check_deterministic: bool = True):
        if loss_reduction(loss_fn) == "sum":
            raise ValueError("the Fisher is defined for the mean loss: loss_fn.reduction must be "
                             "'mean', got 'sum' (use a mean-reduced loss_fn and multiply by the "
                             "number of samples, or the GGN)")
        self.kind = check_choice("kind", kind, FISHER_KINDS)
        self.mc_samples = check_int("mc_samples", mc_samples, low=1)
        self.seed = make_generator(seed).initial_seed()
        self.curvature = "empirical_fisher" if kind == "empirical" else "fisher"
        common = dict(params=params, model_mode=model_mode, batch_size_fn=batch_size_fn,
                      progress=progress, reuse_graph=reuse_graph, preconditioner=preconditioner,
                      check_deterministic=check_deterministic)
        if kind == "empirical":
            if model_mode == "train" and any(True for _ in model.buffers()):
                raise ValueError('kind="empirical" cannot run model_mode="train" on a model with '
                                 'buffers (per-sample gradients cannot update BatchNorm '
                                 'statistics); use model_mode="eval"')
            HessianOperator.__init__(self, model, loss_fn, data, **common)
            return
        self.likelihood = _likelihood(loss_fn, likelihood)
        super().__init__(model, loss_fn, data, **common)

    def _output_product(self, outputs: Tensor, batch: Any) -> OutputProduct:
        f = outputs.detach()
        # 1 / (number of observations): the criterion's mean over positions (categorical,
        # classes on dim 1) or over elements (gaussian)
        scale = (f.shape[1] if self.likelihood == "categorical" else 1) / f.numel()
        if self.likelihood == "categorical" and f.dim() < 2:
            raise ValueError("the categorical likelihood needs outputs [N, C, ...] (classes on "
                             f"dim 1), got shape {tuple(f.shape)}")
        if self.kind == "exact":
            if self.likelihood == "gaussian":
                return lambda w: w * (2.0 * scale)
            p = torch.softmax(f, dim=1)
            return lambda w: (p * w - p * _observation_dot("categorical", p, w)) * scale
        scores = self._sampled_scores(f, batch)
        return lambda w: sum(r * _observation_dot(self.likelihood, r, w) for r in scores) * (
            scale / self.mc_samples)

    def _sampled_scores(self, f: Tensor, batch: Any) -> list[Tensor]:
        """Output gradients of the negative log-likelihood at ``mc_samples`` label draws."""
        gen = make_generator(_batch_seed(self.seed, batch))
        shape = (self.mc_samples, *f.shape)
        if self.likelihood == "gaussian":   # y = f + e / sqrt(2): d/df (f - y)^2 = -sqrt(2) e
            noise = torch.randn(shape, generator=gen, dtype=torch.float64).to(f)
            return list(noise * -math.sqrt(2.0))
        p = torch.softmax(f, dim=1)
        cdf = p.movedim(1, -1).cumsum(-1)
        u = torch.rand((self.mc_samples, *cdf.shape[:-1], 1), generator=gen,
                       dtype=torch.float64).to(f)
        labels = torch.searchsorted(cdf.expand(self.mc_samples, *cdf.shape).contiguous(),
                                    u * cdf[..., -1:]).clamp_(max=f.shape[1] - 1)
        onehot = cdf.new_zeros((self.mc_samples, *cdf.shape)).scatter_(-1, labels, 1.0)
        return [p - h.movedim(-1, 1) for h in onehot]

    def _product(self, batch: Any, vs: Tensor) -> Tensor:
        if self.kind != "empirical":
            return super()._product(batch, vs)
        losses, primals, values, pullback = self._cached(lambda: self._per_sample_losses(batch))

        def as_dict(v: Tensor) -> dict[str, Tensor]:
            return dict(zip(primals, unflatten(v, self.params)))

        def flat(d: dict[str, Tensor]) -> Tensor:
            return torch.cat([d[key].reshape(-1) for key in primals])

        # G v = (g_i . v)_i by a JVP of the per-sample losses, G^T w by their VJP: the
        # per-sample gradients g_i are never formed
        gv = vmap(lambda v: jvp(losses, (primals,), (as_dict(v),))[1])(vs)
        return vmap(lambda w: flat(pullback(w)[0]))(gv) / values.shape[0]

    def _per_sample_losses(self, batch: Any) -> tuple:
        """``theta -> [n]`` losses of ``loss_fn`` on each sample as a batch of one (``vmap``
        over the leading dimension of the batch's tensors that have ``n`` rows, ``n`` the
        default sample count), the primals, the losses and their pullback."""
        n = default_batch_size(batch)
        leaves, spec = tree_flatten(batch)
        batched = [i for i, t in enumerate(leaves)
                   if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n]
        samples = [leaves[i] for i in batched]
        wrapper = LossModule(self.model, self.loss_fn)
        primals = {"model." + name: p.detach() for name, p in zip(self.names, self.params)}

        def one(theta: dict[str, Tensor], xs: list[Tensor]) -> Tensor:
            full = list(leaves)
            for i, x in zip(batched, xs):
                full[i] = x.unsqueeze(0)
            return functional_call(wrapper, theta, (tree_unflatten(full, spec),))

        def losses(theta: dict[str, Tensor]) -> Tensor:
            return vmap(one, in_dims=(None, 0))(theta, samples)

        values, pullback = vjp(losses, primals)
        check_loss(values.mean(), " in the per-sample losses of the empirical Fisher")
        return losses, primals, values, pullback


def _batch_seed(seed: int, batch: Any) -> int:
    """A seed from ``seed`` and the bytes of the batch's tensors (so draws follow the data)."""
    h = hashlib.blake2b(str(seed).encode(), digest_size=8)
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, Tensor):
            h.update(leaf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return int.from_bytes(h.digest(), "little") >> 1


def curvature_operator(curvature: str, model: nn.Module, loss_fn: LossFn, data: Iterable, *,
                       params: ParamSelection = None, model_mode: str = "eval",
                       batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
                       hvp_method: str = "reverse", preconditioner: Preconditioner = None
                       ) -> HessianOperator:
    """The operator of ``curvature=`` (one of :data:`CURVATURES`; ``"fisher"`` is the exact
    Fisher), preconditioned when ``preconditioner`` is given."""
    check_choice("curvature", curvature, CURVATURES)
    common = dict(params=params, model_mode=model_mode, batch_size_fn=batch_size_fn,
                  progress=progress, preconditioner=preconditioner)
    if curvature == "hessian":
        return HessianOperator(model, loss_fn, data, hvp_method=hvp_method, **common)
    if hvp_method != "reverse":
        raise ValueError(f'hvp_method={hvp_method!r} applies to curvature="hessian" only, '
                         f'got curvature={curvature!r}')
    if curvature == "ggn":
        return GGNOperator(model, loss_fn, data, **common)
    kind = "exact" if curvature == "fisher" else "empirical"
    return FisherOperator(model, loss_fn, data, kind=kind, **common)
