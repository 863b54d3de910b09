r"""The vector space the iterative solvers work in: full vectors, or this rank's shards.

The solvers (block Lanczos and the power method in ``analysis.lanczos``, the trace estimators
of ``analysis.trace``, SLQ in ``analysis.density``) hold their vectors as rows of length
:attr:`Space.n_local` and do all their vector algebra through a space:

* local row operations (``axpy``, scaling, a basis rotation) need nothing;
* every inner product, norm or Gram matrix is a local product followed by :meth:`Space.sum`
  (one all-reduce per Gram matrix, not per pair);
* every maximum (an L-infinity norm) is a local maximum followed by :meth:`Space.amax`;
* random start and probe vectors come from :meth:`Space.randn` / :meth:`Space.rademacher` /
  :meth:`Space.uniform`, which return this rank's columns of the rows one process draws from
  the same generator;
* small ``m x m`` problems (Rayleigh-Ritz, the ``R`` of a QR) are solved redundantly on every
  rank, from the same all-reduced numbers;
* a few numbers from every rank (L-BFGS-B's breakpoints, :mod:`analysis.core.lbfgsb`) are
  stacked by :meth:`Space.gather` (one all-reduce of zero-padded slots).

:class:`Space` is one process: the vectors are the full flat vectors, :meth:`Space.sum` is the
identity and every method is the expression the solvers used before (the same cost and the
same result). :class:`ShardedSpace` is a vector sharded over the ranks of a process group: the
concatenation, in parameter order, of this rank's pieces of the flat vector (for FSDP2's
``Shard(0)``, one contiguous range of each parameter's flattened elements). An operator that
works on such vectors provides its space as the attribute ``space`` (``getattr(op, "space",
None)``; ``analysis.sharded.ShardedOperator`` does), and its ``matmat`` takes and returns
``[b, n_local]`` rows.

Random rows are reproducible across world sizes: ``torch.randn`` / ``torch.randint`` /
``torch.rand`` on a CPU generator fill a tensor in one sequential stream, and drawing that
stream in pieces of a multiple of 16 elements (the last piece at least 16) gives the same
numbers and leaves the generator in the same state (CPU ``normal_`` transforms blocks of 16
uniforms and redraws the last 16 of a length that is not a multiple of 16; checked on torch
2.13). So
:class:`ShardedSpace` draws the rows' stream in pieces of :data:`CHUNK` elements and keeps the
parts that fall in its ranges: no rank allocates a full-length vector, and every rank's slice
is the one-process vector's.
"""
from __future__ import annotations

import bisect
from typing import Sequence

import torch
from torch import Tensor

from .distributed import all_reduce_max_, all_reduce_sum_
from .seeding import rademacher, randn, uniform

CHUNK = 2 ** 16  # elements of the random stream drawn at once (a multiple of 16; 512 KiB)


class Space:
    """Full flat vectors of ``n`` elements in one process (the default of every solver).

    Args:
        n: The dimension.

    Attributes:
        n: The dimension (the number of selected parameter elements).
        n_local: The length of the rows the solver holds (``n`` here).
        rank: This process's rank among the space's processes (0 here).
        world: The number of processes that hold the rows (1 here).
    """

    sharded = False
    rank, world = 0, 1

    def __init__(self, n: int):
        self.n = self.n_local = n

    def sum(self, t: Tensor) -> Tensor:
        """Local inner products summed over the ranks (the identity in one process).

        Args:
            t: Partial sums (any shape) computed from this rank's columns.

        Returns:
            ``t``, summed in place over the ranks.
        """
        return t

    def norm(self, x: Tensor, dim: int | None = None) -> Tensor:
        """The Euclidean norm of ``x`` (of each row along ``dim``).

        Args:
            x: A vector or rows.
            dim: None (the whole tensor) or the dimension of the columns.

        Returns:
            ``torch.linalg.vector_norm(x, dim=dim)`` over the full vectors.
        """
        return torch.linalg.vector_norm(x, dim=dim)

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        """The inner product of two vectors.

        Args:
            a: A vector (local columns).
            b: Another.

        Returns:
            A 0-d tensor.
        """
        return self.sum(torch.dot(a, b))

    def gram(self, A: Tensor, B: Tensor) -> Tensor:
        """``A @ B.T`` over the full vectors: one all-reduce for the whole matrix.

        Args:
            A: ``[p, n_local]`` rows.
            B: ``[q, n_local]`` rows (or one vector, ``[n_local]``).

        Returns:
            ``[p, q]`` (``[p]`` for a vector ``B``).
        """
        return self.sum(A @ (B.T if B.dim() == 2 else B))

    def randn(self, rows: int, gen: torch.Generator, *, like: Tensor) -> Tensor:
        """``rows`` standard normal vectors (this rank's columns of ``randn((rows, n))``).

        Args:
            rows: Number of vectors.
            gen: The generator (``analysis.core.randn``'s stream).
            like: A tensor of the rows' dtype and device.

        Returns:
            ``[rows, n_local]``.
        """
        return self._stream(randn, torch.float64, rows, gen, like)

    def rademacher(self, rows: int, gen: torch.Generator, *, like: Tensor) -> Tensor:
        """``rows`` Rademacher vectors (this rank's columns of ``rademacher((rows, n))``).

        Args:
            rows: Number of vectors.
            gen: The generator (``analysis.core.rademacher``'s stream).
            like: A tensor of the rows' dtype and device.

        Returns:
            ``[rows, n_local]``.
        """
        return self._stream(rademacher, torch.int8, rows, gen, like)

    def uniform(self, rows: int, gen: torch.Generator, *, like: Tensor) -> Tensor:
        """``rows`` vectors uniform on ``[-1, 1)`` (this rank's columns of ``uniform((rows, n))``).

        Args:
            rows: Number of vectors.
            gen: The generator (``analysis.core.uniform``'s stream).
            like: A tensor of the rows' dtype and device.

        Returns:
            ``[rows, n_local]``.
        """
        return self._stream(uniform, torch.float64, rows, gen, like)

    def _stream(self, draw, cpu_dtype: torch.dtype, rows: int, gen: torch.Generator,
                like: Tensor) -> Tensor:
        """``draw((rows, n), gen)`` as ``like``'s rows, drawn whole (one process).

        ``cpu_dtype`` is the dtype in which a sharded space draws the stream on the CPU
        (:class:`ShardedSpace`), so that every rank slices the same numbers.
        """
        return draw((rows, self.n), gen, like=like)

    def amax(self, t: Tensor) -> Tensor:
        """Local maxima maximised over the ranks (the identity in one process).

        Args:
            t: Maxima (any shape) over this rank's columns.

        Returns:
            ``t``, maximised in place over the ranks.
        """
        return t

    def local(self, full: Tensor) -> Tensor:
        """This rank's columns of full vectors.

        Args:
            full: ``[..., n]``.

        Returns:
            ``[..., n_local]`` (``full`` itself in one process).
        """
        return full

    def gather(self, t: Tensor) -> Tensor:
        """Every rank's ``t`` (a small tensor of the same shape on every rank), stacked.

        Args:
            t: This rank's tensor.

        Returns:
            ``[world, *t.shape]``, rank order (``t[None]`` in one process).
        """
        return t[None]

    def eye(self, start: int, stop: int, *, like: Tensor) -> Tensor:
        """Rows ``[start, stop)`` of the ``n x n`` identity (their local columns).

        Args:
            start: First row.
            stop: One past the last row.
            like: A tensor of the rows' dtype and device.

        Returns:
            ``[stop - start, n_local]``.
        """
        return torch.eye(self.n, dtype=like.dtype, device=like.device)[start:stop]

    def qr(self, Y: Tensor) -> tuple[Tensor, Tensor]:
        r"""A thin QR of the columns ``Y.T``: orthonormal rows ``Q`` with ``Y = R^\top Q``.

        Args:
            Y: ``[m, n_local]`` rows, ``m <= n``.

        Returns:
            ``(Q, R)``: ``[m, n_local]`` and ``[m, m]`` (upper triangular), so that
            ``Y.T = Q.T @ R`` (Householder, ``torch.linalg.qr`` in one process).
        """
        Q, R = torch.linalg.qr(Y.T)
        return Q.T, R


class ShardedSpace(Space):
    """Vectors sharded over a process group: this rank's ranges of the flat vector.

    Args:
        n: The dimension of the full vectors.
        ranges: ``(start, stop)`` of this rank's pieces in the full flat vector, in the order
            in which they are concatenated into a local row (increasing, disjoint).
        reduce: Sums a list of tensors over the ranks, in place, in one collective (default
            :func:`analysis.core.all_reduce_sum_`, over all ranks).
        reduce_max: Maximises a list of tensors over the same ranks likewise (default
            :func:`analysis.core.all_reduce_max_`).
        rank: This rank's index in the group (for :meth:`qr`).
        world: The group's size.

    Attributes:
        n, n_local: The full dimension and this rank's share of it.
        ranges: As given.

    Raises:
        ValueError: Ranges out of ``[0, n]``, overlapping or unordered.
    """

    sharded = True

    def __init__(self, n: int, ranges: Sequence[tuple[int, int]], *, rank: int, world: int,
                 reduce=all_reduce_sum_, reduce_max=all_reduce_max_):
        self.n = n
        self.ranges = [(int(a), int(b)) for a, b in ranges if b > a]
        ends = [x for r in self.ranges for x in r]
        if ends != sorted(ends) or (ends and (ends[0] < 0 or ends[-1] > n)):
            raise ValueError(f"ranges must be ordered, disjoint and within [0, {n}], got "
                             f"{list(ranges)}")
        self.n_local = sum(b - a for a, b in self.ranges)
        self.rank, self.world, self._reduce = rank, world, reduce
        self._reduce_max = reduce_max
        self._starts = [a for a, _ in self.ranges]

    def sum(self, t: Tensor) -> Tensor:
        """Sum local partial inner products over the ranks, in place (one all-reduce).

        Args:
            t: This rank's partial sums.

        Returns:
            ``t``, now the full sums (the same on every rank).
        """
        self._reduce([t])
        return t

    def norm(self, x: Tensor, dim: int | None = None) -> Tensor:
        """The Euclidean norm over the full vectors (one all-reduce).

        Args:
            x: A vector or rows of local columns.
            dim: None (the whole tensor) or the dimension of the columns.

        Returns:
            The norms, the same on every rank.
        """
        squares = (x * x).sum() if dim is None else (x * x).sum(dim)
        return self.sum(squares).sqrt()

    def _draw(self, rows: int, draw, like: Tensor) -> Tensor:
        """This rank's columns of ``rows`` rows of the stream ``draw(count)`` (module docstring).

        The stream is drawn in pieces of :data:`CHUNK` elements (a multiple of 16; the last
        piece at least 16), so it is the one-process stream, element for element; the rows
        are returned as ``like``'s dtype and device. Each piece is copied into the rows as it
        is drawn, so one chunk and the rows are all that is held (views of the chunks kept
        the whole float64 stream alive, and a concatenation and a stack copied it twice).
        """
        out = like.new_empty(rows, self.n_local)
        filled = [0] * rows
        total, start = rows * self.n, 0
        while start < total:
            stop = min(start + CHUNK, total)
            if total - stop < 16:
                stop = total
            chunk = draw(stop - start)
            for row, lo, hi in self._overlaps(start, stop):
                out[row, filled[row]:filled[row] + hi - lo] = chunk[lo - start:hi - start]
                filled[row] += hi - lo
            del chunk  # before the next is drawn
            start = stop
        return out

    def _overlaps(self, start: int, stop: int):
        """``(row, lo, hi)``: the parts of ``[start, stop)`` of the row-major stream kept here."""
        for row in range(start // self.n, (stop - 1) // self.n + 1):
            base = row * self.n
            a, b = start - base, stop - base
            i = max(bisect.bisect_right(self._starts, a) - 1, 0)
            for lo, hi in self.ranges[i:]:
                if lo >= b:
                    break
                lo, hi = max(lo, a), min(hi, b)
                if lo < hi:
                    yield row, base + lo, base + hi

    def _stream(self, draw, cpu_dtype: torch.dtype, rows: int, gen: torch.Generator,
                like: Tensor) -> Tensor:
        """:meth:`Space._stream` in pieces: this rank's columns only (:meth:`_draw`)."""
        cpu = torch.empty((), dtype=cpu_dtype)
        return self._draw(rows, lambda c: draw((c,), gen, like=cpu), like)

    def amax(self, t: Tensor) -> Tensor:
        """Maximise local maxima over the ranks, in place (one all-reduce).

        Args:
            t: This rank's maxima (an empty shard's: below every value, e.g. 0 for norms).

        Returns:
            ``t``, now the maxima over all ranks (the same on every rank).
        """
        self._reduce_max([t])
        return t

    def local(self, full: Tensor) -> Tensor:
        """This rank's columns of full vectors.

        Args:
            full: ``[..., n]``.

        Returns:
            ``[..., n_local]``, a copy.
        """
        return torch.cat([full[..., a:b] for a, b in self.ranges], dim=-1) if self.ranges \
            else full[..., :0].clone()

    def gather(self, t: Tensor) -> Tensor:
        """Every rank's ``t`` stacked: each rank fills its slot of zeros, then one all-reduce.

        Args:
            t: This rank's tensor (the same shape on every rank; finite or infinite values,
                the other slots add zeros).

        Returns:
            ``[world, *t.shape]``, rank order, the same on every rank.
        """
        out = t.new_zeros((self.world, *t.shape))
        out[self.rank] = t
        return self.sum(out)

    def eye(self, start: int, stop: int, *, like: Tensor) -> Tensor:
        """Rows ``[start, stop)`` of the identity, this rank's columns.

        Args:
            start: First row.
            stop: One past the last row.
            like: A tensor of the rows' dtype and device.

        Returns:
            ``[stop - start, n_local]``.
        """
        out = torch.zeros(stop - start, self.n_local, dtype=like.dtype, device=like.device)
        offset = 0
        for a, b in self.ranges:
            lo, hi = max(a, start), min(b, stop)
            for row in range(lo, hi):
                out[row - start, offset + row - a] = 1
            offset += b - a
        return out

    def qr(self, Y: Tensor) -> tuple[Tensor, Tensor]:
        r"""TSQR (Demmel et al. 2012): local QRs, then a QR of the ranks' stacked ``R``.

        Each rank factors its columns, ``Y_r^\top = Q_r R_r``; the ``R_r`` (padded to
        ``m x m``) are summed into a ``[world m, m]`` stack by one all-reduce and factored on
        every rank, ``[R_0; ...] = Q' R``; this rank's rows are ``Q'_r^\top Q_r^\top``. Stable
        like Householder QR (rank-deficient ``Y`` included, unlike CholeskyQR); ``Q`` and ``R``
        may differ from the one-process factors by the signs of rows of ``R``.

        Args:
            Y: ``[m, n_local]`` rows, ``m <= n``.

        Returns:
            ``(Q, R)``: ``[m, n_local]`` orthonormal rows and ``[m, m]``, ``Y.T = Q.T @ R``.
        """
        m = len(Y)
        Qr, Rr = torch.linalg.qr(Y.T)  # [n_local, p], [p, m], p = min(n_local, m)
        stack = Y.new_zeros(self.world * m, m)
        stack[self.rank * m:self.rank * m + len(Rr)] = Rr
        self.sum(stack)
        Q2, R = torch.linalg.qr(stack)
        return (Qr @ Q2[self.rank * m:self.rank * m + len(Rr)]).T, R
