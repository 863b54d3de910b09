r"""L-BFGS-B (Byrd, Lu, Nocedal & Zhu 1995) on the rows of a :class:`~analysis.core.space.Space`.

Minimises $f(x)$ subject to $l \le x \le u$ (each bound may be infinite) with the
limited-memory BFGS matrix in compact form,
$B = \theta I - W M W^\top$, $W = [Y,\ \theta S]$ (Byrd et al. 1995, sec. 3, after Byrd,
Nocedal & Schnabel 1994; $S$, $Y$ the last $m$ pairs $s = x_{k+1} - x_k$, $y = g_{k+1} - g_k$,
$\theta = y^\top y / s^\top y$). A port of scipy's L-BFGS-B (version 3.0 with the
subspace minimisation of Morales & Nocedal 2011; the C translation of scipy >= 1.15,
``scipy/optimize/__lbfgsb.c``, driven as ``scipy.optimize.minimize(method="L-BFGS-B")``
drives it, with its defaults). Each iteration:

1. the generalized Cauchy point (GCP): the first local minimiser of the model
   $q(x) = g^\top (x - x_k) + \frac12 (x - x_k)^\top B (x - x_k)$ along the projected
   path $x(t) = P(x_k - t g)$, the path's breakpoints $t_i$ taken in increasing order with
   the recursion of $f' = q'(t)$ and $f'' = q''(t)$ (Byrd et al. 1995, sec. 4;
   ``cauchy``), $f''$ kept above $\epsilon_{\mathrm{mach}} f''_0$;
2. the direct primal subspace minimisation of $q$ over the variables free at the GCP
   (Byrd et al. 1995, sec. 5.1: the $2m \times 2m$ matrix $K$ of ``formk``, the reduced
   gradient of ``cmprlb``), the minimiser projected onto the box and, when that is not a
   descent direction, backtracked onto the box along the Newton step (Morales & Nocedal
   2011; ``subsm``);
3. the Moré & Thuente (1994) line search on $x_k + \alpha d$ (MINPACK-2's ``dcsrch`` and
   ``dcstep``, :class:`_MoreThuente`) with $\mu = 10^{-3}$, $\eta = 0.9$,
   ``xtol`` $= 0.1$, $\alpha \le \alpha_{\max}$ (1 at the first iteration, else the step to the
   box's edge, at most $10^{10}$), the first trial $\alpha = 1$ ($\min(1/\|d\|,
   \alpha_{\max})$ at the first iteration unless every variable has both bounds), at most
   ``max_ls`` evaluations; a failed search restarts from $B = I$, or stops when $B = I$;
4. the pair is skipped when $s^\top y \le \epsilon_{\mathrm{mach}} (-g_k^\top s)$.

It stops when $\max_i |P(x - g) - x|_i \le$ ``pgtol`` (the projected gradient), when
$(f_k - f_{k+1}) / \max(|f_k|, |f_{k+1}|, 1) \le$ ``ftol``, after ``max_iter`` iterations,
or once more than ``max_fun`` evaluations were spent (checked after an iteration).
An evaluation at the point evaluated last is not repeated (as scipy's ``ScalarFunction``).

Vectors are rows of ``space``: one process (:class:`~analysis.core.space.Space`) holds the
whole vectors; on a :class:`~analysis.core.space.ShardedSpace` each rank holds its rows, every
inner product, norm, count or extremum is a local reduction completed by one all-reduce, and
the $2m \times 2m$ matrices and the line search's scalars are computed on every rank from the
same reduced numbers. The Cauchy path needs the breakpoints in global increasing order: each
rank sorts its own, and the path is walked in chunks: each rank offers its next $k$
breakpoints ($t_i$, $-g_i$, the distance to the bound and the row of $W$), stacked on every
rank by :meth:`~analysis.core.space.Space.gather`; all the offered breakpoints up to the
smallest of the last offered $t_i$ of the ranks that hold more are in global order, and they
are processed at once (the recursions by prefix sums, which on the CPU add in scipy's order;
the floor on $f''$ by a running maximum), the state carried to the next chunk ($k$ starts at
16 and doubles, while the stacked chunk stays below an average shard). So no rank holds more
than its rows (the $2m$ stored vectors and a few work rows) and $O(m^2)$ numbers, and one
process runs the same code with one rank.

Up to the order of summation (blocked inner products; ties between breakpoints) the iterates
are scipy's (10-iteration runs agree to about 1e-13 in one process, with the same ``nit`` and
``nfev``). By design, the products of $K$ are recomputed at each
iteration over the current free set (scipy updates them incrementally, which leaves stale
products after an iteration whose GCP has no free variable), and the backtracking puts on its
bound every variable whose step to the bound is the smallest (scipy: the first of them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .space import Space
from .validation import ArgumentTypeError, check_int, check_nonnegative

EPS = 2.220446049250313e-16  # float64 machine epsilon, scipy's ``epsmach``
FTOL = 2.2204460492503131e-09  # scipy's default ``ftol`` (factr = 1e7)
STEP_CAP = 1e10  # the largest step of the line search
FIRST_CHUNK = 16  # breakpoints each rank offers in the Cauchy path's first chunk
LS_FTOL, LS_GTOL, LS_XTOL = 1e-3, 0.9, 0.1  # the line search's constants (scipy's lnsrlb)

MESSAGES = {
    "grad": "CONVERGENCE: NORM OF PROJECTED GRADIENT <= PGTOL",
    "f": "CONVERGENCE: RELATIVE REDUCTION OF F <= FACTR*EPSMCH",
    "iter": "STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT",
    "fun": "STOP: TOTAL NO. OF F,G EVALUATIONS EXCEEDS LIMIT",
    "abnormal": "ABNORMAL: ",
}


@dataclass
class LbfgsbResult:
    """The outcome of :func:`lbfgsb` (the fields of scipy's ``OptimizeResult`` of these names).

    Attributes:
        x: The final point (this rank's rows).
        fun: $f(x)$.
        jac: The gradient at ``x`` (this rank's rows).
        nit: Iterations (accepted line searches).
        nfev: Evaluations of ``fun_and_grad``.
        status: 0 converged, 1 ``max_iter`` or ``max_fun`` reached, 2 a line search failed
            with $B = I$ (``x`` is then the last accepted point).
        message: scipy's message, e.g. ``"CONVERGENCE: NORM OF PROJECTED GRADIENT <= PGTOL"``.
    """

    x: Tensor
    fun: float
    jac: Tensor
    nit: int
    nfev: int
    status: int
    message: str

    @property
    def success(self) -> bool:
        """Whether it converged (``status == 0``)."""
        return self.status == 0


# -- the box ---------------------------------------------------------------------------------
class _Box:
    """The bounds as rows of the space, with scipy's ``nbd`` read from which are finite."""

    def __init__(self, lower: Tensor, upper: Tensor, space: Space):
        self.lower, self.upper = lower, upper
        self.has_l, self.has_u = torch.isfinite(lower), torch.isfinite(upper)
        bad = torch.isnan(lower) | torch.isnan(upper) | (lower == math.inf) \
            | (upper == -math.inf) | (lower > upper)
        counts = space.sum(torch.stack([bad.sum(), (self.has_l | self.has_u).sum(),
                                        (self.has_l & self.has_u).sum()]).to(lower.dtype))
        if counts[0] > 0:
            raise ValueError(f"lower and upper must satisfy lower <= upper elementwise (not NaN, "
                             f"lower < inf, upper > -inf); {int(counts[0])} elements do not")
        self.constrained = bool(counts[1] > 0)
        self.boxed = bool(counts[2] == space.n)
        self.fixed = self.has_l & self.has_u & (upper - lower <= 0)

    def clip(self, x: Tensor) -> Tensor:
        r"""The projection $\min(\max(x, l), u)$."""
        return torch.clamp(x, self.lower, self.upper)

    def gradient_norm(self, x: Tensor, g: Tensor, space: Space) -> float:
        r"""$\max_i |P(x - g) - x|_i$, the projected gradient (scipy's ``projgr``; NaN: a NaN)."""
        pg = torch.where((g < 0) & self.has_u, torch.maximum(x - self.upper, g), g)
        pg = torch.where((g >= 0) & self.has_l, torch.minimum(x - self.lower, pg), pg)
        local = torch.stack([pg.abs().amax() if pg.numel() else pg.new_zeros(()),
                             torch.isnan(g).any().to(g.dtype)])
        out = space.amax(local)
        return math.nan if out[1] > 0 else float(out[0])

    def ratios(self, base: Tensor, d: Tensor, mask: Tensor | None = None) -> Tensor:
        r"""Steps $\alpha_i$ from ``base`` along ``d`` to each variable's bound (inf: none).

        0 where ``base`` is on (or beyond) the bound ``d`` points to, as in scipy's ``lnsrlb``
        and ``subsm``.
        """
        down, up = self.has_l & (d < 0), self.has_u & (d > 0)
        if mask is not None:
            down, up = down & mask, up & mask
        gap_l, gap_u = self.lower - base, self.upper - base
        r_l = torch.where(gap_l >= 0, torch.zeros_like(d), gap_l / d)
        r_u = torch.where(gap_u <= 0, torch.zeros_like(d), gap_u / d)
        return torch.where(down, r_l, torch.where(up, r_u, torch.full_like(d, math.inf)))


def _global_min(space: Space, t: Tensor) -> float:
    """The smallest element of ``t`` over all ranks (inf when there is none)."""
    local = t.amin() if t.numel() else t.new_tensor(math.inf)
    return -float(space.amax(-local))


# -- the limited-memory matrix ---------------------------------------------------------------
def _gram(rows: list[Tensor], weight: Tensor | None = None) -> Tensor:
    """This rank's part of the Gram matrix of ``rows`` (with the column weights ``weight``).

    Computed in blocks of columns, each stacked block no larger than one row.
    """
    n = rows[0].numel()
    out = rows[0].new_zeros(len(rows), len(rows))
    step = max(FIRST_CHUNK, n // len(rows))
    for a in range(0, n, step):
        block = torch.stack([r[a:a + step] for r in rows])
        left = block if weight is None else block * weight[a:a + step]
        out += left @ block.T
    return out


class _Memory:
    r"""The compact L-BFGS matrix $B = \theta I - W M W^\top$: the pairs and the small matrices.

    ``S``, ``Y``: the pairs, oldest first (separate rows of the space); ``SY``: $S^\top Y$ (lower
    triangle and diagonal: $L$ and $D$); ``SS``: $S^\top S$; ``J``: the lower Cholesky factor
    of $T = \theta S^\top S + L D^{-1} L^\top$ (scipy's ``formt``).
    """

    def __init__(self, space: Space, m: int, like: Tensor):
        self.space, self.m, self.like = space, m, like
        self.reset()

    def reset(self):
        """Forget the pairs: $B = I$ (scipy's refresh of the memory)."""
        self.S, self.Y = [], []
        self.theta = 1.0
        self.SY = self.SS = self.J = self.like.new_zeros(0, 0)

    @property
    def col(self) -> int:
        """The number of pairs held."""
        return len(self.S)

    def wt(self, v: Tensor) -> Tensor:
        r"""$W^\top v = [Y^\top v;\ \theta S^\top v]$ (one all-reduce)."""
        if not self.col:
            return v.new_zeros(0)
        out = self.space.sum(torch.stack([torch.dot(r, v) for r in self.Y + self.S]))
        out[self.col:] *= self.theta
        return out

    def bmv(self, V: Tensor) -> Tensor:
        r"""$M v$ for each row $v$ of ``V`` (``[..., 2 col]``; scipy's ``bmv``).

        $M^{-1} = [[-D, L^\top], [L, \theta S^\top S]]$, solved through
        $[[D^{1/2}, 0], [-L D^{-1/2}, J]]\,[[-D^{1/2}, D^{-1/2} L^\top], [0, J^\top]]$.
        """
        c = self.col
        if not c:
            return V
        rows = V.reshape(-1, 2 * c)
        D = torch.diagonal(self.SY)
        root, L = D.sqrt(), torch.tril(self.SY, -1)
        v1, v2 = rows[:, :c], rows[:, c:]
        p2 = v2 + (v1 / D) @ L.T
        p2 = torch.linalg.solve_triangular(self.J, p2.T, upper=False)
        p2 = torch.linalg.solve_triangular(self.J.T, p2, upper=True).T
        p1 = -(v1 / root) / root + (p2 @ L) / D
        return torch.cat([p1, p2], dim=1).reshape(V.shape)

    def combine(self, base: Tensor, a: Tensor, b: Tensor) -> Tensor:
        r"""``base`` $+ \sum_j (a_j y_j + b_j s_j)$, term by term as scipy."""
        for y, s, aj, bj in zip(self.Y, self.S, a.tolist(), b.tolist()):
            base = base + y * aj + s * bj
        return base

    def update(self, s: Tensor, y: Tensor, stp: float, dtd: float, dr: float, rr: float
               ) -> bool:
        """Keep the pair (scipy's ``matupd`` and ``formt``).

        Returns:
            False when the Cholesky factorization of $T$ fails (the caller refreshes).
        """
        if self.col == self.m:
            del self.S[0], self.Y[0]
            self.SY, self.SS = self.SY[1:, 1:], self.SS[1:, 1:]
        old = self.col
        new = self.space.sum(torch.stack([torch.dot(s, r) for r in self.Y]
                                         + [torch.dot(r, s) for r in self.S])) \
            if old else s.new_zeros(0)
        SY, SS = s.new_zeros(old + 1, old + 1), s.new_zeros(old + 1, old + 1)
        SY[:old, :old], SS[:old, :old] = self.SY, self.SS
        SY[old, :old], SY[old, old] = new[:old], dr
        SS[:old, old] = SS[old, :old] = new[old:]
        SS[old, old] = dtd if stp == 1.0 else stp * stp * dtd
        self.S.append(s)
        self.Y.append(y)
        self.SY, self.SS, self.theta = SY, SS, rr / dr
        L, D = torch.tril(SY, -1), torch.diagonal(SY)
        self.J, info = torch.linalg.cholesky_ex(self.theta * SS + (L / D) @ L.T)
        return int(info) == 0


# -- the generalized Cauchy point ------------------------------------------------------------
@dataclass
class _Path:
    r"""The state of the walk along the Cauchy path (the same on every rank).

    ``f1``, ``f2``: $f'$ and $f''$ on the current segment; ``f2_floor``:
    $\epsilon_{\mathrm{mach}} f''_0$; ``p``: $W^\top d$ of the current direction; ``c``:
    $W^\top (x(t_j) - x)$; ``tj``: the last breakpoint passed, ``tsum`` the sum of the
    segments' lengths up to it (scipy's, $t_j$ up to rounding); ``dtm``: the step to the
    minimiser from there (set when the walk ends).
    """

    f1: float
    f2: float
    f2_floor: float
    p: Tensor
    c: Tensor
    tj: float = 0.0
    tsum: float = 0.0
    dtm: float = 0.0


def _classify(x: Tensor, g: Tensor, box: _Box) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""The first loop of scipy's ``cauchy``: which variables move, and their breakpoints.

    Returns:
        ``(free, d, breaks, times)``: the variables free at $x$ (scipy's ``iwhere <= 0``),
        the direction $d = -g$ on the moving ones (0 elsewhere), the indices of the moving
        variables that reach a bound, and their breakpoints $t_i$.
    """
    neg = -g
    xlower = box.has_l & (x - box.lower <= 0)
    xupper = box.has_u & (box.upper - x <= 0)
    bounded = (box.has_l | box.has_u) & ~box.fixed
    out = torch.where(xlower, neg <= 0, torch.where(xupper, neg >= 0, torch.zeros_like(xlower)))
    zero = ~xlower & ~xupper & (neg == 0)
    moving = (bounded & ~out & ~zero) | ~(box.has_l | box.has_u)
    free = moving | (bounded & ~out & zero)
    d = torch.where(moving, neg, torch.zeros_like(neg))
    to_lower = moving & box.has_l & (neg < 0)
    to_upper = moving & ~to_lower & box.has_u & (neg > 0)
    breaks = (to_lower | to_upper).nonzero().flatten()
    gap = torch.where(to_lower, x - box.lower, box.upper - x)[breaks]
    return free, d, breaks, gap / d[breaks].abs()


def _chunk(walk: dict, k: int, mem: _Memory) -> Tensor:
    """This rank's next ``k`` breakpoints as rows ``[t, d, z, W row]`` plus a header row.

    The header holds how many rows are real and the last offered $t$ when more remain
    (inf otherwise).
    """
    ptr, times, order = walk["ptr"], walk["times"], walk["order"]
    x, d, box = walk["x"], walk["d"], walk["box"]
    idx = order[ptr:ptr + k]
    n = len(idx)
    out = x.new_zeros(k + 1, 3 + 2 * mem.col)
    out[:n, 0] = times[ptr:ptr + k]
    out[:n, 1] = d[idx]
    out[:n, 2] = torch.where(d[idx] > 0, box.upper[idx] - x[idx], box.lower[idx] - x[idx])
    for j, (y, s) in enumerate(zip(mem.Y, mem.S)):
        out[:n, 3 + j] = y[idx]
        out[:n, 3 + mem.col + j] = mem.theta * s[idx]
    out[k, 0] = n
    out[k, 1] = times[ptr + k - 1] if len(times) > ptr + k else math.inf
    return out


def _merge(every: Tensor) -> tuple[Tensor, Tensor]:
    """The offered breakpoints that are in global order, sorted by $t$, and their ranks.

    Every rank offered its next breakpoints in increasing order; those up to the smallest
    last-offered $t$ of the ranks that hold more come before every breakpoint not offered.
    """
    k = every.shape[1] - 1
    bound = every[:, k, 1].min()
    parts, owners = [], []
    for r, rows in enumerate(every):
        rows = rows[:int(rows[k, 0])]
        rows = rows[rows[:, 0] <= bound]
        parts.append(rows)
        owners.append(torch.full((len(rows),), r, dtype=torch.long, device=rows.device))
    items, owner = torch.cat(parts), torch.cat(owners)
    order = torch.sort(items[:, 0], stable=True).indices
    return items[order], owner[order]


def _sequential(first, terms: Tensor) -> Tensor:
    """``first``, then ``first + terms[0]``, ... summed in order (scipy's rounding on the CPU).

    ``terms`` is ``[L, ...]``; returns ``[L + 1, ...]``.
    """
    start = torch.as_tensor(first, dtype=terms.dtype, device=terms.device)
    return torch.cumsum(torch.cat([start.expand(terms.shape[1:])[None], terms]), 0)


def _curvatures(path: _Path, terms: Tensor) -> Tensor:
    r"""$f''$ after each breakpoint: the running sums of ``terms`` (``[L, 3]``), at least the floor.

    Summed in scipy's order; once a sum falls below the floor (rounding only: $f''$ is a
    curvature of the positive definite $B$), the floored recursion
    $f''_{i+1} = \max(\text{floor}, f''_i + \Delta_i)$ is evaluated in closed form with a
    running maximum.
    """
    S = _sequential(path.f2, terms.reshape(-1))[3::3]
    if not (S < path.f2_floor).any():
        return S
    return S + torch.cummax(path.f2_floor - S, 0).values.clamp(min=0)


def _segments(path: _Path, items: Tensor, mem: _Memory) -> tuple[int | None, _Path]:
    r"""Walk the path through the breakpoints ``items`` (rows ``[t, d, z, W row]``, sorted).

    scipy ``cauchy``'s loop: passing breakpoint $i$ (direction component $d_i$, distance
    $z_i$ to its bound, row $w_i$ of $W$, $v_i = M w_i$) after a segment of length
    $\Delta t_i$ gives $c \mathrel{+}= \Delta t_i\, p$, $f' \mathrel{+}= \Delta t_i f''
    + d_i^2 - \theta d_i z_i + d_i\, c^\top v_i$, $f'' \mathrel{+}= -\theta d_i^2 + 2 d_i\,
    p^\top v_i - d_i^2\, w_i^\top v_i$ (at least $\epsilon_{\mathrm{mach}} f''_0$),
    $p \mathrel{-}= d_i w_i$ (Byrd et al. 1995, sec. 4). The recursions are prefix
    sums of their terms, interleaved in scipy's order. The minimiser lies on the segment
    before breakpoint $i$ when $-f'/f'' < \Delta t_i$.

    Returns:
        ``(stop, path)``: the index of the first breakpoint not passed, with the path at
        that minimiser (``dtm`` set), or None and the path after the last breakpoint.
    """
    T, D, Z, B = items[:, 0], items[:, 1], items[:, 2], items[:, 3:]
    theta = mem.theta
    prev = torch.cat([T.new_tensor([path.tj]), T[:-1]])
    dt = T - prev
    P = _sequential(path.p, -(D[:, None] * B))  # p before each breakpoint, and after
    C = _sequential(path.c, dt[:, None] * P[:-1])  # c before each, and after
    V = mem.bmv(B)
    wmc, wmp, wmw = (C[1:] * V).sum(1), (P[:-1] * V).sum(1), (B * V).sum(1)
    D2 = D * D
    F2 = _curvatures(path, torch.stack([-theta * D2, (D * 2.0) * wmp, -(D2 * wmw)], 1))
    F2 = torch.cat([F2.new_tensor([path.f2]), F2])
    F1 = _sequential(path.f1, torch.stack([dt * F2[:-1], D2, -(theta * D) * Z, D * wmc], 1)
                     .reshape(-1))[::4]
    tsum = _sequential(path.tsum, dt)
    dtm = -F1[:-1] / F2[:-1]
    hit = (dtm < dt).nonzero()
    if len(hit):
        k = int(hit[0])
        return k, replace(path, tsum=float(tsum[k]), dtm=float(dtm[k]), p=P[k], c=C[k])
    return None, replace(path, f1=float(F1[-1]), f2=float(F2[-1]), p=P[-1], c=C[-1],
                         tj=float(T[-1]), tsum=float(tsum[-1]))


def _walk(path: _Path, walk: dict, mem: _Memory, space: Space, n_breaks: int, bounded: bool
          ) -> tuple[int, _Path]:
    """Walk the path in chunks of the ranks' breakpoints (module docstring).

    Returns:
        ``(passed, path)``: how many of this rank's breakpoints (in increasing order) were
        passed (their variables are at their bounds at the GCP), and the final path.
    """
    widest = max(FIRST_CHUNK, space.n // space.world // (space.world * (3 + 2 * mem.col)))
    k, done = FIRST_CHUNK, 0
    while True:
        items, owner = _merge(space.gather(_chunk(walk, k, mem)))
        stop, path = _segments(path, items, mem)
        used = len(items) if stop is None else stop
        walk["ptr"] += int((owner[:used] == space.rank).sum())
        done += used
        if stop is not None:
            return walk["ptr"], path
        if done >= n_breaks:  # every breakpoint passed
            dtm = 0.0 if bounded else -path.f1 / path.f2
            return walk["ptr"], replace(path, dtm=dtm)
        k = min(2 * k, widest)


def _cauchy(x: Tensor, g: Tensor, box: _Box, mem: _Memory, space: Space
            ) -> tuple[Tensor, Tensor, Tensor]:
    r"""The generalized Cauchy point (scipy's ``cauchy``).

    Returns:
        ``(xcp, c, free)``: the GCP, $c = W^\top (x^c - x)$ and the variables free at it.
    """
    free, d, breaks, times = _classify(x, g, box)
    c2 = 2 * mem.col
    moving = d != 0
    loose = moving.clone()
    loose[breaks] = False  # moving towards no bound
    # f' = -|d|^2 summed in index order as scipy (f' cancels along the path: the order shows)
    f1 = torch.cumsum(-(d * d), 0)[-1] if d.numel() else d.new_zeros(())
    local = [torch.dot(r, d) for r in mem.Y + mem.S] + [f1, moving.sum(), loose.sum(),
                                                        breaks.new_tensor(len(breaks))]
    total = space.sum(torch.stack([t.to(x.dtype) for t in local]))
    p = total[:c2].clone()
    p[mem.col:] *= mem.theta
    f1, n_moving, n_loose, n_breaks = (float(t) for t in total[c2:])
    if n_moving == 0:
        return x.clone(), x.new_zeros(c2), free
    f2 = -mem.theta * f1
    f2_floor = EPS * f2
    if mem.col:
        f2 -= float(torch.dot(mem.bmv(p), p))
    path = _Path(f1, f2, f2_floor, p, x.new_zeros(c2), dtm=-f1 / f2)
    passed = 0
    if n_breaks:
        times, perm = torch.sort(times, stable=True)
        walk = dict(ptr=0, times=times, order=breaks[perm], x=x, d=d, box=box)
        passed, path = _walk(path, walk, mem, space, int(n_breaks), n_loose == 0)
    dtm = max(path.dtm, 0.0)
    xcp = x + (path.tsum + dtm) * d
    fixed = walk["order"][:passed] if passed else breaks[:0]
    xcp[fixed] = torch.where(d[fixed] > 0, box.upper[fixed], box.lower[fixed])
    free[fixed] = False
    return xcp, path.c + dtm * path.p, free


# -- subspace minimisation -------------------------------------------------------------------
def _formk(mem: _Memory, free: Tensor, space: Space) -> Tensor | None:
    r"""The upper triangular factor of $K$ (scipy's ``formk``), or None if it is not definite.

    $K = [[-D - Y^\top Z Z^\top Y / \theta,\ L_a^\top - R_z^\top],
    [L_a - R_z,\ \theta S^\top A A^\top S]]$ with $Z$ / $A$ the free / active variables at the
    GCP, $L_a$ the strictly lower triangle of $S^\top A A^\top Y$ and $R_z$ the upper triangle
    of $S^\top Z Z^\top Y$, factored as $K = U^\top E U$, $E = \mathrm{diag}(-I, I)$:
    $U = [[U_{11}, X], [0, U_{22}]]$ with $U_{11}^\top U_{11} = D + Y^\top Z Z^\top Y/\theta$,
    $U_{11}^\top X = R_z^\top - L_a^\top$, $U_{22}^\top U_{22} = \theta S^\top A A^\top S +
    X^\top X$. The products over the free and the active set: one all-reduce.
    """
    c, theta = mem.col, mem.theta
    rows = mem.Y + mem.S
    weight = free.to(rows[0].dtype)
    grams = space.sum(torch.stack([_gram(rows, weight), _gram(rows, 1.0 - weight)]))
    on_free, on_active = grams[0], grams[1]
    top = on_free[:c, :c] / theta + torch.diag(torch.diagonal(mem.SY))
    U11, info = torch.linalg.cholesky_ex(top, upper=True)
    if int(info):
        return None
    right = torch.triu(on_free[c:, :c]).T - torch.tril(on_active[c:, :c], -1).T
    X = torch.linalg.solve_triangular(U11.T, right, upper=False)
    U22, info = torch.linalg.cholesky_ex(theta * on_active[c:, c:] + X.T @ X, upper=True)
    if int(info):
        return None
    U = U11.new_zeros(2 * c, 2 * c)
    U[:c, :c], U[:c, c:], U[c:, c:] = U11, X, U22
    return U


def _reduced_gradient(x: Tensor, g: Tensor, xcp: Tensor, c: Tensor | None, free: Tensor,
                      mem: _Memory, box: _Box) -> Tensor:
    r"""$r = -Z^\top (g + B (x^c - x))$ on the free variables, 0 elsewhere (scipy's ``cmprlb``)."""
    if not box.constrained:
        return -g
    a = mem.bmv(c)
    r = -mem.theta * (xcp - x) - g
    r = mem.combine(r, a[:mem.col], mem.theta * a[mem.col:])
    return torch.where(free, r, torch.zeros_like(r))


def _newton(r: Tensor, free: Tensor, U: Tensor, mem: _Memory) -> Tensor:
    r"""The subspace Newton step $d = r / \theta + Z^\top W K^{-1} W^\top Z r / \theta^2$."""
    c, theta = mem.col, mem.theta
    wv = mem.wt(r)
    wv = torch.linalg.solve_triangular(U.T, wv[:, None], upper=False)
    wv[:c] = -wv[:c]
    wv = torch.linalg.solve_triangular(U, wv, upper=True)[:, 0]
    d = mem.combine(r, wv[:c] / theta, wv[c:])  # as scipy: y_j wv_j / theta + s_j wv_{c+j}
    return torch.where(free, d * (1.0 / theta), torch.zeros_like(d))


def _subspace(x: Tensor, g: Tensor, xcp: Tensor, r: Tensor, free: Tensor, U: Tensor,
              mem: _Memory, box: _Box, space: Space) -> Tensor:
    r"""The subspace minimiser (scipy's ``subsm``, Morales & Nocedal 2011).

    The Newton step from the GCP projected onto the box; if it touches a bound and is not
    a descent direction from $x$ ($(x^+ - x)^\top g > 0$), the step is instead cut at the
    first bound it meets along the Newton direction.
    """
    d = _newton(r, free, U, mem)
    proj = torch.where(free, box.clip(xcp + d), xcp)
    hits = free & ((box.has_l & (proj == box.lower)) | (box.has_u & (proj == box.upper)))
    out = space.sum(torch.stack([hits.sum().to(x.dtype), torch.dot(proj - x, g)]))
    if out[0] == 0 or out[1] <= 0:
        return proj
    ratio = box.ratios(xcp, d, free)
    alpha = min(1.0, _global_min(space, ratio))
    new = xcp + alpha * d
    if alpha < 1.0:
        snap = ratio == alpha
        new = torch.where(snap, torch.where(d > 0, box.upper, box.lower), new)
    return new


def _direction(x: Tensor, g: Tensor, box: _Box, mem: _Memory, space: Space) -> Tensor | None:
    """The point $z$ (the search direction is $z - x$): the GCP, then subspace minimisation.

    Returns None when a factorization fails (the caller refreshes the memory).
    """
    if box.constrained or not mem.col:
        xcp, c, free = _cauchy(x, g, box, mem, space)
    else:  # no bounds: no Cauchy point (scipy)
        xcp, c, free = x, None, torch.ones_like(x, dtype=torch.bool)
    if not mem.col or not float(space.sum(free.sum().to(x.dtype))):
        return xcp
    U = _formk(mem, free, space)
    if U is None:
        return None
    r = _reduced_gradient(x, g, xcp, c, free, mem, box)
    return _subspace(x, g, xcp, r, free, U, mem, box, space)


# -- the line search -------------------------------------------------------------------------
def _cubic(a: float, fa: float, da: float, b: float, fb: float, db: float, clip: bool = False
           ) -> tuple[float, float]:
    r"""``(gamma, theta)`` of the cubic through $(a, f_a, f'_a)$, $(b, f_b, f'_b)$ (``dcstep``).

    $\theta = 3 (f_a - f_b)/(b - a) + f'_a + f'_b$, $\gamma = s \sqrt{(\theta/s)^2 -
    (f'_a/s)(f'_b/s)}$ with $s = \max(|\theta|, |f'_a|, |f'_b|)$ (the root of at least 0 if
    ``clip``).
    """
    theta = 3.0 * (fa - fb) / (b - a) + da + db
    s = np.fmax(abs(theta), np.fmax(abs(da), abs(db)))
    root = (theta / s) ** 2 - (da / s) * (db / s)
    return s * np.sqrt(np.fmax(0.0, root) if clip else root), theta


def _step_higher(stx, fx, dx, stp, fp, dp):
    """``dcstep``'s first case, $f_p > f_x$: the cubic step, or halfway to the quadratic one."""
    gamma, theta = _cubic(stx, fx, dx, stp, fp, dp)
    if stp < stx:
        gamma = -gamma
    p = (gamma - dx) + theta
    q = ((gamma - dx) + gamma) + dp
    stpc = stx + (p / q) * (stp - stx)
    stpq = stx + ((dx / ((fx - fp) / (stp - stx) + dx)) / 2.0) * (stp - stx)
    return stpc if abs(stpc - stx) < abs(stpq - stx) else stpc + (stpq - stpc) / 2.0


def _step_opposite(stx, fx, dx, stp, fp, dp):
    """``dcstep``'s second case, derivatives of opposite signs: the cubic or the secant step."""
    gamma, theta = _cubic(stx, fx, dx, stp, fp, dp)
    if stp > stx:
        gamma = -gamma
    p = (gamma - dp) + theta
    q = ((gamma - dp) + gamma) + dx
    stpc = stp + (p / q) * (stx - stp)
    stpq = stp + (dp / (dp - dx)) * (stx - stp)
    return stpc if abs(stpc - stp) > abs(stpq - stp) else stpq


def _step_decreasing(stx, fx, dx, sty, stp, fp, dp, brackt, stmin, stmax):
    """``dcstep``'s third case: same signs, $|f'|$ decreasing."""
    gamma, theta = _cubic(stx, fx, dx, stp, fp, dp, clip=True)
    if stp > stx:
        gamma = -gamma
    p = (gamma - dp) + theta
    q = (gamma + (dx - dp)) + gamma
    r = p / q
    if r < 0.0 and gamma != 0.0:
        stpc = stp + r * (stx - stp)
    else:
        stpc = stmax if stp > stx else stmin
    stpq = stp + (dp / (dp - dx)) * (stx - stp)
    if brackt:
        stpf = stpc if abs(stpc - stp) < abs(stpq - stp) else stpq
        cap = stp + 0.66 * (sty - stp)
        return np.fmin(cap, stpf) if stp > stx else np.fmax(cap, stpf)
    stpf = stpc if abs(stpc - stp) > abs(stpq - stp) else stpq
    return np.fmax(stmin, np.fmin(stmax, stpf))


def _step_same(stx, sty, fy, dy, stp, fp, dp, brackt, stmin, stmax):
    """``dcstep``'s fourth case: same signs, $|f'|$ not decreasing."""
    if brackt:
        gamma, theta = _cubic(stp, fp, dp, sty, fy, dy)
        if stp > sty:
            gamma = -gamma
        p = (gamma - dp) + theta
        q = ((gamma - dp) + gamma) + dy
        return stp + (p / q) * (sty - stp)
    return stmax if stp > stx else stmin


def _dcstep(stx, fx, dx, sty, fy, dy, stp, fp, dp, brackt, stmin, stmax):
    """MINPACK-2's ``dcstep``: the safeguarded next step and the updated interval.

    Returns:
        ``(stx, fx, dx, sty, fy, dy, stp, brackt)``.
    """
    with np.errstate(all="ignore"):
        sgnd = dp * (dx / abs(dx))
        if fp > fx:
            stpf, brackt = _step_higher(stx, fx, dx, stp, fp, dp), True
        elif sgnd < 0.0:
            stpf, brackt = _step_opposite(stx, fx, dx, stp, fp, dp), True
        elif abs(dp) < abs(dx):
            stpf = _step_decreasing(stx, fx, dx, sty, stp, fp, dp, brackt, stmin, stmax)
        else:
            stpf = _step_same(stx, sty, fy, dy, stp, fp, dp, brackt, stmin, stmax)
    if fp > fx:
        sty, fy, dy = stp, fp, dp
    else:
        if sgnd < 0.0:
            sty, fy, dy = stx, fx, dx
        stx, fx, dx = stp, fp, dp
    return stx, fx, dx, sty, fy, dy, stpf, brackt


class _MoreThuente:
    r"""The Moré & Thuente (1994) line search, MINPACK-2's ``dcsrch`` as L-BFGS-B calls it.

    Looks for $\alpha \in [0, \alpha_{\max}]$ with $\phi(\alpha) \le \phi(0) + \mu \alpha
    \phi'(0)$ and $|\phi'(\alpha)| \le \eta |\phi'(0)|$; the scalars in float64 (numpy), so
    the arithmetic is the C code's.

    Args:
        f0: $\phi(0)$.
        g0: $\phi'(0) < 0$.
        stp: The first trial step.
        stpmax: $\alpha_{\max}$.
        ftol: $\mu$.
        gtol: $\eta$.
        xtol: The relative width of the bracket below which it stops.

    Attributes:
        stp: The step to evaluate next (or the accepted step once a call returned True).
    """

    def __init__(self, f0: float, g0: float, stp: float, stpmax: float, ftol: float = 1e-3,
                 gtol: float = 0.9, xtol: float = 0.1):
        f0, g0, stp = np.float64(f0), np.float64(g0), np.float64(stp)
        self.stp, self.stpmin, self.stpmax = stp, np.float64(0.0), np.float64(stpmax)
        self.gtol, self.xtol = gtol, xtol
        self.brackt, self.stage = False, 1
        self.finit, self.ginit, self.gtest = f0, g0, ftol * g0
        self.width = self.stpmax - self.stpmin
        self.width1 = self.width / 0.5
        self.stx = self.sty = np.float64(0.0)
        self.fx = self.fy = f0
        self.gx = self.gy = g0
        self.stmin, self.stmax = np.float64(0.0), stp + 4.0 * stp

    def __call__(self, f: float, g: float) -> bool:
        r"""Take $\phi$ and $\phi'$ at :attr:`stp`.

        Returns:
            True: :attr:`stp` is accepted (both conditions, or a warning: rounding errors,
            the bracket below ``xtol``, $\alpha_{\max}$ or $0$ reached); False: evaluate at the
            new :attr:`stp`.
        """
        f, g = np.float64(f), np.float64(g)
        ftest = self.finit + self.stp * self.gtest
        if self.stage == 1 and f <= ftest and g >= 0.0:
            self.stage = 2
        if self._finished(f, g, ftest):
            return True
        self._next(f, g, ftest)
        return False

    def _finished(self, f, g, ftest) -> bool:
        """``dcsrch``'s tests for warnings and convergence."""
        stp, bracketed = self.stp, self.brackt
        return bool((bracketed and (stp <= self.stmin or stp >= self.stmax))
                    or (bracketed and self.stmax - self.stmin <= self.xtol * self.stmax)
                    or (stp == self.stpmax and f <= ftest and g <= self.gtest)
                    or (stp == self.stpmin and (f > ftest or g >= self.gtest))
                    or (f <= ftest and abs(g) <= self.gtol * (-self.ginit)))

    def _next(self, f, g, ftest):
        """``dcsrch``'s next trial step (the modified function in the first stage)."""
        t = self.gtest if self.stage == 1 and f <= self.fx and f > ftest else 0.0
        (self.stx, fx, gx, self.sty, fy, gy, self.stp, self.brackt) = _dcstep(
            self.stx, self.fx - self.stx * t, self.gx - t, self.sty, self.fy - self.sty * t,
            self.gy - t, self.stp, f - self.stp * t, g - t, self.brackt, self.stmin,
            self.stmax)
        self.fx, self.fy = fx + self.stx * t, fy + self.sty * t
        self.gx, self.gy = gx + t, gy + t
        if self.brackt:
            if abs(self.sty - self.stx) >= 0.66 * self.width1:
                self.stp = self.stx + 0.5 * (self.sty - self.stx)
            self.width1, self.width = self.width, abs(self.sty - self.stx)
            self.stmin = np.fmin(self.stx, self.sty)
            self.stmax = np.fmax(self.stx, self.sty)
        else:
            self.stmin = self.stp + 1.1 * (self.stp - self.stx)
            self.stmax = self.stp + 4.0 * (self.stp - self.stx)
        self.stp = np.fmin(np.fmax(self.stp, self.stpmin), self.stpmax)
        if self.brackt and (self.stp <= self.stmin or self.stp >= self.stmax
                            or self.stmax - self.stmin <= self.xtol * self.stmax):
            self.stp = self.stx


class _Evaluations:
    """``fun_and_grad`` with scipy's count and its cache of the point evaluated last."""

    def __init__(self, fun_and_grad: Callable, space: Space):
        self.fun_and_grad, self.space = fun_and_grad, space
        self.nfev, self.last = 0, None

    def __call__(self, x: Tensor) -> tuple[float, Tensor]:
        r"""$f(x)$ and this rank's rows of $\nabla f(x)$."""
        if self.last is not None:
            differ = x.new_tensor(0.0 if torch.equal(x, self.last[0]) else 1.0)
            if float(self.space.sum(differ)) == 0:
                return self.last[1], self.last[2]
        f, g = self.fun_and_grad(x)
        if not isinstance(g, Tensor) or g.shape != x.shape:
            raise ValueError(f"fun_and_grad must return (f, gradient) with the gradient shaped "
                             f"like x ({tuple(x.shape)}), got {type(g).__name__} "
                             f"{tuple(getattr(g, 'shape', ()))}")
        self.nfev += 1
        self.last = (x, float(f), g.to(x))
        return self.last[1], self.last[2]


def _max_step(x: Tensor, d: Tensor, box: _Box, space: Space, first: bool) -> float:
    """The line search's largest step (scipy's ``lnsrlb``): to the box's edge along ``d``."""
    if not box.constrained:
        return STEP_CAP
    if first:
        return 1.0
    return min(STEP_CAP, _global_min(space, box.ratios(x, d)))


def _line_search(run: _Evaluations, x: Tensor, f: float, g: Tensor, z: Tensor, box: _Box,
                 space: Space, first: bool, max_ls: int) -> tuple | None:
    r"""The line search from $x$ along $d = z - x$ (scipy's ``lnsrlb``).

    The trial point is $z$ itself at $\alpha = 1$, else $P(x + \alpha d)$.

    Returns:
        ``(x, f, g, d, stp, gd, gd0, dtd)`` at the accepted step ($g^\top d$ there and at
        $x$, $\|d\|^2$), or None: $d$ is not a descent direction, or ``max_ls`` evaluations
        found no step.
    """
    d = z - x
    dnorm = float(space.norm(d))
    dtd = dnorm ** 2
    stpmax = _max_step(x, d, box, space, first)
    stp = min(1.0 / dnorm, stpmax) if first and not box.boxed else 1.0
    gd0 = float(space.dot(g, d))
    if gd0 >= 0:
        return None
    search = _MoreThuente(f, gd0, stp, stpmax, LS_FTOL, LS_GTOL, LS_XTOL)
    for _ in range(max_ls):
        stp = float(search.stp)
        xt = z if stp == 1.0 else box.clip(stp * d + x)
        ft, gt = run(xt)
        gd = float(space.dot(gt, d))
        if search(ft, gd):
            return xt, ft, gt, d, stp, gd, gd0, dtd
    return None


def _keep_pair(mem: _Memory, found: tuple, g: Tensor, space: Space):
    r"""Update the memory with the step just taken, unless $s^\top y \le \epsilon (-g^\top s)$."""
    _, _, g_new, d, stp, gd, gd0, dtd = found
    y = g_new - g
    rr = float(space.norm(y)) ** 2
    if stp == 1.0:
        dr, ddum, s = gd - gd0, -gd0, d
    else:
        dr, ddum, s = (gd - gd0) * stp, -gd0 * stp, stp * d
    if dr <= EPS * ddum:
        return  # skipped (scipy's rule)
    if not mem.update(s, y, stp, dtd, dr, rr):
        mem.reset()


def _check(x0: Tensor, lower: Tensor, upper: Tensor, space: Space | None, m: int,
           max_iter: int, max_fun: int, max_ls: int, ftol: float, pgtol: float) -> Space:
    """Validate :func:`lbfgsb`'s arguments; the space."""
    for name, value in (("x0", x0), ("lower", lower), ("upper", upper)):
        if not isinstance(value, Tensor) or value.dim() != 1 or not value.is_floating_point():
            raise ArgumentTypeError(f"{name} must be a 1-D floating-point tensor, got "
                                    f"{type(value).__name__} {tuple(getattr(value, 'shape', ()))}")
    if lower.shape != x0.shape or upper.shape != x0.shape:
        raise ValueError(f"lower and upper must be shaped like x0 {tuple(x0.shape)}, got "
                         f"{tuple(lower.shape)} and {tuple(upper.shape)}")
    for name, value in (("m", m), ("max_iter", max_iter), ("max_fun", max_fun),
                        ("max_ls", max_ls)):
        check_int(name, value, 1)
    check_nonnegative("ftol", ftol)
    check_nonnegative("pgtol", pgtol)
    space = Space(x0.numel()) if space is None else space
    if space.n_local != x0.numel():
        raise ValueError(f"x0 must hold the space's {space.n_local} local elements, got "
                         f"{x0.numel()}")
    return space


def lbfgsb(fun_and_grad: Callable[[Tensor], tuple[float, Tensor]], x0: Tensor, lower: Tensor,
           upper: Tensor, space: Space | None = None, *, max_iter: int = 15000, m: int = 10,
           ftol: float = FTOL, pgtol: float = 1e-5, max_fun: int = 15000, max_ls: int = 20,
           callback: Callable[[Tensor, float], None] | None = None) -> LbfgsbResult:
    r"""Minimise $f$ over the box $l \le x \le u$ with L-BFGS-B (module docstring).

    scipy's ``minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=...)`` with the options
    ``maxcor=m``, ``maxiter=max_iter``, ``ftol``, ``gtol=pgtol``, ``maxfun=max_fun``,
    ``maxls=max_ls`` (the defaults are scipy's), in torch on the rows of ``space``.

    Args:
        fun_and_grad: ``x -> (f, g)``: $f(x)$ as a float (the same on every rank) and this
            rank's rows of $\nabla f(x)$; called on every rank at once.
        x0: The start, this rank's rows (projected onto the box first). Its dtype is the
            solver's (float64 for scipy's arithmetic).
        lower: $l$, rows like ``x0`` (``-inf``: no lower bound).
        upper: $u$ (``inf``: none).
        space: The space of the rows (default: one process, ``Space(len(x0))``).
        max_iter: The most iterations (scipy's ``maxiter``).
        m: The pairs kept (scipy's ``maxcor``).
        ftol: Stop when $(f_k - f_{k+1}) / \max(|f_k|, |f_{k+1}|, 1) \le$ ``ftol``.
        pgtol: Stop when the projected gradient's largest component is at most ``pgtol``.
        max_fun: Stop after the iteration in which more than ``max_fun`` evaluations were spent.
        max_ls: The most evaluations of one line search.
        callback: ``callback(x, f)`` after each iteration.

    Returns:
        A :class:`LbfgsbResult` (``nit``, ``nfev``, ``status``, ``message`` as scipy's).

    Raises:
        ArgumentTypeError: ``x0``, ``lower`` or ``upper`` is not a 1-D floating tensor.
        ValueError: A bound or an option outside its range, or shapes that do not match.
    """
    space = _check(x0, lower, upper, space, m, max_iter, max_fun, max_ls, ftol, pgtol)
    box = _Box(lower.to(x0), upper.to(x0), space)
    run = _Evaluations(fun_and_grad, space)
    x = box.clip(x0)
    f, g = run(x)
    if box.gradient_norm(x, g, space) <= pgtol:
        return LbfgsbResult(x, f, g, 0, run.nfev, 0, MESSAGES["grad"])
    mem, nit = _Memory(space, m, x), 0
    while True:
        z = _direction(x, g, box, mem, space)
        found = None if z is None else _line_search(run, x, f, g, z, box, space, nit == 0,
                                                    max_ls)
        if found is None:
            if z is not None and not mem.col:
                return LbfgsbResult(x, f, g, nit, run.nfev, 2, MESSAGES["abnormal"])
            mem.reset()  # and restart the iteration from B = I
            continue
        nit += 1
        f_old, (x_new, f, g_new) = f, found[:3]
        if callback is not None:
            callback(x_new, f)
        stop = _stopped(box, space, x_new, g_new, f_old, f, nit, run.nfev, max_iter, max_fun,
                        ftol, pgtol)
        if stop is not None:
            return LbfgsbResult(x_new, f, g_new, nit, run.nfev, *stop)
        _keep_pair(mem, found, g, space)
        x, g = x_new, g_new


def _stopped(box: _Box, space: Space, x: Tensor, g: Tensor, f_old: float, f: float, nit: int,
             nfev: int, max_iter: int, max_fun: int, ftol: float, pgtol: float
             ) -> tuple[int, str] | None:
    """``(status, message)`` when the iteration just finished ends the run (scipy's order)."""
    sbgnrm = box.gradient_norm(x, g, space)
    if nit >= max_iter:
        return 1, MESSAGES["iter"]
    if nfev > max_fun:
        return 1, MESSAGES["fun"]
    if sbgnrm <= pgtol:
        return 0, MESSAGES["grad"]
    if f_old - f <= ftol * max(abs(f_old), abs(f), 1.0):
        return 0, MESSAGES["f"]
    return None
