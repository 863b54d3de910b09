"""Flatness measures from the generalisation literature: Keskar et al.'s epsilon-sharpness and
the PAC-Bayes sigma of Jiang et al. (2020), on the ``loss_fn(model, batch)`` protocol."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from scipy.optimize import Bounds, minimize
from torch import Tensor, nn
from tqdm.auto import tqdm

from .core import (BatchSizeFn, check_bool, check_choice, check_data, check_int, check_positive,
                   guarded, LossFn, make_generator, ParamSelection, preserved, randn, rank,
                   records_metadata, register_result, select_params, uniform)
from .sharpness import PerturbedLoss

METRICS = ("loss", "error")
MAX_HALVINGS = 60  # sigma_max / 2^60: the metric no longer moves in floating point


@register_result
@dataclass
class KeskarSharpness:
    """Keskar et al. (2017) epsilon-sharpness, ``100 (max_{y in C_eps} L(w + A y) - L(w)) / (1 + L(w))``.

    value: the sharpness (percent); max_increase: ``max L - L(w)`` over the points evaluated;
    loss: ``L(w)``; n_iter: L-BFGS-B iterations; n_forward / n_backward: per-batch passes;
    subspace: the ``[n, p]`` orthonormal basis ``A`` of the random subspace, a torch tensor
        (None: full space).
    """
    value: float
    max_increase: float
    loss: float
    n_iter: int
    n_forward: int
    n_backward: int
    subspace: Tensor | None = None
    metadata: dict = field(default_factory=dict)


@records_metadata
@guarded
def keskar_sharpness(model: nn.Module, loss_fn: LossFn, data: Iterable, eps: float = 1e-3,
                     subspace_dim: int | None = None, *, seed: int = 0, maxiter: int = 10,
                     params: ParamSelection = None, model_mode: str = "eval",
                     batch_size_fn: BatchSizeFn | None = None,
                     progress: bool = True, check_deterministic: bool = True) -> KeskarSharpness:
    """Keskar et al. (2017), Metric 2.1: the largest loss increase over the box
    ``C_eps = {|y_i| <= eps (|(A^+ w)_i| + 1)}``, maximised with scipy's L-BFGS-B.

    Full space (``subspace_dim=None``): ``A = I``, the box ``|delta_i| <= eps (|w_i| + 1)``.
    Random subspace of dimension p: ``A`` has orthonormal columns (QR of a seeded Gaussian
    ``n x p`` matrix, so ``A^+ = A^T``); it costs ``n p`` memory. The ascent starts at a seeded
    uniform point of the box (at a minimum the gradient at ``y = 0`` vanishes), runs at most
    ``maxiter`` L-BFGS-B iterations (Keskar et al. used 10) on float64 numpy vectors with
    gradients from autograd, and the best point evaluated is reported (``y = 0`` included).
    check_deterministic: first check that two passes over ``data`` agree (two forward passes).
    """
    eps = check_positive("eps", eps)
    maxiter = check_int("maxiter", maxiter, 1)
    gen = make_generator(seed)
    check_data(data)
    _, chosen = select_params(model, params)
    with preserved(model, model_mode, weights=True, trainable=chosen):
        objective = PerturbedLoss(model, loss_fn, data, chosen, batch_size_fn)
        w = objective.base
        basis = None
        if subspace_dim is not None:
            p = check_int("subspace_dim", subspace_dim, 1)
            if p > w.numel():
                raise ValueError(f"subspace_dim must be at most the number of selected "
                                 f"parameter elements ({w.numel()}), got {p}")
            basis = torch.linalg.qr(randn((w.numel(), p), gen, like=w)).Q
        center = w if basis is None else basis.T @ w
        bound = (eps * (center.abs() + 1)).double().cpu().numpy()
        y0 = uniform(bound.shape, gen, like=torch.zeros(1, dtype=torch.float64)).numpy() * bound
        loss, _ = objective(None)
        best = [loss]

        def negative(y: np.ndarray) -> tuple[float, np.ndarray]:
            y_t = torch.from_numpy(y).to(w)
            value, g = objective(y_t if basis is None else basis @ y_t, grad=True)
            best[0] = max(best[0], value)
            g = g if basis is None else basis.T @ g
            return -value, -g.double().cpu().numpy()

        bar = tqdm(total=maxiter, desc="keskar sharpness", leave=False,
                   disable=not progress or rank() != 0)
        result = minimize(negative, y0, jac=True, method="L-BFGS-B",
                          bounds=Bounds(-bound, bound), options={"maxiter": maxiter},
                          callback=lambda *_: bar.update())
        bar.close()
    increase = best[0] - loss
    return KeskarSharpness(100.0 * increase / (1.0 + loss), increase, loss, int(result.nit),
                           objective.n_forward, objective.n_backward, basis)


def classification_error(model: nn.Module, batch: Any) -> Tensor:
    """The 0-1 error of ``model(batch[0])`` (class scores on the last dim) against ``batch[1]``."""
    device = next(model.parameters()).device
    scores = model(batch[0].to(device))
    return (scores.argmax(-1) != batch[1].to(device)).to(scores.dtype).mean()


@register_result
@dataclass
class PacBayesSigma:
    """Result of the PAC-Bayes sigma search (Jiang et al. 2020).

    sigma: the noise scale found; flatness: ``1 / sigma^2``; increase: the estimated rise of
    the metric at sigma (mean over the draws); converged: ``|increase - target| <= tolerance``;
    n_evaluations: sigma values tried; n_forward: per-batch forward passes.
    """
    sigma: float
    flatness: float
    increase: float
    target: float
    converged: bool
    n_evaluations: int
    n_forward: int
    metadata: dict = field(default_factory=dict)


@records_metadata
@guarded
def pac_bayes_sigma(model: nn.Module, loss_fn: LossFn, data: Iterable, target: float = 0.1, *,
                    metric: str = "loss", magnitude_aware: bool = False,
                    magnitude_eps: float = 1e-3, n_samples: int = 10, depth: int = 15,
                    tolerance: float = 1e-2, sigma_max: float = 2.0,
                    error_fn: Callable[[nn.Module, Any], Tensor] | None = None, seed: int = 0,
                    params: ParamSelection = None, model_mode: str = "eval",
                    batch_size_fn: BatchSizeFn | None = None,
                    progress: bool = True, check_deterministic: bool = True) -> PacBayesSigma:
    """The largest sigma whose Gaussian weight noise raises the metric by ``target``
    (Jiang et al. 2020, "pacbayes.flatness" and "pacbayes.mag.flatness"; defaults as theirs:
    10 draws, search depth 15, tolerance 0.01, sigma at most 2).

    Noise: ``delta_i = sigma * xi_i`` or, with ``magnitude_aware``, ``delta_i =
    sqrt(sigma^2 w_i^2 + magnitude_eps^2) * xi_i``, with ``xi`` standard normal: sigma is the
    standard deviation. (The reference port draws ``normal(0, sigma**2)``, i.e. uses sigma^2
    as the standard deviation, and the variance formula as the std in the magnitude-aware
    case; we do not copy that.) The same ``n_samples`` draws of ``xi`` (from ``seed``) are
    used at every sigma, so the estimated increase is a deterministic function of sigma.

    metric: "loss" (the mean of ``loss_fn``) or "error" (the mean of ``error_fn``, default
    ``classification_error``; ``loss_fn`` is then unused). The search halves sigma from
    ``sigma_max`` until the increase falls below the target, then bisects geometrically for at
    most ``depth`` steps, stopping when ``|increase - target| <= tolerance``; the sigma whose
    increase is closest to the target is returned.
    check_deterministic: first check that two passes over ``data`` agree (two forward passes).
    """
    target = check_positive("target", target)
    tolerance = check_positive("tolerance", tolerance)
    sigma_max = check_positive("sigma_max", sigma_max)
    metric = check_choice("metric", metric, METRICS)
    n_samples = check_int("n_samples", n_samples, 1)
    depth = check_int("depth", depth, 1)
    magnitude_aware = check_bool("magnitude_aware", magnitude_aware)
    magnitude_eps = check_positive("magnitude_eps", magnitude_eps)
    make_generator(seed)
    check_data(data)
    fn = loss_fn if metric == "loss" else (error_fn or classification_error)
    _, chosen = select_params(model, params)
    with preserved(model, model_mode, weights=True, trainable=chosen):
        objective = PerturbedLoss(model, fn, data, chosen, batch_size_fn)
        w = objective.base
        clean, _ = objective(None)
        tried: dict[float, float] = {}
        bar = tqdm(desc="pac-bayes sigma", leave=False, disable=not progress or rank() != 0)

        def increase(sigma: float) -> float:
            std = sigma if not magnitude_aware else torch.sqrt(sigma ** 2 * w ** 2
                                                               + magnitude_eps ** 2)
            gen = make_generator(seed)
            up = sum(objective(std * randn(w.shape, gen, like=w))[0]
                     for _ in range(n_samples)) / n_samples - clean
            tried[sigma] = up
            bar.update()
            return up

        hi = sigma_max
        if increase(hi) > target + tolerance:
            lo = hi / 2
            for _ in range(MAX_HALVINGS):
                if increase(lo) <= target + tolerance:
                    break
                hi, lo = lo, lo / 2
            if abs(tried[lo] - target) > tolerance:
                for _ in range(depth):
                    mid = math.sqrt(lo * hi)
                    up = increase(mid)
                    if abs(up - target) <= tolerance:
                        break
                    if up > target:
                        hi = mid
                    else:
                        lo = mid
        bar.close()
    sigma = min(tried, key=lambda s: (abs(tried[s] - target), -s))
    up = tried[sigma]
    return PacBayesSigma(sigma, 1.0 / sigma ** 2, up, target, abs(up - target) <= tolerance,
                         len(tried), objective.n_forward)
