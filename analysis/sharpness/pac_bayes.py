r"""The PAC-Bayes sigma.

Jiang et al. 2020, "Fantastic generalization measures and where to find them", the measures
"pacbayes.flatness" and "pacbayes.mag.flatness".

The largest noise scale whose Gaussian weight noise raises the metric $M$ (loss or error) by
at most the target $d$:

$$\sigma^* = \max \{\sigma : \mathbb{E}_{\xi \sim \mathcal{N}(0, I)} M(w + s_\sigma \odot \xi)
- M(w) \le d\},$$

with $s_\sigma = \sigma$ or, magnitude-aware, $s_{\sigma, i} = \sqrt{\sigma^2 w_i^2 +
\epsilon^2}$; the flatness measure is $1 / \sigma^{*2}$.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core import (BatchSizeFn, LossFn, ParamSelection, check_bool, check_choice, check_data,
                    check_int, check_positive, guarded, make_generator, preserved, rank,
                    records_metadata, register_result, renamed_keywords, select_params)
from .perturbation import PerturbedLoss, perturbed_loss

METRICS = ("loss", "error")
MAX_HALVINGS = 60  # sigma_max / 2^60: the metric no longer moves in floating point


def classification_error(model: nn.Module, batch: Any) -> Tensor:
    """The 0-1 error of ``model(batch[0])`` against ``batch[1]``.

    Args:
        model: A classifier whose outputs hold the class scores on the last dim.
        batch: ``(inputs, targets, ...)``.

    Returns:
        The mean error over the batch, a 0-d tensor of the scores' dtype.
    """
    device = next(model.parameters()).device
    scores = model(batch[0].to(device))
    return (scores.argmax(-1) != batch[1].to(device)).to(scores.dtype).mean()


@register_result(formerly=("analysis.flatness:PacBayesSigma",))
@dataclass
class PacBayesSigma:
    r"""Result of the PAC-Bayes sigma search (Jiang et al. 2020; module docstring).

    Attributes:
        sigma: The noise scale $\sigma$ found.
        flatness: $1 / \sigma^2$ (``inf`` when it overflows a float, sigma below ~1e-154).
        increase: The estimated rise of the metric at sigma (mean over the draws).
        target: The target rise $d$.
        converged: $|\mathrm{increase} - \mathrm{target}| \le \mathrm{tol}$.
        n_evaluations: Sigma values tried.
        n_forward: Per-batch forward passes.
        metadata: Seed, configuration and versions.
    """

    sigma: float
    flatness: float
    increase: float
    target: float
    converged: bool
    n_evaluations: int
    n_forward: int
    metadata: dict = field(default_factory=dict)


class _NoisyIncrease:
    """``sigma -> `` the mean rise of the metric under the same ``n_samples`` noise draws.

    Remembers every sigma tried (``tried``) and ticks ``bar`` once per evaluation.
    """

    def __init__(self, objective: PerturbedLoss, n_samples: int, seed: int,
                 magnitude_eps: float | None, bar):
        self.objective, self.n_samples, self.seed = objective, n_samples, seed
        self.magnitude_eps, self.bar = magnitude_eps, bar
        self.clean, _ = objective(None)
        self.tried: dict[float, float] = {}

    def __call__(self, sigma: float) -> float:
        w = self.objective.base
        std = sigma if self.magnitude_eps is None else torch.sqrt(
            sigma ** 2 * w ** 2 + self.magnitude_eps ** 2)
        gen = make_generator(self.seed)
        space = self.objective.space  # on shards: this rank's slice of the one-process draw
        up = sum(self.objective(std * space.randn(1, gen, like=w)[0])[0]
                 for _ in range(self.n_samples)) / self.n_samples - self.clean
        self.tried[sigma] = up
        self.bar.update()
        return up


def _bracket(f: Callable[[float], float], sigma_max: float, ceiling: float
             ) -> tuple[float, float] | None:
    """Halve sigma from ``sigma_max`` until ``f(sigma) <= ceiling``.

    Returns:
        ``(lo, hi)`` with ``f(lo) <= ceiling < f(hi)`` (``lo = hi / 2``), or None when
        ``f(sigma_max) <= ceiling`` already.
    """
    hi = sigma_max
    if f(hi) <= ceiling:
        return None
    lo = hi / 2
    for _ in range(MAX_HALVINGS):
        if f(lo) <= ceiling:
            break
        hi, lo = lo, lo / 2
    return lo, hi


def _geometric_bisection(f: Callable[[float], float], lo: float, hi: float, target: float,
                         tol: float, max_iter: int) -> None:
    r"""Bisect $[lo, hi]$ at $\sqrt{lo \cdot hi}$ until $|f - target| \le tol$ (``max_iter`` steps).

    ``f`` is increasing in sigma; the caller reads the values from what ``f`` remembers.
    """
    for _ in range(max_iter):
        mid = math.sqrt(lo * hi)
        up = f(mid)
        if abs(up - target) <= tol:
            return
        if up > target:
            hi = mid
        else:
            lo = mid


@renamed_keywords(tolerance="tol", depth="max_iter")
@records_metadata
@guarded(sharded=True)
def pac_bayes_sigma(model: nn.Module, loss_fn: LossFn, data: Iterable, target: float = 0.1, *,
                    metric: str = "loss", magnitude_aware: bool = False,
                    magnitude_eps: float = 1e-3, n_samples: int = 10, max_iter: int = 15,
                    tol: float = 1e-2, sigma_max: float = 2.0,
                    error_fn: Callable[[nn.Module, Any], Tensor] | None = None, seed: int = 0,
                    params: ParamSelection = None, model_mode: str = "eval",
                    batch_size_fn: BatchSizeFn | None = None,
                    progress: bool = True, check_deterministic: bool = True) -> PacBayesSigma:
    r"""The largest sigma whose Gaussian weight noise raises the metric by ``target``.

    Jiang et al. 2020, "pacbayes.flatness" and "pacbayes.mag.flatness" (module docstring);
    defaults as theirs: 10 draws, search depth 15, tolerance 0.01, sigma at most 2. Noise:
    $\delta_i = \sigma \xi_i$ or, with ``magnitude_aware``,
    $\delta_i = \sqrt{\sigma^2 w_i^2 + \epsilon^2}\, \xi_i$ ($\epsilon$ = ``magnitude_eps``),
    with $\xi$ standard normal: sigma is the standard deviation. (The reference port draws
    ``normal(0, sigma**2)``, i.e. uses $\sigma^2$ as the standard deviation, and the variance
    formula as the std in the magnitude-aware case; we do not copy that.) The same
    ``n_samples`` draws of $\xi$ (from ``seed``) are used at every sigma, so the estimated
    increase is a deterministic function of sigma. On a model sharded with FSDP2's
    ``fully_shard`` the noise is drawn and scaled on this rank's local shards (its slice of
    the one-process draw), so every rank gets the one-process answer.

    The search halves sigma from ``sigma_max`` until the increase falls below
    ``target + tol``, then bisects geometrically for at most ``max_iter`` steps, stopping when
    $|\mathrm{increase} - \mathrm{target}| \le \mathrm{tol}$; the sigma whose increase is
    closest to the target is returned. The model is left exactly as it was.

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor`` (unused with ``metric="error"``).
        data: A deterministic re-iterable of batches.
        target: The target rise $d > 0$ of the metric.
        metric: "loss" (the mean of ``loss_fn``) or "error" (the mean of ``error_fn``).
        magnitude_aware: Scale the noise by the weights' magnitudes.
        magnitude_eps: $\epsilon > 0$ of the magnitude-aware noise.
        n_samples: Noise draws per sigma (>= 1).
        max_iter: The most bisection steps (>= 1; formerly ``depth``, still accepted for one
            release with a DeprecationWarning).
        tol: Tolerance on the increase (> 0; formerly ``tolerance``, likewise).
        sigma_max: The largest sigma tried (> 0).
        error_fn: ``(model, batch) -> Tensor`` for ``metric="error"`` (default
            :func:`classification_error`).
        seed: Seed of the noise draws.
        params: The parameter selection.
        model_mode: "eval" or "train".
        batch_size_fn: ``batch -> int`` sample count (default: the leading dimension).
        progress: Show a progress bar (rank 0).
        check_deterministic: First check that two passes over ``data`` agree (two forward
            passes).

    Returns:
        A :class:`PacBayesSigma`.

    Raises:
        ValueError: An argument outside its range.
    """
    target = check_positive("target", target)
    tol = check_positive("tol", tol)
    sigma_max = check_positive("sigma_max", sigma_max)
    metric = check_choice("metric", metric, METRICS)
    n_samples = check_int("n_samples", n_samples, 1)
    max_iter = check_int("max_iter", max_iter, 1)
    magnitude_aware = check_bool("magnitude_aware", magnitude_aware)
    magnitude_eps = check_positive("magnitude_eps", magnitude_eps)
    make_generator(seed)
    check_data(data)
    fn = loss_fn if metric == "loss" else (error_fn or classification_error)
    _, chosen = select_params(model, params)
    with preserved(model, model_mode, weights=True, trainable=chosen):
        objective = perturbed_loss(model, fn, data, chosen, batch_size_fn)
        bar = tqdm(desc="pac-bayes sigma", leave=False, disable=not progress or rank() != 0)
        increase = _NoisyIncrease(objective, n_samples, seed,
                                  magnitude_eps if magnitude_aware else None, bar)
        bracket = _bracket(increase, sigma_max, target + tol)
        if bracket is not None and abs(increase.tried[bracket[0]] - target) > tol:
            _geometric_bisection(increase, *bracket, target, tol, max_iter)
        bar.close()
    tried = increase.tried
    sigma = min(tried, key=lambda s: (abs(tried[s] - target), -s))
    up = tried[sigma]
    flatness = 1.0 / sigma ** 2 if sigma ** 2 > 0 else math.inf  # sigma < 1e-154: overflow
    return PacBayesSigma(sigma, flatness, up, target, abs(up - target) <= tol,
                         len(tried), objective.n_forward)
