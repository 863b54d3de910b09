r"""Worst-case sharpness: the largest loss increase under a bounded weight perturbation.

$$S_{\max}(w) = \max_{\|\delta / c\|_p \le \rho} L(w + \delta) - L(w),$$

the sharpness of SAM (Foret et al. 2021, the bracketed term of Eq. 1; with $c = |w|$ the
adaptive sharpness of ASAM, Kwon et al. 2021), in the notation of Andriushchenko et al. 2023
("A modern look at the relationship between sharpness and generalization"); $c$ is the scale
of :mod:`.perturbation` (plain, elementwise or filter-wise).

It is maximised by projected gradient ascent with APGD's step-size schedule (:mod:`.apgd`).
The one-step SAM point $\rho\, g / \|g\|$ (Foret et al. 2021, Eq. 2; ASAM's
$c^2 g / \|c g\|$ when adaptive) is always evaluated and starts the first restart, so the
reported value is never below the one-step estimate; where the gradient vanishes (an exact
minimum) the restarts start at random points of the set.

On a model sharded with FSDP2's ``fully_shard`` the ascent runs on this rank's local shards
(:mod:`.perturbation`): no rank holds a full parameter-sized vector, and every rank gets the
one-process answer (the same ``seed``, the same random restarts).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core import (BatchSizeFn, LossFn, ParamSelection, all_reduce_sum_, check_choice,
                    check_data, check_int, check_positive, flatten, guarded, loss_reduction,
                    make_generator, preserved, rank, records_metadata, register_result,
                    select_params, unwrap_compiled)
from ..core.sharding import as_sharded, full_values, is_dtensor, local_values, pieces_like
from ..core.space import Space
from .apgd import Point, apgd
from .m_batches import split_batches
from .perturbation import (NORMS, Ball, PerturbedLoss, perturbed_loss, adaptivity,
                           flat_weights, weight_scale, weight_space)


@register_result(formerly=("analysis.sharpness:WorstCaseSharpness",))
@dataclass
class WorstCaseSharpness:
    r"""Worst-case sharpness $\max_{\|\delta / c\|_p \le \rho} L(w + \delta) - L(w)$.

    Attributes:
        value: The sharpness (for m-sharpness, the sample-weighted mean over the batches of
            m, i.e. the plain mean when all hold m samples).
        sam_value: The one-step SAM estimate (same averaging).
        loss: $L(w)$.
        delta_norm: $\|\delta / c\|_p$ of the worst perturbation found ($\le \rho$; for
            m-sharpness the sample-weighted mean over batches).
        n_forward: Per-batch forward passes spent on this rank.
        n_backward: Per-batch backward passes spent on this rank.
        delta: The worst perturbation per parameter name, torch tensors shaped like the
            parameters (to add to the weights; full-data only, else None); for a model
            sharded with ``fully_shard``, DTensors placed like the parameters
            (``full_tensor()`` gives the unsharded piece).
        batch_values: Per-batch sharpness of this rank (m-sharpness only, else None).
        batch_sizes: Per-batch sample counts of this rank (m-sharpness only, else None).
        metadata: Seed, configuration and versions.
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


@dataclass
class _Ascent:
    """The outcome of the ascent on one objective (the loss increases are above ``loss``)."""

    value: float
    sam_value: float
    loss: float
    u: Tensor
    size: float


def _maximize(objective: PerturbedLoss, scale: Tensor | None, ball: Ball, steps: int,
              restarts: int, gen: torch.Generator, start: Tensor | None, bar) -> _Ascent:
    """Worst case over the set for one objective: SAM point, then APGD from each start.

    Every vector is a row of ``objective.space`` (local shards on a sharded model).
    """
    ball = replace(ball, space=objective.space)

    def f(u: Tensor, grad: bool = True) -> tuple[float, Tensor | None]:
        value, g = objective(u if scale is None else scale * u, grad)
        return value, (g if scale is None or g is None else scale * g)

    zero = torch.zeros_like(objective.base)
    loss, g0 = f(zero)
    best = Point(loss, None, zero)          # delta = 0 is in the set: sharpness >= 0
    sam = best
    step = ball.direction(g0)
    if ball.size(step) > 0:  # the same verdict on every rank
        sam_u = ball.rho * step
        sam = Point(*f(sam_u, grad=start is None), sam_u)
    for r in range(restarts):
        if r == 0 and start is not None:
            u0 = ball.project(start)
            x = Point(*f(u0), u0)
        elif r == 0 and sam is not best:
            x = sam
        else:
            u0 = ball.random_point(gen, zero)
            x = Point(*f(u0), u0)
        found = apgd(f, x, ball, steps, bar)
        best = max(best, sam, found, key=lambda p: p.value)
    return _Ascent(best.value - loss, sam.value - loss, loss, best.u, ball.size(best.u))


def _start_vector(start: Tensor | Mapping[str, Tensor], names: list[str],
                  params: list[nn.Parameter], scale: Tensor | None, space: Space) -> Tensor:
    """A user's starting perturbation (flat, or per name) in the scaled coordinates.

    As a row of ``space``: on a sharded model this rank's local shards (a full flat ``start``
    sliced, a full or DTensor piece sharded like its parameter).
    """
    local = local_values(params)
    if isinstance(start, Mapping):
        unknown = set(start) - set(names)
        if unknown:
            raise ValueError(f"start names not among the selected parameters: {sorted(unknown)}")
        for n, p in zip(names, params):
            if n in start and tuple(start[n].shape) != tuple(p.shape):
                raise ValueError(f"start[{n!r}] has shape {tuple(start[n].shape)}, but the "
                                 f"parameter has shape {tuple(p.shape)}")
        start = flatten([torch.zeros_like(w) if n not in start else
                         as_sharded(start[n], p).to_local().to(w) if is_dtensor(p) else
                         full_values([start[n]])[0].to(w) for n, p, w in zip(names, params, local)])
    else:
        start = torch.as_tensor(start).reshape(-1)
        if start.numel() != space.n:
            raise ValueError(f"start must have {space.n} elements (the selected parameters), "
                             f"got {start.numel()}")
        start = space.local(start.to(local[0]))
    if scale is None:
        return start
    return torch.where(scale > 0, start / torch.where(scale > 0, scale, 1), 0)


def _check_m(m: int | None, loss_fn: LossFn) -> int | None:
    """``m=`` validated: None (full data) or an int >= 1 with a mean-reduced ``loss_fn``."""
    m = None if m is None else check_int("m", m, 1)
    if m is not None and loss_reduction(loss_fn) == "sum":
        raise ValueError("m-sharpness averages the sharpness of batch means: loss_fn.reduction "
                         "must be 'mean' with m=, got 'sum' (use a mean-reduced loss_fn)")
    return m


def _batches(data: Iterable, m: int | None, batch_size_fn: BatchSizeFn | None
             ) -> tuple[list, list[int]]:
    """``([None], [])`` for the full-data loss, else the batches of m and their sizes."""
    if m is None:
        return [None], []
    batches, sizes = split_batches(data, m, batch_size_fn)
    total = torch.tensor([float(sum(sizes))], dtype=torch.float64)
    all_reduce_sum_([total])
    if total.item() == 0:
        raise ValueError("data is empty: it yielded no batch with samples")
    if m > total.item():
        raise ValueError(f"m must be at most the number of samples ({int(total.item())}),"
                         f" got m={m}")
    return batches, sizes


def _m_sharpness(found: list[_Ascent], sizes: list[int], n_forward: int, n_backward: int
                 ) -> WorstCaseSharpness:
    """The sample-weighted means over the batches of m (and all ranks)."""
    weights = torch.tensor(sizes, dtype=torch.float64)
    table = torch.tensor([[a.value, a.sam_value, a.loss, a.size] for a in found],
                         dtype=torch.float64).reshape(-1, 4)
    sums = torch.cat([weights @ table, weights.sum().reshape(1)])
    all_reduce_sum_([sums])
    value, sam_value, loss, size = (sums[:4] / sums[4]).tolist()
    return WorstCaseSharpness(value, sam_value, loss, size, n_forward, n_backward,
                              batch_values=table[:, 0].numpy(),
                              batch_sizes=np.asarray(sizes, dtype=np.int64))


@records_metadata
@guarded(sharded=True)
def worst_case_sharpness(model: nn.Module, loss_fn: LossFn, data: Iterable, rho: float = 0.05,
                         norm: str = "l2", adaptive: bool | str = False, steps: int = 20, *,
                         seed: int = 0, m: int | None = None, restarts: int = 1,
                         start: Tensor | Mapping[str, Tensor] | None = None,
                         params: ParamSelection = None, model_mode: str = "eval",
                         batch_size_fn: BatchSizeFn | None = None,
                         progress: bool = True, check_deterministic: bool = True
                         ) -> WorstCaseSharpness:
    r"""Worst-case sharpness by projected gradient ascent with APGD's schedule.

    $$S_{\max}(w) = \max_{\|\delta / c\|_p \le \rho} L(w + \delta) - L(w)$$

    (Foret et al. 2021, Eq. 1's sharpness term; module docstring). The model is left exactly
    as it was.

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: A deterministic re-iterable of batches.
        rho: The radius $\rho > 0$.
        norm: "l2" (ball) or "linf" (box).
        adaptive: False ($c = 1$), True / "elementwise" ($c = |w|$), or "filter" ($c$ = the
            norm of the filter).
        steps: Ascent steps per restart (>= 1).
        seed: Seed of the random restarts; batch $b$ of m-sharpness uses ``seed + b``.
        m: None for the full-data loss; an int for m-sharpness (Foret et al. 2021): the data is
            cut into consecutive batches of m samples, each maximised on its own, and the
            values averaged (weighted by sample count; under torch.distributed each rank cuts
            its own shard). Needs a mean-reduced ``loss_fn``.
        restarts: Restarts (>= 1): the first starts at the SAM point (or at ``start``), the
            others at random points of the set.
        start: A perturbation in parameter space, flat or per name, projected onto the set.
        params: The parameter selection.
        model_mode: "eval" or "train".
        batch_size_fn: ``batch -> int`` sample count (default: the leading dimension).
        progress: Show a progress bar (rank 0).
        check_deterministic: First check that two passes over ``data`` agree (two forward
            passes).

    Returns:
        A :class:`WorstCaseSharpness`.

    Raises:
        ValueError: An argument outside its range, empty data, ``m`` larger than the data.
    """
    model = unwrap_compiled(model)
    rho = check_positive("rho", rho)
    ball = Ball(check_choice("norm", norm, NORMS), rho)
    kind = adaptivity(adaptive)
    steps = check_int("steps", steps, 1)
    restarts = check_int("restarts", restarts, 1)
    m = _check_m(m, loss_fn)
    make_generator(seed)  # validates the seed
    check_data(data)
    names, chosen = select_params(model, params)
    with preserved(model, model_mode, weights=True, trainable=chosen):
        scale = weight_scale(chosen, kind)
        start_u = None if start is None else _start_vector(start, names, chosen, scale,
                                                           weight_space(chosen))
        batches, sizes = _batches(data, m, batch_size_fn)
        bar = tqdm(total=len(batches) * restarts * steps, desc="worst-case sharpness",
                   disable=not progress or rank() != 0, leave=False)
        found, n_forward, n_backward = [], 0, 0
        base = flat_weights(chosen)  # before any objective writes a point into the model
        for b, batch in enumerate(batches):
            objective = perturbed_loss(model, loss_fn, data, chosen, batch_size_fn, batch, base)
            found.append(_maximize(objective, scale, ball, steps, restarts,
                                   make_generator(seed + b), start_u, bar))
            n_forward += objective.n_forward
            n_backward += objective.n_backward
        bar.close()
    if m is not None:
        return _m_sharpness(found, sizes, n_forward, n_backward)
    a = found[0]
    delta = a.u if scale is None else scale * a.u
    return WorstCaseSharpness(
        a.value, a.sam_value, a.loss, a.size, n_forward, n_backward,
        delta={n: t.clone() for n, t in zip(names, pieces_like(delta, chosen))})
