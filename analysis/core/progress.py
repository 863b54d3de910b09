r"""Progress bars that count what bounds the work, so their ETA means something.

* :func:`batch_progress` / :func:`batch_done`: a pass over the data (:func:`data_mean`) reports
  each batch's share of the pass to the innermost bar that asked for it, so a bar over products
  moves during a pass (a chunk of 8 Hutch++ probes is one pass over the data: without this its
  bar sat at 0 % until the whole pass was done).
* :class:`ConvergenceBar`: a bar over the products of an iterative solver whose total is the
  predicted number of products to convergence, capped by the budget, plus the products the
  solver spends after convergence (Lanczos's search for more copies). The log of the worst
  residual over its threshold, $g_j = \log \max_i r_i / t_i$, is extrapolated to zero along
  its recent slope (least squares over the last 4 iterations) and along its mean slope since
  the second iteration (the first is the start vector's Rayleigh quotient, whose drop says
  nothing about the rate); the sooner of the two is the prediction. **No ETA until it is
  trusted**: the two agree within a factor 2 (plus one product) and reach no further than 3
  times the products they are fitted on. Until then the bar shows the products spent, the
  rate and the budget but no total and no ETA; once trusted, a later untrusted iteration keeps
  the last trusted end (no ETA again if the products pass it). The extrapolation errs both
  ways: early it follows the fast first drop and predicts too few products, on a plateau of
  $g$ (which then falls faster) too many; the rule hides both. On the documentation's
  examples no ETA is shown for 20-46 % of a bar's time (``benchmarks/eta.py`` reports it); on
  52 recorded histories (those examples and 48 MNIST-1D MLPs and CNNs, k = 1-5), replayed
  offline, the bars off by more than 2x somewhere (products, the search's at 0.7) fell from
  25 to 13.
* The ETA predicts **time**, not products: products before convergence at their mean
  seconds so far, those after it at the mean seconds of that phase once it spent some
  (Lanczos's search passes carry two vectors: each product costs less, about 0.6-0.75 of one
  on the examples) and at ``_SEARCH_COST`` (0.7) times the first phase's before. Within a
  pass the ETA is the geometric mean of the prediction made at the last iteration counted
  down (a pass's end costs more than its batches: orthogonalisation, Ritz values) and that
  prediction less the pass's products its batches reported, at the phase's rate. The ETA is
  written into the bar's format (tqdm's own would be the products left over the mean rate);
  :attr:`ConvergenceBar.eta` holds it. ``benchmarks/eta.py`` measures the ETA against the
  time actually left on the documentation's examples and replays recorded runs under other
  rules offline.
* :class:`CountBar`: a bar over a number of products known in advance (the trace and SLQ
  bars). Its ETA is the products left at the **current** seconds per product, not the mean
  since the start (tqdm's with ``smoothing=0``, which lags when the machine's load changes
  during the bar): the seconds over the products, both decayed by half every
  ``_HALF_LIFE`` (8) products, $s = \sum_k 2^{-(n - n_k)/h}\, \Delta t_k /
  \sum_k 2^{-(n - n_k)/h}\, \Delta n_k$. Over the first few products this is the mean (the
  decay has not yet acted: no rate from a single noisy product); once the rate changes for
  good, the part of the old rate left in $s$ halves every 8 products (a slow-down by 2x is
  followed to within 1.25x after 11 products, one by 4x to within 2x after 5, a speed-up by
  2x to within 1.25x after 16; the mean rate is 1.5-1.8x off for the rest of a bar of 100
  products changing midway). Why 8: under load a product's time varies by 30-40 % (the
  scheduler's time slices), and the decayed sums average about $2h / \ln 2 \approx 23$
  products, so $s$ varies by about 7 %; replayed on the recorded loaded runs, half-lives of
  2-4 products were worse than the mean (they follow that noise), 8-16 alike.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import time
from typing import Callable, Iterator

from tqdm import std
from tqdm.auto import tqdm

_HOOK: contextvars.ContextVar[Callable[[float], None] | None] = contextvars.ContextVar(
    "sharpscape_batch_progress", default=None)
_WINDOW = 4   # iterations in the slope of the log residual gap
_AGREE = 2.0   # the two extrapolations agree within this factor (trusted)
_HORIZON = 3.0  # and reach at most this many times the products they are fitted on
_SEARCH_COST = 0.7  # seconds per product of two-vector passes over one-vector ones, a guess
_HALF_LIFE = 8.0  # products over which a CountBar's seconds per product lose half their weight


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


def _bar_format(eta: float, rate: str = "{rate_fmt}") -> str:
    """A tqdm format showing ``eta`` seconds left (and ``rate``) instead of tqdm's own."""
    return ("{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<" + std.tqdm.format_interval(eta)
            + ", " + rate + "{postfix}]")


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
        clock: Seconds, for the ETA (tests and replays pass their own).

    Attributes:
        settled: Products at which the current phase after convergence began (None while the
            tolerance is not met); the solver sets it again when it starts another such phase.
        eta: The seconds left shown at the last redraw (None: no ETA shown).
    """

    def __init__(self, budget: int, desc: str, disable: bool = False, bar=None,
                 after: int = 0, clock: Callable[[], float] = time.perf_counter):
        self.budget, self.after, self.clock = budget, after, clock
        self.bar = bar if bar is not None else tqdm(total=None, desc=desc, disable=disable,
                                                    leave=False, unit="hvp", smoothing=0)
        self.history: list[tuple[float, float]] = []   # (products, log residual gap)
        self.times: list[float] = []                   # the clock at each update
        self.restarts = 0
        self.start = clock()
        self._settled: tuple[float, float] | None = None   # (products, clock)
        self.total: int | None = None
        self.eta: float | None = None
        self._end: float | None = None   # the products where the last trusted rule met the gap

    @property
    def settled(self) -> float | None:
        """Products at which the current phase after convergence began (class doc)."""
        return None if self._settled is None else self._settled[0]

    @settled.setter
    def settled(self, products: float | None) -> None:
        self._settled = None if products is None else (float(products), self.clock())

    def _rest(self) -> float | None:
        """Products predicted until the gap is met (None: no prediction).

        The trusted extrapolation (module doc), or the end the last trusted one predicted
        while that lies ahead.
        """
        done, gap = self.history[-1]
        points = self.history[1:]
        if len(points) >= 2:
            first_n, first_gap = points[0]
            slope = _slope(points[-_WINDOW:])
            recent = gap / -slope if slope < 0 else math.inf
            mean = gap * (done - first_n) / (first_gap - gap) if first_gap > gap else math.inf
            rest = min(recent, mean)
            if max(recent, mean) <= _AGREE * rest + 1 and rest <= _HORIZON * (done - first_n):
                self._end = done + rest
        if self._end is None or self._end <= done:
            return None
        return self._end - done

    def predicted_total(self) -> int | None:
        """Products predicted in all: done plus the extrapolated rest, at most the budget.

        The trusted extrapolation of the log gap to zero (module doc, :meth:`_rest`), then
        ``after`` more products. Once the gap is met: the products at which it was met plus
        ``after``. None (no total, no ETA: the bar shows the budget instead) until an
        extrapolation is trusted, and when the products pass the end it predicted.

        Returns:
            The predicted products, or None.
        """
        done, gap = self.history[-1]
        if gap <= 0:
            start = done if self.settled is None else self.settled
            return int(min(self.budget, max(done, start + self.after)))
        rest = self._rest()
        if rest is None:
            return None
        return int(min(self.budget, max(done + 1, math.ceil(done + rest + self.after))))

    def seconds_left(self, n: float, now: float) -> float | None:
        """Seconds predicted from ``now`` (``n`` products done) to :meth:`predicted_total`.

        Each phase's products at its own mean seconds per product: before convergence, over
        the products so far; after it (single-vector passes now carry two vectors), over the
        products since it began, and before the first of those, ``_SEARCH_COST`` times the
        first phase's. Within a pass: the geometric mean of the prediction made at the last
        update counted down (at least half the next figure) and that prediction less the
        pass's products done (reported by its batches) at the current phase's rate.

        Args:
            n: Products done (fractional within a pass).
            now: The clock's time.

        Returns:
            The seconds left, or None without a total.
        """
        if self.total is None or not self.times:
            return None
        done, last = self.history[-1][0], self.times[-1]
        first_end, first_t = self._settled or (done, last)
        first = max(first_t - self.start, 0.0) / max(first_end, 1.0)
        later = (last - first_t) / (done - first_end) if done > first_end else (
            _SEARCH_COST * first)
        if self._settled is None:
            converged = min(self.total, max(done, self.total - self.after))
            ahead = (converged - done) * first + (self.total - converged) * later
            rate = first
        else:
            ahead, rate = (self.total - done) * later, later
        by_count = max(ahead - (n - done) * rate, 0.0)
        return math.sqrt(max(ahead - (now - last), 0.5 * by_count) * by_count)

    def _show(self, n: float) -> None:
        """Put the ETA (:meth:`seconds_left`) into the bar's format, None: tqdm's own."""
        self.eta = self.seconds_left(n, self.clock())
        self.bar.bar_format = None if self.eta is None else _bar_format(self.eta)

    def update(self, products: int, gap: float, **postfix) -> None:
        r"""Record the solver's state after an iteration and redraw.

        Args:
            products: Products spent so far.
            gap: $\log \max_i r_i / t_i$ over the wanted pairs (<= 0: converged).
            **postfix: Shown after the bar (e.g. the current estimate).
        """
        self.history.append((float(products), float(gap)))
        self.times.append(self.clock())
        if gap > 0:
            self.settled = None
        elif self.settled is None:
            self._settled = (float(products), self.times[-1])
        total = self.predicted_total()
        self.total = None if total is None else max(total, products)
        self.bar.total = self.total
        self.bar.n = products
        postfix["budget"] = self.budget
        if self.restarts:
            postfix["restarts"] = self.restarts
        self.bar.set_postfix(postfix, refresh=False)
        self._show(products)
        self.bar.refresh()

    def advance(self, fraction: float) -> None:
        """Move by ``fraction`` of a product (a batch of a pass; :func:`batch_progress`)."""
        self._show(self.bar.n + fraction)
        self.bar.update(fraction)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


class CountBar:
    r"""A bar over a known number of products, its ETA at the current rate (module doc).

    A context manager with tqdm's ``n``, ``total``, ``update`` and ``close``; the ETA, the
    products left at $s$ seconds each (the seconds and products decayed by half every
    ``half_life`` products, module doc), is written into the bar's format.

    Args:
        total: The products the work takes.
        desc: The bar's label.
        disable: No bar at all.
        unit: The unit shown with the rate.
        bar: A tqdm-like bar to drive instead of a new one (tests).
        clock: Seconds, for the ETA (tests and replays pass their own).
        half_life: Products after which a product's time weighs half in $s$ (> 0).

    Attributes:
        eta: The seconds left shown at the last update (None: before the first product).

    Raises:
        ValueError: ``half_life`` is not positive.
    """

    def __init__(self, total: float, desc: str, disable: bool = False, unit: str = "hvp",
                 bar=None, clock: Callable[[], float] = time.perf_counter,
                 half_life: float = _HALF_LIFE):
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        self.total, self.unit, self.clock, self.half_life = total, unit, clock, half_life
        self.disable = disable
        self.bar = bar if bar is not None else tqdm(total=total, desc=desc, disable=disable,
                                                    leave=False, unit=unit, smoothing=0)
        self.n = 0.0
        self.eta: float | None = None
        self._last = clock()
        self._seconds = self._products = 0.0   # decayed sums (module doc)

    def seconds_per_product(self) -> float | None:
        """The decayed seconds over the decayed products (None before the first product)."""
        return self._seconds / self._products if self._products > 0 else None

    def seconds_left(self) -> float | None:
        """The products left at :meth:`seconds_per_product` (None before the first product)."""
        per = self.seconds_per_product()
        return None if per is None else max(self.total - self.n, 0.0) * per

    def update(self, k: float = 1) -> None:
        """Count ``k`` more products (a fraction within a pass) and redraw.

        Args:
            k: Products done since the last update (>= 0; 0 only redraws).
        """
        now = self.clock()
        if k > 0:
            decay = 2.0 ** (-k / self.half_life)
            self._seconds = self._seconds * decay + (now - self._last)
            self._products = self._products * decay + k
            self._last = now
        self.n += k
        self.eta = self.seconds_left()
        if self.eta is not None and not self.disable:
            per = self.seconds_per_product()
            rate = (f"{per:.2f}s/{self.unit}" if per >= 1 or per == 0
                    else f"{1 / per:.2f}{self.unit}/s")
            self.bar.bar_format = _bar_format(self.eta, rate)
        self.bar.update(k)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()

    def __enter__(self) -> "CountBar":
        """Enter: the bar itself."""
        return self

    def __exit__(self, *exc) -> None:
        """Exit: close the bar."""
        self.close()


__all__ = ["batch_progress", "batch_done", "ConvergenceBar", "CountBar", "gap"]
