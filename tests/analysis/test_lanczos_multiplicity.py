"""Repeated eigenvalues that a single start vector cannot see (issue 30, last point): after
every converged run with k >= 2, Lanczos looks for more copies from a new random start."""
import warnings

import pytest
import torch

from analysis.lanczos import lanczos

LIKE = torch.zeros(1, dtype=torch.float64)


def spectrum(top, n=150, seed=None):
    """``top`` followed by values spread in [0.1, 3]; rotated by a random orthogonal matrix."""
    lam = torch.linspace(3, 0.1, n, dtype=torch.float64)
    lam[:len(top)] = torch.tensor(top, dtype=torch.float64)
    if seed is None:
        return torch.diag(lam)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))
    return Q @ torch.diag(lam) @ Q.T


def counted(A):
    """``V -> V A`` and the list of product counts it was called with."""
    calls = []

    def matmat(V):
        calls.append(len(V))
        return V @ A
    return matmat, calls


def solve(A, k, **kwargs):
    matmat, calls = counted(A)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        theta, U, res, n_hvp, ok = lanczos(matmat, len(A), k, like=LIKE, **kwargs)
    assert n_hvp == sum(calls)  # the search's products are in the count
    true = torch.linalg.vector_norm(U @ A - theta[:, None] * U, dim=1)
    torch.testing.assert_close(res, true, rtol=1e-3, atol=1e-12)  # the estimates stay exact
    torch.testing.assert_close(U @ U.T, torch.eye(k, dtype=U.dtype), atol=1e-10, rtol=0)
    return theta, n_hvp, ok


def test_a_double_top_eigenvalue_is_found_with_k_2():
    """diag(5, 5, 4, 3, ...), k=2: was [5, 4] with converged=True."""
    theta, _, ok = solve(spectrum([5.0, 5.0, 4.0]), 2)
    assert ok
    torch.testing.assert_close(theta, torch.tensor([5.0, 5.0], dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1])
def test_a_triple_top_eigenvalue_is_found_with_k_3(seed):
    theta, _, ok = solve(spectrum([5.0, 5.0, 5.0, 4.0], seed=seed), 3)
    assert ok
    torch.testing.assert_close(theta, torch.tensor([5.0] * 3, dtype=torch.float64))


def test_a_repeated_bottom_eigenvalue_is_found():
    theta, _, ok = solve(-spectrum([5.0, 5.0, 4.0], seed=2), 2, which="SA")
    assert ok
    torch.testing.assert_close(theta, torch.tensor([-5.0, -5.0], dtype=torch.float64))


def test_distinct_values_cost_a_short_search_that_is_counted():
    """No copy to find: the search ends after five steps of the widened block (the pending
    block and the random row: 10 products), and they are part of ``n_hvp``."""
    theta, n_hvp, ok = solve(spectrum([5.0, 4.0], seed=3), 2)
    assert ok
    torch.testing.assert_close(theta, torch.tensor([5.0, 4.0], dtype=torch.float64))
    one, n_one, _ = solve(spectrum([5.0, 4.0], seed=3), 1)
    assert n_hvp >= n_one + 10


def test_k_1_does_not_look_for_copies():
    """A repeated top eigenvalue leaves the value of k=1 unchanged (only its eigenvector is not
    unique), so k=1 runs no search: its cost is the plain run's."""
    matmat, calls = counted(spectrum([5.0, 5.0, 4.0]))
    theta, _, _, n_hvp, ok = lanczos(matmat, 150, 1, like=LIKE)
    assert ok and set(calls) == {1}
    torch.testing.assert_close(theta, torch.tensor([5.0], dtype=torch.float64))
