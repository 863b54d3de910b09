r"""Projected gradient ascent with the step-size schedule of APGD (Croce & Hein 2020, Alg. 1).

Momentum 0.75; checkpoints at fractions 0.22, 0.41, ... of the budget, where the step is
halved and the iterate restarted from the best point when fewer than 75 % of the steps since
the last checkpoint increased the loss, or when the best loss has not moved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from .perturbation import Ball

MOMENTUM = 0.75       # APGD's alpha (Croce & Hein 2020, Alg. 1)
MIN_UPDATE_RATIO = 0.75

Objective = Callable[..., "tuple[float, Tensor | None]"]


@dataclass
class Point:
    """An evaluated point.

    Attributes:
        value: The loss.
        grad: Its gradient in ``u`` (None if not needed).
        u: The point, in the scaled coordinates.
    """

    value: float
    grad: Tensor | None
    u: Tensor


def apgd_checkpoints(steps: int) -> set[int]:
    r"""The iterations after which APGD checks its progress.

    $\lceil p_j \cdot \mathrm{steps} \rceil$ with $p_0 = 0$, $p_1 = 0.22$,
    $p_{j+1} = p_j + \max(p_j - p_{j-1} - 0.03, 0.06)$ (Croce & Hein 2020, the checkpoints
    of Alg. 1).

    Args:
        steps: The ascent steps.

    Returns:
        The checkpoint iterations (1-based).
    """
    out, before, p = set(), 0.0, 0.22
    while p <= 1.0:
        out.add(math.ceil(round(p * steps, 9)))
        before, p = p, p + max(p - before - 0.03, 0.06)
    return out


def apgd(f: Objective, x: Point, ball: Ball, steps: int, bar) -> Point:
    """Projected gradient ascent from ``x`` with APGD's momentum and step-size schedule.

    Args:
        f: ``f(u, grad=bool) -> (loss, gradient or None)`` in the scaled coordinates.
        x: The evaluated start (with its gradient).
        ball: The constraint set.
        steps: The ascent steps.
        bar: A progress bar, updated once per step.

    Returns:
        The best point evaluated (``x`` included).
    """
    eta, best, prev = 2.0 * ball.rho, x, x.u
    checkpoints = apgd_checkpoints(steps)
    last_check, n_up, best_at_check, reduced = 0, 0, best.value, False
    for k in range(steps):
        z = ball.project(x.u + eta * ball.direction(x.grad))
        alpha = MOMENTUM if k > 0 else 1.0
        u = ball.project(x.u + alpha * (z - x.u) + (1 - alpha) * (x.u - prev))
        value, grad = f(u, grad=k + 1 < steps)  # the last gradient would go unused
        n_up += value > x.value
        prev, x = x.u, Point(value, grad, u)
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
