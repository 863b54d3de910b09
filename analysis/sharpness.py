"""Sharpness of a point in weight space: the worst-case and the average loss increase under
weight perturbations, plain or adaptive (scale-invariant).

Definitions (Andriushchenko et al. 2023, "A modern look at the relationship between sharpness
and generalization", worst-case and average-case sharpness):

* worst case  ``S_max = max_{||delta / c||_p <= rho} L(w + delta) - L(w)``
* average     ``S_avg = E_{delta ~ N(0, sigma^2 diag(c^2))} L(w + delta) - L(w)``

with ``c = 1`` (plain), ``c = |w|`` (elementwise adaptive, as ASAM, Kwon et al. 2021) or
``c_i = ||w_f||`` for the filter ``f`` (slice along dim 0) that holds element ``i`` (filter-wise).
Both are computed in the scaled coordinates ``u = delta / c``, where the constraint set is a
plain L2 ball or L-infinity box: the L2 "ellipsoid" projection of the adaptive case is then
exact (no Lagrange-multiplier bisection is needed).

The worst case is maximised by projected gradient ascent with the step-size schedule of APGD
(Croce & Hein 2020, Alg. 1): momentum 0.75, checkpoints at fractions 0.22, 0.41, ... of the
budget, where the step is halved and the iterate restarted from the best point when fewer than
75 % of the steps since the last checkpoint increased the loss or when the best loss has not
moved. The one-step SAM point ``rho * grad / ||grad||`` (Foret et al. 2021, eq. 2; ASAM's
``c^2 grad / ||c grad||`` when adaptive) is always evaluated and starts the first restart,
so the reported value is never below the one-step estimate; where the gradient vanishes (an
exact minimum) the restarts start at random points of the set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .core import (all_reduce_sum_, BatchSizeFn, check_bool, check_choice, check_data, check_int,
                   check_loss, check_positive, data_mean, default_batch_size, flatten, guarded,
                   loss_reduction, LossFn, make_generator, ParamSelection, preserved, randn, rank,
                   records_metadata, register_result, select_params, unflatten, uniform,
                   unwrap_compiled)
from .lanczos import top_eigenvalues
from .ops import explained_errors, gradients

NORMS = ("l2", "linf")
ADAPTIVE = ("elementwise", "filter")
MOMENTUM = 0.75       # APGD's alpha (Croce & Hein 2020, Alg. 1)
MIN_UPDATE_RATIO = 0.75


def adaptivity(adaptive: bool | str | None) -> str | None:
    """``adaptive=`` as None (plain), "elementwise" (True) or "filter"."""
    if adaptive is None or adaptive is False:
        return None
    if adaptive is True:
        return "elementwise"
    if isinstance(adaptive, str) and adaptive in ADAPTIVE:
        return adaptive
    raise ValueError(f"adaptive must be False, True, 'elementwise' or 'filter', got {adaptive!r}")


def weight_scale(params: Sequence[Tensor], kind: str | None) -> Tensor | None:
    """The flat scale ``c`` of the adaptive perturbation model (None when plain).

    "elementwise": ``|w_i|``; "filter": the L2 norm of the slice along dim 0 holding ``w_i``
    (a row of a Linear weight, an output channel of a Conv weight, one entry of a bias).
    """
    if kind is None:
        return None
    if kind == "elementwise":
        return flatten([p.detach().abs() for p in params])
    parts = []
    for p in params:
        rows = p.detach().reshape(len(p), -1) if p.dim() > 0 else p.detach().reshape(1, 1)
        parts.append(torch.linalg.vector_norm(rows, dim=1, keepdim=True).expand_as(rows))
    return flatten(parts)


# ----------------------------------------------------------------------------- objective

class PerturbedLoss:
    """``delta -> L(w + delta)`` (and its gradient) for the selected parameters.

    Writes ``w + delta`` into the parameters (and leaves the last point there), so the caller
    must hold ``preserved(model, weights=True)``; ``base`` is ``w`` flattened (default: the
    parameters' values now). With ``batch`` given, the loss is that one batch on this rank
    alone (m-sharpness); otherwise the sample-weighted mean over ``data`` and all ranks.
    ``n_forward`` / ``n_backward`` count the per-batch passes spent.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable | None,
                 params: Sequence[nn.Parameter], batch_size_fn: BatchSizeFn | None = None,
                 batch: Any = None, base: Tensor | None = None):
        self.model, self.loss_fn, self.data, self.params = model, loss_fn, data, list(params)
        self.batch_size_fn, self.batch = batch_size_fn, batch
        self.base = flatten([p.detach() for p in self.params]) if base is None else base
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


# ----------------------------------------------------------------------------- constraint sets

@dataclass(frozen=True)
class Ball:
    """The L2 ball or L-infinity box ``||u||_p <= rho`` (in the scaled coordinates)."""
    norm: str
    rho: float

    def size(self, u: Tensor) -> float:
        return float(torch.linalg.vector_norm(u, ord=2 if self.norm == "l2" else math.inf))

    def project(self, u: Tensor) -> Tensor:
        if self.norm == "linf":
            return u.clamp(-self.rho, self.rho)
        size = self.size(u)
        return u * (self.rho / size) if size > self.rho else u

    def direction(self, g: Tensor) -> Tensor:
        """The steepest-ascent unit step for this norm: ``g / ||g||_2`` or ``sign(g)``."""
        if self.norm == "linf":
            return torch.sign(g)
        size = float(torch.linalg.vector_norm(g))
        return g / size if size > 0 else torch.zeros_like(g)

    def noise(self, gen: torch.Generator, like: Tensor) -> Tensor:
        """Unit-scale noise: standard normal for L2, uniform on [-1, 1] for L-infinity."""
        draw = randn if self.norm == "l2" else uniform
        return draw(like.shape, gen, like=like)

    def random_point(self, gen: torch.Generator, like: Tensor) -> Tensor:
        """A random start in the set: on the L2 sphere, or uniform in the box."""
        u = self.noise(gen, like)
        if self.norm == "l2":
            return u * (self.rho / max(self.size(u), torch.finfo(u.dtype).tiny))
        return u * self.rho


# ----------------------------------------------------------------------------- APGD

@dataclass
class _Point:
    """An evaluated point: the loss, its gradient in ``u`` (None if not needed) and ``u``."""
    value: float
    grad: Tensor | None
    u: Tensor


def apgd_checkpoints(steps: int) -> set[int]:
    """Iterations after which APGD checks progress: ``ceil(p_j * steps)`` with
    ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``."""
    out, before, p = set(), 0.0, 0.22
    while p <= 1.0:
        out.add(math.ceil(round(p * steps, 9)))
        before, p = p, p + max(p - before - 0.03, 0.06)
    return out


def _apgd(f, x: _Point, ball: Ball, steps: int, bar) -> _Point:
    """Projected gradient ascent from ``x`` with APGD's momentum and step-size schedule."""
    eta, best, prev = 2.0 * ball.rho, x, x.u
    checkpoints = apgd_checkpoints(steps)
    last_check, n_up, best_at_check, reduced = 0, 0, best.value, False
    for k in range(steps):
        z = ball.project(x.u + eta * ball.direction(x.grad))
        alpha = MOMENTUM if k > 0 else 1.0
        u = ball.project(x.u + alpha * (z - x.u) + (1 - alpha) * (x.u - prev))
        value, grad = f(u, grad=k + 1 < steps)  # the last gradient would go unused
        n_up += value > x.value
        prev, x = x.u, _Point(value, grad, u)
        if value > best.value:
            best = x
        if k + 1 in checkpoints:
            stalled = n_up < MIN_UPDATE_RATIO * (k + 1 - last_check)
            flat = not reduced and best.value <= best_at_check
            last_check, n_up, best_at_check, reduced = k + 1, 0, best.value, stalled or flat
            if reduced:
                eta /= 2
                x, prev = best, best.u
        bar.update()
    return best


@dataclass
class _Ascent:
    value: float
    sam_value: float
    loss: float
    u: Tensor
    size: float


def _maximize(objective: PerturbedLoss, scale: Tensor | None, ball: Ball, steps: int,
              restarts: int, gen: torch.Generator, start: Tensor | None, bar) -> _Ascent:
    """Worst case over the set for one objective: SAM point, then APGD from each start."""
    def f(u: Tensor, grad: bool = True) -> tuple[float, Tensor | None]:
        value, g = objective(u if scale is None else scale * u, grad)
        return value, (g if scale is None or g is None else scale * g)

    zero = torch.zeros_like(objective.base)
    loss, g0 = f(zero)
    best = _Point(loss, None, zero)          # delta = 0 is in the set: sharpness >= 0
    sam = best
    step = ball.direction(g0)
    if bool(step.any()):
        sam_u = ball.rho * step
        sam = _Point(*f(sam_u, grad=start is None), sam_u)
    for r in range(restarts):
        if r == 0 and start is not None:
            u0 = ball.project(start)
            x = _Point(*f(u0), u0)
        elif r == 0 and sam is not best:
            x = sam
        else:
            u0 = ball.random_point(gen, zero)
            x = _Point(*f(u0), u0)
        found = _apgd(f, x, ball, steps, bar)
        best = max(best, sam, found, key=lambda p: p.value)
    return _Ascent(best.value - loss, sam.value - loss, loss, best.u, ball.size(best.u))


# ----------------------------------------------------------------------------- m-sharpness batches

def _slice(batch: Any, start: int, stop: int, n: int) -> Any:
    if (start, stop) == (0, n):
        return batch
    if isinstance(batch, Tensor):
        if len(batch) != n:
            raise ValueError(f"m-sharpness splits batches along dim 0, but a tensor of the batch "
                             f"has {len(batch)} rows for {n} samples")
        return batch[start:stop]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(x, start, stop, n) for x in batch)
    if isinstance(batch, Mapping):
        return {k: _slice(v, start, stop, n) for k, v in batch.items()}
    raise ValueError(f"m-sharpness cannot split a batch holding a {type(batch).__name__}: use "
                     "tensors, or tuples/lists/dicts of tensors, or pass data batched by m")


def _concat(pieces: list) -> Any:
    first = pieces[0]
    if len(pieces) == 1:
        return first
    if isinstance(first, Tensor):
        return torch.cat(pieces)
    if isinstance(first, (tuple, list)):
        return type(first)(_concat(list(xs)) for xs in zip(*pieces))
    return {k: _concat([p[k] for p in pieces]) for k in first}


def split_batches(data: Iterable, m: int, batch_size_fn: BatchSizeFn | None = None
                  ) -> tuple[list, list[int]]:
    """Consecutive batches of ``m`` samples (the last one may be smaller) cut from ``data``.

    A batch of exactly ``m`` samples is passed through untouched, so ``DataLoader(batch_size=m)``
    costs no copy. Returns ``(batches, sizes)``.
    """
    check_data(data)
    size = batch_size_fn or default_batch_size
    out, sizes, pending, have = [], [], [], 0
    for batch in data:
        n, start = size(batch), 0
        while start < n:
            take = min(m - have, n - start)
            pending.append(_slice(batch, start, start + take, n))
            have, start = have + take, start + take
            if have == m:
                out.append(_concat(pending))
                sizes.append(m)
                pending, have = [], 0
    if pending:
        out.append(_concat(pending))
        sizes.append(have)
    return out, sizes


# ----------------------------------------------------------------------------- public API

@register_result
@dataclass
class WorstCaseSharpness:
    """Worst-case sharpness ``max_{||delta / c|| <= rho} L(w + delta) - L(w)``.

    value: the sharpness (for m-sharpness, the sample-weighted mean over the batches of m,
        i.e. the plain mean when all hold m samples); sam_value: the one-step SAM estimate
        (same averaging); loss: ``L(w)``.
    delta_norm: ``||delta / c||_p`` of the worst perturbation found (<= rho; for m-sharpness
        the sample-weighted mean over batches).
    delta: the worst perturbation per parameter name, torch tensors shaped like the parameters
        (to add to the weights; full-data only, else None).
    batch_values / batch_sizes: per-batch sharpness and sample counts of this rank
        (m-sharpness only, else None).
    n_forward / n_backward: per-batch forward / backward passes spent on this rank.
    """
    value: float
    sam_value: float
    loss: float
    delta_norm: float
    n_forward: int
    n_backward: int
    delta: dict[str, Tensor] | None = None
    batch_values: np.ndarray | None = None
    batch_sizes: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)


def _start_vector(start: Tensor | Mapping[str, Tensor], names: list[str],
                  params: list[nn.Parameter], scale: Tensor | None) -> Tensor:
    """A user's starting perturbation (flat, or per name) in the scaled coordinates."""
    like = flatten([p.detach() for p in params])
    if isinstance(start, Mapping):
        unknown = set(start) - set(names)
        if unknown:
            raise ValueError(f"start names not among the selected parameters: {sorted(unknown)}")
        start = flatten([start[n].to(p) if n in start else torch.zeros_like(p)
                         for n, p in zip(names, params)])
    start = torch.as_tensor(start).reshape(-1).to(like)
    if start.numel() != like.numel():
        raise ValueError(f"start must have {like.numel()} elements (the selected parameters), "
                         f"got {start.numel()}")
    if scale is None:
        return start
    return torch.where(scale > 0, start / torch.where(scale > 0, scale, 1), 0)


@records_metadata
@guarded
def worst_case_sharpness(model: nn.Module, loss_fn: LossFn, data: Iterable, rho: float = 0.05,
                         norm: str = "l2", adaptive: bool | str = False, steps: int = 20, *,
                         seed: int = 0, m: int | None = None, restarts: int = 1,
                         start: Tensor | Mapping[str, Tensor] | None = None,
                         params: ParamSelection = None, model_mode: str = "eval",
                         batch_size_fn: BatchSizeFn | None = None,
                         progress: bool = True, check_deterministic: bool = True
                         ) -> WorstCaseSharpness:
    """Worst-case sharpness by projected gradient ascent with APGD's schedule (module doc).

    norm: "l2" (ball) or "linf" (box). adaptive: False, True / "elementwise" (``c = |w|``),
    or "filter" (``c`` = norm of the filter). steps: ascent steps per restart; restarts: the
    first starts at the SAM point (or at ``start``, a perturbation in parameter space, flat or
    per name, projected onto the set), the others at random points of the set.
    m: None for the full-data loss; an int for m-sharpness (Foret et al. 2021): the data is
    cut into consecutive batches of m samples, each maximised on its own, and the values
    averaged (weighted by sample count; under torch.distributed each rank cuts its own shard).
    Batch b uses seed ``seed + b``; m-sharpness needs a mean-reduced ``loss_fn``. The model is
    left exactly as it was. check_deterministic: first check that two passes over ``data``
    agree (two forward passes).
    """
    model = unwrap_compiled(model)
    rho = check_positive("rho", rho)
    ball = Ball(check_choice("norm", norm, NORMS), rho)
    kind = adaptivity(adaptive)
    steps = check_int("steps", steps, 1)
    restarts = check_int("restarts", restarts, 1)
    m = None if m is None else check_int("m", m, 1)
    if m is not None and loss_reduction(loss_fn) == "sum":
        raise ValueError("m-sharpness averages the sharpness of batch means: loss_fn.reduction "
                         "must be 'mean' with m=, got 'sum' (use a mean-reduced loss_fn)")
    make_generator(seed)  # validates the seed
    check_data(data)
    names, chosen = select_params(model, params)
    with preserved(model, model_mode, weights=True, trainable=chosen):
        scale = weight_scale(chosen, kind)
        start_u = None if start is None else _start_vector(start, names, chosen, scale)
        if m is None:
            batches, sizes = [None], []
        else:
            batches, sizes = split_batches(data, m, batch_size_fn)
            total = torch.tensor([float(sum(sizes))], dtype=torch.float64)
            all_reduce_sum_([total])
            if total.item() == 0:
                raise ValueError("data is empty: it yielded no batch with samples")
            if m > total.item():
                raise ValueError(f"m must be at most the number of samples ({int(total.item())}),"
                                 f" got m={m}")
        bar = tqdm(total=len(batches) * restarts * steps, desc="worst-case sharpness",
                   disable=not progress or rank() != 0, leave=False)
        found, n_forward, n_backward = [], 0, 0
        base = flatten([p.detach() for p in chosen])
        for b, batch in enumerate(batches):
            objective = PerturbedLoss(model, loss_fn, data, chosen, batch_size_fn, batch, base)
            found.append(_maximize(objective, scale, ball, steps, restarts,
                                   make_generator(seed + b), start_u, bar))
            n_forward += objective.n_forward
            n_backward += objective.n_backward
        bar.close()
    if m is None:
        a = found[0]
        delta = a.u if scale is None else scale * a.u
        return WorstCaseSharpness(
            a.value, a.sam_value, a.loss, a.size, n_forward, n_backward,
            delta={n: t.clone() for n, t in zip(names, unflatten(delta, chosen))})
    weights = torch.tensor(sizes, dtype=torch.float64)
    table = torch.tensor([[a.value, a.sam_value, a.loss, a.size] for a in found],
                         dtype=torch.float64).reshape(-1, 4)
    sums = torch.cat([weights @ table, weights.sum().reshape(1)])
    all_reduce_sum_([sums])
    value, sam_value, loss, size = (sums[:4] / sums[4]).tolist()
    return WorstCaseSharpness(value, sam_value, loss, size, n_forward, n_backward,
                              batch_values=table[:, 0].numpy(),
                              batch_sizes=np.asarray(sizes, dtype=np.int64))


@register_result
@dataclass
class AverageSharpness:
    """Average sharpness ``E_delta L(w + delta) - L(w)``.

    value: the Monte-Carlo mean; stderr: its standard error; loss: ``L(w)``;
    samples: the per-draw increases (per antithetic pair when ``antithetic``);
    n_forward: per-batch forward passes spent on this rank.
    """
    value: float
    stderr: float
    loss: float
    samples: np.ndarray
    n_forward: int
    metadata: dict = field(default_factory=dict)


@records_metadata
@guarded
def average_sharpness(model: nn.Module, loss_fn: LossFn, data: Iterable, sigma: float = 0.01,
                      adaptive: bool | str = False, n_samples: int = 32, *, seed: int = 0,
                      norm: str = "l2", antithetic: bool = False, params: ParamSelection = None,
                      model_mode: str = "eval", batch_size_fn: BatchSizeFn | None = None,
                      progress: bool = True, check_deterministic: bool = True
                      ) -> AverageSharpness:
    """Average sharpness with ``delta = sigma * c * xi``: ``xi`` standard normal (norm="l2")
    or uniform on [-1, 1] (norm="linf"), ``c`` as in ``worst_case_sharpness``.

    Each draw is evaluated on the full data (all ranks; draws are identical on every rank).
    antithetic: evaluate ``+delta`` and ``-delta`` and average the pair (same expectation; the
    first-order term cancels, which removes most of the variance away from a minimum);
    n_samples then counts evaluations and must be even.
    check_deterministic: first check that two passes over ``data`` agree (two forward passes).
    """
    model = unwrap_compiled(model)
    sigma = check_positive("sigma", sigma)
    ball = Ball(check_choice("norm", norm, NORMS), 1.0)
    kind = adaptivity(adaptive)
    antithetic = check_bool("antithetic", antithetic)
    n_samples = check_int("n_samples", n_samples, 4 if antithetic else 2)
    if antithetic and n_samples % 2:
        raise ValueError(f"n_samples must be even with antithetic=True, got {n_samples}")
    gen = make_generator(seed)
    check_data(data)
    names, chosen = select_params(model, params)
    draws = n_samples // 2 if antithetic else n_samples
    with preserved(model, model_mode, weights=True, trainable=chosen):
        objective = PerturbedLoss(model, loss_fn, data, chosen, batch_size_fn)
        scale = weight_scale(chosen, kind)
        loss, _ = objective(None)
        increases = []
        for _ in tqdm(range(draws), desc="average sharpness", leave=False,
                      disable=not progress or rank() != 0):
            delta = sigma * ball.noise(gen, objective.base)
            if scale is not None:
                delta *= scale
            up = objective(delta)[0] - loss
            if antithetic:
                up = 0.5 * (up + objective(-delta)[0] - loss)
            increases.append(up)
    samples = np.asarray(increases)
    return AverageSharpness(float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(draws)),
                            loss, samples, objective.n_forward)


@register_result
@dataclass
class SharpnessVsCurvature:
    """Worst-case L2 sharpness beside its second-order prediction ``rho^2 lambda_max / 2``.

    rhos, sharpness, sam_values (one-step SAM estimates) and prediction are arrays over the
    radii; ratio = sharpness / prediction (1 where the quadratic model holds at a minimum);
    lambda_max: the top Hessian eigenvalue; n_forward: per-batch forward passes of the ascents;
    n_hvp: Hessian-vector products of the eigenvalue solve.
    """
    rhos: np.ndarray
    sharpness: np.ndarray
    sam_values: np.ndarray
    prediction: np.ndarray
    lambda_max: float
    n_forward: int
    n_hvp: int

    @property
    def ratio(self) -> np.ndarray:
        return self.sharpness / self.prediction
    metadata: dict = field(default_factory=dict)


@records_metadata
@guarded
def sharpness_vs_curvature(model: nn.Module, loss_fn: LossFn, data: Iterable,
                           rhos: Sequence[float] = (1e-3, 1e-2, 1e-1), *, steps: int = 20,
                           restarts: int = 1, seed: int = 0, tol: float = 1e-6,
                           max_hvp: int | None = None, params: ParamSelection = None,
                           model_mode: str = "eval", batch_size_fn: BatchSizeFn | None = None,
                           progress: bool = True, check_deterministic: bool = True
                           ) -> SharpnessVsCurvature:
    """Where does the quadratic picture hold? At a minimum (zero gradient, PSD Hessian)
    ``max_{||delta|| <= rho} L(w + delta) - L(w) = rho^2 lambda_max / 2 + O(rho^3)``.

    For each radius, the worst-case L2 sharpness (APGD, first restart started at
    ``rho * v_max``, the top eigenvector from ``top_eigenvalues``) is reported beside the
    prediction. Away from a minimum the first-order term ``rho ||grad||`` dominates at small
    rho and the ratio exceeds 1; at large rho higher-order terms take over.
    check_deterministic: check once that two passes over ``data`` agree (two forward passes).
    """
    radii = np.asarray([check_positive("rhos entries", r) for r in rhos], dtype=np.float64)
    if radii.size == 0:
        raise ValueError("rhos must hold at least one radius")
    eig = top_eigenvalues(model, loss_fn, data, k=1, which="LA", tol=tol, max_hvp=max_hvp,
                          seed=seed, params=params, model_mode=model_mode,
                          batch_size_fn=batch_size_fn, progress=progress)
    lam, v = float(eig.eigenvalues[0]), eig.eigenvectors[0]
    found = [worst_case_sharpness(model, loss_fn, data, rho, "l2", False, steps, seed=seed,
                                  restarts=restarts, start=rho * v, params=params,
                                  model_mode=model_mode, batch_size_fn=batch_size_fn,
                                  progress=progress) for rho in radii]
    return SharpnessVsCurvature(
        radii, np.array([r.value for r in found]), np.array([r.sam_value for r in found]),
        0.5 * radii ** 2 * lam, lam, sum(r.n_forward for r in found), eig.n_hvp)
