r"""Worst-case sharpness beside its quadratic (second-order) prediction.

At a minimum (zero gradient, positive semi-definite Hessian $H$ with top eigenvalue
$\lambda_{\max}$)

$$\max_{\|\delta\|_2 \le \rho} L(w + \delta) - L(w) = \frac{\rho^2 \lambda_{\max}}{2}
+ O(\rho^3),$$

so the ratio of the measured sharpness to $\rho^2 \lambda_{\max} / 2$ says over which radii the
quadratic picture of the loss holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from torch import nn

from ..core import (BatchSizeFn, LossFn, ParamSelection, check_positive, guarded,
                    records_metadata, register_result)
from ..lanczos import top_eigenvalues
from .worst_case import worst_case_sharpness


@register_result(formerly=("analysis.sharpness:SharpnessVsCurvature",))
@dataclass
class SharpnessVsCurvature:
    r"""Worst-case L2 sharpness beside its second-order prediction $\rho^2 \lambda_{\max} / 2$.

    Attributes:
        rhos: The radii.
        sharpness: The worst-case sharpness at each radius.
        sam_values: The one-step SAM estimates at each radius.
        prediction: $\rho^2 \lambda_{\max} / 2$ at each radius.
        lambda_max: The top Hessian eigenvalue.
        n_forward: Per-batch forward passes of the ascents.
        n_hvp: Hessian-vector products of the eigenvalue solve.
        metadata: Seed, configuration and versions.
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
        """``sharpness / prediction`` (1 where the quadratic model holds at a minimum)."""
        return self.sharpness / self.prediction
    metadata: dict = field(default_factory=dict)


@records_metadata
@guarded(sharded=True)
def sharpness_vs_curvature(model: nn.Module, loss_fn: LossFn, data: Iterable,
                           rhos: Sequence[float] = (1e-3, 1e-2, 1e-1), *, steps: int = 20,
                           restarts: int = 1, seed: int = 0, tol: float = 1e-6,
                           max_hvp: int | None = None, params: ParamSelection = None,
                           model_mode: str = "eval", batch_size_fn: BatchSizeFn | None = None,
                           progress: bool = True, check_deterministic: bool = True
                           ) -> SharpnessVsCurvature:
    r"""Where does the quadratic picture hold? Sharpness against $\rho^2 \lambda_{\max} / 2$.

    For each radius, the worst-case L2 sharpness (APGD, first restart started at
    $\rho v_{\max}$, the top eigenvector from ``top_eigenvalues``) is reported beside the
    prediction (module docstring); on a model sharded with ``fully_shard`` the eigenvector
    stays sharded (DTensors) and the ascents run on the local shards. Away from a minimum the
    first-order term
    $\rho \|\nabla L\|$ dominates at small $\rho$ and the ratio exceeds 1; at large $\rho$
    higher-order terms take over.

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: A deterministic re-iterable of batches.
        rhos: The radii (each > 0; at least one).
        steps: Ascent steps per restart.
        restarts: Restarts per radius.
        seed: Seed of the eigenvalue solve and the restarts.
        tol: Tolerance of the eigenvalue solve.
        max_hvp: Hessian-vector product budget of the eigenvalue solve (None: its default).
        params: The parameter selection.
        model_mode: "eval" or "train".
        batch_size_fn: ``batch -> int`` sample count (default: the leading dimension).
        progress: Show progress bars (rank 0).
        check_deterministic: Check once that two passes over ``data`` agree (two forward
            passes).

    Returns:
        A :class:`SharpnessVsCurvature`.

    Raises:
        ValueError: A radius that is not positive, or no radius.
    """
    radii = np.asarray([check_positive("rhos entries", r) for r in rhos], dtype=np.float64)
    if radii.size == 0:
        raise ValueError("rhos must hold at least one radius")
    eig = top_eigenvalues(model, loss_fn, data, k=1, which="LA", tol=tol, max_hvp=max_hvp,
                          seed=seed, params=params, model_mode=model_mode,
                          batch_size_fn=batch_size_fn, progress=progress)
    lam, v = float(eig.eigenvalues[0]), eig.eigenvectors[0]
    if isinstance(v, list):  # a fully_shard model's eigenvector: DTensors, kept sharded
        v = dict(zip(eig.names, v))

    def scaled(rho: float):
        return {n: rho * t for n, t in v.items()} if isinstance(v, dict) else rho * v

    found = [worst_case_sharpness(model, loss_fn, data, rho, "l2", False, steps, seed=seed,
                                  restarts=restarts, start=scaled(rho), params=params,
                                  model_mode=model_mode, batch_size_fn=batch_size_fn,
                                  progress=progress) for rho in radii]
    return SharpnessVsCurvature(
        radii, np.array([r.value for r in found]), np.array([r.sam_value for r in found]),
        0.5 * radii ** 2 * lam, lam, sum(r.n_forward for r in found), eig.n_hvp)
