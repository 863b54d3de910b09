r"""Average sharpness: the expected loss increase under random weight noise.

$$S_{\mathrm{avg}}(w) = \mathbb{E}_{\delta \sim \mathcal{N}(0, \sigma^2 \operatorname{diag}(c^2))}
L(w + \delta) - L(w)$$

(the average-case sharpness of Andriushchenko et al. 2023, "A modern look at the relationship
between sharpness and generalization"), with the scale $c$ of :mod:`.perturbation`; with
``norm="linf"`` the noise is uniform on $[-\sigma c, \sigma c]$ instead of Gaussian.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from ..core import (BatchSizeFn, LossFn, ParamSelection, check_bool, check_choice, check_data,
                    check_int, check_positive, guarded, make_generator, preserved, rank,
                    records_metadata, register_result, select_params, unwrap_compiled)
from .perturbation import NORMS, Ball, adaptivity, perturbed_loss, weight_scale


@register_result(formerly=("analysis.sharpness:AverageSharpness",))
@dataclass
class AverageSharpness:
    r"""Average sharpness $\mathbb{E}_\delta L(w + \delta) - L(w)$.

    Attributes:
        value: The Monte-Carlo mean.
        stderr: Its standard error.
        loss: $L(w)$.
        samples: The per-draw increases (per antithetic pair when ``antithetic``).
        n_forward: Per-batch forward passes spent on this rank.
        metadata: Seed, configuration and versions.
    """

    value: float
    stderr: float
    loss: float
    samples: np.ndarray
    n_forward: int
    metadata: dict = field(default_factory=dict)


@records_metadata
@guarded(sharded=True)
def average_sharpness(model: nn.Module, loss_fn: LossFn, data: Iterable, sigma: float = 0.01,
                      adaptive: bool | str = False, n_samples: int = 32, *, seed: int = 0,
                      norm: str = "l2", antithetic: bool = False, params: ParamSelection = None,
                      model_mode: str = "eval", batch_size_fn: BatchSizeFn | None = None,
                      progress: bool = True, check_deterministic: bool = True
                      ) -> AverageSharpness:
    r"""Average sharpness by Monte Carlo, with $\delta = \sigma\, c \odot \xi$.

    $$S_{\mathrm{avg}}(w) \approx \frac{1}{N} \sum_{j=1}^{N} L(w + \delta_j) - L(w),$$

    $\xi$ standard normal (``norm="l2"``) or uniform on $[-1, 1]$ (``norm="linf"``), $c$ as in
    :func:`worst_case_sharpness`. Each draw is evaluated on the full data (all ranks; draws
    are identical on every rank). On a model sharded with FSDP2's ``fully_shard`` each rank
    draws and scales only its local shards of $\delta$ (its slice of the one-process draw:
    the same ``seed`` gives the same estimate as one process). The model is left exactly as
    it was.

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: A deterministic re-iterable of batches.
        sigma: The noise scale $\sigma > 0$.
        adaptive: False ($c = 1$), True / "elementwise" ($c = |w|$), or "filter".
        n_samples: Evaluations $N$ (>= 2; even and >= 4 with ``antithetic``).
        seed: Seed of the draws.
        norm: "l2" (Gaussian noise) or "linf" (uniform noise).
        antithetic: Evaluate $+\delta$ and $-\delta$ and average the pair (same expectation;
            the first-order term cancels, which removes most of the variance away from a
            minimum); ``n_samples`` then counts evaluations.
        params: The parameter selection.
        model_mode: "eval" or "train".
        batch_size_fn: ``batch -> int`` sample count (default: the leading dimension).
        progress: Show a progress bar (rank 0).
        check_deterministic: First check that two passes over ``data`` agree (two forward
            passes).

    Returns:
        An :class:`AverageSharpness`.

    Raises:
        ValueError: An argument outside its range, or an odd ``n_samples`` with
            ``antithetic``.
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
        objective = perturbed_loss(model, loss_fn, data, chosen, batch_size_fn)
        ball = replace(ball, space=objective.space)  # draws: this rank's slice on shards
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
