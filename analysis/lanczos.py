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

``method="power"`` is PyHessian's deflated power iteration, kept for comparison (judged by a
measured residual, with a Rayleigh-Ritz step on its last two iterates).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .core import (all_finite, BatchSizeFn, check_choice, check_device, check_dtype, check_int,
                   check_positive, guarded, LossFn, make_generator, ParamSelection, product_eps,
                   records_metadata, register_result)
from .core.progress import ConvergenceBar, batch_progress, gap
from .core.space import Space
from .curvature import curvature_operator
from .operator import _asymmetry_message, CurvatureOperator
from .preconditioning import Preconditioner

WHICH = ("LA", "SA", "LM")
METHODS = ("lanczos", "power")
BASIS_DTYPES = (torch.float64, torch.float32)
MatMat = Callable[[Tensor], Tensor]
BASIS_BYTES = 2 ** 32  # default cap of the Lanczos basis (4 GiB: 8 vectors of GPT-2 small)
DGKS = 2 ** -0.5  # a second Gram-Schmidt pass when one pass leaves less than this part of the norm
_SEARCH_STEPS = 5  # steps of a search for more copies before a value short of the k-th ends it


@register_result
@dataclass
class EigenResult:
    r"""Extreme eigenpairs of a curvature matrix ($P^{-1/2} A P^{-1/2}$ when preconditioned).

    Attributes:
        eigenvalues: numpy, ordered by ``which``: descending for "LA", ascending for "SA",
            descending magnitude for "LM".
        eigenvectors: torch tensor ``[k, n]`` of unit rows, flat over the selected parameters
            in ``names`` order (``analysis.core.unflatten(row, params)`` gives per-parameter
            tensors). For a model sharded with FSDP2's ``fully_shard``: a list of ``k``
            vectors, each a list of DTensors placed like the selected parameters.
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
    basis beside ``w``, no vector-sized temporary is made. The coefficients of all rows are
    summed over the ranks in one all-reduce (``basis.space``).
    """
    parts = basis.rows(m)
    if not parts:
        return w.new_zeros(0)
    if parts[0].dtype != w.dtype or parts[0].device != w.device:
        x = w.to(parts[0])
        hs = _summed(basis.space, [part @ x for part in parts])
        for part, h in zip(parts, hs):
            w -= (part.T @ h).to(w)
        return torch.cat(hs).to(w)
    hs = _summed(basis.space, [part @ w for part in parts])
    for part, h in zip(parts, hs):
        w.addmv_(part.T, h, alpha=-1)
    return torch.cat(hs)


def _summed(space: Space, hs: list[Tensor]) -> list[Tensor]:
    """The partial coefficients ``hs`` summed over the ranks in one all-reduce (sharded)."""
    if not space.sharded or not hs:
        return hs
    return list(torch.split(space.sum(torch.cat(hs)), [len(h) for h in hs]))


class Basis:
    """The Lanczos basis: ``capacity`` rows of length ``n``, stored as a head and a tail.

    The ``head`` wanted Ritz vectors can then be formed in place (:meth:`rotate_`) and returned
    after the tail is freed (:meth:`release`): the eigenvectors cost no memory beyond the basis.
    The tail can be enlarged (:meth:`grow`), so that a run allocates only the rows its budget of
    products can fill.

    Args:
        capacity: Rows allocated.
        n: Row length (``space.n_local``: this rank's columns of sharded vectors).
        head: Rows of the head (at most ``capacity``).
        dtype: The rows' dtype.
        device: The rows' device.
        space: The vector space of the rows (default: full vectors in one process,
            :class:`analysis.core.space.Space`).
    """

    def __init__(self, capacity: int, n: int, *, head: int, dtype: torch.dtype,
                 device: torch.device | str, space: Space | None = None):
        self.head = head = min(head, capacity)
        self.parts = [torch.empty(rows, n, dtype=dtype, device=device)
                      for rows in (head, capacity - head) if rows]
        self.dtype, self.device, self.n = dtype, device, n
        self.space = space or Space(n)

    def grow(self, rows: int) -> None:
        """Room for ``rows`` rows: the tail reallocated that large, its rows copied, if needed.

        The head and the split between head and tail are unchanged, so every product over the
        rows is the same.

        Args:
            rows: Rows wanted.
        """
        have = sum(len(part) for part in self.parts)
        if rows <= have:
            return
        tail = torch.empty(rows - self.head, self.n, dtype=self.dtype, device=self.device)
        if have > self.head:
            tail[:have - self.head] = self.parts[-1]
            self.parts[-1] = tail
        else:
            self.parts.append(tail)

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


def _orthogonalise(block: Tensor, basis: Basis, m: int, gen: torch.Generator,
                   events: dict | None = None) -> tuple[Tensor, Tensor]:
    r"""Orthonormalise the rows of ``block`` against the first ``m`` rows of ``basis``, each other.

    Returns ``(Q, C)`` with ``block^T = basis^T C[:m] + Q^T C[m:]`` (``Q`` is ``block``,
    overwritten in place): ``C[:m]`` are the
    coefficients on the ``m`` basis rows, ``C[m:]`` is upper triangular. A row that vanishes
    (an invariant subspace was found: a breakdown) is replaced by a random unit vector
    orthogonal to everything, keeping its (tiny) coefficient. "Vanishes": at most
    $\sqrt{\epsilon}$ of its norm is left, so at least half its digits were lost to
    cancellation and its direction is known to $\epsilon / ratio$ only. When the random vector
    vanishes too, the basis and the rows before it span the whole space: the row is dropped
    (``Q`` and ``C[m:]`` lose it), so a block larger than the space left shrinks to it.

    Args:
        block: ``[b, n]`` rows, overwritten.
        basis: The basis.
        m: Its rows used.
        gen: The generator of the random replacements.
        events: Counts ``"breakdown"`` (rows replaced) and ``"dropped"`` (rows dropped) into
            this dict, when given.

    Returns:
        ``(Q, C)``: ``[b', n]`` orthonormal rows (``b' <= b``) and ``[m + b', b]``.
    """
    b, space = block.shape[0], basis.space
    coef = torch.zeros(m + b, b, dtype=block.dtype, device=block.device)
    out, keep = block, []
    for i in range(b):
        w, done = out[i], (out[:i] if len(keep) == i else out[keep])  # a view unless dropped
        before = norm = space.norm(w)
        for _ in range(2):  # twice is enough (Giraud et al. 2005)
            coef[:m, i] += _project_out(w, basis, m)
            g = space.gram(done, w) if len(done) else done @ w
            w.addmv_(done.T, g, alpha=-1)
            coef[m + torch.tensor(keep, dtype=torch.long, device=coef.device), i] += g
            norm, previous = space.norm(w), norm
            if norm > DGKS * previous:  # little was removed: one pass is orthogonal to rounding
                break
        coef[m + i, i] = norm
        if _vanished(norm, before):
            norm = _replace(w, basis, m, done, gen)
            _count(events, "breakdown" if norm > 0 else "dropped")
            if norm == 0:
                continue
        w /= norm
        keep.append(i)
    if len(keep) == b:
        return out, coef
    rows = torch.cat([torch.arange(m), m + torch.tensor(keep, dtype=torch.long)])
    return out[keep], coef[rows.to(coef.device)]


def _vanished(norm: Tensor, before: Tensor) -> bool:
    """Whether a row kept at most ``sqrt(eps)`` of its norm ``before`` (module docstring)."""
    return bool(norm <= math.sqrt(torch.finfo(norm.dtype).eps) * before or norm == 0)


def _replace(w: Tensor, basis: Basis, m: int, done: Tensor, gen: torch.Generator) -> Tensor:
    """Overwrite ``w`` with a random vector orthogonal to the basis and ``done``; its norm.

    Zero when no such vector exists to rounding (it vanishes too): the space is full.
    """
    space = basis.space
    w.copy_(space.randn(1, gen, like=w)[0])
    before = space.norm(w)
    for _ in range(2):
        _project_out(w, basis, m)
        w.addmv_(done.T, space.gram(done, w) if len(done) else done @ w, alpha=-1)
    norm = space.norm(w)
    return norm.new_zeros(()) if _vanished(norm, before) else norm


def _count(events: dict | None, key: str) -> None:
    """Add one to ``events[key]`` when ``events`` is given."""
    if events is not None:
        events[key] = events.get(key, 0) + 1


def _start_block(v0: Tensor | None, n: int, b: int, gen: torch.Generator, like: Tensor,
                 space: Space | None = None) -> Tensor:
    """Rows of ``v0`` folded onto ``b`` rows (row i added to row i mod b), random otherwise.

    The rows have ``space.n_local`` columns (``n`` in one process), as must ``v0``'s.
    """
    space = space or Space(n)
    block = space.randn(b, gen, like=like)
    if v0 is not None:
        if not isinstance(v0, Tensor):
            raise ValueError(f"v0 must be a tensor of shape [n] or [r, n], got {type(v0).__name__}")
        v0 = v0 if v0.dim() == 2 else v0.reshape(1, -1)
        if v0.shape[1] != space.n_local:
            raise ValueError(f"v0 must have {space.n_local} columns (the number of selected "
                             f"parameter elements{' on this rank' if space.sharded else ''}), got "
                             f"shape {tuple(v0.shape)}")
        if not all_finite(v0):
            raise ValueError("v0 must be finite (it holds NaN or inf)")
        folded = torch.zeros_like(block)
        folded.index_add_(0, torch.arange(len(v0), device=like.device) % b, v0.to(like))
        given = space.norm(folded, dim=1) > 0
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
        capacity: Rows of the basis at most (``max_basis``).
        n: The dimension.
        like: A tensor of the blocks' dtype and device.
        gen: The generator of restarts after a breakdown.
        head: Rows that :meth:`vectors` may return.
        basis_dtype: Dtype of ``V`` (default ``like``'s).
        basis_device: Device of ``V`` (default ``like``'s).
        space: The vector space (default full vectors, :class:`analysis.core.space.Space`):
            rows of ``space.n_local`` columns, inner products summed over its ranks.
        rows: Rows allocated at first (default ``capacity``; at least ``head``): ``V`` and
            ``T`` grow on demand up to ``capacity``, with the same results.
    """

    def __init__(self, capacity: int, n: int, like: Tensor, gen: torch.Generator, *,
                 head: int = 0, basis_dtype: torch.dtype | None = None,
                 basis_device: torch.device | str | None = None, space: Space | None = None,
                 rows: int | None = None):
        self.space = space or Space(n)
        rows = capacity if rows is None else min(capacity, max(rows, head, 1))
        self.V = Basis(rows, self.space.n_local, head=head, dtype=basis_dtype or like.dtype,
                       device=basis_device or like.device, space=self.space)
        self.capacity, self.n, self.replaced = capacity, n, 0
        # the symmetry screen (:meth:`_screen`): the coupling <Q, H V[lo:]> the next block's
        # products must reproduce as <V[lo:], H Q>, the largest product norm seen, the
        # tolerance relative to it, and who confirms and reports a mismatch (None: raise here);
        # off unless the solver turns it on (:func:`lanczos` does)
        self.expect: tuple[int, Tensor] | None = None
        self.scale, self.sym_tol = 0.0, 30 * math.sqrt(torch.finfo(like.dtype).eps)
        self.symmetry: Callable[[Tensor, float], None] | None = None
        self.screening = False
        self.T = torch.zeros(rows, rows, dtype=torch.float64, device=like.device)
        self.m, self.n_hvp, self.gen, self.like = 0, 0, gen, like
        self.events: dict = {}  # breakdowns and dropped rows (:func:`_orthogonalise`)
        self.Q: Tensor | None = None
        self.seg = 0  # products before the current new start (:func:`lanczos`)

    def start(self, block: Tensor, carried: int = 0) -> None:
        """Orthonormalise ``block`` (against ``V``) into the pending block.

        After :meth:`restart`, a random ``block`` starts a new Krylov space orthogonal to the
        kept vectors (the check of multiplicities, :func:`lanczos`).

        Args:
            block: ``[b, n]`` start vectors.
            carried: Leading rows of ``block`` that are the pending block itself (already
                orthonormal to ``V``), whose coupling to ``V`` is known: the symmetry screen
                goes on (the other rows, orthogonal to them and to the Ritz vectors kept, have
                coupling zero).
        """
        expect = self.expect if carried and self.expect is not None else None
        self.Q = _orthogonalise(block, self.V, self.m, self.gen, self.events)[0]
        if expect is None or len(self.Q) != len(block):
            self.expect = None
            return
        lo, S = expect
        self.expect = lo, torch.cat([S, S.new_zeros(len(block) - carried, S.shape[1])])

    def extend(self, matmat: MatMat, count: int | None = None) -> Tensor:
        r"""Append (up to ``count`` rows of) the pending block $Q$ and make the next one $Q_n$.

        Args:
            matmat: The matrix, rows in and rows out.
            count: Rows of $Q$ appended (default all).

        Returns:
            $B$, the coefficients of $Q_n$: $H V^\top = V^\top T + Q_n^\top B E_{last}^\top$;
            ``[b', b]`` for ``b`` rows appended and ``b' <= b`` rows of $Q_n$ (fewer when the
            space is exhausted).
        """
        m, Q = self.m, self.Q[:count]
        b = Q.shape[0]
        self._room(m + b)
        self.V.put(m, Q)
        self.Q = Q = None  # its only copy is now in V
        block = self.V.get(m, m + b)
        Z = matmat(block if block.dtype == self.like.dtype and block.device == self.like.device
                   else block.to(self.like))
        del block
        self.n_hvp += b
        before = self.events.get("breakdown", 0)
        self.Q, coef = _orthogonalise(Z, self.V, m + b, self.gen, self.events)
        self.replaced = self.events.get("breakdown", 0) - before  # random rows of Q
        block = coef[:m + b].to(torch.float64)
        self.scale = max(self.scale, float(torch.linalg.vector_norm(coef, dim=0).max()))
        if self.screening and self.expect is not None:
            self._screen(block, m, b)
        self.T[:m + b, m:m + b] = block
        self.T[m:m + b, :m + b] = block.T
        self.m = m + b
        self.B = coef[m + b:].to(torch.float64)
        self.expect = (m, self.B) if self.screening else None
        return self.B

    def _room(self, rows: int) -> None:
        """Grow ``V`` and ``T`` to hold ``rows`` rows (doubling, at most ``capacity``)."""
        have = self.T.shape[0]
        if rows <= have:
            return
        size = min(self.capacity, max(rows, 2 * have))
        self.V.grow(size)
        T = self.T.new_zeros(size, size)
        T[:have, :have] = self.T
        self.T = T

    def _screen(self, block: Tensor, m: int, b: int) -> None:
        r"""The symmetry screen: the coupling of consecutive blocks, computed both ways.

        A row $q$ of the block just multiplied came out of an earlier product $H v$ (or a
        restart), which fixed $\langle q, H v \rangle$ (``expect``); the new product gives
        $\langle v, H q \rangle$ (``block``, the coefficients on ``V``). For a symmetric
        operator they agree to the products' rounding; a gap above ``sym_tol`` (the symmetry
        probe's $30 \sqrt{\epsilon}$, :meth:`analysis.CurvatureOperator.matmat`) times the
        largest product norm seen is an asymmetry. The two rows are then handed to
        ``symmetry`` (which multiplies them again and reports, counting 2 products) or, without
        it, a ``RuntimeError`` is raised here. Costs no product and no vector. Skipped where
        the products' scale is not resolved in their dtype (:func:`resolvable`).
        """
        info = torch.finfo(self.like.dtype)
        if not math.sqrt(info.tiny) <= self.scale <= math.sqrt(info.max):
            return  # products under- or overflow: :func:`resolvable` refuses the result
        lo, S = self.expect
        S = S[:b]
        gaps = (block[lo:lo + S.shape[1]] - S.T).abs()
        worst = float(gaps.max()) if gaps.numel() else 0.0
        bound = self.sym_tol * self.scale
        if worst <= bound:
            return
        i, j = divmod(int(gaps.argmax()), gaps.shape[1])
        vs = torch.stack([self.V.get(lo + i, lo + i + 1)[0], self.V.get(m + j, m + j + 1)[0]])
        vs = vs.to(self.like)
        if self.symmetry is None:
            raise RuntimeError(f"the products are not symmetric: <v, A w> and <w, A v> differ by "
                               f"{worst / self.scale:.3g} of the largest product norm, above "
                               f"{self.sym_tol:.2g} (two rows of the Lanczos basis)")
        self.symmetry(vs, bound)  # raises when the asymmetry is reproduced
        self.n_hvp += len(vs)
        self.screening = False

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
        if self.expect is not None:  # H u = theta u + Q^T B y_last: <Q, H u> = B y_last
            self.expect = 0, self.B @ Y[self.m - self.B.shape[1]:self.m, keep]
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
            product_dtype: torch.dtype | None = None,
            symmetry: Callable[[Tensor, float], None] | None = None, space: Space | None = None
            ) -> tuple[Tensor, Tensor, Tensor, int, bool]:
    r"""Block Lanczos with full reorthogonalisation and thick restart on any symmetric ``matmat``.

    The Krylov recurrence $H V_m^\top = V_m^\top T_m + Q_{m+1}^\top B_m E_m^\top$ (Golub & Van
    Loan, Alg. 10.3.1; module docstring), restarted with the wanted Ritz vectors when the basis
    is full (Wu & Simon 2000). Convergence: residual
    $\le \max(\max(tol, 50\epsilon) |\theta|, 50\epsilon \max|\theta|)$ for all ``k``
    wanted pairs, with ``eps`` the machine epsilon of ``like`` (float32 stops near its
    attainable accuracy; eigenvalues near zero are resolved to rounding level relative to the
    largest Ritz value), or an exhausted basis (``n`` vectors: the Ritz pairs are exact).
    With ``basis_dtype`` coarser than ``like``'s, ``eps`` is that of ``basis_dtype``.

    Degenerate spectra: convergence is tested only once there are ``k`` Ritz values. A Krylov
    space from one start vector holds one copy of each eigenvalue (``b`` copies from a block);
    when it becomes invariant (a breakdown) it continues from a random vector orthogonal to
    the basis (drawn from the routine's generator). Once the ``k`` wanted pairs converged,
    for ``k >= 2`` always, and for ``k = 1`` when there was a breakdown or the value is zero,
    the basis is restarted with the ``k`` wanted Ritz vectors, and ``b`` random rows
    orthogonal to them join the pending block (:func:`_new_start`): the new Krylov space sees
    the copies the first one could not (``diag(5, 5, 4, ...)``, the null space of a
    rank-deficient GGN), and it is repeated while it finds a value beyond the ``k``-th. The
    search costs up to 5 steps of the widened block (10 products for ``b = 1``, fewer when the
    next value converges sooner, more for each copy found), counted
    in ``n_hvp``. With ``k = 1`` a repeated top eigenvalue changes nothing returned (the
    value is the same, only its eigenvector is not unique), so the search is not made
    routinely there. A block larger than the space left shrinks to it. ``converged=False``
    always comes with a ``RuntimeWarning`` that says why (the budget, a cut-off search for
    more copies, or a curvature scale that the products cannot resolve, :func:`resolvable`).

    Symmetry: every product is screened for an asymmetric operator, free
    (:meth:`Krylov._screen`; ``symmetry``).

    Args:
        matmat: The matrix, ``[b, n]`` rows in, new rows out (the input rows are overwritten).
        n: The dimension.
        k: Wanted eigenpairs.
        which: ``"LA"``, ``"SA"`` or ``"LM"`` (as :func:`top_eigenvalues`).
        tol: Relative residual tolerance.
        max_hvp: Budget of products (default ``max(300, 50 k)``).
        block_size: Vectors per block.
        max_basis: Basis rows before a thick restart (default :func:`default_max_basis`);
            ``min(max_basis, max_hvp + block_size)`` rows are allocated (each costs a product),
            more only if a widened block needs them.
        v0: Start vectors, ``[n]`` or ``[r, n]`` (folded onto the block), random otherwise.
        seed: Seed of the random start and of restarts after a breakdown.
        like: A tensor of the vectors' dtype and device.
        progress: Show a bar over the products whose total is those predicted to convergence
            and through the search for more copies (at most ``max_hvp``;
            :class:`analysis.core.progress.ConvergenceBar`), with the restarts so far.
        basis_dtype: Dtype of the basis (default ``like``'s).
        basis_device: Device of the basis (default ``like``'s).
        product_dtype: The dtype ``matmat`` computes in, when it is coarser than ``like``'s
            (bfloat16/float16 models; ``like`` is then float32). Its products are accurate to
            about ``eps = finfo(product_dtype).eps`` relative, below which the Ritz estimates
            (exact for exact products) mean nothing: the iteration stops once they reach
            ``eps max|theta|``, the residuals of the wanted pairs are measured by ``k`` more
            products, and ``converged`` is judged on those; a ``tol`` they cannot meet gives
            ``converged=False`` and a warning naming the dtype.
        symmetry: Called as ``symmetry(vs, bound)`` with two basis rows ``[2, n]`` on which
            the recurrence shows an asymmetry: $\langle v, H w \rangle$ from one product and
            $\langle w, H v \rangle$ from another differ by more than ``bound``
            (:meth:`Krylov._screen`, free, at every product). It multiplies them again and
            raises when the gap is reproduced (:func:`top_eigenvalues` reports it as the
            operator's symmetry probe does); when it returns, its 2 products are counted and
            the screen stops. Without it, the screen raises a ``RuntimeError`` itself.
        space: The vector space (:mod:`analysis.core.space`; default full vectors in one
            process). With a sharded space every vector, ``v0``, the rows ``matmat`` takes and
            returns and ``U`` hold this rank's ``space.n_local`` columns.

    Returns:
        ``(theta, U, residuals, n_hvp, converged)``: the ``k`` Ritz values in ``which`` order,
        their unit vectors ``[k, n]``, residual norms, products spent, and whether all ``k``
        met the tolerance.

    Raises:
        ValueError: When ``max_basis`` is below ``k + block_size`` (and below ``n``), or for a
            bad ``v0``.
        RuntimeError: When the products are not symmetric (``symmetry``).
    """
    b = min(block_size, n)
    if max_basis is None:
        max_basis = default_max_basis(n, k, b, basis_dtype or like.dtype)
    m_max = min(n, max_basis)
    if m_max < k + b and m_max < n:
        raise ValueError(f"max_basis must be >= k + block_size = {k + b}, got {m_max}")
    budget = max_hvp if max_hvp is not None else max(300, 50 * k)
    eps = max(torch.finfo(like.dtype).eps, torch.finfo(basis_dtype or like.dtype).eps)
    test = _Test(k, which, max(tol, 50 * eps), eps,
                 product_eps(product_dtype) if product_dtype else 0.0)
    gen = make_generator(seed)
    # rows allocated: what the budget can fill (each row costs a product), more on demand
    K = Krylov(m_max, n, like, gen, head=k, basis_dtype=basis_dtype, basis_device=basis_device,
               space=space, rows=budget + b)
    K.symmetry, K.sym_tol, K.screening = symmetry, 30 * math.sqrt(max(eps, test.noise)), True
    K.start(_start_block(v0, n, b, gen, like, K.space))
    bar = ConvergenceBar(budget, "lanczos", disable=not progress,
                         after=_SEARCH_STEPS * 2 * b if k >= 2 else 0)  # the search, _settled
    try:
        theta, Y, pick, resid, ok, checking = _iterate(K, matmat, n, test, b, m_max, budget, bar)
    finally:
        bar.close()
    if not ok:
        _warn_unconverged(theta, resid, pick, test, K.n_hvp, checking)
    ok = resolvable(theta, like.dtype) and ok
    U = K.vectors(Y[:, pick])
    if not product_dtype or not product_eps(product_dtype):
        return theta[pick], U, resid[pick], K.n_hvp, ok
    floor = 50 * eps * theta.abs().max()
    measured = K.space.norm(matmat(U).to(U) - theta[pick].to(U)[:, None] * U,
                            dim=1).to(torch.float64)
    ok = measured <= torch.clamp(test.rel * theta[pick].abs(), min=floor)
    if not bool(ok.all()):
        worst = float((measured / theta[pick].abs().clamp_min(floor)).max())
        warnings.warn(f"Lanczos on {product_dtype} Hessian-vector products: the measured residuals"
                      f" reach {worst:.2g} relative to the eigenvalues, above tol={tol:g}; "
                      f"{product_dtype} products are accurate to about "
                      f"{product_eps(product_dtype):.1g}, so converged=False. Pass a tol above "
                      "the measured residual, or analyse a float32 copy of the model",
                      RuntimeWarning, stacklevel=3)
    return theta[pick], U, measured, K.n_hvp + len(U), bool(ok.all())


def resolvable(theta: Tensor, dtype: torch.dtype) -> bool:
    r"""Whether curvature of magnitude ``max|theta|`` is resolved by products in ``dtype``.

    A Hessian-vector product by double backpropagation multiplies first-order terms, each of
    the loss's scale $s$, so it holds terms of order $s^2$: below $\sqrt{tiny}$ they are
    subnormal or flushed to zero (a float32 loss scaled by $10^{-22}$ gives a top eigenvalue
    10 times too small, with small residuals), above $\sqrt{max}$ they overflow. Warns (a
    ``RuntimeWarning`` naming the way out) when ``max|theta|`` lies outside
    $[\sqrt{tiny}, \sqrt{max}]$ of ``dtype`` (float32: $[1.1 \cdot 10^{-19}, 1.8 \cdot 10^{19}]$);
    an all-zero ``theta`` is resolved (a zero matrix).

    Args:
        theta: The eigenvalues or Ritz values found.
        dtype: The dtype of the products.

    Returns:
        Whether the scale is resolved (else the result must say ``converged=False``).
    """
    info = torch.finfo(dtype)
    top = float(theta.abs().max()) if theta.numel() else 0.0
    if top == 0 or math.sqrt(info.tiny) <= top <= math.sqrt(info.max):
        return True
    warnings.warn(f"the curvature's scale, max|eigenvalue| = {top:.3g}, lies outside "
                  f"[{math.sqrt(info.tiny):.2g}, {math.sqrt(info.max):.2g}], where {dtype} "
                  "Hessian-vector products (terms of the squared loss scale) underflow or "
                  "overflow: the values cannot be trusted, so converged=False. Multiply the loss "
                  f"by a constant c (e.g. c = 1 / {top:.3g}) and divide the eigenvalues by c, or "
                  "analyse a float64 copy of the model", RuntimeWarning, stacklevel=7)
    return False


@dataclass
class _Test:
    """The convergence test of :func:`lanczos` (its docstring) for ``k`` pairs at ``which``."""

    k: int
    which: str
    rel: float
    eps: float
    noise: float  # relative accuracy of the products (coarse product dtypes), else 0

    def bounds(self, theta: Tensor, pick: Tensor) -> Tensor:
        """The residual each picked Ritz pair may have: ``max(rel |theta|, floor)``."""
        scale = theta.abs().max()
        floor = 50 * self.eps * scale
        noise = self.noise * scale if self.noise else 0.0
        return torch.clamp(self.rel * theta[pick].abs(), min=max(floor, noise))

    def better(self, x: Tensor, y: Tensor, slack: Tensor) -> bool:
        """Whether ``x`` lies beyond ``y`` at the wanted end by more than ``slack``."""
        if self.which == "LA":
            return bool(x > y + slack)
        if self.which == "SA":
            return bool(x < y - slack)
        return bool(x.abs() > y.abs() + slack)


def _degenerate(theta: Tensor, resid: Tensor, pick: Tensor, test: _Test, events: dict) -> bool:
    """Whether the wanted values may hide more copies: a breakdown, a zero or a repeated value.

    A single Krylov space holds one copy of each eigenvalue (a block of ``b``, ``b`` copies);
    the rest of a repeated eigenvalue, e.g. the null space of a rank-deficient curvature, is
    orthogonal to it and only found from a new start vector.
    """
    if events.get("breakdown"):
        return True
    bound = torch.maximum(test.bounds(theta, pick), resid[pick])
    if bool((theta[pick].abs() <= bound).any()):
        return True
    values, order = torch.sort(theta[pick])
    gaps = values[1:] - values[:-1]
    return bool((gaps <= bound[order][1:] + bound[order][:-1]).any())


def _iterate(K: Krylov, matmat: MatMat, n: int, test: _Test, b: int, m_max: int, budget: int,
             bar) -> tuple[Tensor, Tensor, Tensor, Tensor, bool, bool]:
    """The Lanczos loop of :func:`lanczos`: extend, test, check multiplicities, restart.

    Returns:
        ``(theta, Y, pick, resid, ok, checking)``: all Ritz values and their coordinates, the
        ``k`` wanted indices, all residuals, whether the ``k`` converged (and their count was
        checked when needed), and whether a check of multiplicities was under way.
    """
    k, locked = test.k, None  # locked: the wanted values when the last new start was injected
    while True:
        rows = len(K.Q)
        with batch_progress(lambda fraction: bar.advance(fraction * rows)):  # during a pass
            B = K.extend(matmat, m_max - K.m)
        theta, Y = K.ritz()
        resid = torch.linalg.vector_norm(B @ Y[K.m - B.shape[1]:], dim=0)
        exact = K.m == n or len(K.Q) == 0
        if exact:  # the whole space: the Ritz pairs are the eigenpairs
            resid.zero_()
        pick = _wanted(theta, k if locked is None else k + 1, test.which)
        bar.update(K.n_hvp, gap(resid[pick[:k]], test.bounds(theta, pick[:k])) if len(pick)
                   else math.inf, theta=f"{theta[pick[0]].item():.6g}" if len(pick) else "")
        ok = len(pick) > k - 1 and bool((resid[pick[:k]] <= test.bounds(theta, pick[:k])).all())
        if ok and not exact:
            settled, inject = _settled(theta, resid, pick, locked, K, test)
            if inject and K.n_hvp + len(K.Q) + b > budget:  # no products left for the search
                return theta, Y, pick[:k], resid, False, True
            if inject:  # look for more copies from a new start orthogonal to the wanted
                locked, K.seg = theta[pick[:k]].clone(), K.n_hvp
                _new_start(K, theta, Y, pick[:k], b)
                bar.restarts, bar.settled = bar.restarts + 1, K.n_hvp
                bar.after = _SEARCH_STEPS * len(K.Q)  # the widened block's products
                continue
            ok = settled
        if ok or exact or K.n_hvp + b > budget:
            return theta, Y, pick[:k], resid, ok or exact, locked is not None
        q = len(K.Q)  # the pending block: b rows, fewer where the space left is smaller
        if K.m + q > m_max:  # thick restart with the Ritz vectors at the wanted end
            K.restart(theta, Y, _wanted(theta, min(K.m - q, max(len(pick), (m_max + k) // 2)),
                                        test.which))
            bar.restarts += 1


def _new_start(K: Krylov, theta: Tensor, Y: Tensor, keep: Tensor, b: int) -> None:
    r"""Restart with the Ritz vectors ``keep`` and ``b`` random rows added to the pending block.

    The pending block $Q$ stays: it holds the kept pairs' residuals,
    $H u_i - \theta_i u_i = Q^\top B y_i$, so with $Q$ in the next block the Krylov relation,
    and with it every Ritz residual estimate, stays exact (dropped, the new Ritz vectors'
    estimates would miss the part of their residual along $Q$). The ``b`` random rows,
    orthogonalised against the kept vectors and $Q$, start the Krylov space that sees the
    copies the first one could not. After a breakdown $Q$ is itself random rows orthogonal
    to the basis (:func:`_orthogonalise`), a new start already: it is kept alone. Where the
    basis has no room for both (a ``max_basis`` of ``k + b``) the random rows replace $Q$;
    the estimates may then understate the true residuals by at most the kept pairs'
    residuals, which met the tolerance.
    """
    K.restart(theta, Y, keep)
    if K.replaced >= len(K.Q):
        return
    fresh = K.space.randn(b, K.gen, like=K.like)
    if K.m + len(K.Q) + b <= K.capacity:
        K.start(torch.cat([K.Q, fresh]), carried=len(K.Q))
    else:
        K.start(fresh)


def _settled(theta: Tensor, resid: Tensor, pick: Tensor, locked: Tensor | None, K: Krylov,
             test: _Test) -> tuple[bool, bool]:
    r"""Once the ``k`` wanted pairs converged: ``(done, inject a new start)``.

    Without a check under way, a new start is injected for ``k >= 2``, and for ``k = 1``
    when :func:`_degenerate` (module docstring of :func:`lanczos`). With one
    (``locked``), the new Krylov space's best Ritz value $\mu$ (pair ``k + 1``) decides: a
    wanted value beyond ``locked`` means a missed copy, so another new start; otherwise done
    once $\mu$'s pair converged, or after ``_SEARCH_STEPS`` (5) steps of the new block when
    $\mu$ plus its residual stays short of the ``k``-th value.
    """
    k = test.k
    if locked is None:
        search = k >= 2 or _degenerate(theta, resid, pick, test, K.events)
        return (False, True) if search else (True, False)
    slack = test.bounds(theta, pick[k - 1:k])[0]
    if test.better(theta[pick[k - 1]], locked[-1], slack):
        return False, True
    if len(pick) <= k:
        return False, False
    mu, r = theta[pick[k]], resid[pick[k]]
    if r <= test.bounds(theta, pick[k:k + 1])[0]:
        return True, False
    reach = mu + r if test.which == "LA" else mu - r if test.which == "SA" else mu.abs() + r
    short = not test.better(reach, theta[pick[k - 1]], -slack)
    return short and K.n_hvp - K.seg >= _SEARCH_STEPS * len(K.Q), False


def _warn_unconverged(theta: Tensor, resid: Tensor, pick: Tensor, test: _Test, n_hvp: int,
                      checking: bool) -> None:
    """Say why :func:`lanczos` returns ``converged=False``."""
    worst = float((resid[pick] / test.bounds(theta, pick)).max())
    if checking and worst <= 1:
        why = ("the wanted end holds a zero or repeated eigenvalue, or the Krylov space was "
               "invariant (a breakdown), so more copies may lie outside it; their search from a "
               f"new start vector was cut off by the budget after {n_hvp} products")
    else:
        why = (f"the budget of {n_hvp} products ran out with residuals up to {worst:.2g} "
               f"times their tolerance (relative {test.rel:.2g})")
    warnings.warn(f"Lanczos did not converge: {why}. Raise max_hvp (or tol), or a block_size "
                  "of the expected multiplicity", RuntimeWarning, stacklevel=7)


def _confirm_asymmetry(op: CurvatureOperator, vs: Tensor, bound: float) -> None:
    r"""Multiply two rows again; raise the symmetry probe's error when their gap is reproduced.

    The ``symmetry`` of :func:`lanczos` in :func:`top_eigenvalues`: with fresh products,
    $|\langle v, A w \rangle - \langle w, A v \rangle| > $ ``bound`` is an asymmetric operator,
    reported by the operator's own message (the parameters and modules where
    $v \odot A w - w \odot A v$ concentrates); a gap that is not reproduced means products
    that vary (shuffled data, stochastic layers), left to the determinism guards as the
    probe leaves them.

    Raises:
        RuntimeError: When the asymmetry is reproduced.
    """
    out = op.matmat(vs)
    (v, av), (w, aw) = (vs[0].to(out), out[0]), (vs[1].to(out), out[1])
    gap = abs(float(torch.dot(v, aw) - torch.dot(w, av)))
    if gap > bound:
        size = float(v.norm() * aw.norm() + w.norm() * av.norm()) / 2
        raise RuntimeError(_asymmetry_message(op, v * aw - w * av, gap / max(size, bound)))


def power_iteration(matmat: MatMat, n: int, k: int, *, tol: float = 1e-3, max_iter: int = 100,
                    max_hvp: int | None = None, v0: Tensor | None = None, seed: int = 0,
                    like: Tensor, progress: bool = False, space: Space | None = None
                    ) -> tuple[Tensor, Tensor, Tensor, int, bool]:
    r"""Deflated power iteration (PyHessian's, Yao et al. 2020), kept for comparison.

    Per eigenpair, power iteration $v \leftarrow P H v / \|P H v\|$ with $P$ the projector off
    the pairs found so far. Each step extracts the pair of largest $|\theta|$ from the span of
    the last two iterates (Rayleigh-Ritz, Saad 2011, Sec. 4.3: exact for a $\pm\lambda$ pair,
    on which the iterates themselves alternate), and the pair is accepted only by a residual
    test, $\|H u - \theta u\| \le \max(tol\, |\theta|, 50 \epsilon \max|\theta|)$, never by a
    stalled Rayleigh quotient (PyHessian's relative change, which a tiny $\lambda$ or a
    $\pm\lambda$ pair meets while far from an eigenpair). A step whose deflated product vanishes
    is in the null space left: the eigenvalue 0, found (rank-deficient matrices). Converges to
    the largest-magnitude eigenvalues.

    Args:
        matmat: The matrix, rows in and rows out.
        n: The dimension.
        k: Wanted eigenpairs.
        tol: Relative residual tolerance.
        max_iter: Products per pair at most.
        max_hvp: Budget of products over all pairs (default ``k * max_iter``).
        v0: Start vectors, ``[n]`` or ``[r, n]``, random otherwise.
        seed: Seed of the random start.
        like: A tensor of the vectors' dtype and device.
        progress: Show a bar over the pairs.
        space: The vector space (as :func:`lanczos`).

    Returns:
        ``(theta, U, residuals, n_hvp, converged)`` as :func:`lanczos`, by descending
        magnitude; the residuals are measured ($\|H u - \theta u\|$ from the products). When
        ``converged`` is False a ``RuntimeWarning`` says which pairs missed ``tol``.

    Raises:
        ValueError: When ``max_hvp`` leaves no product for some pair.
    """
    gen, space = make_generator(seed), space or Space(n)
    start = _start_block(v0, n, k, gen, like, space)
    vecs, vals, res, missed = [], [], [], []
    n_hvp, scale = 0, 0.0
    budget = max_hvp if max_hvp is not None else k * max_iter
    for i in tqdm(range(k), desc="power iteration", disable=not progress, leave=False):
        steps = min(max_iter, budget - n_hvp - (k - 1 - i))  # one product for each pair left
        if steps < 1:
            break
        found = torch.stack(vecs) if vecs else start[:0]
        lam, u, r, used, ok, scale = _power_pair(matmat, start[i], found, steps, tol, scale, gen,
                                                 space)
        n_hvp += used
        vecs.append(u)
        vals.append(lam)
        res.append(r)
        if not ok:
            missed.append(i)
    if len(vals) < k:
        raise ValueError(f"max_hvp={max_hvp} is too small for k={k} with the power method")
    if missed:
        warnings.warn(f"power iteration did not converge: pairs {missed} kept residuals above "
                      f"tol={tol:g} relative after {n_hvp} products (at most {max_iter} per pair)"
                      '; raise max_iter/max_hvp, or use method="lanczos"', RuntimeWarning,
                      stacklevel=6)
    theta = torch.tensor(vals, dtype=torch.float64)
    order = _wanted(theta, k, "LM")
    residuals = torch.tensor(res, dtype=torch.float64)[order]
    ok = resolvable(theta, like.dtype) and not missed
    return theta[order], torch.stack(vecs)[order], residuals, n_hvp, ok


def _power_pair(matmat: MatMat, v: Tensor, found: Tensor, steps: int, tol: float, scale: float,
                gen: torch.Generator, space: Space
                ) -> tuple[float, Tensor, float, int, bool, float]:
    """One pair of :func:`power_iteration`, orthogonal to the rows of ``found``.

    Returns:
        ``(theta, u, residual, products, converged, scale)``, ``scale`` the largest product
        norm seen (the resolution of a zero eigenvalue).
    """
    floor = 50 * torch.finfo(v.dtype).eps

    def off(x: Tensor) -> Tensor:
        for _ in range(2):
            x = x - found.T @ (space.gram(found, x) if len(found) else found @ x)
        return x

    v = off(v)
    if not bool(space.norm(v) > 0):  # a start inside the pairs found
        v = off(space.randn(1, gen, like=v)[0])
    v, prev = v / space.norm(v), None
    for step in range(1, steps + 1):
        hv = matmat(v.unsqueeze(0))[0]
        scale = max(scale, space.norm(hv).item())
        lam, u, r = _two_vector_ritz(prev, v, hv, space)
        ok = r <= max(tol * abs(lam), floor * scale)
        w = off(hv)
        wn = space.norm(w)
        if ok or not bool(wn > floor * scale):
            return lam, u, r, step, ok or r <= floor * scale, scale
        prev, v = (v, hv), w / wn
    return lam, u, r, steps, False, scale


def _two_vector_ritz(prev: tuple[Tensor, Tensor] | None, v: Tensor, hv: Tensor,
                     space: Space | None = None) -> tuple[float, Tensor, float]:
    """The Ritz pair of largest magnitude in ``span(prev[0], v)`` (``hv`` is ``H v``).

    Returns:
        ``(theta, u, ||H u - theta u||)``; the Rayleigh quotient of ``v`` without ``prev`` or
        when ``v`` is parallel to it.
    """
    space = space or Space(len(v))
    q, hq = [v], [hv]
    if prev is not None:
        c = space.dot(prev[0], v)
        w = v - c * prev[0]
        wn = space.norm(w)
        if wn > math.sqrt(torch.finfo(v.dtype).eps):
            q, hq = [prev[0], w / wn], [prev[1], (hv - c * prev[1]) / wn]
    Q, HQ = torch.stack(q), torch.stack(hq)
    T = space.gram(Q, HQ).to(torch.float64)
    theta, Y = torch.linalg.eigh((T + T.T) / 2)
    i = int(torch.argmax(theta.abs()))
    y = Y[:, i].to(Q)
    u, hu = y @ Q, y @ HQ
    lam = theta[i].item()
    return lam, u, space.norm(hu - lam * u).item()


@records_metadata
@guarded(sharded=True)
def top_eigenvalues(model: nn.Module, loss_fn: LossFn, data: Iterable, k: int = 1,
                    which: str = "LA", tol: float = 1e-6, max_hvp: int | None = None, *,
                    params: ParamSelection = None, model_mode: str = "eval",
                    batch_size_fn: BatchSizeFn | None = None, seed: int = 0, progress: bool = True,
                    v0: Tensor | None = None, method: str = "lanczos", block_size: int = 1,
                    max_basis: int | None = None, hvp_method: str = "reverse",
                    curvature: str = "hessian", preconditioner: Preconditioner = None,
                    basis_dtype: torch.dtype | None = None,
                    basis_device: torch.device | str | None = None,
                    check_deterministic: bool = True, fd_richardson: bool = False) -> EigenResult:
    r"""The ``k`` extreme eigenpairs of the Hessian (or another curvature) of the mean loss.

    Block Lanczos with full reorthogonalisation and thick restart (module docstring; Golub &
    Van Loan, Alg. 10.3.1; Wu & Simon 2000) on the operator of ``curvature``. The
    ``eigenvectors`` of the result are a ``[k, n]`` tensor of unit rows, flat over the selected
    parameters in ``.names`` order (``analysis.core.unflatten`` splits a row per parameter), on
    the model's device, in its dtype (float32 for bfloat16/float16 models, whose basis is kept
    in float32; their residuals are measured, see :func:`lanczos`).

    A model sharded with FSDP2's ``fully_shard`` is analysed through
    :class:`analysis.sharded.ShardedOperator` (each rank passing its data shard with the same
    number of batches; every rank gets the one-process answer; eigenvectors as DTensors).

    Args:
        model: The model (restored afterwards).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the batch's mean loss.
        data: An iterable of batches, passed over once per product (block).
        k: Eigenpairs wanted, from 1 to ``n``.
        which: "LA" (largest algebraic), "SA" (smallest algebraic: negative curvature) or "LM"
            (largest magnitude).
        tol: Lanczos stops when every wanted Ritz pair has
            $\|H u - \theta u\| \le tol\, |\theta|$; the power method the same (a measured
            residual, :func:`power_iteration`).
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
            multiplicity up to ``b`` within one Krylov space and shares each forward pass
            among ``b`` products; more copies, and for ``k >= 2`` any copy, are looked for
            from new random start vectors once the ``k`` pairs converged (:func:`lanczos`).
        max_basis: Basis size before a thick restart (default ``max(30, 3k + 2 block_size)``
            vectors, fewer when they would take more than ``BASIS_BYTES``, but at least
            ``k + 2 block_size``); the memory is ``min(max_basis, max_hvp + block_size) * n``
            elements (the rows the budget of products can fill).
        hvp_method: ``"reverse"``, ``"forward"`` or ``"finite_difference"``
            (:class:`analysis.HessianOperator`; the Hessian only). Finite differences record
            their step and error estimate in ``metadata["hvp"]``.
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
        fd_richardson: With ``hvp_method="finite_difference"``, Richardson-extrapolate each
            product (:mod:`analysis.finite_difference`: a larger step, at most 4 more gradients
            per product); refused with another ``hvp_method``.

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
                            preconditioner=preconditioner, fd_richardson=fd_richardson)
    n = op.shape[0]
    v0 = op.take(v0) if hasattr(op, "take") else v0  # FSDP2: eigenvectors as returned
    check_int("k", k, 1, n)
    if max_hvp is not None:  # enough products for k Ritz values (whole blocks for Lanczos)
        b = min(block_size, n)
        max_hvp = check_int("max_hvp", max_hvp, k if method == "power" else b * math.ceil(k / b))
    symmetry = partial(_confirm_asymmetry, op) if isinstance(op, CurvatureOperator) else None
    if symmetry and block_size == 1 and op._probe is None:
        op._probe = False  # its probe needs two vectors; the Lanczos screen checks every product
    space = getattr(op, "space", None)  # FSDP2: this rank's shards (analysis.core.space)
    with op:
        if method == "lanczos":
            out = lanczos(op.matmat, n, k, which=which, tol=tol, max_hvp=max_hvp,
                          block_size=block_size, max_basis=max_basis, v0=v0, seed=seed,
                          like=op.like, progress=progress, basis_dtype=basis_dtype,
                          basis_device=basis_device, product_dtype=op.dtype, symmetry=symmetry,
                          space=space)
        else:
            out = power_iteration(op.matmat, n, k, tol=tol, max_hvp=max_hvp, v0=v0, seed=seed,
                                  like=op.like, progress=progress, space=space)
    theta, U, resid, n_hvp, ok = out
    U = op.hand_back(U.detach()) if hasattr(op, "hand_back") else U.detach()  # FSDP2: shards
    return EigenResult(theta.cpu().numpy(), U, resid.cpu().numpy(), n_hvp, ok,
                       list(op.names), curvature=op.curvature,
                       preconditioned=op.preconditioned, metadata=op.product_metadata())
