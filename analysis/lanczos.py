r"""Extreme Hessian eigenpairs: block Lanczos with full reorthogonalisation and thick restart.

The solver keeps an orthonormal basis $V$ (rows) of the Krylov space
$\mathcal{K}_m(H, Q_0) = \mathrm{span}\{Q_0, H Q_0, \dots, H^{m-1} Q_0\}$ and the projected
matrix $T = V H V^\top$; new blocks are orthogonalised against all of ``V`` by classical
Gram-Schmidt, with a second pass when the first removed more than ``1 - DGKS`` of the norm
(Daniel, Gragg, Kaufman & Stewart 1976, the criterion of ARPACK's ``dsaitr``; "twice is enough",
Giraud et al. 2005), so ``T`` is the block-tridiagonal Lanczos matrix up to rounding (Golub & Van
Loan, Alg. 10.3.1 with full reorthogonalisation). When the basis is
full it is thick-restarted (Wu & Simon 2000, Sec. 3) with the Ritz vectors at the wanted end.
A Ritz pair $(\theta, u = V^\top y)$ has residual $\|H u - \theta u\| = \|B y_{last}\|$,
with $B$ the coefficients of the next block and $y_{last}$ the last block of $y$ (Saad 2011,
Prop. 6.8); the pair is converged when that residual is at most $tol \cdot |\theta|$.

``method="power"`` is PyHessian's deflated power iteration, kept for comparison.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .core import (all_finite, BatchSizeFn, check_choice, check_device, check_dtype, check_int,
                   check_positive, guarded, LossFn, make_generator, ParamSelection, product_eps,
                   randn, records_metadata, register_result)
from .core.progress import ConvergenceBar, batch_progress, gap
from .curvature import curvature_operator
from .preconditioning import Preconditioner

WHICH = ("LA", "SA", "LM")
METHODS = ("lanczos", "power")
BASIS_DTYPES = (torch.float64, torch.float32)
MatMat = Callable[[Tensor], Tensor]
BASIS_BYTES = 2 ** 32  # default cap of the Lanczos basis (4 GiB: 8 vectors of GPT-2 small)
DGKS = 2 ** -0.5  # a second Gram-Schmidt pass when one pass leaves less than this part of the norm


@register_result
@dataclass
class EigenResult:
    r"""Extreme eigenpairs of a curvature matrix ($P^{-1/2} A P^{-1/2}$ when preconditioned).

    Attributes:
        eigenvalues: numpy, ordered by ``which``: descending for "LA", ascending for "SA",
            descending magnitude for "LM".
        eigenvectors: torch tensor ``[k, n]`` of unit rows, flat over the selected parameters
            in ``names`` order (``analysis.core.unflatten(row, params)`` gives per-parameter
            tensors).
        residuals: numpy, $\|A u - \theta u\|$ per pair (Ritz estimate for Lanczos,
            measured for the power method).
        n_hvp: Products spent.
        converged: Whether all ``k`` pairs met the tolerance.
        names: The selected parameters' names.
        curvature: The registered name of the matrix (``curvature=``).
        preconditioned: Whether it is $P^{-1/2} A P^{-1/2}$.
        metadata: Seed, configuration and versions (:func:`analysis.core.make_metadata`).
    """
    eigenvalues: np.ndarray
    eigenvectors: Tensor
    residuals: np.ndarray
    n_hvp: int
    converged: bool
    names: list[str]
    curvature: str = "hessian"
    preconditioned: bool = False
    metadata: dict = field(default_factory=dict)


def _wanted(theta: Tensor, count: int, which: str) -> Tensor:
    """Indices of the ``count`` Ritz values at the wanted end, in output order."""
    if which == "LA":
        return torch.argsort(theta, descending=True)[:count]
    if which == "SA":
        return torch.argsort(theta)[:count]
    return torch.argsort(theta.abs(), descending=True)[:count]


def _project_out(w: Tensor, basis: "Basis", m: int) -> Tensor:
    """Subtract from ``w`` (in place) its components on the first ``m`` rows of ``basis``.

    Classical Gram-Schmidt (all coefficients from the same ``w``); the basis may be in another
    dtype or on another device; returns the coefficients in ``w``'s dtype and device. With the
    basis beside ``w``, no vector-sized temporary is made.
    """
    parts = basis.rows(m)
    if not parts:
        return w.new_zeros(0)
    if parts[0].dtype != w.dtype or parts[0].device != w.device:
        x = w.to(parts[0])
        hs = [part @ x for part in parts]
        for part, h in zip(parts, hs):
            w -= (part.T @ h).to(w)
        return torch.cat(hs).to(w)
    hs = [part @ w for part in parts]
    for part, h in zip(parts, hs):
        w.addmv_(part.T, h, alpha=-1)
    return torch.cat(hs)


class Basis:
    """The Lanczos basis: ``capacity`` rows of length ``n``, stored as a head and a tail.

    The ``head`` wanted Ritz vectors can then be formed in place (:meth:`rotate_`) and returned
    after the tail is freed (:meth:`release`): the eigenvectors cost no memory beyond the basis.

    Args:
        capacity: Rows.
        n: Row length.
        head: Rows of the head (at most ``capacity``).
        dtype: The rows' dtype.
        device: The rows' device.
    """

    def __init__(self, capacity: int, n: int, *, head: int, dtype: torch.dtype,
                 device: torch.device | str):
        head = min(head, capacity)
        self.parts = [torch.empty(rows, n, dtype=dtype, device=device)
                      for rows in (head, capacity - head) if rows]
        self.dtype, self.device = dtype, device

    def rows(self, m: int) -> list[Tensor]:
        """Views of rows ``[0, m)``.

        Args:
            m: Number of leading rows.

        Returns:
            One view per part they touch.
        """
        out, left = [], m
        for part in self.parts:
            if left <= 0:
                break
            out.append(part[:left])
            left -= len(part)
        return out

    def _spans(self, start: int, stop: int):
        """``(part, rows in it, rows of the range)`` per part that rows ``[start, stop)`` touch."""
        offset = 0
        for part in self.parts:
            lo, hi = max(start, offset), min(stop, offset + len(part))
            if lo < hi:
                yield part, slice(lo - offset, hi - offset), slice(lo - start, hi - start)
            offset += len(part)

    def put(self, start: int, block: Tensor) -> None:
        """Write ``block`` into rows ``[start, start + len(block))``.

        Args:
            start: First row.
            block: ``[b, n]`` rows.
        """
        for part, rows, src in self._spans(start, start + len(block)):
            part[rows] = block[src]

    def get(self, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)``: a view when they lie in one part, else a copy.

        Args:
            start: First row.
            stop: One past the last row.

        Returns:
            ``[stop - start, n]``.
        """
        pieces = [part[rows] for part, rows, _ in self._spans(start, stop)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def rotate_(self, Y: Tensor, m: int) -> None:
        r"""Rows ``[0, r)`` become $Y^\top V_{:m}$ in place.

        One block of columns at a time, so the only temporary is ``r x n / (8 r)`` elements: an
        eighth of a row of ``V``.

        Args:
            Y: ``[m, r]``, ``r <= m`` (at most the head).
            m: Rows of ``V`` combined.
        """
        r, n = Y.shape[1], self.parts[0].shape[1]
        Yt, parts = Y.T.to(self.dtype).to(self.device), self.rows(m)
        bounds = torch.tensor([0] + [len(p) for p in parts]).cumsum(0).tolist()
        step = max(1, -(-n // (8 * r)))
        for start in range(0, n, step):
            cols = slice(start, start + step)
            new = Yt[:, :bounds[1]] @ parts[0][:, cols]
            for i in range(1, len(parts)):
                new.addmm_(Yt[:, bounds[i]:bounds[i + 1]], parts[i][:, cols])
            for part, rows, src in self._spans(0, r):
                part[rows, cols] = new[src]

    def release(self, r: int) -> Tensor:
        """Rows ``[0, r)``, after freeing every other row.

        Args:
            r: Rows kept, at most the head.

        Returns:
            ``[r, n]``.
        """
        head = self.parts[0]
        self.parts = []
        return head if r == len(head) else head[:r].clone()


def _orthogonalise(block: Tensor, basis: Basis, m: int,
                   gen: torch.Generator) -> tuple[Tensor, Tensor]:
    r"""Orthonormalise the rows of ``block`` against the first ``m`` rows of ``basis``, each other.

    Returns ``(Q, C)`` with ``block^T = basis^T C[:m] + Q^T C[m:]`` (``Q`` is ``block``,
    overwritten in place): ``C[:m]`` are the
    coefficients on the ``m`` basis rows, ``C[m:]`` is upper triangular. A row that vanishes
    (an invariant subspace was found) is replaced by a random unit vector orthogonal to
    everything, keeping its (tiny) coefficient. "Vanishes": at most $\sqrt{\epsilon}$ of its
    norm is left, so at least half its digits were lost to cancellation and its direction is
    known to $\epsilon / ratio$ only.
    """
    b = block.shape[0]
    coef = torch.zeros(m + b, b, dtype=block.dtype, device=block.device)
    out = block
    for i in range(b):
        w = out[i]
        before = norm = torch.linalg.vector_norm(w)
        for _ in range(2):  # twice is enough (Giraud et al. 2005)
            coef[:m, i] += _project_out(w, basis, m)
            g = out[:i] @ w
            w.addmv_(out[:i].T, g, alpha=-1)
            coef[m:m + i, i] += g
            norm, previous = torch.linalg.vector_norm(w), norm
            if norm > DGKS * previous:  # little was removed: one pass is orthogonal to rounding
                break
        coef[m + i, i] = norm
        if norm <= math.sqrt(torch.finfo(w.dtype).eps) * before or norm == 0:
            out[i] = randn(w.shape, gen, like=w)
            for _ in range(2):
                _project_out(w, basis, m)
                w.addmv_(out[:i].T, out[:i] @ w, alpha=-1)
            norm = torch.linalg.vector_norm(w)
        w /= norm
    return out, coef


def _start_block(v0: Tensor | None, n: int, b: int, gen: torch.Generator, like: Tensor) -> Tensor:
    """Rows of ``v0`` folded onto ``b`` rows (row i added to row i mod b), random otherwise."""
    block = randn((b, n), gen, like=like)
    if v0 is not None:
        if not isinstance(v0, Tensor):
            raise ValueError(f"v0 must be a tensor of shape [n] or [r, n], got {type(v0).__name__}")
        v0 = v0 if v0.dim() == 2 else v0.reshape(1, -1)
        if v0.shape[1] != n:
            raise ValueError(f"v0 must have {n} columns (the number of selected parameter "
                             f"elements), got shape {tuple(v0.shape)}")
        if not all_finite(v0):
            raise ValueError("v0 must be finite (it holds NaN or inf)")
        folded = torch.zeros_like(block)
        folded.index_add_(0, torch.arange(len(v0), device=like.device) % b, v0.to(like))
        given = torch.linalg.vector_norm(folded, dim=1) > 0
        block[given] = folded[given]
    return block


class Krylov:
    r"""An orthonormal basis $V$ (rows, at most ``capacity``) and $T = V H V^\top$.

    Extended a block at a time with full reorthogonalisation (Golub & Van Loan, Alg. 10.3.1).
    The blocks are in ``like``'s dtype and on its device; ``V`` may be kept in another
    (``basis_dtype``, ``basis_device``). The pending block ``Q`` (orthonormal to ``V``, not yet
    multiplied) is held here, so that no copy of it outlives its move into ``V``; ``head`` rows
    of ``V`` can be returned as vectors (:meth:`vectors`) without a second copy.

    Args:
        capacity: Rows of the basis.
        n: The dimension.
        like: A tensor of the blocks' dtype and device.
        gen: The generator of restarts after a breakdown.
        head: Rows that :meth:`vectors` may return.
        basis_dtype: Dtype of ``V`` (default ``like``'s).
        basis_device: Device of ``V`` (default ``like``'s).
    """

    def __init__(self, capacity: int, n: int, like: Tensor, gen: torch.Generator, *,
                 head: int = 0, basis_dtype: torch.dtype | None = None,
                 basis_device: torch.device | str | None = None):
        self.V = Basis(capacity, n, head=head, dtype=basis_dtype or like.dtype,
                       device=basis_device or like.device)
        self.T = torch.zeros(capacity, capacity, dtype=torch.float64, device=like.device)
        self.m, self.n_hvp, self.gen, self.like = 0, 0, gen, like
        self.Q: Tensor | None = None

    def start(self, block: Tensor) -> None:
        """Orthonormalise ``block`` into the first pending block.

        Args:
            block: ``[b, n]`` start vectors.
        """
        self.Q = _orthogonalise(block, self.V, 0, self.gen)[0]

    def extend(self, matmat: MatMat, count: int | None = None) -> Tensor:
        r"""Append (up to ``count`` rows of) the pending block $Q$ and make the next one $Q_n$.

        Args:
            matmat: The matrix, rows in and rows out.
            count: Rows of $Q$ appended (default all).

        Returns:
            $B$, the coefficients of $Q_n$: $H V^\top = V^\top T + Q_n^\top B E_{last}^\top$.
        """
        m, Q = self.m, self.Q[:count]
        b = Q.shape[0]
        self.V.put(m, Q)
        self.Q = Q = None  # its only copy is now in V
        block = self.V.get(m, m + b)
        Z = matmat(block if block.dtype == self.like.dtype and block.device == self.like.device
                   else block.to(self.like))
        del block
        self.n_hvp += b
        self.Q, coef = _orthogonalise(Z, self.V, m + b, self.gen)
        block = coef[:m + b].to(torch.float64)
        self.T[:m + b, m:m + b] = block
        self.T[m:m + b, :m + b] = block.T
        self.m = m + b
        return coef[m + b:].to(torch.float64)

    def ritz(self) -> tuple[Tensor, Tensor]:
        """The Ritz pairs of the current basis.

        Returns:
            The Ritz values (ascending) and the coordinates ``Y`` of the Ritz vectors in ``V``.
        """
        T = self.T[:self.m, :self.m]
        return torch.linalg.eigh((T + T.T) / 2)

    def restart(self, theta: Tensor, Y: Tensor, keep: Tensor) -> None:
        """Thick restart (Wu & Simon 2000): keep the Ritz vectors ``keep``, built in place in V.

        The next block's coupling to them is recomputed by projection when it is appended.

        Args:
            theta: Ritz values.
            Y: Their coordinates in ``V``.
            keep: Indices of the Ritz pairs kept.
        """
        self.V.rotate_(Y[:, keep], self.m)
        self.T.zero_()
        self.T[:len(keep), :len(keep)] = torch.diag(theta[keep])
        self.m = len(keep)

    def vectors(self, Y: Tensor) -> Tensor:
        r"""The Ritz vectors $Y^\top V$, formed in place in ``V``, which is then freed.

        The Krylov space cannot be extended afterwards.

        Args:
            Y: ``[m, r]`` coordinates, ``r`` at most ``head``.

        Returns:
            ``[r, n]`` in ``like``'s dtype and device.
        """
        self.Q = None
        self.V.rotate_(Y, self.m)
        return self.V.release(Y.shape[1]).to(self.like)


def default_max_basis(n: int, k: int, block_size: int, dtype: torch.dtype) -> int:
    """The default ``max_basis``: ``max(30, 3k + 2b)`` rows, fewer past ``BASIS_BYTES``.

    Args:
        n: Row length.
        k: Wanted eigenpairs.
        block_size: Block size ``b``.
        dtype: The basis dtype.

    Returns:
        ``max(30, 3k + 2b)`` rows of ``n`` elements of ``dtype``, fewer when they would take
        more than ``BASIS_BYTES``, but at least ``k + 2b``.
    """
    item = torch.finfo(dtype).bits // 8
    return max(k + 2 * block_size,
               min(max(30, 3 * k + 2 * block_size), BASIS_BYTES // (n * item)))


def lanczos(matmat: MatMat, n: int, k: int, *, which: str = "LA", tol: float = 1e-6,
            max_hvp: int | None = None, block_size: int = 1, max_basis: int | None = None,
            v0: Tensor | None = None, seed: int = 0, like: Tensor, progress: bool = False,
            basis_dtype: torch.dtype | None = None, basis_device: torch.device | str | None = None,
            product_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor, int, bool]:
    r"""Block Lanczos with full reorthogonalisation and thick restart on any symmetric ``matmat``.

    The Krylov recurrence $H V_m^\top = V_m^\top T_m + Q_{m+1}^\top B_m E_m^\top$ (Golub & Van
    Loan, Alg. 10.3.1; module docstring), restarted with the wanted Ritz vectors when the basis
    is full (Wu & Simon 2000). Convergence: residual
    $\le \max(\max(tol, 50\epsilon) |\theta|, 50\epsilon \max|\theta|)$ for all ``k``
    wanted pairs, with ``eps`` the machine epsilon of ``like`` (float32 stops near its
    attainable accuracy; eigenvalues near zero are resolved to rounding level relative to the
    largest Ritz value), or an exhausted basis (``n`` vectors: the Ritz pairs are exact).
    With ``basis_dtype`` coarser than ``like``'s, ``eps`` is that of ``basis_dtype``.

    Args:
        matmat: The matrix, ``[b, n]`` rows in, new rows out (the input rows are overwritten).
        n: The dimension.
        k: Wanted eigenpairs.
        which: ``"LA"``, ``"SA"`` or ``"LM"`` (as :func:`top_eigenvalues`).
        tol: Relative residual tolerance.
        max_hvp: Budget of products (default ``max(300, 50 k)``).
        block_size: Vectors per block.
        max_basis: Basis rows before a thick restart (default :func:`default_max_basis`).
        v0: Start vectors, ``[n]`` or ``[r, n]`` (folded onto the block), random otherwise.
        seed: Seed of the random start and of restarts after a breakdown.
        like: A tensor of the vectors' dtype and device.
        progress: Show a bar over the products whose total is those predicted to convergence
            (at most ``max_hvp``; :class:`analysis.core.progress.ConvergenceBar`), with the
            restarts so far.
        basis_dtype: Dtype of the basis (default ``like``'s).
        basis_device: Device of the basis (default ``like``'s).
        product_dtype: The dtype ``matmat`` computes in, when it is coarser than ``like``'s
            (bfloat16/float16 models; ``like`` is then float32). Its products are accurate to
            about ``eps = finfo(product_dtype).eps`` relative, below which the Ritz estimates
            (exact for exact products) mean nothing: the iteration stops once they reach
            ``eps max|theta|``, the residuals of the wanted pairs are measured by ``k`` more
            products, and ``converged`` is judged on those; a ``tol`` they cannot meet gives
            ``converged=False`` and a warning naming the dtype.

    Returns:
        ``(theta, U, residuals, n_hvp, converged)``: the ``k`` Ritz values in ``which`` order,
        their unit vectors ``[k, n]``, residual norms, products spent, and whether all ``k``
        met the tolerance.

    Raises:
        ValueError: When ``max_basis`` is below ``k + block_size`` (and below ``n``), or for a
            bad ``v0``.
    """
    b = min(block_size, n)
    if max_basis is None:
        max_basis = default_max_basis(n, k, b, basis_dtype or like.dtype)
    m_max = min(n, max_basis)
    if m_max < k + b and m_max < n:
        raise ValueError(f"max_basis must be >= k + block_size = {k + b}, got {m_max}")
    budget = max_hvp if max_hvp is not None else max(300, 50 * k)
    eps = max(torch.finfo(like.dtype).eps, torch.finfo(basis_dtype or like.dtype).eps)
    rel = max(tol, 50 * eps)
    gen = make_generator(seed)
    K = Krylov(m_max, n, like, gen, head=k, basis_dtype=basis_dtype, basis_device=basis_device)
    K.start(_start_block(v0, n, b, gen, like))
    bar = ConvergenceBar(budget, "lanczos", disable=not progress)
    try:
        while True:
            with batch_progress(lambda fraction: bar.advance(fraction * b)):  # during a pass
                B = K.extend(matmat, m_max - K.m)
            theta, Y = K.ritz()
            resid = torch.linalg.vector_norm(B @ Y[K.m - B.shape[0]:], dim=0)
            if K.m == n:
                resid.zero_()
            pick = _wanted(theta, k, which)
            floor = 50 * eps * theta.abs().max()
            noise = product_eps(product_dtype) * theta.abs().max() if product_dtype else 0.0
            bound = torch.clamp(rel * theta[pick].abs(), min=max(floor, noise))
            ok = resid[pick] <= bound
            bar.update(K.n_hvp, gap(resid[pick], bound), theta=f"{theta[pick[0]].item():.6g}")
            if bool(ok.all()) or K.m == n or K.n_hvp + b > budget:
                break
            if K.m + b > m_max:  # thick restart with the Ritz vectors at the wanted end
                K.restart(theta, Y, _wanted(theta, min(K.m - b, max(k, (m_max + k) // 2)), which))
                bar.restarts += 1
    finally:
        bar.close()
    U = K.vectors(Y[:, pick])
    if not product_dtype or not product_eps(product_dtype):
        return theta[pick], U, resid[pick], K.n_hvp, bool(ok.all()) or K.m == n
    measured = torch.linalg.vector_norm(matmat(U).to(U) - theta[pick].to(U)[:, None] * U,
                                        dim=1).to(torch.float64)
    ok = measured <= torch.clamp(rel * theta[pick].abs(), min=floor)
    if not bool(ok.all()):
        worst = float((measured / theta[pick].abs().clamp_min(floor)).max())
        warnings.warn(f"Lanczos on {product_dtype} Hessian-vector products: the measured residuals"
                      f" reach {worst:.2g} relative to the eigenvalues, above tol={tol:g}; "
                      f"{product_dtype} products are accurate to about "
                      f"{product_eps(product_dtype):.1g}, so converged=False. Pass a tol above "
                      "the measured residual, or analyse a float32 copy of the model",
                      RuntimeWarning, stacklevel=3)
    return theta[pick], U, measured, K.n_hvp + len(U), bool(ok.all())


def power_iteration(matmat: MatMat, n: int, k: int, *, tol: float = 1e-3, max_iter: int = 100,
                    max_hvp: int | None = None, v0: Tensor | None = None, seed: int = 0,
                    like: Tensor, progress: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor, int, bool]:
    r"""PyHessian's deflated power iteration (Yao et al. 2020), kept for comparison.

    Per eigenpair, power iteration $v \leftarrow H v / \|H v\|$ on the iterate projected off the
    pairs found so far, stopped when the Rayleigh quotient changes by less than ``tol``
    relative ($|l_t - l_{t-1}| / (|l_{t-1}| + 10^{-6})$) or after ``max_iter`` products.
    Converges to the largest-magnitude eigenvalues.

    Args:
        matmat: The matrix, rows in and rows out.
        n: The dimension.
        k: Wanted eigenpairs.
        tol: Relative change of the Rayleigh quotient that stops a pair.
        max_iter: Products per pair at most.
        max_hvp: Budget of products over all pairs (default ``k * max_iter``).
        v0: Start vectors, ``[n]`` or ``[r, n]``, random otherwise.
        seed: Seed of the random start.
        like: A tensor of the vectors' dtype and device.
        progress: Show a bar over the pairs.

    Returns:
        ``(theta, U, residuals, n_hvp, converged)`` as :func:`lanczos`, by descending
        magnitude.

    Raises:
        ValueError: When ``max_hvp`` leaves no product for some pair.
    """
    gen = make_generator(seed)
    start = _start_block(v0, n, k, gen, like)
    vecs, vals, res = [], [], []
    n_hvp, all_ok = 0, True
    budget = max_hvp if max_hvp is not None else k * max_iter
    for i in tqdm(range(k), desc="power iteration", disable=not progress, leave=False):
        found = torch.stack(vecs) if vecs else start[:0]
        v, lam, ok = start[i], None, False
        for _ in range(max_iter):
            if n_hvp >= budget - (k - 1 - i):  # keep one product for each pair still to find
                break
            v = v - found.T @ (found @ v)
            v = v / torch.linalg.vector_norm(v)
            hv = matmat(v.unsqueeze(0))[0]
            n_hvp += 1
            new = torch.dot(v, hv).item()
            r = torch.linalg.vector_norm(hv - new * v).item()
            ok = lam is not None and abs(new - lam) / (abs(lam) + 1e-6) < tol
            lam = new
            if ok:
                break
            v = hv / torch.linalg.vector_norm(hv)
        if lam is None:
            break
        vecs.append(v)
        vals.append(lam)
        res.append(r)
        all_ok = all_ok and ok
    if len(vals) < k:
        raise ValueError(f"max_hvp={max_hvp} is too small for k={k} with the power method")
    theta = torch.tensor(vals, dtype=torch.float64)
    order = _wanted(theta, k, "LM")
    residuals = torch.tensor(res, dtype=torch.float64)[order]
    return theta[order], torch.stack(vecs)[order], residuals, n_hvp, all_ok


@records_metadata
@guarded
def top_eigenvalues(model: nn.Module, loss_fn: LossFn, data: Iterable, k: int = 1,
                    which: str = "LA", tol: float = 1e-6, max_hvp: int | None = None, *,
                    params: ParamSelection = None, model_mode: str = "eval",
                    batch_size_fn: BatchSizeFn | None = None, seed: int = 0, progress: bool = True,
                    v0: Tensor | None = None, method: str = "lanczos", block_size: int = 1,
                    max_basis: int | None = None, hvp_method: str = "reverse",
                    curvature: str = "hessian", preconditioner: Preconditioner = None,
                    basis_dtype: torch.dtype | None = None,
                    basis_device: torch.device | str | None = None,
                    check_deterministic: bool = True) -> EigenResult:
    r"""The ``k`` extreme eigenpairs of the Hessian (or another curvature) of the mean loss.

    Block Lanczos with full reorthogonalisation and thick restart (module docstring; Golub &
    Van Loan, Alg. 10.3.1; Wu & Simon 2000) on the operator of ``curvature``. The
    ``eigenvectors`` of the result are a ``[k, n]`` tensor of unit rows, flat over the selected
    parameters in ``.names`` order (``analysis.core.unflatten`` splits a row per parameter), on
    the model's device, in its dtype (float32 for bfloat16/float16 models, whose basis is kept
    in float32; their residuals are measured, see :func:`lanczos`).

    Args:
        model: The model (restored afterwards).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the batch's mean loss.
        data: An iterable of batches, passed over once per product (block).
        k: Eigenpairs wanted, from 1 to ``n``.
        which: "LA" (largest algebraic), "SA" (smallest algebraic: negative curvature) or "LM"
            (largest magnitude).
        tol: Lanczos stops when every wanted Ritz pair has
            $\|H u - \theta u\| \le tol\, |\theta|$; for ``method="power"`` it is
            PyHessian's relative-change tolerance instead.
        max_hvp: Budget of products (default ``max(300, 50 k)`` for Lanczos, ``100 k`` for the
            power method); at least ``k`` (Lanczos: ``k`` rounded up to whole blocks);
            ``converged`` says whether the tolerance was met.
        params: The parameters analysed (default all with requires_grad).
        model_mode: ``"eval"`` or ``"train"``, the mode during the products.
        batch_size_fn: Sample count of a batch.
        seed: Seed of the random start.
        progress: Show a bar over the products.
        v0: Warm start, ``[n]`` or ``[r, n]`` (e.g. the last result's ``eigenvectors``).
        method: "lanczos" or "power" (PyHessian's deflated power iteration; "LA"/"LM" only,
            both meaning largest magnitude there).
        block_size: Vectors per Lanczos block; a block of size ``b`` resolves eigenvalues of
            multiplicity up to ``b`` (single-vector Krylov spaces see one copy of a repeated
            eigenvalue) and shares each forward pass among ``b`` products.
        max_basis: Basis size before a thick restart (default ``max(30, 3k + 2 block_size)``
            vectors, fewer when they would take more than ``BASIS_BYTES``, but at least
            ``k + 2 block_size``); the memory is ``max_basis * n`` elements.
        hvp_method: ``"reverse"`` or ``"forward"`` (:class:`analysis.HessianOperator`; the
            Hessian only).
        curvature: A registered name: "hessian", "ggn", "fisher" (exact), "empirical_fisher"
            (:mod:`analysis.curvature`) or one added by :func:`analysis.register_curvature`.
        preconditioner: A diagonal $P$; the eigenpairs are then those of
            $P^{-1/2} A P^{-1/2}$ (:mod:`analysis.preconditioning`).
        basis_dtype: Dtype of the Lanczos basis (default the model's), e.g.
            ``torch.float32`` for a float64 model (eigenvalues then to float32 accuracy, see
            :func:`lanczos`).
        basis_device: Device of the Lanczos basis (default the model's), e.g. ``"cpu"`` for a
            model on a GPU.
        check_deterministic: First check that two passes over ``data`` agree (two forward
            passes; ``analysis.core.guards``).

    Returns:
        An :class:`EigenResult`.

    Raises:
        ValueError: For an argument out of its range, ``which="SA"`` with the power method, an
            unknown ``curvature``, and as the curvature's operator
            (:class:`analysis.CurvatureOperator`).
    """
    k = check_int("k", k, 1)
    basis_dtype = check_dtype("basis_dtype", basis_dtype, BASIS_DTYPES)
    basis_device = check_device("basis_device", basis_device)
    check_choice("which", which, WHICH)
    check_choice("method", method, METHODS)
    if method == "power" and which == "SA":
        raise ValueError('method="power" finds largest-magnitude eigenvalues; which="SA" '
                         'needs method="lanczos"')
    tol = check_positive("tol", tol)
    block_size = check_int("block_size", block_size, 1)
    if max_basis is not None:
        max_basis = check_int("max_basis", max_basis, 1)
    seed = make_generator(seed).initial_seed()
    op = curvature_operator(curvature, model, loss_fn, data, params=params, model_mode=model_mode,
                            batch_size_fn=batch_size_fn, progress=False, hvp_method=hvp_method,
                            preconditioner=preconditioner)
    n = op.shape[0]
    check_int("k", k, 1, n)
    if max_hvp is not None:  # enough products for k Ritz values (whole blocks for Lanczos)
        b = min(block_size, n)
        max_hvp = check_int("max_hvp", max_hvp, k if method == "power" else b * math.ceil(k / b))
    with op:
        if method == "lanczos":
            out = lanczos(op.matmat, n, k, which=which, tol=tol, max_hvp=max_hvp,
                          block_size=block_size, max_basis=max_basis, v0=v0, seed=seed,
                          like=op.like, progress=progress, basis_dtype=basis_dtype,
                          basis_device=basis_device, product_dtype=op.dtype)
        else:
            out = power_iteration(op.matmat, n, k, tol=tol, max_hvp=max_hvp, v0=v0, seed=seed,
                                  like=op.like, progress=progress)
    theta, U, resid, n_hvp, ok = out
    return EigenResult(theta.cpu().numpy(), U.detach(), resid.cpu().numpy(), n_hvp, ok,
                       list(op.names), curvature=op.curvature,
                       preconditioned=op.preconditioned)
