r"""Progress bars that count what bounds the work, so their ETA means something.

* :func:`batch_progress` / :func:`batch_done`: a pass over the data (:func:`data_mean`) reports
  each batch's share of the pass to the innermost bar that asked for it, so a bar over products
  moves during a pass (a chunk of 8 Hutch++ probes is one pass over the data: without this its
  bar sat at 0 % until the whole pass was done).
* :class:`ConvergenceBar`: a bar over the products of an iterative solver whose total is the
  predicted number of products to convergence, capped by the budget: the log of the
  worst residual over its threshold, $g_j = \log \max_i r_i / t_i$, is extrapolated to zero
  along its recent slope (least squares over the last iterations) and along its mean slope
  since the second iteration, the sooner of the two, plus the products the solver spends
  after convergence (Lanczos's search for more copies), at most the budget; while it does not
  decrease the bar has no total and shows no ETA (rather than one from the budget, 10-300
  times too long on the documentation's examples). tqdm's ETA is then the predicted products
  left over the mean rate of products so far (``smoothing=0``: the products cost alike, and
  tqdm's moving average follows the uneven batches of a pass). ``benchmarks/eta.py`` measures
  the ETA against the time actually left on the documentation's examples.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Iterator

from tqdm.auto import tqdm

_HOOK: contextvars.ContextVar[Callable[[float], None] | None] = contextvars.ContextVar(
    "sharpscape_batch_progress", default=None)
_WINDOW = 4   # iterations in the slope of the log residual gap


@contextlib.contextmanager
def batch_progress(callback: Callable[[float], None]) -> Iterator[None]:
    """Within the block, each batch of a pass over the data calls ``callback(fraction)``.

    ``fraction`` is the batch's share of the pass (``1 / len(data)``; data without a length
    reports nothing). Nested blocks: the innermost callback receives the reports.

    Args:
        callback: Called with the fraction of a pass each batch represents.

    Yields:
        None.
    """
    token = _HOOK.set(callback)
    try:
        yield
    finally:
        _HOOK.reset(token)


def batch_done(fraction: float) -> None:
    """Report a finished batch, ``fraction`` of its pass, to the current :func:`batch_progress`.

    Args:
        fraction: The batch's share of the pass.
    """
    hook = _HOOK.get()
    if hook is not None:
        hook(fraction)


def gap(residuals, bounds) -> float:
    r"""$\log \max_i r_i / t_i$: how far the worst pair is from its tolerance (<= 0: met).

    Args:
        residuals: The residual norms $r_i$ (a tensor or array).
        bounds: Their thresholds $t_i$.

    Returns:
        The log gap (a float; ``-inf`` for zero residuals).
    """
    ratio = float((residuals / bounds).max())
    return math.log(ratio) if ratio > 0 else -math.inf


def _slope(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of ``(x, y)`` points (0 when the x are all equal)."""
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if not spread:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


class ConvergenceBar:
    """A bar over products whose total is the products predicted to convergence (module doc).

    Args:
        budget: The most products the solver may spend (shown; the total is at most this).
        desc: The bar's label.
        disable: No bar at all.
        bar: A tqdm-like bar to drive instead of a new one (tests).
        after: Products the solver spends once the tolerance is met (e.g. Lanczos's search
            for more copies of the wanted eigenvalues), part of the predicted total.

    Attributes:
        settled: Products at which the current phase after convergence began (None while the
            tolerance is not met); the solver sets it again when it starts another such phase.
    """

    def __init__(self, budget: int, desc: str, disable: bool = False, bar=None,
                 after: int = 0):
        self.budget, self.after = budget, after
        self.bar = bar if bar is not None else tqdm(total=None, desc=desc, disable=disable,
                                                    leave=False, unit="hvp", smoothing=0)
        self.history: list[tuple[float, float]] = []   # (products, log residual gap)
        self.restarts = 0
        self.settled: float | None = None

    def predicted_total(self) -> int | None:
        """Products predicted in all: done plus the extrapolated rest, at most the budget.

        The smaller of two extrapolations of the log gap to zero: along its slope over the
        last few iterations, and along its mean slope since the second iteration (the first
        is the start vector's Rayleigh quotient, whose drop to the second says nothing about
        the rate: both estimates leave it out); then ``after`` more products. Once the gap is
        met: the products at which it was met plus ``after``. None (no total, no ETA: the bar
        shows the budget instead) while neither estimate decreases.
        """
        done, gap = self.history[-1]
        if gap <= 0:
            start = done if self.settled is None else self.settled
            return int(min(self.budget, max(done, start + self.after)))
        rests = []
        points = self.history[1:]
        recent = points[-_WINDOW:]
        slope = _slope(recent) if len(recent) >= 2 else 0.0
        if slope < 0:
            rests.append(gap / -slope)
        if len(points) >= 2:
            first_n, first_gap = points[0]
            if first_gap > gap and done > first_n:
                rests.append(gap * (done - first_n) / (first_gap - gap))
        if not rests:
            return None
        return int(min(self.budget, max(done + 1, math.ceil(done + min(rests) + self.after))))

    def update(self, products: int, gap: float, **postfix) -> None:
        r"""Record the solver's state after an iteration and redraw.

        Args:
            products: Products spent so far.
            gap: $\log \max_i r_i / t_i$ over the wanted pairs (<= 0: converged).
            **postfix: Shown after the bar (e.g. the current estimate).
        """
        self.history.append((float(products), float(gap)))
        if gap > 0:
            self.settled = None
        elif self.settled is None:
            self.settled = float(products)
        total = self.predicted_total()
        self.bar.total = None if total is None else max(total, products)
        self.bar.n = products
        postfix["budget"] = self.budget
        if self.restarts:
            postfix["restarts"] = self.restarts
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def advance(self, fraction: float) -> None:
        """Move by ``fraction`` of a product (a batch of a pass; :func:`batch_progress`)."""
        self.bar.update(fraction)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


__all__ = ["batch_progress", "batch_done", "ConvergenceBar", "gap"]
