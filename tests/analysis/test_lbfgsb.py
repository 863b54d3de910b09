"""``analysis.core.lbfgsb`` is scipy's L-BFGS-B: on box-constrained float64 problems (a convex
quadratic with many active bounds, bounded and unbounded Rosenbrock, one whose projected
subspace step is backtracked, a path through many breakpoints, a negated log-sum-exp whose
pairs get skipped) every iterate of a 10-iteration run equals scipy's
``minimize(method="L-BFGS-B")`` to 1e-8 (relative; observed 1e-13), with the same ``nit``,
``nfev`` after each iteration and message (line searches that fail with an inconsistent
gradient included); mutants of the Cauchy point, the skipping rule, the backtracking and the
line search's constants are caught. The walk along the Cauchy path in
chunks gives the same point whatever the chunk size, and on 4 ranks (one holding no element,
one holding two ranges) every rank gets the one-process iterates (``sharded_run``, spawned by
the 4-rank test of ``test_sharded_sharpness.py``)."""
import dataclasses

import numpy as np
import pytest
import torch
from scipy.optimize import Bounds, minimize

import analysis.core.lbfgsb as lb
from analysis.core.lbfgsb import lbfgsb
from analysis.core.validation import ArgumentTypeError

RTOL = 1e-8


def _quadratic(rng, n=40):
    """A convex quadratic whose minimiser lies outside the box: many bounds active."""
    Q = rng.standard_normal((n, n))
    A, b = Q @ Q.T / n + 0.1 * np.eye(n), 3 * rng.standard_normal(n)
    return (lambda x: (0.5 * x @ A @ x + b @ x, A @ x + b)), rng.uniform(-0.5, 0.5, n), \
        np.full(n, -0.5), np.full(n, 0.5)


def _rosenbrock(x):
    f = np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)
    g = np.zeros_like(x)
    g[:-1] = -400 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2 * (1 - x[:-1])
    g[1:] += 200 * (x[1:] - x[:-1] ** 2)
    return f, g


def _rosenbrock_box(rng, n=30):
    lo, hi = np.full(n, -1.5), np.full(n, 0.9)
    hi[::3] = 2.0
    lo[1::7], hi[2::5] = -np.inf, np.inf  # not every variable boxed: first step 1/|d|
    return _rosenbrock, rng.uniform(-1, 0.8, n), lo, hi


def _many_breakpoints(rng, n=200):
    """A steep linear term in a tight box: the first Cauchy point passes ~170 breakpoints."""
    c, h = 10 * rng.standard_normal(n), rng.uniform(0.1, 2, n)
    M = 0.01 * rng.standard_normal((n, n))
    H = np.diag(h) + M @ M.T

    def fg(x):
        return (c @ x + 0.5 * x @ H @ x + 0.1 * np.sum(np.sin(3 * x)),
                c + H @ x + 0.3 * np.cos(3 * x))
    return fg, np.zeros(n), -rng.uniform(0.1, 3, n), rng.uniform(0.1, 3, n)


def _negated_lse(rng, n=12):
    """A negated log-sum-exp (a Keskar-like ascent): line searches end at the box's edge with
    negative curvature, so pairs are skipped (at 6 stored pairs)."""
    W, c = rng.standard_normal((n, n)) / np.sqrt(n), rng.standard_normal(n)

    def fg(x):
        z = W @ x
        e = np.exp(z - z.max())
        f = -(z.max() + np.log(e.sum())) + 0.05 * x @ x + 0.1 * c @ x
        return f, -(W.T @ (e / e.sum())) + 0.1 * x + 0.1 * c
    return fg, 0.3 * rng.uniform(-3, 3, n), np.full(n, -3.0), np.full(n, 3.0)


def _skip(rng):
    rng.integers(5, 30)  # (found by a search: a projected subspace step is backtracked)
    return rng


PROBLEMS = {
    "quadratic": lambda: _quadratic(np.random.default_rng(0)),
    "rosenbrock_box": lambda: _rosenbrock_box(np.random.default_rng(1)),
    "rosenbrock_free": lambda: (_rosenbrock, np.random.default_rng(2).uniform(-1, 1, 10),
                                np.full(10, -np.inf), np.full(10, np.inf)),
    "rosenbrock_backtracked": lambda: _rosenbrock_box(_skip(np.random.default_rng(81)), n=6),
    "many_breakpoints": lambda: _many_breakpoints(np.random.default_rng(0)),
    "negated_lse": lambda: _negated_lse(np.random.default_rng(8)),
}


def scipy_run(problem, max_iter):
    """scipy's iterates ``[(x, evaluations so far)]`` and its result."""
    fg, x0, lo, hi = problem
    calls, seen = [0], []

    def counted(x):
        calls[0] += 1
        return fg(x)

    r = minimize(counted, x0, jac=True, method="L-BFGS-B", bounds=Bounds(lo, hi),
                 options={"maxiter": max_iter}, callback=lambda x: seen.append((x, calls[0])))
    return seen, r


def our_run(problem, max_iter, **kw):
    fg, x0, lo, hi = problem
    calls, seen = [0], []

    def counted(x):
        calls[0] += 1
        f, g = fg(x.numpy())
        return f, torch.from_numpy(g)

    r = lbfgsb(counted, torch.from_numpy(x0), torch.from_numpy(lo), torch.from_numpy(hi),
               max_iter=max_iter, callback=lambda x, f: seen.append((x.numpy().copy(), calls[0])),
               **kw)
    return seen, r


def agree(problem, max_iter=10):
    """Assert our run equals scipy's, iterate by iterate; the largest relative difference."""
    want, ref = scipy_run(problem, max_iter)
    got, res = our_run(problem, max_iter)
    assert (res.nit, res.nfev, res.message) == (ref.nit, ref.nfev, ref.message)
    assert [n for _, n in got] == [n for _, n in want]  # evaluations after each iteration
    worst = 0.0
    for (a, _), (b, _) in zip(got, want):
        worst = max(worst, np.abs(a - b).max() / max(1.0, np.abs(b).max()))
    assert worst <= RTOL, worst
    np.testing.assert_allclose(res.fun, ref.fun, rtol=RTOL)
    return worst


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_every_iterate_is_scipys(name):
    agree(PROBLEMS[name]())


def test_runs_to_convergence_as_scipy():
    for name in ("quadratic", "many_breakpoints"):  # converge in 6 and 14 iterations
        agree(PROBLEMS[name](), max_iter=100)


def _inconsistent(rng, n=8):
    """A gradient that is not f's: line searches fail, restart from B = I, then stop."""
    A, B = rng.standard_normal((n, n)), 0.8 * rng.standard_normal((n, n))
    A = A @ A.T / n + np.eye(n)
    return (lambda x: (0.5 * x @ A @ x + np.sum(x), A @ x + 1 + B @ x)), \
        rng.uniform(-1, 1, n), np.full(n, -2.0), np.full(n, 2.0)


def test_failed_line_searches_restart_and_stop_as_scipy():
    problem = _inconsistent(np.random.default_rng(0))
    agree(problem, max_iter=50)  # 6 iterations, 59 evaluations
    assert our_run(problem, 50)[1].message.startswith("ABNORMAL")


def _first_breakpoint_only(real):
    def walk(path, items, mem):  # the GCP never passes a breakpoint (wrong)
        stop, out = real(path, items, mem)
        if stop == 0:
            return stop, out
        dt = float(items[0, 0]) - path.tj
        return 0, dataclasses.replace(path, dtm=min(dt, -path.f1 / path.f2))
    return walk


def _no_backtracking(x, g, xcp, r, free, U, mem, box, space):
    return torch.where(free, box.clip(xcp + lb._newton(r, free, U, mem)), xcp)


def _no_skipping(mem, found, g, space):
    _, _, g_new, d, stp, gd, gd0, dtd = found
    y, s = g_new - g, d if stp == 1.0 else stp * d
    if not mem.update(s, y, stp, dtd, (gd - gd0) * stp, float(space.norm(y)) ** 2):
        mem.reset()


MUTANTS = {
    "cauchy_stops_at_the_first_breakpoint": ("_segments", _first_breakpoint_only(lb._segments)),
    "no_update_skipping": ("_keep_pair", _no_skipping),
    "subspace_step_not_backtracked": ("_subspace", _no_backtracking),
    "line_search_gtol_0.5": ("LS_GTOL", 0.5),
    "line_search_ftol_0.45": ("LS_FTOL", 0.45),  # (1e-3 -> 0.1 changes no step here)
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_a_mutant_is_caught(monkeypatch, mutant):
    name, value = MUTANTS[mutant]
    monkeypatch.setattr(lb, name, value)
    caught = 0
    for problem in ("many_breakpoints", "negated_lse", "rosenbrock_box",
                    "rosenbrock_backtracked"):
        try:
            agree(PROBLEMS[problem]())
        except AssertionError:
            caught += 1
    assert caught


def test_the_chunks_of_the_cauchy_path_do_not_change_the_point(monkeypatch):
    problem = PROBLEMS["many_breakpoints"]()
    want = our_run(problem, 4)[1].x
    monkeypatch.setattr(lb, "FIRST_CHUNK", 1)  # 1, 2, 4, ... breakpoints at a time
    assert torch.equal(our_run(problem, 4)[1].x, want)


def test_bad_arguments_are_refused():
    fg, *arrays = PROBLEMS["quadratic"]()
    x0, lo, hi = (torch.from_numpy(a) for a in arrays)
    with pytest.raises(ValueError, match="lower <= upper"):
        lbfgsb(fg, x0, hi, lo)
    with pytest.raises(ArgumentTypeError, match="x0"):
        lbfgsb(fg, x0[None], lo, hi)
    with pytest.raises(ValueError, match="shaped like x0"):
        lbfgsb(fg, x0, lo[1:], hi)
    for key in ("m", "max_iter", "max_ls"):
        with pytest.raises(ValueError, match=key):
            lbfgsb(fg, x0, lo, hi, **{key: 0})


# -- on shards ---------------------------------------------------------------------------------
RANGES = {0: [(0, 5), (60, 90)], 1: [], 2: [(5, 60)], 3: [(90, 200)]}  # rank 1 holds nothing


def sharded_run(rank, names):
    """Each problem solved on 4 ranks of a ShardedSpace (4 breakpoints per rank per chunk)."""
    import torch.distributed as dist

    from analysis.core.space import ShardedSpace

    lb.FIRST_CHUNK = 4
    out = {}
    for name in names:
        fg, *arrays = PROBLEMS[name]()
        x0, lo, hi = (torch.from_numpy(a) for a in arrays)
        n = len(x0)
        ranges = [(a, min(b, n)) for a, b in RANGES[rank] if a < n]
        space = ShardedSpace(n, ranges, rank=rank, world=4)

        def local_fg(x):  # the test's objective gathers x (the solver never does)
            full = torch.zeros(n, dtype=x.dtype)
            at = 0
            for a, b in ranges:
                full[a:b], at = x[at:at + b - a], at + b - a
            dist.all_reduce(full)
            f, g = fg(full.numpy())
            return f, space.local(torch.from_numpy(g))

        r = lbfgsb(local_fg, space.local(x0), space.local(lo), space.local(hi), space,
                   max_iter=10)
        out[name] = (r.x, r.nit, r.nfev, r.message)
    return out


def check_sharded(ranks, names):
    """Assert every rank's result of :func:`sharded_run` is its slice of the one-process run
    (run by ``tests/analysis/test_sharded_sharpness.py::test_four_ranks``, which spawns the 4
    ranks anyway)."""
    for name in names:
        _, r = our_run(PROBLEMS[name](), 10)
        n = len(r.x)
        for rank, got in enumerate(ranks):
            x, nit, nfev, message = got[name]
            want = torch.cat([r.x[a:min(b, n)] for a, b in RANGES[rank] if a < n]
                             or [r.x[:0]])
            assert (nit, nfev, message) == (r.nit, r.nfev, r.message), (name, rank)
            torch.testing.assert_close(x, want, rtol=1e-12, atol=1e-12)
