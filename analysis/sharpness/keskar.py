r"""Keskar et al.'s epsilon-sharpness.

Keskar et al. 2017, "On large-batch training for deep learning: generalization gap and sharp
minima", Metric 2.1:

$$\phi_{w}(\epsilon, A) = 100\, \frac{\max_{y \in C_\epsilon} L(w + A y) - L(w)}{1 + L(w)},
\qquad C_\epsilon = \{y : |y_i| \le \epsilon (|(A^{+} w)_i| + 1)\},$$

with $A = I$ (the full space) or an $n \times p$ matrix with orthonormal columns spanning a
random subspace ($A^{+} = A^\top$).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from scipy.optimize import Bounds, minimize
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core import (BatchSizeFn, LossFn, ParamSelection, check_data, check_int, check_positive,
                    guarded, make_generator, preserved, randn, rank, records_metadata,
                    register_result, renamed_keywords, select_params, uniform)
from .perturbation import perturbed_loss


@register_result(formerly=("analysis.flatness:KeskarSharpness",))
@dataclass
class KeskarSharpness:
    r"""Keskar et al. (2017) epsilon-sharpness $\phi_w(\epsilon, A)$ (module docstring).

    Attributes:
        value: The sharpness, in percent:
            $100 (\max_{y \in C_\epsilon} L(w + A y) - L(w)) / (1 + L(w))$.
        max_increase: $\max L - L(w)$ over the points evaluated.
        loss: $L(w)$.
        n_iter: L-BFGS-B iterations.
        n_forward: Per-batch forward passes.
        n_backward: Per-batch backward passes.
        subspace: The ``[n, p]`` orthonormal basis $A$ of the random subspace, a torch tensor
            (None: the full space).
        metadata: Seed, configuration and versions.
    """

    value: float
    max_increase: float
    loss: float
    n_iter: int
    n_forward: int
    n_backward: int
    subspace: Tensor | None = None
    metadata: dict = field(default_factory=dict)


def _subspace(w: Tensor, subspace_dim: int | None, gen: torch.Generator) -> Tensor | None:
    r"""The orthonormal basis $A$ (QR of a seeded Gaussian $n \times p$ matrix), or None."""
    if subspace_dim is None:
        return None
    p = check_int("subspace_dim", subspace_dim, 1)
    if p > w.numel():
        raise ValueError(f"subspace_dim must be at most the number of selected "
                         f"parameter elements ({w.numel()}), got {p}")
    return torch.linalg.qr(randn((w.numel(), p), gen, like=w)).Q


@renamed_keywords(maxiter="max_iter")
@records_metadata
@guarded(sharded=True)
def keskar_sharpness(model: nn.Module, loss_fn: LossFn, data: Iterable, eps: float = 1e-3,
                     subspace_dim: int | None = None, *, seed: int = 0, max_iter: int = 10,
                     params: ParamSelection = None, model_mode: str = "eval",
                     batch_size_fn: BatchSizeFn | None = None,
                     progress: bool = True, check_deterministic: bool = True) -> KeskarSharpness:
    r"""Keskar et al. (2017), Metric 2.1: the largest loss increase over the box $C_\epsilon$.

    $$\phi_{w}(\epsilon, A) = 100\, \frac{\max_{y \in C_\epsilon} L(w + A y) - L(w)}{1 + L(w)}$$

    maximised with scipy's L-BFGS-B. Full space (``subspace_dim=None``): $A = I$, the box
    $|\delta_i| \le \epsilon (|w_i| + 1)$. Random subspace of dimension $p$: $A$ has
    orthonormal columns (QR of a seeded Gaussian $n \times p$ matrix, so $A^{+} = A^\top$); it
    costs $n p$ memory. The ascent starts at a seeded uniform point of the box (at a minimum
    the gradient at $y = 0$ vanishes), runs at most ``max_iter`` L-BFGS-B iterations (Keskar
    et al. used 10) on float64 numpy vectors with gradients from autograd, and the best point
    evaluated is reported ($y = 0$ included). The model is left exactly as it was.

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: A deterministic re-iterable of batches.
        eps: The box size $\epsilon > 0$.
        subspace_dim: The dimension $p$ of the random subspace (None: the full space).
        seed: Seed of the subspace and of the starting point.
        max_iter: The most L-BFGS-B iterations (>= 1; formerly ``maxiter``, still accepted
            for one release with a DeprecationWarning).
        params: The parameter selection.
        model_mode: "eval" or "train".
        batch_size_fn: ``batch -> int`` sample count (default: the leading dimension).
        progress: Show a progress bar (rank 0).
        check_deterministic: First check that two passes over ``data`` agree (two forward
            passes).

    Returns:
        A :class:`KeskarSharpness`.

    Raises:
        ValueError: An argument outside its range (``subspace_dim`` above the number of
            selected parameter elements included).
    """
    eps = check_positive("eps", eps)
    max_iter = check_int("max_iter", max_iter, 1)
    gen = make_generator(seed)
    check_data(data)
    _, chosen = select_params(model, params)
    with preserved(model, model_mode, weights=True, trainable=chosen):
        objective = perturbed_loss(model, loss_fn, data, chosen, batch_size_fn)
        w = objective.base
        basis = _subspace(w, subspace_dim, gen)
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

        bar = tqdm(total=max_iter, desc="keskar sharpness", leave=False,
                   disable=not progress or rank() != 0)
        result = minimize(negative, y0, jac=True, method="L-BFGS-B",
                          bounds=Bounds(-bound, bound), options={"maxiter": max_iter},
                          callback=lambda *_: bar.update())
        bar.close()
    increase = best[0] - loss
    return KeskarSharpness(100.0 * increase / (1.0 + loss), increase, loss, int(result.nit),
                           objective.n_forward, objective.n_backward, basis)
