"""Degenerate spectra against their exact eigenvalues (issues 25 item 4 and 30): repeated and
zero eigenvalues, invariant start vectors, +-lambda pairs, blocks larger than the space left and
curvature scales below or above what float32 products resolve. Each solver returns ``k`` values
or ``converged=False`` with a warning that says why."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from analysis import supervised, top_eigenvalues
from analysis.lanczos import lanczos, power_iteration
from tests.analysis.test_lanczos import ce, check_pairs, expected
from tests.oracles import classification_data, exact_hessian, mlp, uneven_batches

DUMMY = [torch.zeros(1)]  # one batch: the quadratic losses below ignore it
LIKE = torch.zeros(1, dtype=torch.float64)


class Flat(nn.Module):
    """One flat parameter ``w`` (the output); the loss is a closed form in it."""

    def __init__(self, n, dtype=torch.float64):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.1, 0.6, n, dtype=dtype))

    def forward(self, batch):
        return self.w


def quadratic(A):
    """The loss $w^T A w / 2$, whose Hessian is ``A``."""
    return lambda m, b: 0.5 * m(b) @ A @ m(b)


def solve(model, loss, **kwargs):
    """``top_eigenvalues`` with the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = top_eigenvalues(model, loss, DUMMY, progress=False, **kwargs)
    return result, [str(w.message) for w in caught if w.category is RuntimeWarning]


def exact_pick(model, loss, k, which):
    return expected(exact_hessian(model, loss, DUMMY), k, which)


def test_a_multiple_of_the_identity_gives_k_copies():
    """H = 2I in 6 dimensions, k=3: every start vector is an eigenvector (a breakdown at each
    product); was one value with converged=True."""
    model, loss = Flat(6), lambda m, b: (m(b) ** 2).sum()
    result, said = solve(model, loss, k=3)
    assert result.converged and not said
    np.testing.assert_allclose(result.eigenvalues, [2.0, 2.0, 2.0], rtol=1e-12)
    np.testing.assert_allclose(result.eigenvalues, exact_pick(model, loss, 3, "LA"), rtol=1e-12)
    U = result.eigenvectors
    torch.testing.assert_close(U @ U.T, torch.eye(3, dtype=U.dtype), atol=1e-12, rtol=0)


@pytest.mark.parametrize("which,exact", [("LA", [1.0, 0.0, 0.0]), ("SA", [-1.0, 0.0, 0.0])])
def test_the_saddle_w0_w1_finds_every_copy_of_zero(which, exact):
    """Eigenvalues 1, -1 and four zeros: the Krylov space holds one zero (was [1, 0, -1] for
    LA k=3 with converged=True)."""
    model, loss = Flat(6), lambda m, b: m(b)[0] * m(b)[1]
    result, said = solve(model, loss, k=3, which=which)
    assert result.converged and not said
    np.testing.assert_allclose(result.eigenvalues, exact, atol=1e-12)
    np.testing.assert_allclose(result.eigenvalues, exact_pick(model, loss, 3, which), atol=1e-12)
    check_pairs(result, exact_hessian(model, loss, DUMMY), 1e-6)


def test_k_beyond_the_rank_gives_k_pairs():
    """Issue 25 item 4: k=5 on a rank-3 Hessian returned 4 pairs with converged=True."""
    A = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model, loss = Flat(8), quadratic(A.T @ A)
    result, said = solve(model, loss, k=5)
    assert result.converged and not said
    assert result.eigenvalues.shape == (5,) and result.eigenvectors.shape == (5, 8)
    np.testing.assert_allclose(result.eigenvalues, exact_pick(model, loss, 5, "LA"),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.eigenvalues[3:], 0.0, atol=1e-12)


def test_a_start_vector_in_a_small_invariant_subspace():
    """diag(1..10), v0 = e1 + e2 spans an invariant subspace of dimension 2 < k = 3 (was
    [2, 1] with converged=True)."""
    d = torch.arange(1.0, 11.0, dtype=torch.float64)
    v0 = torch.zeros(10, dtype=torch.float64)
    v0[:2] = 1
    theta, U, res, _, ok = lanczos(lambda V: V * d, 10, 3, v0=v0, like=LIKE, tol=1e-10)
    assert ok and len(theta) == 3 and U.shape == (3, 10)
    torch.testing.assert_close(theta, torch.tensor([10.0, 9.0, 8.0], dtype=torch.float64))


def test_the_ggn_of_a_small_mlp_has_three_zeros_at_the_bottom():
    """The GGN of cross-entropy over 10 samples and 3 classes has rank <= 20 of n = 103, so
    its three smallest eigenvalues are exactly 0 (was [0, 1.4e-4, 2.7e-4], converged=True)."""
    x, y = classification_data(n=10, d=6)
    model, data = mlp((6, 10, 3)), uneven_batches(x, y, (4, 6))
    result = top_eigenvalues(model, supervised(nn.CrossEntropyLoss()), data, k=3, which="SA",
                             curvature="ggn", progress=False)
    top = top_eigenvalues(model, supervised(nn.CrossEntropyLoss()), data, k=1,
                          curvature="ggn", progress=False).eigenvalues[0]
    assert result.converged and top > 1e-3
    np.testing.assert_allclose(result.eigenvalues, 0.0, atol=1e-12 * top)


def test_a_block_larger_than_the_space_left_shrinks():
    """block_size=8 on a 43-parameter MLP, k=8: the basis (40 rows) and the block (8) exceed
    the space; was Ritz values 10-19 for a true 0.72, converged=False without a warning."""
    x, y = classification_data(n=23, d=4)
    model, data = mlp((4, 5, 3)), uneven_batches(x, y)
    H = exact_hessian(model, ce, data)
    assert H.shape == (43, 43)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = top_eigenvalues(model, ce, data, k=8, block_size=8, tol=1e-8, progress=False)
    assert result.converged
    np.testing.assert_allclose(result.eigenvalues, expected(H, 8, "LA"), rtol=1e-7)
    check_pairs(result, H, 1e-8)


def test_a_dense_block_larger_than_the_matrix():
    """Every row of a block beyond the dimension is dropped, the rest are exact."""
    d = torch.tensor([3.0, -2.0, 1.0, 0.5], dtype=torch.float64)
    theta, U, _, n_hvp, ok = lanczos(lambda V: V * d, 4, 4, block_size=3, like=LIKE)
    assert ok and n_hvp <= 6
    torch.testing.assert_close(theta, torch.tensor([3.0, 1.0, 0.5, -2.0], dtype=torch.float64))
    torch.testing.assert_close(U @ U.T, torch.eye(4, dtype=U.dtype), atol=1e-12, rtol=0)


def test_a_cut_off_multiplicity_check_says_so():
    """H = 2I with a budget of exactly k products: the values are right but more copies could
    not be looked for, so converged=False and a warning names the reason."""
    result, said = solve(Flat(6), lambda m, b: (m(b) ** 2).sum(), k=3, max_hvp=3)
    assert not result.converged and len(result.eigenvalues) == 3
    assert any("copies" in s and "budget" in s for s in said)


def test_an_exhausted_budget_is_said():
    x, y = classification_data(n=23, d=12)
    model, data = mlp((12, 8, 5, 3)), uneven_batches(x, y)
    with pytest.warns(RuntimeWarning, match="did not converge: the budget of 4 products"):
        result = top_eigenvalues(model, ce, data, k=3, max_hvp=4, progress=False)
    assert not result.converged


def _spectrum(lam, seed=0):
    n = len(lam)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return Q @ torch.diag(torch.tensor(lam, dtype=torch.float64)) @ Q.T


def test_power_method_on_a_plus_minus_pair():
    """Eigenvalues +1 and -1 (and smaller): the iterates alternate; was 0.93 or -0.37 with
    converged=True."""
    model, loss = Flat(5), quadratic(_spectrum([1.0, -1.0, 0.5, 0.2, -0.1]))
    result, said = solve(model, loss, k=2, method="power", tol=1e-8)
    assert result.converged and not said
    np.testing.assert_allclose(np.sort(result.eigenvalues), [-1.0, 1.0], rtol=1e-8)
    check_pairs(result, exact_hessian(model, loss, DUMMY), 1e-8)


def test_power_method_on_a_rank_one_matrix():
    """H = 6 u u^T: the second pair is in the null space, 0 (was [6, 6], converged=True)."""
    u = torch.ones(6, dtype=torch.float64) / 6 ** 0.5
    model, loss = Flat(6), quadratic(6 * torch.outer(u, u))
    result, said = solve(model, loss, k=2, method="power")
    assert result.converged and not said
    np.testing.assert_allclose(result.eigenvalues, [6.0, 0.0], atol=1e-12)
    assert abs(float(result.eigenvectors[0] @ result.eigenvectors[1])) < 1e-12


def test_power_method_on_a_tiny_spectrum():
    """lambda_max = 1e-11: PyHessian's stopping rule (+1e-6 in the denominator) stopped after 2
    products at 3 % off with converged=True; the residual test reaches tol."""
    lam = [1e-11, 0.5e-11, 0.2e-11, 0.1e-11]
    model, loss = Flat(4), quadratic(_spectrum(lam))
    result, said = solve(model, loss, k=1, method="power", tol=1e-8)
    assert result.converged and not said
    np.testing.assert_allclose(result.eigenvalues, [1e-11], rtol=1e-7)
    assert result.residuals[0] <= 1e-8 * 1e-11


def test_power_method_that_runs_out_says_so():
    """A slow gap and 5 products: converged=False with a warning, residual above tol."""
    d = torch.tensor([1.0, 0.99, 0.5], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="power iteration did not converge"):
        theta, _, res, n_hvp, ok = power_iteration(lambda V: V * d, 3, 1, tol=1e-10,
                                                   max_iter=5, like=LIKE)
    assert not ok and n_hvp == 5 and res[0] > 1e-10 * theta[0]


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_float32_curvature_outside_the_resolved_scale_is_refused(scale):
    """A float32 model's loss times 1e-30: the products underflow (lambda -1.4e-32 or 6.6e-32
    for a true 6.8e-31, converged=True); times 1e30 they overflow."""
    x, y = classification_data()
    model, data = mlp((6, 8, 5, 3)).float(), [(a.float(), b) for a, b in uneven_batches(x, y)]

    def loss(m, b):
        return ce(m, b) * scale

    with pytest.warns(RuntimeWarning, match="Multiply the loss by a constant"):
        result = top_eigenvalues(model, loss, data, k=1, max_hvp=60, progress=False)
    assert not result.converged
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fine = top_eigenvalues(model, ce, data, k=1, progress=False)  # scale 1: resolved
    assert fine.converged
