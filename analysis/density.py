"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

Each run starts Lanczos (full reorthogonalisation) from a unit Rademacher vector ``v``; the
tridiagonal ``T_m`` is diagonalised with ``eigh`` (symmetric: never a general ``eig``) as
``T_m = Y diag(theta) Y^T``, and ``sum_k tau_k delta(x - theta_k)`` with ``tau_k = Y_{1k}^2``
is the Gauss quadrature of the spectral measure ``v^T delta(x - H) v`` (Golub & Meurant 2010,
Ch. 6; Lin, Saad & Yang 2016, Eq. 3.8). It integrates polynomials of degree ``<= 2m - 1``
exactly, so ``n * sum_k tau_k theta_k^j`` is an unbiased estimate of ``tr H^j``. The density
averages the runs and replaces each node by a Gaussian of width ``sigma`` (Ghorbani, Krishnan &
Xiao 2019, Eq. 5).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import trange

from .core import (BatchSizeFn, check_bool, check_device, check_dtype, check_int, check_positive,
                   guarded, LossFn, make_generator, ParamSelection, rademacher, records_metadata,
                   register_result)
from .curvature import curvature_operator
from .lanczos import BASIS_DTYPES, Krylov
from .preconditioning import Preconditioner


@register_result
@dataclass
class DensityResult:
    """``density`` on ``grid`` (integrates to 1 there). ``nodes``/``weights``: the quadrature
    of each run, ``[n_vectors, m]`` (weights of a run sum to 1). With ``log_scale`` the grid
    and the smoothing are in ``log10 |lambda|``."""
    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    log_scale: bool
    n_hvp: int
    curvature: str = "hessian"
    preconditioned: bool = False
    metadata: dict = field(default_factory=dict)


def lanczos_quadrature(matmat, n: int, steps: int, n_vectors: int, *, seed: int = 0,
                       like: torch.Tensor, progress: bool = False,
                       basis_dtype: torch.dtype | None = None,
                       basis_device: torch.device | str | None = None
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """Nodes and weights ``[n_vectors, min(steps, n)]`` of SLQ on any symmetric ``matmat``.

    If a run's Krylov space becomes invariant early, Lanczos continues from a random vector
    orthogonal to it; the new nodes then carry zero weight (up to rounding), so the quadrature
    is unchanged.
    """
    gen = make_generator(seed)
    m = min(steps, n)
    nodes, weights, n_hvp = np.zeros((n_vectors, m)), np.zeros((n_vectors, m)), 0
    for run in trange(n_vectors, desc="SLQ", disable=not progress, leave=False):
        K = Krylov(m, n, like, gen, basis_dtype=basis_dtype, basis_device=basis_device)
        K.start(rademacher((1, n), gen, like=like))
        for _ in range(m):
            K.extend(matmat)
        theta, Y = K.ritz()
        nodes[run], weights[run] = theta.cpu().numpy(), (Y[0] ** 2).cpu().numpy()
        n_hvp += K.n_hvp
    return nodes, weights, n_hvp


def smooth(nodes: np.ndarray, weights: np.ndarray, sigma: float | None = None,
           n_grid: int = 1000, log_scale: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Gaussian-smoothed average of the runs on a grid padded by ``5 sigma``, normalised to
    integrate to 1 (trapezoid rule). ``sigma`` defaults to ``(max - min) / m`` of the nodes."""
    x = nodes
    if log_scale:
        floor = np.finfo(np.float64).eps * max(np.abs(nodes).max(), np.finfo(np.float64).tiny)
        x = np.log10(np.maximum(np.abs(nodes), floor))
    span = float(x.max() - x.min())
    if sigma is None:
        sigma = span / nodes.shape[1] if span > 0 else 1.0
    grid = np.linspace(x.min() - 5 * sigma, x.max() + 5 * sigma, n_grid)
    kernel = np.exp(-0.5 * ((grid[:, None] - x.reshape(-1)[None]) / sigma) ** 2)
    density = kernel @ weights.reshape(-1) / (weights.shape[0] * sigma * np.sqrt(2 * np.pi))
    return grid, density / np.trapezoid(density, grid), float(sigma)


@records_metadata
@guarded
def spectral_density(model: nn.Module, loss_fn: LossFn, data: Iterable, n_lanczos: int = 80,
                     n_vectors: int = 10, *, params: ParamSelection = None,
                     model_mode: str = "eval", batch_size_fn: BatchSizeFn | None = None,
                     seed: int = 0, progress: bool = True, sigma: float | None = None,
                     n_grid: int = 1000, log_scale: bool = False,
                     hvp_method: str = "reverse", curvature: str = "hessian",
                     preconditioner: Preconditioner = None, basis_dtype: torch.dtype | None = None,
                     basis_device: torch.device | str | None = None,
                     check_deterministic: bool = True) -> DensityResult:
    """The Hessian's eigenvalue density from ``n_vectors`` SLQ runs of ``n_lanczos`` steps.

    Memory: ``n_lanczos * n`` elements (the basis of one run). Costs
    ``n_vectors * min(n_lanczos, n)`` Hessian-vector products.
    log_scale: smooth ``log10 |lambda|`` instead of ``lambda`` (the grid is then in log10
        units; negative eigenvalues are counted by magnitude).
    curvature, preconditioner, basis_dtype, basis_device: as in :func:`analysis.top_eigenvalues`
        (the matrix whose density it is; where the basis lives).
    check_deterministic: first check that two passes over ``data`` agree (two forward passes).
    """
    n_lanczos = check_int("n_lanczos", n_lanczos, 1)
    n_vectors = check_int("n_vectors", n_vectors, 1)
    n_grid = check_int("n_grid", n_grid, 2)
    log_scale = check_bool("log_scale", log_scale)
    basis_dtype = check_dtype("basis_dtype", basis_dtype, BASIS_DTYPES)
    basis_device = check_device("basis_device", basis_device)
    if sigma is not None:
        check_positive("sigma", sigma)
    make_generator(seed)
    op = curvature_operator(curvature, model, loss_fn, data, params=params, model_mode=model_mode,
                            batch_size_fn=batch_size_fn, progress=False, hvp_method=hvp_method,
                            preconditioner=preconditioner)
    with op:
        nodes, weights, n_hvp = lanczos_quadrature(op.matmat, op.shape[0], n_lanczos, n_vectors,
                                                   seed=seed, like=op.like,
                                                   progress=progress, basis_dtype=basis_dtype,
                                                   basis_device=basis_device)
    grid, density, sigma = smooth(nodes, weights, sigma, n_grid, log_scale)
    return DensityResult(grid, density, nodes, weights, sigma, log_scale, n_hvp,
                         curvature=op.curvature, preconditioned=op.preconditioned)
