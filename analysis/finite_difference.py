r"""Hessian-vector products by central differences of ordinary gradients.

Where double backward is unavailable or too costly (a model sharded with FSDP2's
``fully_shard``, whose parameters reach autograd only through hooks; a kernel without a second
derivative), the product is the derivative of the gradient along ``v``:

$$ D(h) = \frac{g(w + h v) - g(w - h v)}{2 h} = H v + \frac{h^2}{6} \nabla^3 L[v, v, \cdot]
   + O(h^4), $$

each gradient ``g`` an ordinary ``loss.backward()`` (so every hook a wrapper installs, DDP's or
FSDP's, runs as in training). One Richardson step removes the $h^2$ term
(Richardson 1911; Nocedal & Wright, *Numerical Optimization*, 2006, Sec. 8.1):

$$ R(h) = \frac{4 D(h) - D(2h)}{3} = H v + O(h^4). $$

**Step size.** Truncation error grows like $h^2$ (central) or $h^4$ (Richardson) and rounding
error like $\epsilon \|g\| / (h \|v\|)$, with $\epsilon$ the machine epsilon of the
parameters' dtype. Balancing the two (Nocedal & Wright, eq. 8.6, for the relative
perturbation $h \|v\| / (1 + \|w\|)$) gives, per product,

$$ h = \epsilon^{1/3} \, \frac{1 + \|w\|}{\|v\|} \ \text{(central)}, \qquad
   h = \epsilon^{1/5} \, \frac{1 + \|w\|}{\|v\|} \ \text{(Richardson)}, $$

with $\|w\|$ the norm of the selected parameters. In float64 the central step perturbs the
weights by about $6 \cdot 10^{-6}$ relative and the Richardson step by $7 \cdot 10^{-4}$; in
float32 by $5 \cdot 10^{-3}$ and $4 \cdot 10^{-2}$.

**Error estimate.** With ``estimate_error=True`` (always with Richardson) the product is also
formed at the step $2h$, and $\|D(2h) - D(h)\|$ is recorded: about three times the truncation
error of $D(h)$ (it is $\tfrac{h^2}{2} \|\nabla^3 L[v, v]\|$) and at least its rounding error, a
conservative bound for $D(h)$ and, a fortiori, for $R(h)$ in the truncation regime (measured on
an MLP and a tiny GPT-2 in float64 and float32). Low-precision parameters (bfloat16, float16)
never give better than a few percent: a warning says so.

**Mixed precision.** Under an FSDP2 ``MixedPrecisionPolicy`` that computes or reduces in a
lower precision than the parameters (``param_dtype=torch.bfloat16`` on float32 weights) the
routines refuse ``hvp_method="finite_difference"`` (:func:`check_fd_policy`): the differenced
gradients are bfloat16-rounded, a few percent off at any step (``benchmarks/fd_error.py``).
The exact product ignores the policy and gives the Hessian of the model in its parameters'
dtype, from the master shards.

**Restoration.** The weights are snapshotted once per product and written back from the
snapshot after every perturbation (never by subtracting the step), so they are bit-exactly as
found afterwards, also when a gradient raises.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .core import (BatchSizeFn, check_bool, check_loss, check_positive, data_mean, flatten,
                   LossFn, LOW_PRECISION, unflatten)

Pieces = list[Tensor]
Gradient = Callable[[], Pieces]

ORDER = {False: 1 / 3, True: 1 / 5}  # the step's power of eps: central, Richardson


def _local(t: Tensor) -> Tensor:
    """The local part of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _shard_group(pieces: Sequence[Tensor]):
    """The process group over which DTensor ``pieces`` are sharded (None for plain tensors)."""
    mesh = next((t.device_mesh for t in pieces if hasattr(t, "device_mesh")), None)
    return None if mesh is None else mesh.get_group()


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """``sum_i <a_i, b_i>`` in float64 over parameter-shaped pieces.

    For DTensor pieces (shards) the local sums are all-reduced over their mesh, so every rank
    gets the global value.
    """
    total = torch.zeros((), dtype=torch.float64, device=_local(a[0]).device)
    for x, y in zip(a, b):
        total += (_local(x).detach().double() * _local(y).detach().double()).sum()
    group = _shard_group(a)
    if group is not None:
        dist.all_reduce(total, group=group)
    return float(total)


def fd_step(dtype: torch.dtype, weight_norm: float, vector_norm: float,
            richardson: bool = False) -> float:
    r"""The step $h = \epsilon^{p} (1 + \|w\|) / \|v\|$ of the module docstring.

    Args:
        dtype: the parameters' dtype ($\epsilon$ is its machine epsilon).
        weight_norm: $\|w\|$, the norm of the selected parameters.
        vector_norm: $\|v\|$, positive.
        richardson: $p = 1/5$ if True (the product is Richardson-extrapolated), else $1/3$.

    Returns:
        The step $h$ (the weights are perturbed by $\pm h v$).

    Raises:
        ValueError: ``vector_norm`` is not positive and finite.
    """
    check_positive("vector_norm", vector_norm)
    eps = torch.finfo(dtype).eps
    return eps ** ORDER[bool(richardson)] * (1.0 + weight_norm) / vector_norm


@contextmanager
def _perturbing(params: Sequence[nn.Parameter]) -> Iterator[Callable[[Pieces, float], None]]:
    """``move(v, h)`` sets the weights to ``w + h v``.

    On exit (also on error) they are copied back from a snapshot taken on entry, bit-exactly.
    """
    snapshot = [p.detach().clone() for p in params]

    def move(v: Pieces, h: float) -> None:
        with torch.no_grad():
            for p, w, d in zip(params, snapshot, v):
                p.copy_(w + h * d.to(w.dtype))

    try:
        yield move
    finally:
        with torch.no_grad():
            for p, w in zip(params, snapshot):
                p.copy_(w)


class FiniteDifference:
    r"""Hessian-vector products of a gradient function by central differences.

    The caller supplies ``gradient()``, the gradient of its loss w.r.t. ``params`` at their
    current values (one ``.backward()`` per batch, or a full pass over the data); this class
    perturbs the weights, differences the gradients, chooses the step and keeps the error
    estimate. Products of several batches may be reduced between :meth:`differences` and
    :meth:`combine` (both are linear in the gradients).

    Args:
        params: the parameters differentiated (plain tensors or FSDP2 DTensor shards; vectors
            are lists of tensors shaped, and for DTensors placed, like them).
        richardson: extrapolate $R(h) = (4 D(h) - D(2h)) / 3$ (four gradients per product).
            Off by default: its larger step (the $\epsilon^{1/5}$ rule) pays where third
            derivatives are small (MLPs: 1e-10 in float64) but not on a tiny GPT-2 (3e-5
            against 3e-7 for the central difference at its own step).
        step: a fixed step $h$ (the weights move by $\pm h v$); None chooses it per product
            (:func:`fd_step`).
        estimate_error: also form $D(2h)$ for the error estimate (forced by ``richardson``);
            False costs two gradients per product and records no estimate.

    Attributes:
        steps: the steps of the products so far.
        errors: per product, the estimate $\|D(2h) - D(h)\|$ (absolute).
        relative_errors: per product, that estimate over the norm of the product.

    Raises:
        ValueError: ``step`` is not positive, or a flag is not a bool.
    """

    def __init__(self, params: Sequence[nn.Parameter], *, richardson: bool = False,
                 step: float | None = None, estimate_error: bool = True):
        self.params = list(params)
        self.richardson = check_bool("richardson", richardson)
        self.estimate_error = self.richardson or check_bool("estimate_error", estimate_error)
        self.step = None if step is None else check_positive("step", step)
        self.dtype = self.params[0].dtype
        if self.dtype in LOW_PRECISION:
            warnings.warn(f"finite-difference Hessian-vector products of {self.dtype} parameters "
                          "are a few percent off at best (rounding of the perturbed weights); "
                          "analyse a float32 copy for accurate numbers", stacklevel=3)
        self.steps: list[float] = []
        self.errors: list[float] = []
        self.relative_errors: list[float] = []

    def steps_for(self, vectors: Sequence[Pieces]) -> list[float]:
        """The step of each vector: the fixed ``step``, or :func:`fd_step` of its norm.

        Args:
            vectors: vectors as lists of parameter-shaped pieces.

        Returns:
            One step per vector.

        Raises:
            ValueError: a vector is zero or not finite.
        """
        if self.step is not None:
            return [self.step] * len(vectors)
        w = math.sqrt(dot(self.params, self.params))
        out = []
        for v in vectors:
            norm = math.sqrt(dot(v, v))
            if not 0 < norm < math.inf:
                raise ValueError(f"vectors must be nonzero and finite for a finite-difference "
                                 f"product, got a vector of norm {norm}")
            out.append(fd_step(self.dtype, w, norm, self.richardson))
        return out

    def differences(self, gradient: Gradient, vectors: Sequence[Pieces],
                    steps: Sequence[float]) -> list[list[Pieces]]:
        """The central differences of ``gradient()`` along each vector.

        Args:
            gradient: the gradient at the current weights, as parameter-shaped pieces.
            vectors: the directions $v$.
            steps: their steps $h$ (:meth:`steps_for`).

        Returns:
            Per vector, ``[D(h)]`` or ``[D(h), D(2h)]`` (with the error estimate).
        """
        scales = (1, 2) if self.estimate_error else (1,)
        out = []
        with _perturbing(self.params) as move:
            for v, h in zip(vectors, steps):
                row = []
                for s in scales:
                    move(v, s * h)
                    plus = [g.detach().clone() for g in gradient()]
                    move(v, -s * h)
                    minus = gradient()
                    row.append([(a - b.detach()) / (2 * s * h) for a, b in zip(plus, minus)])
                out.append(row)
        return out

    def combine(self, differences: Sequence[Sequence[Pieces]], steps: Sequence[float], *,
                record: bool = True) -> list[Pieces]:
        """The products from (reduced) :meth:`differences`; records steps and error estimates.

        Args:
            differences: per vector ``[D(h)]`` or ``[D(h), D(2h)]``.
            steps: the steps they were taken with.
            record: keep the steps and error estimates (False for a part of a product, e.g.
                one batch's, whose estimate is not that of the product).

        Returns:
            Per vector, $D(h)$, or $R(h)$ with ``richardson``.
        """
        out = []
        for row, h in zip(differences, steps):
            product = row[0]
            if self.estimate_error:
                far = row[1]
                if self.richardson:
                    product = [(4 * a - b) / 3 for a, b in zip(row[0], far)]
            if self.estimate_error and record:
                gap = [a - b for a, b in zip(row[0], far)]
                error = math.sqrt(dot(gap, gap))
                size = math.sqrt(dot(product, product))
                self.errors.append(error)
                self.relative_errors.append(error / size if size > 0 else
                                            math.inf if error else 0.0)
            if record:
                self.steps.append(float(h))
            out.append(product)
        return out

    def metadata(self) -> dict:
        """What the products so far used: method, rule, steps and the largest error estimates.

        Returns:
            A JSON-representable dict: ``hvp_method``, ``richardson``, ``step_rule``,
            ``step`` (the last step; ``step_min``/``step_max`` over all products),
            ``error_estimate`` and ``relative_error_estimate`` (the largest over the products,
            None without estimates) and ``n_products``.
        """
        rule = "fixed" if self.step is not None else \
            f"eps^(1/{3 if not self.richardson else 5}) * (1 + ||w||) / ||v||"
        return {"hvp_method": "finite_difference", "richardson": self.richardson,
                "step_rule": rule, "step": self.steps[-1] if self.steps else None,
                "step_min": min(self.steps, default=None),
                "step_max": max(self.steps, default=None),
                "error_estimate": max(self.errors, default=None),
                "relative_error_estimate": max(self.relative_errors, default=None),
                "n_products": len(self.steps)}


def cast_policies(model: nn.Module) -> dict[str, torch.dtype]:
    """The dtypes the FSDP2 ``MixedPrecisionPolicy`` of ``model``'s units casts to.

    Args:
        model: any module.

    Returns:
        ``"param_dtype"``, ``"reduce_dtype"``, ``"output_dtype"`` -> the lowest-precision dtype
        any ``fully_shard`` unit's policy names for it (empty without FSDP2 or policy).
    """
    out: dict[str, torch.dtype] = {}
    for m in model.modules():
        policy = getattr(getattr(m, "_get_fsdp_state", lambda: None)(), "_mp_policy", None)
        for key in ("param_dtype", "reduce_dtype", "output_dtype"):
            dtype = getattr(policy, key, None)
            if isinstance(dtype, torch.dtype) and dtype.is_floating_point and (
                    key not in out or torch.finfo(dtype).eps > torch.finfo(out[key]).eps):
                out[key] = dtype
    return out


def check_fd_policy(model: nn.Module, dtype: torch.dtype) -> None:
    r"""Refuse finite differences through an FSDP2 policy that rounds below ``dtype``.

    Under a ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` the forward runs on bfloat16
    copies of the weights: a perturbation $h v$ smaller than their rounding vanishes and the
    differenced gradients carry bfloat16 noise, so the products are at best a few percent off
    at any step (``benchmarks/fd_error.py``; Granziol & Juarev 2026, arXiv 2602.00816, on the
    bf16 noise), and what they estimate, a Hessian of a function rounded to bfloat16, is not
    defined. The exact product (``hvp_method="reverse"``) ignores the policy: it computes the
    Hessian of the model in its parameters' dtype from the master shards.

    Args:
        model: the model analysed.
        dtype: the selected parameters' dtype.

    Raises:
        ValueError: a policy casts the weights, the gradient reduction or the output to a
            dtype of lower precision than ``dtype``.
    """
    eps = torch.finfo(dtype).eps
    lower = {k: d for k, d in cast_policies(model).items() if torch.finfo(d).eps > eps}
    if lower:
        casts = ", ".join(f"{k}={d}" for k, d in lower.items())
        raise ValueError(
            f'hvp_method="finite_difference" cannot differentiate this model: its fully_shard '
            f"MixedPrecisionPolicy ({casts}) rounds the forward or the gradients below the "
            f"parameters' {dtype}, so differenced gradients are a few percent off at any step; "
            'use hvp_method="reverse" (exact: the Hessian of the model in its parameters\' '
            "dtype, computed from the master shards, the policy not applied)")


def no_sync(model: nn.Module):
    """``model.no_sync()`` for DistributedDataParallel, a null context otherwise.

    Under ``no_sync`` DDP's gradients stay local, and the caller reduces them with the data.
    """
    return model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) \
        else nullcontext()


def backward_gradient(model: nn.Module, loss: Callable[[], Tensor],
                      params: Sequence[nn.Parameter]) -> Pieces:
    """The gradient of ``loss()`` w.r.t. ``params`` by one ordinary ``.backward()``.

    The parameters' ``.grad`` are cleared before and after (the caller restores the user's);
    under DistributedDataParallel the backward runs in ``no_sync()``.

    Args:
        model: the model ``loss`` evaluates.
        loss: computes the scalar loss.
        params: the parameters whose gradients are returned (zeros where none arrives).

    Returns:
        The gradients, shaped like ``params``.
    """
    for p in params:
        p.grad = None
    with torch.enable_grad(), no_sync(model):
        loss().backward()
    out = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    for p in params:
        p.grad = None
    return out


def fd_matmat(fd: FiniteDifference, model: nn.Module, loss_fn: LossFn, data: Iterable,
              vs: Tensor, *, batch_size_fn: BatchSizeFn | None = None, reduction: str = "mean",
              progress: bool = False) -> Tensor:
    """``H v`` for each row of ``vs`` (flat over ``fd.params``) of the mean loss over ``data``.

    One pass over ``data`` per product: each batch's differences are reduced with
    :func:`analysis.core.data_mean` (sample-weighted, all-reduced over ranks; DDP's own
    reduction is off through ``no_sync``), then combined (:meth:`FiniteDifference.combine`),
    so the error estimate is that of the full-data product. The model must already be in its
    analysis mode with the user's gradients set aside (``analysis.core.preserved``).

    Args:
        fd: the differencer (its parameters are the model's selected parameters).
        model: the model whose weights ``fd.params`` are.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: the iterable of batches (this rank's shard under ``torch.distributed``).
        batch_size_fn: sample count of a batch (default: the leading dimension).
        progress: a bar over the batches.
        vs: ``[k, n]`` vectors, flat in the order of ``fd.params``.
        reduction: ``loss_reduction(loss_fn)``.

    Returns:
        ``[k, n]``, the products.
    """
    params = fd.params
    vectors = [unflatten(v, params) for v in vs]
    steps = fd.steps_for(vectors)

    def per_batch(batch: Any) -> list[Tensor]:
        def loss() -> Tensor:
            return check_loss(loss_fn(model, batch), " in the finite-difference product")

        rows = fd.differences(lambda: backward_gradient(model, loss, params), vectors, steps)
        return [torch.stack([torch.stack([flatten(d) for d in row]) for row in rows])]

    m = 2 if fd.estimate_error else 1
    total = data_mean(data, per_batch, batch_size_fn, reduction=reduction, progress=progress,
                      zeros=lambda: [vs.new_zeros(len(vs), m, vs.shape[1])]).values[0]
    rows = [[unflatten(d, params) for d in row] for row in total.to(vs.dtype)]
    return torch.stack([flatten(p) for p in fd.combine(rows, steps)])


__all__ = ["FiniteDifference", "fd_step", "dot", "backward_gradient", "no_sync", "fd_matmat",
           "cast_policies", "check_fd_policy"]
