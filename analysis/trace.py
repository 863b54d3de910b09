r"""Stochastic trace estimates of the Hessian with standard errors from their own probes.

* Hutchinson (1989): $\mathrm{tr}\, H \approx \frac{1}{m} \sum_i z_i^\top H z_i$ with
  Rademacher $z_i$; the standard error is the sample standard deviation (``ddof=1``) of the
  $m$ probe values over $\sqrt{m}$.
* Hutchinson's probes are Rademacher vectors, distinct up to sign (in a few dimensions
  repeats are likely), with the finite-population factor $1 - m/2^{n-1}$ in the variance.
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021, Alg. 1): a third of the budget sketches
  $H S$ ($S$ Gaussian), $Q = \mathrm{orth}(H S)$; a third computes $\mathrm{tr}(Q^\top H Q)$
  exactly; the rest runs Hutchinson on the deflated $(I - QQ^\top) H (I - QQ^\top)$ with
  Gaussian probes projected off $Q$ and normalised to the sphere of the residual space
  (:func:`_sphere_residual`; exact when the deflated matrix is a multiple of the identity). Since
  $\mathrm{tr}\, H = \mathrm{tr}(Q^\top H Q) + \mathrm{tr}((I - QQ^\top) H (I - QQ^\top))$
  for every orthonormal $Q$, the estimate is unbiased given $Q$, and its standard error is that
  of the Hutchinson part (conditional on the sketch): $\sqrt{\bar v / g}$ with $\bar v$ a
  plug-in estimate of one probe value's variance from the Frobenius norm each probe sees
  (:func:`_sphere_variance`), not the sample variance of the $g$ values, which shrinks with the
  estimate on spectra with a few heavy directions. It is exact when
  $\mathrm{rank}\, H \le$ ``n_hvp // 3``.
* XTrace (Epperly, Tropp & Webber 2024): the exchangeable version of Hutch++ (Gaussian
  probes, residuals normalised as in the paper's Sec. 2.3), exact when
  $\mathrm{rank}\, H <$ ``n_hvp // 2``, $O(n m^2 + m^3)$ beyond its $2m$ products; its
  standard error adds a leave-two-out estimate of the covariance of the $m$ leave-one-out
  estimates to a plug-in estimate of their variance, from the Frobenius norm each residual
  probe sees (:func:`_leave_one_out`, :func:`_xtrace_variance`), not the paper's
  $s/\sqrt{m}$, which is too small.
* Whatever the method, when $n \le$ ``n_hvp`` the trace is computed exactly from the $n$ unit
  vectors and only $n$ products are spent (and reported).
* Every stderr is at least the rounding level $\epsilon \sqrt{n}\, (size + \|H\|_2)$
  (:func:`rounding_stderr`): an estimate exact but for rounding reports that, never 0 or 1e-31.
* For a model below float64 (float32, bfloat16, float16), :func:`hessian_trace` also floors
  the stderr by the bias of the low-precision products themselves, measured against a float64
  copy of the model on a few probes (:func:`_precision_floor`, issue 31).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from .core.progress import batch_progress, CountBar
from .core.space import Space

from .core import (BatchSizeFn, check_choice, check_int, guarded, LossFn, make_generator,
                   is_sharded, ParamSelection, rademacher, records_metadata,
                   register_result, select_params, unwrap_compiled)
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


def _distinct_signs(m: int, n: int, gen, like: Tensor, space: Space | None = None) -> Tensor:
    r"""$m$ Rademacher vectors, no two equal up to sign (redrawn from ``gen`` until distinct).

    In a few dimensions the $2^{n-1}$ sign classes ($z$ and $-z$ give the same probe value)
    repeat among a few probes (two probes out of 3 dimensions coincide with probability 1/4),
    and repeated values made a sample variance, hence a stderr, of 0 for an inexact estimate.
    Drawn without repetition, each probe is still uniform (the mean stays unbiased) and the
    variance of the mean is the finite-population one, $(1 - m/N)\, s^2 / m$ with
    $N = 2^{n-1}$ (Cochran 1977, Thm. 2.2; :func:`_hutchpp`). Beyond 64 dimensions a repeat
    has probability below $m^2 2^{-64}$ and the draws are used as they come (``space``'s
    columns of them; below, the few full rows are drawn and sliced).
    """
    space = space or Space(n)
    if n > 64:
        return space.rademacher(m, gen, like=like)
    Z = rademacher((m, n), gen, like=like)
    while True:
        seen, repeats = set(), []
        for i, row in enumerate((Z * Z[:, :1]).tolist()):
            key = tuple(row)
            (repeats.append(i) if key in seen else seen.add(key))
        if not repeats:
            break
        Z[repeats] = rademacher((len(repeats), n), gen, like=like)
    return space.local(Z)


def _sphere_residual(g: int, Q: Tensor, n: int, gen, like: Tensor,
                     space: Space | None = None) -> Tensor:
    r"""$g$ Gaussian probes projected off the sketch and scaled to norm $\sqrt{n - k}$.

    $w = \sqrt{n - k}\, P z / \|P z\|$ with $P = I - Q^\top Q$ of rank $n - k$: uniform on the
    sphere of radius $\sqrt{n - k}$ in the range of $P$, so $E[w w^\top] = P$ and
    $E[w^\top H w] = \mathrm{tr}(P H P)$ (unbiased given the sketch), exact when $P H P = cP$
    (Epperly, Tropp & Webber 2024, Sec. 2.3, sphere normalisation). Projected Rademacher
    probes were neither: on $H = 2I$ in 6 dimensions their values coincided and Hutch++
    returned 14.0 with a stderr of 9e-15 (issue 30).
    """
    space = space or Space(n)
    G = space.randn(g, gen, like=like).to(torch.float64)
    Q64 = Q.to(torch.float64)
    G = G - space.gram(G, Q64) @ Q64
    return (G * math.sqrt(n - len(Q)) / space.norm(G, dim=1)[:, None]).to(like)


def _hutchpp(apply, n: int, n_hvp: int, gen, like: Tensor, method: str,
             space: Space | None = None) -> TraceResult:
    r"""Hutch++ (a zero sketch makes it Hutchinson).

    Hutch++'s sketch $S$ is Gaussian (its range captures that of $H$ when
    $\mathrm{rank}\, H \le k$, almost surely; Rademacher sketches miss it with a probability
    that does not vanish in any dimension) and its residual probes are
    :func:`_sphere_residual`'s. Hutchinson's probes are Rademacher, distinct up to sign
    (:func:`_distinct_signs`), with the finite-population factor $1 - m/N$ in the variance.
    """
    sketch = min(n_hvp // 3, n) if method == "hutch++" else 0
    g = n_hvp - 2 * sketch if sketch < n else 0  # a full sketch makes the trace exact
    space = space or Space(n)
    exact, size, norm, Q = 0.0, 0.0, 0.0, like.new_zeros(0, space.n_local)
    if sketch:
        S = space.randn(sketch, gen, like=like)
        HS = apply(S)
        Q = space.qr(HS.to(torch.float64))[0].to(like)
        parts = space.sum((Q.to(torch.float64) * apply(Q)).sum(1))
        exact, size = float(parts.sum()), float(parts.abs().sum())
        norm = _norm_estimate(HS, S, space)
        G = _sphere_residual(g, Q, n, gen, like, space)
        population = math.inf
    else:
        G = _distinct_signs(g, n, gen, like, space)
        population = 2.0 ** (n - 1) if n <= 64 else math.inf  # 2^(n-1) sign classes
    HG = apply(G)
    samples = space.sum((G.to(torch.float64) * HG).sum(1)).cpu().numpy()
    norm = max(norm, _norm_estimate(HG, G, space))
    floor = rounding_stderr(size + float(np.abs(samples).mean()) if g else size, n, like, norm)
    if g == 0:
        return TraceResult(exact, floor, 2 * sketch, method, samples)
    if sketch:
        variance = _sphere_variance(HG, Q, G, samples, n - len(Q), space) / g
    else:
        variance = float(samples.var(ddof=1)) / g * (1 - g / population)
    return TraceResult(exact + float(samples.mean()), max(math.sqrt(variance), floor),
                       2 * sketch + g, method, samples)


def _sphere_variance(HG: Tensor, Q: Tensor, G: Tensor, samples: np.ndarray, d: int,
                     space: Space) -> float:
    r"""The plug-in variance of one residual sample of Hutch++, $\bar v$.

    For $w$ uniform on the sphere of radius $\sqrt d$ in the range of $P = I - Q^\top Q$
    (rank $d$) and $A = P H P$, $\mathrm{Var}(w^\top A w) = \frac{2d}{d+2} (\|A\|_F^2 -
    (\mathrm{tr}\, A)^2 / d)$; with $q_i = w_i^\top A w_i$ and $E\|A w_i\|^2 = \|A\|_F^2$,
    $v_i = 2 \|A w_i\|^2 - 2 q_i^2 / d$ is unbiased for it and never negative
    ($q_i^2 \le \|w_i\|^2 \|A w_i\|^2$), 0 on $A = cP$: the estimator of
    :func:`_xtrace_variance`'s $v_i$. Unlike the sample variance of the $q_i$ it does not
    shrink with the estimate when a few heavy directions dominate the residual: over 300 seeds
    the SD of z = error / stderr was 1.25-1.41 with the sample variance (a preconditioned GGN,
    an empirical Fisher and 0.5 I + rank 10 at budgets 20-60), 0.93-1.08 with $\bar v$ on
    the seven matrices and three budgets of ``tests/analysis/test_trace_xtrace.py``'s cases.
    $A w_i = P H w_i$ since $P w_i = w_i$: from the products already made. Computed as
    $v_i = 2 \|A w_i - (q_i/d) w_i\|^2$ (equal, as $\|w_i\|^2 = d$), free of the
    cancellation of the difference on $A \approx cP$.
    """
    HG64, Q64 = HG.to(torch.float64), Q.to(torch.float64)
    AG = HG64 - space.gram(HG64, Q64) @ Q64
    R = AG - torch.as_tensor(samples / d, device=AG.device)[:, None] * G.to(torch.float64)
    return float(np.mean(2 * space.sum(R.square().sum(1)).cpu().numpy()))


def rounding_stderr(size: float, n: int, like: Tensor, norm: float = 0.0) -> float:
    r"""The floor of every reported stderr: $\epsilon \sqrt{n}\, (size + \|H\|_2)$.

    Two rounding errors that no number of probes averages away, in ``like``'s dtype
    ($\epsilon$ its machine epsilon): summing terms of total magnitude ``size`` (the sum of
    the absolute values of the terms added) made of length-``n`` inner products, and the
    rounding of each product $H v$ itself, about $\epsilon \|H\|_2 \|v\|$ in norm, so about
    $\epsilon \|H\|_2 \sqrt{n}$ in a probe value $v^\top H v$ with $\|v\| = \sqrt{n}$ (and
    not reduced by averaging: the errors of one operator need not be independent). The second
    dominates where $\lambda_{\max}$ is large next to the trace (a float32 MobileNetV2 with
    $\lambda_{\max} = 2.3 \cdot 10^8$, an indefinite spectrum). Without the floor an estimate
    exact but for rounding (a low-rank Hessian, a sketch spanning everything) would report a
    stderr of 0 or 1e-31 below its actual error.

    Args:
        size: The sum of the absolute values of the terms added.
        n: The vectors' length.
        like: A tensor of the products' dtype.
        norm: An estimate of $\|H\|_2$ (default 0: the summation alone).

    Returns:
        The floor.
    """
    return float(torch.finfo(like.dtype).eps * math.sqrt(n) * (size + norm))


def _leave_one_out(H: Tensor, C: Tensor, R: Tensor, a: Tensor, G: Tensor, w2: Tensor,
                   n: int, M: Tensor) -> tuple[Tensor, Tensor]:
    r"""The $m$ exchangeable estimates $t_i$ and unbiased estimates $v_i$ of their variances.

    The $t_i$ are those of Epperly, Tropp & Webber 2024, Sec. 2.1. In the basis $Q$ of the
    sketch $H W = Q R$: $\hat H = Q^\top H Q$, $c_i = Q^\top w_i$, $a_i = w_i^\top H w_i$
    and $Q^\top H w_i = R e_i$. Leaving column $i$ out of the sketch leaves the projector
    $P_i = Q (I - s_i s_i^\top) Q^\top$, $s_i$ the normalised column $i$ of $G = R^{-\top}$
    (the rank-one downdate of the paper's Alg. 2), so with
    $d_i = c_i - s_i s_i^\top c_i$ ($P_i w_i = Q d_i$):
    $$t_i = \mathrm{tr}\, \hat H - s_i^\top \hat H s_i + q_i, \quad
    q_i = \kappa_i (a_i - 2 e_i^\top R^\top d_i + d_i^\top \hat H d_i),$$
    $q_i = \tilde r_i^\top A_i \tilde r_i$ the residual term: $A_i = (I - P_i) H (I - P_i)$,
    $\tilde r_i = \sqrt{\kappa_i}\, r_i$, $r_i = (I - P_i) w_i$ and
    $\kappa_i = \delta / \|r_i\|^2$, $\|r_i\|^2 = \|w_i\|^2 - \|d_i\|^2$ (``w2`` holds
    $\|w_i\|^2$), $\delta = n - m + 1$: the residual probe normalised to the sphere of radius
    $\sqrt\delta$ in the $\delta$-dimensional range of $I - P_i$ (the paper's Sec. 2.3), which
    keeps $t_i$ unbiased (Gaussian $w_i$, independent of $P_i$) and makes it exact on $H = cI$.

    Given the other columns $W_{-i}$, $\varepsilon_i = t_i - \mathrm{tr}\, H = q_i -
    \mathrm{tr}\, A_i$ is the error of a one-probe sphere estimate of $\mathrm{tr}\, A_i$, of
    variance $\frac{2\delta}{\delta + 2} (\|A_i\|_F^2 - (\mathrm{tr}\, A_i)^2 / \delta)$;
    with $f_i = \|A_i \tilde r_i\|^2$ ($E f_i = \|A_i\|_F^2$) and $E q_i^2 =
    \frac{\delta}{\delta + 2} ((\mathrm{tr}\, A_i)^2 + 2 \|A_i\|_F^2)$ that variance is
    $E[v_i \mid W_{-i}]$ for
    $$v_i = 2 f_i - 2 q_i^2 / \delta \ \ge 0 \quad (q_i^2 \le \delta f_i,
    \text{ Cauchy--Schwarz}).$$
    No extra product: $H r_i = Q u_i - E d_i$ with $u_i = R e_i - \hat H d_i$ and
    $E = (I - QQ^\top) H Q$ (from $Z = (HQ)^\top$), so $(I - P_i) H r_i = Q s_i s_i^\top u_i
    - E d_i$ and $f_i = \kappa_i ((s_i^\top u_i)^2 + d_i^\top M d_i)$, ``M`` $= E^\top E$.
    $O(m^3)$ for all $i$ together. $v_i$ is exact (0) on $H = cI$ and, a function of the
    spectrum of $A_i$ seen through one probe, far less heavy-tailed than the squared deviations
    $(t_i - \bar t)^2$ (:func:`_xtrace_variance`).
    """
    S = G / G.norm(dim=0)
    D = C - S * (S * C).sum(0)
    delta = n - len(R) + 1
    kappa = delta / (w2 - (D * D).sum(0))
    HD = H @ D
    q = kappa * (a - 2 * (R * D).sum(0) + (HD * D).sum(0))
    t = torch.trace(H) - ((H @ S) * S).sum(0) + q
    f = kappa * ((S * (R - HD)).sum(0) ** 2 + ((M @ D) * D).sum(0))
    return t, (2 * f - 2 * q ** 2 / delta).clamp(min=0.0)


def _leave_two_out(H: Tensor, C: Tensor, R: Tensor, a: Tensor, G: Tensor, w2: Tensor,
                   n: int) -> Tensor:
    r"""``t[i, j]``: the estimate of probe $i$ with column $j$ also left out of the sketch.

    The projector left is $Q (I - B K^{-1} B^\top) Q^\top$ with $B = [g_i, g_j]$ (columns of
    $G = R^{-\top}$) and $K = B^\top B$ ($2 \times 2$, inverted in closed form); with
    $\alpha = K^{-1} B^\top c_i$, $d = c_i - B \alpha$ and $B^\top R e_i = (1, 0)$ (as
    $G^\top R = I$), every term is an entry of an $m \times m$ matrix: $O(m^3)$ for all pairs.
    The residual term is normalised as in :func:`_leave_one_out`, to $n - m + 2$ dimensions
    ($\|d\|^2 = \|c_i\|^2 - \alpha^\top B^\top c_i$). The diagonal ($i = j$) is meaningless.
    """
    K, GHG, GC, GHC = G.T @ G, G.T @ H @ G, G.T @ C, G.T @ H @ C
    kii, hii = torch.diagonal(K)[:, None], torch.diagonal(GHG)[:, None]
    kjj, hjj = kii.T, hii.T
    det = (kii * kjj - K ** 2).fill_diagonal_(1.0)
    p, q, r = kjj / det, -K / det, kii / det  # K^{-1} = [[p, q], [q, r]]
    b0, b1 = torch.diagonal(GC)[:, None], GC.T
    al0, al1 = p * b0 + q * b1, q * b0 + r * b1
    dhd = (((H @ C) * C).sum(0)[:, None]
           - 2 * (al0 * torch.diagonal(GHC)[:, None] + al1 * GHC.T)
           + al0 ** 2 * hii + 2 * al0 * al1 * GHG + al1 ** 2 * hjj)
    residual = a[:, None] - 2 * ((R * C).sum(0)[:, None] - al0) + dhd
    d2 = (C * C).sum(0)[:, None] - (al0 * b0 + al1 * b1)
    scale = (n - len(R) + 2) / (w2[:, None] - d2)
    return torch.trace(H) - (p * hii + 2 * q * GHG + r * hjj) + scale * residual


def _xtrace_variance(t: Tensor, t2: Tensor, v: Tensor) -> float:
    r"""An estimate of the variance of $\bar t = \frac{1}{m}\sum_i t_i$.

    For exchangeable $t_i$ with errors $\varepsilon_i = t_i - \mathrm{tr}\, H$:
    $$\mathrm{Var}\, \bar t = \frac{1}{m} \mathrm{Var}\, \varepsilon_i
    + \frac{m - 1}{m} \mathrm{Cov}(\varepsilon_i, \varepsilon_j).$$
    *Variance*: $\bar v = \frac{1}{m} \sum_i v_i$, the plug-in estimates of
    :func:`_leave_one_out` ($E[\varepsilon_i \mid W_{-i}] = 0$, so $\mathrm{Var}\,
    \varepsilon_i = E\, \mathrm{Var}(\varepsilon_i \mid W_{-i}) = E v_i$).
    *Covariance*: each $t_i$ is unbiased given the other columns, so with $\delta_{ij} = t_i -
    t_{i,-j}$ ($t_{i,-j}$ the leave-two-out estimate, a function of $W_{-j}$):
    $\mathrm{Cov}(t_i, t_j) = E[\delta_{ij} \delta_{ji}]$, estimated by
    $\hat c = \frac{1}{m(m-1)} \sum_{i \ne j} \delta_{ij} \delta_{ji}$ and clipped to
    $[0, \bar v]$ (Cauchy--Schwarz: $\mathrm{Cov} \le \mathrm{Var}\, \varepsilon_i$;
    the shared sketch makes it positive):
    $$\widehat{\mathrm{Var}}\, \bar t = \frac{\bar v}{m} + \frac{m - 1}{m}
    \min(\max(\hat c, 0), \bar v).$$
    The paper's $s^2 / m$ (Epperly, Tropp & Webber 2024, Sec. 2.2; $s^2$ the sample variance
    of the $t_i$) treats them as independent and drops the covariance (z-scores with SD
    1.3-1.9 over 300 seeds); $s^2/m$ plus $\hat c$ (unbiased, as $E s^2 = \mathrm{Var}\,
    \varepsilon_i - \mathrm{Cov}$) had z SD 1.29 on a rank-23 empirical Fisher with $m =
    20$: $s^2$ from 20 correlated, skewed values is heavy-tailed and small exactly where the
    estimate is low. With $\bar v$ it is 1.10 there (1.00 and 0.97 on a GGN and a Hessian),
    and the clip at $\bar v$ tames $\hat c$ where $m - 2$ columns miss a direction the $m$
    catch (RMS stderr 2.6 instead of 4.8 times the SD of the estimates on $cI$ plus rank 10
    with $m = 12$; there the stderr errs on the safe side).
    """
    m = len(t)
    d = t[:, None] - t2
    off = ~torch.eye(m, dtype=torch.bool, device=t.device)
    cov = float(torch.where(off, d * d.T, 0).sum()) / (m * (m - 1))
    vbar = float(v.mean())
    return vbar / m + (m - 1) / m * min(max(cov, 0.0), vbar)


def _xtrace(apply, n: int, n_hvp: int, gen, like: Tensor, space: Space | None = None
            ) -> TraceResult:
    r"""XTrace (Epperly, Tropp & Webber 2024, Alg. 2), the exchangeable Hutch++.

    The mean of the $m$ Hutch++-type estimates $t_i = \mathrm{tr}(P_i H P_i) + w_i^\top
    (I - P_i) H (I - P_i) w_i$, $P_i$ the projector onto the sketch $H W$ without its column
    $i$ (so each is unbiased), from $2m$ products and $O(n m^2 + m^3)$ further work
    (:func:`_leave_one_out`); the standard error is :func:`_xtrace_variance`'s. The probes
    $w_i$ are Gaussian: a rank-deficient sketch then captures the range of $H$ (rank $H < m$)
    almost surely and gives the exact $\mathrm{tr}(Q^\top H Q)$. (Rademacher probes did
    not: on $H = \mathrm{diag}(1, 1, 0, \dots, 0)$ with 1000 parameters and 6 products, 46 of
    200 seeds returned 1 with a stderr of 7e-15, all three probes equal up to sign on the
    two coordinates, whose span $H$ leaves invariant.) A sketch numerically rank-deficient
    without an invariant range goes to :func:`_xtrace_degenerate`.
    """
    m, space = min(n_hvp // 2, n), space or Space(n)
    W = space.randn(m, gen, like=like)
    Y = apply(W).to(torch.float64)
    W64 = W.to(torch.float64)
    Q, R = space.qr(Y)  # orthonormal rows: the columns of the paper's Q
    Z = apply(Q.to(like)).to(torch.float64)
    H = space.gram(Q, Z)
    H = (H + H.T) / 2
    C, a = space.gram(Q, W64), space.sum((W64 * Y).sum(1))
    norm = _norm_estimate(Y, W64, space)
    U, sv, _ = torch.linalg.svd(R)
    rank = int((sv > sv[0] * m * torch.finfo(torch.float64).eps * 10).sum())
    if rank < m:
        Ur = U[:, :rank]
        inside = Ur.T @ H @ Ur
        if space.norm(Ur.T @ Z - inside.T @ Ur.T @ Q) <= 1e-8 * space.norm(Z):
            exact = float(torch.trace(inside))
            floor = rounding_stderr(float(torch.diagonal(inside).abs().sum()), n, like, norm)
            return TraceResult(exact, floor, 2 * m, "xtrace", np.full(m, exact))
        return _xtrace_degenerate(H, C, R, a, n, like, norm)
    G = torch.linalg.solve_triangular(R, torch.eye(m, dtype=R.dtype, device=R.device),
                                      upper=True).T
    w2 = space.sum((W64 * W64).sum(1))
    E = Z - H @ Q  # rows of (I - QQ^T) H Q
    t, v = _leave_one_out(H, C, R, a, G, w2, n, space.gram(E, E))
    stderr = math.sqrt(_xtrace_variance(t, _leave_two_out(H, C, R, a, G, w2, n), v))
    samples = t.cpu().numpy()
    floor = rounding_stderr(float(np.abs(samples).mean()), n, like, norm)
    return TraceResult(float(samples.mean()), max(stderr, floor), 2 * m, "xtrace", samples)


def _xtrace_degenerate(H: Tensor, C: Tensor, R: Tensor, a: Tensor, n: int, like: Tensor,
                       norm: float) -> TraceResult:
    """XTrace when the probes themselves are dependent (only for tiny ``n``).

    Each ``P_i`` from an SVD of ``R`` without column ``i``, truncated at rounding level,
    ``O(m^4)``; the standard error is the paper's ``s / sqrt(m)`` (no leave-two-out estimates
    here).
    """
    m = len(R)
    samples = torch.empty(m, dtype=torch.float64)
    for i in range(m):
        U, sv, _ = torch.linalg.svd(torch.cat([R[:, :i], R[:, i + 1:]], 1), full_matrices=False)
        U = U[:, sv > sv.max() * m * torch.finfo(torch.float64).eps * 10] if m > 1 else U[:, :0]
        c = U @ (U.T @ C[:, i])
        samples[i] = (torch.trace(U.T @ H @ U) + a[i] - 2 * c @ R[:, i] + c @ H @ c)
    samples = samples.cpu().numpy()
    stderr = max(float(samples.std(ddof=1) / math.sqrt(m)),
                 rounding_stderr(float(np.abs(samples).mean()), n, like, norm))
    return TraceResult(float(samples.mean()), stderr, 2 * m, "xtrace", samples)


def _norm_estimate(HV: Tensor, V: Tensor, space: Space | None = None) -> float:
    r"""A lower estimate of $\|H\|_2$ from products made anyway: $\max_i \|H v_i\| / \|v_i\|$."""
    if len(V) == 0:
        return 0.0
    space = space or Space(V.shape[1])
    return float((space.norm(HV, dim=1) / space.norm(V.to(HV), dim=1)).max())


def _exact_trace(apply, n: int, like: Tensor, method: str, space: Space | None = None
                 ) -> TraceResult:
    r"""$\sum_i e_i^\top H e_i$ from the $n$ unit vectors, when the budget allows $n$ products.

    No estimator beats it: it is exact and spends at most ``n_hvp``. (Before, Hutch++ sketched
    only ``n_hvp // 3`` of the $n$ directions and estimated the rest from a few Rademacher
    probes, whose values in so few dimensions can coincide: $H = 2I$ in 6 dimensions gave
    10.67 with a sample variance, hence stderr, of 0.)
    """
    diag, norm, space = [], 0.0, space or Space(n)
    for start in range(0, n, 256):
        rows = space.eye(start, min(start + 256, n), like=like)
        HE = apply(rows)
        diag.append(space.sum((rows.to(torch.float64) * HE.to(torch.float64)).sum(1)).cpu())
        norm = max(norm, _norm_estimate(HE, rows, space))
    diag = torch.cat(diag)
    floor = rounding_stderr(float(diag.abs().sum()), n, like, norm)
    return TraceResult(float(diag.sum()), floor, n, method, np.zeros(0))


def trace_estimate(matmat: MatMat, n: int, n_hvp: int, *, method: str = "hutch++",
                   seed: int = 0, like: Tensor, chunk: int = 8, progress: bool = False,
                   space: Space | None = None) -> TraceResult:
    """Trace estimate of any symmetric ``matmat`` (module docstring for the estimators).

    Args:
        matmat: The matrix, ``[b, n]`` rows in, rows out.
        n: The dimension.
        n_hvp: Products to spend (only ``n`` when ``n <= n_hvp``, the trace then exact; XTrace
            an even number).
        method: "hutch++" (Meyer et al. 2021, Alg. 1), "hutchinson" or "xtrace".
        seed: Seed of the Rademacher probes.
        like: A tensor of the vectors' dtype and device.
        chunk: Probes per call of ``matmat``.
        progress: Show a bar over the products (their number is known in advance; the ETA
            at the current rate: :class:`analysis.core.progress.CountBar`), moving batch by
            batch during each pass over the data.
        space: The vector space (:mod:`analysis.core.space`; default full vectors in one
            process); with a sharded one the probes and the rows ``matmat`` takes and returns
            are this rank's ``space.n_local`` columns of the one-process ones (the same
            ``seed`` gives the same estimate).

    Returns:
        A :class:`TraceResult`.
    """
    gen, space = make_generator(seed), space or Space(n)
    with CountBar(min(n_hvp, n), method, disable=not progress) as bar:  # ETA: current rate
        apply = lambda rows: _apply(matmat, rows, chunk, bar)  # noqa: E731
        if n <= n_hvp:
            return _exact_trace(apply, n, like, method, space)
        if method == "xtrace":
            return _xtrace(apply, n, n_hvp, gen, like, space)
        return _hutchpp(apply, n, n_hvp, gen, like, method, space)


@records_metadata
@guarded(sharded=True)
def hessian_trace(model: nn.Module, loss_fn: LossFn, data: Iterable, n_hvp: int = 99,
                  method: str = "hutch++", *, params: ParamSelection = None,
                  model_mode: str = "eval", batch_size_fn: BatchSizeFn | None = None,
                  seed: int = 0, progress: bool = True, chunk: int = 8, hvp_method: str = "reverse",
                  curvature: str = "hessian", preconditioner: Preconditioner = None,
                  check_deterministic: bool = True, fd_richardson: bool = False) -> TraceResult:
    r"""An unbiased estimate of the Hessian trace from ``n_hvp`` Hessian-vector products.

    Hutch++ (Meyer, Musco, Musco & Woodruff 2021, Alg. 1), Hutchinson (1989) or XTrace
    (Epperly, Tropp & Webber 2024) on the operator of ``curvature`` (module docstring). Probes
    are Rademacher vectors drawn from ``seed`` (identical on every rank).

    Args:
        model: The model (restored afterwards).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the batch's mean loss.
        data: An iterable of batches, passed over once per ``chunk`` of probes.
        n_hvp: Products to spend (only $n$ when $n \le$ ``n_hvp``, the trace then exact
            from the unit vectors).
        method: "hutch++" (default; needs ``n_hvp >= 4``), "hutchinson" (``n_hvp >= 2``) or
            "xtrace" (``n_hvp >= 4``; uses an even number of products).
        params: The parameters analysed (default all with requires_grad).
        model_mode: ``"eval"`` or ``"train"``, the mode during the products.
        batch_size_fn: Sample count of a batch.
        seed: Seed of the probes.
        progress: Show a bar over the products.
        chunk: Probes per pass over the data (memory ``chunk * n`` per pass).
        hvp_method: ``"reverse"``, ``"forward"`` or ``"finite_difference"`` (the Hessian
            only; as in :func:`analysis.top_eigenvalues`).
        curvature: The matrix estimated, a registered name (as in
            :func:`analysis.top_eigenvalues`).
        preconditioner: A diagonal $P$; the trace is then that of $P^{-1/2} A P^{-1/2}$.
        check_deterministic: First check that two passes over ``data`` agree (two forward
            passes).
        fd_richardson: With ``hvp_method="finite_difference"``, Richardson-extrapolate each
            product (:mod:`analysis.finite_difference`: a larger step, at most 4 more gradients
            per product); refused with another ``hvp_method``.

    Returns:
        A :class:`TraceResult`. For a model below float64 its stderr is also floored by the
        bias of the low-precision products, from 4 probes recomputed on a float64 copy of the
        model (:func:`_precision_floor`; 4 extra products in each precision), recorded in
        ``metadata["rounding_floor"]``; a float64 model spends no extra product.

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
                            preconditioner=preconditioner, fd_richardson=fd_richardson)
    with op:
        out = trace_estimate(op.matmat, op.shape[0], n_hvp, method=method, seed=seed,
                             like=op.like, chunk=chunk, progress=progress,
                             space=getattr(op, "space", None))  # FSDP2: this rank's shards
        out.curvature, out.preconditioned = op.curvature, op.preconditioned
        out.metadata = op.product_metadata()
        if getattr(op, "dtype", op.like.dtype) != torch.float64:
            setup = dict(curvature=curvature, params=params, model_mode=model_mode,
                         batch_size_fn=batch_size_fn, hvp_method=hvp_method,
                         preconditioner=preconditioner, fd_richardson=fd_richardson)
            floor, record = _precision_floor(op, model, loss_fn, data, setup, seed)
            out.stderr = max(out.stderr, floor)
            out.metadata["rounding_floor"] = record
    return out


_FLOOR_PROBES = 4
_FLOOR_COPY_BYTES = 2**31  # the float64 copy's parameters and buffers, at most


def _cast64(batch):
    """``batch`` with its floating tensors in float64 (recursively in tuples, lists, dicts)."""
    if isinstance(batch, Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cast64(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _cast64(v) for k, v in batch.items()}
    return batch


class _Cast64:
    """An iterable re-yielding ``data``'s batches through :func:`_cast64` on every pass."""

    def __init__(self, data: Iterable):
        self.data = data

    def __iter__(self):
        return (_cast64(batch) for batch in self.data)


def _precision_floor(op, model: nn.Module, loss_fn: LossFn, data: Iterable, setup: dict,
                     seed: int) -> tuple[float, dict]:
    r"""A floor on the stderr for the bias of low-precision products (issue 31).

    The products of a float32 (or lower) model are those of $H + E$, $E$ the rounding error
    of the operator, and every estimator of :func:`trace_estimate` (the exact path included)
    then estimates $\mathrm{tr}\, H + \mathrm{tr}\, E$: $\mathrm{tr}\, E$ is a bias no
    number of probes averages away, and :func:`rounding_stderr`, a bound on the products'
    error in norm, need not cover it (a float32 MobileNet-like block: diagonal errors of mean
    $-0.041$ over 316 parameters, 92 stderrs off). With $k$ = ``_FLOOR_PROBES`` Rademacher
    probes $z_i$ (drawn from ``seed``'s generator) and $d_i = z_i^\top (H_{32} - H_{64})
    z_i$, products of the model and of a float64 deep copy of it (``data``'s floating tensors
    cast; the user's model untouched): $E[d_i] = \mathrm{tr}\, E$ (Hutchinson 1989) and
    $E[d_i^2] = (\mathrm{tr}\, E)^2 + \mathrm{Var}\, d_i \ge (\mathrm{tr}\, E)^2$, so
    the floor is the root mean square $\sqrt{\frac{1}{k} \sum_i d_i^2}$, an estimate of an
    upper bound on $|\mathrm{tr}\, E|$. It costs $k$ products in each precision.

    Returns:
        The floor (0 when skipped) and its record for ``metadata["rounding_floor"]``:
        method, probes, products in each precision, the floor, or a note why it was skipped
        (a preconditioner, a copy over ``_FLOOR_COPY_BYTES``, or a copy that cannot be made:
        :func:`rounding_stderr` alone then).
    """
    record = {"method": "float64 copy: rms of Rademacher z^T (H_low - H_64) z",
              "probes": _FLOOR_PROBES}
    if setup["preconditioner"] is not None:
        return 0.0, {**record, "skipped": "a preconditioner cannot be mapped to a float64 copy"}
    if is_sharded(unwrap_compiled(model)):
        return 0.0, {**record, "skipped": "a sharded (FSDP2) model is not copied"}
    size = 8 * sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    if size > _FLOOR_COPY_BYTES:
        return 0.0, {**record, "skipped": f"a float64 copy would take {size / 2**30:.1f} GiB "
                                          f"(limit {_FLOOR_COPY_BYTES / 2**30:.0f} GiB)"}
    Z = rademacher((_FLOOR_PROBES, op.shape[0]), make_generator(seed), like=op.like)
    try:
        names = select_params(model, setup.pop("params"))[0]
        double = copy.deepcopy(model).double()
        op64 = curvature_operator(setup.pop("curvature"), double, loss_fn, _Cast64(data),
                                  params=names, progress=False, **setup)
        with op64:
            Z64 = Z.to(op64.like)
            high = (Z64 * op64.matmat(Z64).to(torch.float64)).sum(1)
    except Exception as error:  # noqa: BLE001 - recorded; the rounding floor stands
        return 0.0, {**record, "skipped": f"no float64 copy: {error!r}"}
    low = (Z.to(torch.float64) * op.matmat(Z).to(torch.float64)).sum(1)
    d = (low - high.to(low)).cpu()
    floor = float(d.square().mean().sqrt())
    return floor, {**record, "float64_products": _FLOOR_PROBES,
                   "low_precision_products": _FLOOR_PROBES, "floor": floor,
                   "mean_difference": float(d.mean())}
