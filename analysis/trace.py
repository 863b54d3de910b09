r"""Stochastic trace estimates of the Hessian with standard errors from their own probes.

* Hutchinson (1989): $\mathrm{tr}\, H \approx \frac{1}{m} \sum_i z_i^\top H z_i$ with
  Rademacher $z_i$; the standard error is the sample standard deviation (``ddof=1``) of the
  $m$ probe values over $\sqrt{m}$.
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021, Alg. 1): a third of the budget sketches
  $H S$, $Q = \mathrm{orth}(H S)$; a third computes $\mathrm{tr}(Q^\top H Q)$ exactly; the
  rest runs Hutchinson on the deflated $(I - QQ^\top) H (I - QQ^\top)$. Since
  $\mathrm{tr}\, H = \mathrm{tr}(Q^\top H Q) + \mathrm{tr}((I - QQ^\top) H (I - QQ^\top))$
  for every orthonormal $Q$, the estimate is unbiased given $Q$, and its standard error is that
  of the Hutchinson part: the sample standard deviation (``ddof=1``) of its $g$ probe values
  over $\sqrt{g}$ (conditional on the sketch). It is exact when
  $\mathrm{rank}\, H \le$ ``n_hvp // 3``; when $n \le$ ``n_hvp // 3`` the sketch spans
  everything and only $2n$ products are spent (and reported).
* Every stderr is at least the rounding level $\epsilon \sqrt{n}\, size$
  (:func:`rounding_stderr`): an estimate exact but for rounding reports that, never 0 or 1e-31.
* XTrace (Epperly, Tropp & Webber 2024): the exchangeable version of Hutch++, exact when
  $\mathrm{rank}\, H <$ ``n_hvp // 2``; see :func:`_xtrace`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .core.progress import batch_progress

from .core import (BatchSizeFn, check_choice, check_int, guarded, LossFn, make_generator,
                   ParamSelection, rademacher, records_metadata, register_result)
from .curvature import curvature_operator
from .preconditioning import Preconditioner

TRACE_METHODS = ("hutch++", "hutchinson", "xtrace")
MatMat = Callable[[Tensor], Tensor]


@register_result
@dataclass
class TraceResult:
    r"""A trace estimate of a curvature matrix with its standard error.

    Attributes:
        estimate: The estimate of $\mathrm{tr}\, A$.
        stderr: Its standard error (module docstring).
        n_hvp: Products spent.
        method: "hutch++", "hutchinson" or "xtrace".
        samples: The per-probe values of the stochastic part.
        curvature: The registered name of the matrix (``curvature=``).
        preconditioned: Whether it is $P^{-1/2} A P^{-1/2}$.
        metadata: Seed, configuration and versions (:func:`analysis.core.make_metadata`).
    """
    estimate: float
    stderr: float
    n_hvp: int
    method: str
    samples: np.ndarray
    curvature: str = "hessian"
    preconditioned: bool = False
    metadata: dict = field(default_factory=dict)


def _apply(matmat: MatMat, rows: Tensor, chunk: int, bar) -> Tensor:
    """``H`` applied to the rows of ``rows``, ``chunk`` vectors per pass over the data.

    The bar counts products and moves batch by batch during each pass (a pass computes
    ``chunk`` products at once): each batch adds its share of them.
    """
    out = []
    for piece in torch.split(rows, chunk):
        start = bar.n
        with batch_progress(lambda fraction, c=len(piece): bar.update(c * fraction)):
            out.append(matmat(piece))
        bar.update(start + len(piece) - bar.n)   # exactly the pass's products
    return torch.cat(out)


def _hutchpp(apply, n: int, n_hvp: int, gen, like: Tensor, method: str) -> TraceResult:
    """Hutch++ (a zero sketch makes it Hutchinson)."""
    sketch = min(n_hvp // 3, n) if method == "hutch++" else 0
    g = n_hvp - 2 * sketch if sketch < n else 0  # a full sketch makes the trace exact
    exact, size, Q = 0.0, 0.0, like.new_zeros(0, n)
    if sketch:
        S = rademacher((sketch, n), gen, like=like)
        Q = torch.linalg.qr(apply(S).T.to(torch.float64))[0].T.to(like)
        parts = (Q.to(torch.float64) * apply(Q)).sum(1)
        exact, size = float(parts.sum()), float(parts.abs().sum())
    G = rademacher((g, n), gen, like=like)
    G = G - (G @ Q.T) @ Q
    samples = (G.to(torch.float64) * apply(G)).sum(1).cpu().numpy()
    floor = rounding_stderr(size + float(np.abs(samples).mean()) if g else size, n, like)
    if g == 0:
        return TraceResult(exact, floor, 2 * sketch, method, samples)
    return TraceResult(exact + float(samples.mean()),
                       max(float(samples.std(ddof=1) / math.sqrt(g)), floor),
                       2 * sketch + g, method, samples)


def rounding_stderr(size: float, n: int, like: Tensor) -> float:
    r"""The floor of every reported stderr: $\epsilon \sqrt{n}\, size$.

    The error rounding alone leaves in a trace of magnitude ``size`` (the sum of the absolute
    values of the terms added) made of length-``n`` products in ``like``'s dtype ($\epsilon$
    its machine epsilon). Without it an estimate that is exact but for rounding (a low-rank
    Hessian, a sketch spanning everything) would report a stderr of 0 or 1e-31 below its actual
    error.

    Args:
        size: The sum of the absolute values of the terms added.
        n: The vectors' length.
        like: A tensor of the products' dtype.

    Returns:
        The floor.
    """
    return float(torch.finfo(like.dtype).eps * math.sqrt(n) * size)


def _xtrace(apply, n: int, n_hvp: int, gen, like: Tensor) -> TraceResult:
    """XTrace (Epperly, Tropp & Webber 2024), the exchangeable Hutch++.

    The mean over i of the Hutch++-type estimates
    ``tr(P_i H P_i) + w_i^T (I - P_i) H (I - P_i) w_i`` with ``P_i`` the projector onto the
    sketch ``H W`` without its own column ``i`` (so each is unbiased). With ``Y = H W = Q R``
    and ``Z = H Q``, ``P_i = Q Pi_i Q^T`` with ``Pi_i`` the projector onto the columns of ``R``
    but ``i``; every term is then a small ``m x m`` product, and only ``2m`` products are spent.
    ``Pi_i`` comes from an SVD truncated at rounding level, so a rank-deficient sketch (rank
    ``H < m``: the estimate is exact) is handled. The standard error treats the ``m``
    exchangeable estimates as independent (the paper's error estimate).
    """
    m = min(n_hvp // 2, n)
    W = rademacher((m, n), gen, like=like)
    Y = apply(W).to(torch.float64)
    W64 = W.to(torch.float64)
    Q, R = torch.linalg.qr(Y.T)
    Z = apply(Q.T.to(like)).to(torch.float64)
    QZ = Q.T @ Z.T
    QZ = (QZ + QZ.T) / 2
    QW, WZ, WY = Q.T @ W64.T, W64 @ Z.T, (W64 * Y).sum(1)
    samples = torch.empty(m, dtype=torch.float64)
    for i in range(m):
        U, sv, _ = torch.linalg.svd(torch.cat([R[:, :i], R[:, i + 1:]], 1), full_matrices=False)
        U = U[:, sv > sv.max() * m * torch.finfo(torch.float64).eps * 10] if m > 1 else U[:, :0]
        c = U @ (U.T @ QW[:, i])
        samples[i] = (torch.trace(U.T @ QZ @ U) + WY[i] - WZ[i] @ c - c @ R[:, i]
                      + c @ QZ @ c)
    samples = samples.cpu().numpy()
    stderr = max(float(samples.std(ddof=1) / math.sqrt(m)),
                 rounding_stderr(float(np.abs(samples).mean()), n, like))
    return TraceResult(float(samples.mean()), stderr, 2 * m, "xtrace", samples)


def trace_estimate(matmat: MatMat, n: int, n_hvp: int, *, method: str = "hutch++",
                   seed: int = 0, like: Tensor, chunk: int = 8, progress: bool = False
                   ) -> TraceResult:
    """Trace estimate of any symmetric ``matmat`` (module docstring for the estimators).

    Args:
        matmat: The matrix, ``[b, n]`` rows in, rows out.
        n: The dimension.
        n_hvp: Products to spend (Hutch++ spends ``2n`` when ``n <= n_hvp // 3``; XTrace an
            even number).
        method: "hutch++" (Meyer et al. 2021, Alg. 1), "hutchinson" or "xtrace".
        seed: Seed of the Rademacher probes.
        like: A tensor of the vectors' dtype and device.
        chunk: Probes per call of ``matmat``.
        progress: Show a bar over the products (their number is known in advance: the ETA
            holds), moving batch by batch during each pass over the data.

    Returns:
        A :class:`TraceResult`.
    """
    gen = make_generator(seed)
    with tqdm(total=n_hvp, desc=method, disable=not progress, leave=False) as bar:
        apply = lambda rows: _apply(matmat, rows, chunk, bar)  # noqa: E731
        if method == "xtrace":
            return _xtrace(apply, n, n_hvp, gen, like)
        return _hutchpp(apply, n, n_hvp, gen, like, method)


@records_metadata
@guarded
def hessian_trace(model: nn.Module, loss_fn: LossFn, data: Iterable, n_hvp: int = 99,
                  method: str = "hutch++", *, params: ParamSelection = None,
                  model_mode: str = "eval", batch_size_fn: BatchSizeFn | None = None,
                  seed: int = 0, progress: bool = True, chunk: int = 8, hvp_method: str = "reverse",
                  curvature: str = "hessian", preconditioner: Preconditioner = None,
                  check_deterministic: bool = True) -> TraceResult:
    r"""An unbiased estimate of the Hessian trace from ``n_hvp`` Hessian-vector products.

    Hutch++ (Meyer, Musco, Musco & Woodruff 2021, Alg. 1), Hutchinson (1989) or XTrace
    (Epperly, Tropp & Webber 2024) on the operator of ``curvature`` (module docstring). Probes
    are Rademacher vectors drawn from ``seed`` (identical on every rank).

    Args:
        model: The model (restored afterwards).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the batch's mean loss.
        data: An iterable of batches, passed over once per ``chunk`` of probes.
        n_hvp: Products to spend (Hutch++ spends only $2n$ when $n \le$ ``n_hvp // 3``, the
            trace then exact).
        method: "hutch++" (default; needs ``n_hvp >= 4``), "hutchinson" (``n_hvp >= 2``) or
            "xtrace" (``n_hvp >= 4``; uses an even number of products).
        params: The parameters analysed (default all with requires_grad).
        model_mode: ``"eval"`` or ``"train"``, the mode during the products.
        batch_size_fn: Sample count of a batch.
        seed: Seed of the probes.
        progress: Show a bar over the products.
        chunk: Probes per pass over the data (memory ``chunk * n`` per pass).
        hvp_method: ``"reverse"`` or ``"forward"`` (the Hessian only).
        curvature: The matrix estimated, a registered name (as in
            :func:`analysis.top_eigenvalues`).
        preconditioner: A diagonal $P$; the trace is then that of $P^{-1/2} A P^{-1/2}$.
        check_deterministic: First check that two passes over ``data`` agree (two forward
            passes).

    Returns:
        A :class:`TraceResult`.

    Raises:
        ValueError: For an argument out of its range, an unknown ``curvature``, and as the
            curvature's operator (:class:`analysis.CurvatureOperator`).
    """
    check_choice("method", method, TRACE_METHODS)
    n_hvp = check_int("n_hvp", n_hvp, 2 if method == "hutchinson" else 4)
    chunk = check_int("chunk", chunk, 1)
    make_generator(seed)
    op = curvature_operator(curvature, model, loss_fn, data, params=params, model_mode=model_mode,
                            batch_size_fn=batch_size_fn, progress=False, hvp_method=hvp_method,
                            preconditioner=preconditioner)
    with op:
        out = trace_estimate(op.matmat, op.shape[0], n_hvp, method=method, seed=seed,
                             like=op.like, chunk=chunk, progress=progress)
    out.curvature, out.preconditioned = op.curvature, op.preconditioned
    return out
