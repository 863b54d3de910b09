r"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

Each run starts Lanczos (full reorthogonalisation) from a unit Rademacher vector $v$; the
tridiagonal $T_m$ is diagonalised with ``eigh`` (symmetric: never a general ``eig``) as
$T_m = Y \,\mathrm{diag}(\theta)\, Y^\top$, and $\sum_k \tau_k \delta(x - \theta_k)$ with
$\tau_k = Y_{1k}^2$ is the Gauss quadrature of the spectral measure $v^\top \delta(x - H) v$
(Golub & Meurant 2010, Ch. 6; Lin, Saad & Yang 2016, Eq. 3.8). It integrates polynomials of
degree $\le 2m - 1$ exactly, so $n \sum_k \tau_k \theta_k^j$ is an unbiased estimate of
$\mathrm{tr}\, H^j$. The density averages the runs and replaces each node by a Gaussian of
width $\sigma$ (Ghorbani, Krishnan & Xiao 2019, Eq. 5):

$$\phi_\sigma(x) = \frac{1}{R} \sum_{r=1}^{R} \sum_k \tau_k^{(r)}
\frac{1}{\sigma\sqrt{2\pi}} e^{-(x - \theta_k^{(r)})^2 / (2\sigma^2)}.$$
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from torch import nn

from .core import (BatchSizeFn, check_bool, check_device, check_dtype, check_int, check_positive,
                   guarded, LossFn, make_generator, ParamSelection, records_metadata,
                   register_result, renamed_keywords)
from .core.space import Space
from .core.progress import batch_progress, CountBar
from .curvature import curvature_operator
from .lanczos import BASIS_DTYPES, Krylov
from .preconditioning import Preconditioner


@register_result
@dataclass
class DensityResult:
    r"""The smoothed spectral density of a curvature matrix, and the quadrature behind it.

    Attributes:
        grid: The points of ``density``; in $\log_{10} |\lambda|$ with ``log_scale``.
        density: The density on ``grid`` (integrates to 1 there).
        nodes: The quadrature nodes $\theta_k$ of each run, ``[n_vectors, m]``.
        weights: Their weights $\tau_k$, ``[n_vectors, m]`` (those of a run sum to 1).
        sigma: The width of the Gaussian kernel (in the grid's units).
        log_scale: Whether the grid and the smoothing are in $\log_{10} |\lambda|$.
        n_hvp: Products spent.
        curvature: The registered name of the matrix (``curvature=``).
        preconditioned: Whether it is $P^{-1/2} A P^{-1/2}$.
        metadata: Seed, configuration and versions (:func:`analysis.core.make_metadata`).
    """
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


@renamed_keywords(steps="n_lanczos")
def lanczos_quadrature(matmat, n: int, n_lanczos: int, n_vectors: int, *, seed: int = 0,
                       like: torch.Tensor, progress: bool = False,
                       basis_dtype: torch.dtype | None = None,
                       basis_device: torch.device | str | None = None,
                       space: Space | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Nodes and weights of stochastic Lanczos quadrature on any symmetric ``matmat``.

    Lin, Saad & Yang 2016, Eq. 3.8 (module docstring). If a run's Krylov space becomes
    invariant early, Lanczos continues from a random vector orthogonal to it; the new nodes
    then carry zero weight (up to rounding), so the quadrature is unchanged.

    Args:
        matmat: Rows in, the matrix times each row out (``[b, n] -> [b, n]``).
        n: The dimension.
        n_lanczos: Lanczos steps per run, at most ``n`` are taken (``m = min(n_lanczos, n)``).
            Formerly ``steps`` (accepted for one release, with a ``DeprecationWarning``).
        n_vectors: Runs, each from its own Rademacher start vector.
        seed: Seed of the start vectors (and of restarts after a breakdown).
        like: A tensor of the vectors' dtype and device.
        progress: Show a bar over the products (``n_vectors * m``, known in advance), moving
            batch by batch during each pass over the data.
        basis_dtype: Dtype of the Lanczos basis (default ``like``'s).
        basis_device: Device of the Lanczos basis (default ``like``'s).
        space: The vector space (:mod:`analysis.core.space`; default full vectors in one
            process); with a sharded one the start vectors and the rows ``matmat`` takes and
            returns are this rank's ``space.n_local`` columns of the one-process ones.

    Returns:
        ``(nodes, weights, n_hvp)``: numpy ``[n_vectors, m]`` each, and the products spent
        (``n_vectors * m``).
    """
    gen, space = make_generator(seed), space or Space(n)
    m = min(n_lanczos, n)
    nodes, weights, n_hvp = np.zeros((n_vectors, m)), np.zeros((n_vectors, m)), 0
    with CountBar(n_vectors * m, "SLQ", disable=not progress) as bar:  # ETA: current rate
        for run in range(n_vectors):
            K = Krylov(m, n, like, gen, basis_dtype=basis_dtype, basis_device=basis_device,
                       space=space)
            K.start(space.rademacher(1, gen, like=like))
            for _ in range(m):
                start = bar.n
                with batch_progress(bar.update):  # one product per pass, batch by batch
                    K.extend(matmat)
                bar.update(start + 1 - bar.n)
            theta, Y = K.ritz()
            nodes[run], weights[run] = theta.cpu().numpy(), (Y[0] ** 2).cpu().numpy()
            n_hvp += K.n_hvp
    return nodes, weights, n_hvp


def smooth(nodes: np.ndarray, weights: np.ndarray, sigma: float | None = None,
           n_grid: int = 1000, log_scale: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    r"""The Gaussian-smoothed average of the runs' quadratures (Ghorbani et al. 2019, Eq. 5).

    On a grid padded by $5\sigma$ beyond the nodes, normalised to integrate to 1 (trapezoid
    rule).

    Args:
        nodes: ``[R, m]`` quadrature nodes.
        weights: ``[R, m]`` their weights.
        sigma: Kernel width; default $(\max - \min) / m$ of the (log) nodes, 1 if they agree.
        n_grid: Grid points.
        log_scale: Smooth $\log_{10} |\theta|$ (floored at rounding level) instead of $\theta$.

    Returns:
        ``(grid, density, sigma)``.
    """
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
@guarded(sharded=True)
def spectral_density(model: nn.Module, loss_fn: LossFn, data: Iterable, n_lanczos: int = 80,
                     n_vectors: int = 10, *, params: ParamSelection = None,
                     model_mode: str = "eval", batch_size_fn: BatchSizeFn | None = None,
                     seed: int = 0, progress: bool = True, sigma: float | None = None,
                     n_grid: int = 1000, log_scale: bool = False,
                     hvp_method: str = "reverse", curvature: str = "hessian",
                     preconditioner: Preconditioner = None, basis_dtype: torch.dtype | None = None,
                     basis_device: torch.device | str | None = None,
                     check_deterministic: bool = True,
                     fd_richardson: bool = False) -> DensityResult:
    r"""The Hessian's eigenvalue density from ``n_vectors`` SLQ runs of ``n_lanczos`` steps.

    Stochastic Lanczos quadrature (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019; module
    docstring). Memory: ``n_lanczos * n`` elements (the basis of one run). Costs
    ``n_vectors * min(n_lanczos, n)`` Hessian-vector products.

    Args:
        model: The model (restored afterwards).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the batch's mean loss.
        data: An iterable of batches, passed over once per product.
        n_lanczos: Lanczos steps per run (at least 1; at most ``n`` are taken).
        n_vectors: Runs (at least 1).
        params: The parameters analysed (default all with requires_grad).
        model_mode: ``"eval"`` or ``"train"``, the mode during the products.
        batch_size_fn: Sample count of a batch.
        seed: Seed of the start vectors.
        progress: Show a bar over the products (``n_vectors * m``, known in advance), moving
            batch by batch during each pass over the data.
        sigma: Kernel width (positive); default :func:`smooth`'s.
        n_grid: Grid points (at least 2).
        log_scale: Smooth $\log_{10} |\lambda|$ instead of $\lambda$ (the grid is then in
            log10 units; negative eigenvalues are counted by magnitude).
        hvp_method: ``"reverse"``, ``"forward"`` or ``"finite_difference"`` (the Hessian
            only; as in :func:`analysis.top_eigenvalues`).
        curvature: The matrix, a registered name (as in :func:`analysis.top_eigenvalues`).
        preconditioner: A diagonal $P$; the density is then that of $P^{-1/2} A P^{-1/2}$.
        basis_dtype: Dtype of the Lanczos basis (as in :func:`analysis.top_eigenvalues`).
        basis_device: Device of the Lanczos basis (as in :func:`analysis.top_eigenvalues`).
        check_deterministic: First check that two passes over ``data`` agree (two forward
            passes).
        fd_richardson: With ``hvp_method="finite_difference"``, Richardson-extrapolate each
            product (:mod:`analysis.finite_difference`: a larger step, at most 4 more gradients
            per product); refused with another ``hvp_method``.

    Returns:
        A :class:`DensityResult`.

    Raises:
        ValueError: For an argument out of its range, an unknown ``curvature``, and as the
            curvature's operator (:class:`analysis.CurvatureOperator`).
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
                            preconditioner=preconditioner, fd_richardson=fd_richardson)
    with op:
        nodes, weights, n_hvp = lanczos_quadrature(op.matmat, op.shape[0], n_lanczos, n_vectors,
                                                   seed=seed, like=op.like,
                                                   progress=progress, basis_dtype=basis_dtype,
                                                   basis_device=basis_device,
                                                   space=getattr(op, "space", None))
    grid, density, sigma = smooth(nodes, weights, sigma, n_grid, log_scale)
    return DensityResult(grid, density, nodes, weights, sigma, log_scale, n_hvp,
                         curvature=op.curvature, preconditioned=op.preconditioned,
                         metadata=op.product_metadata())
