"""Stochastic Lanczos quadrature: exact moment identities, exact nodes, smoothed density."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from analysis import spectral_density
from analysis.density import lanczos_quadrature, smooth
from analysis.core import make_generator, rademacher
from tests.oracles import (assert_unchanged, classification_data, exact_hessian, mlp, snapshot,
                     uneven_batches)

LIKE = torch.zeros(1, dtype=torch.float64)


def first_start_vector(n, seed):
    """The unit Rademacher start of run 0 (the first draw of the routine's generator)."""
    return rademacher((n,), make_generator(seed), like=LIKE) / np.sqrt(n)


def test_quadrature_reproduces_moments_up_to_degree_2m_minus_1():
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(-1, 2, 60, dtype=torch.float64)) @ Q.T
    m = 6
    nodes, weights, n_hvp = lanczos_quadrature(lambda V: V @ A, 60, m, 3, seed=4, like=LIKE)
    assert nodes.shape == weights.shape == (3, m) and n_hvp == 3 * m
    np.testing.assert_allclose(weights.sum(1), 1, rtol=1e-12)
    v = first_start_vector(60, 4)
    for j in range(2 * m):  # sum_k tau_k theta_k^j = v^T A^j v for j <= 2m - 1
        exact = (v @ torch.linalg.matrix_power(A, j) @ v).item()
        assert (weights[0] * nodes[0] ** j).sum() == pytest.approx(exact, rel=1e-9, abs=1e-12)


def test_full_lanczos_finds_distinct_eigenvalues_and_smooths_the_histogram():
    lam = torch.tensor([3.0, 3.0, 3.0, 1.0, 0.5, -2.0, -2.0, 0.0] * 5, dtype=torch.float64)
    D = torch.diag(lam)
    n = len(lam)
    nodes, weights, _ = lanczos_quadrature(lambda V: V @ D, n, n, 2, like=LIKE)
    # all weight sits on the distinct eigenvalues (a repeated node after the Krylov space is
    # exhausted shares its weight), and Rademacher weights on a diagonal matrix are exactly
    # multiplicity / n
    for run in range(2):
        for value, count in zip([-2, 0, 0.5, 1, 3], [10, 5, 5, 5, 15]):
            near = np.abs(nodes[run] - value) < 1e-9
            assert weights[run][near].sum() == pytest.approx(count / n, abs=1e-12)
    grid, density, sigma = smooth(nodes, weights, sigma=0.1, n_grid=2001)
    hist = np.exp(-0.5 * ((grid[:, None] - lam.numpy()[None]) / 0.1) ** 2).sum(1)
    hist /= np.trapezoid(hist, grid)
    np.testing.assert_allclose(density, hist, atol=1e-8)
    assert np.trapezoid(density, grid) == pytest.approx(1, rel=1e-12)


def test_unbiased_trace_of_powers_over_runs():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(80, 40, generator=gen, dtype=torch.float64)
    A = X.T @ X / 80  # Wishart
    nodes, weights, _ = lanczos_quadrature(lambda V: V @ A, 40, 5, 400, like=LIKE)
    for j in (1, 2, 3):
        per_run = 40 * (weights * nodes ** j).sum(1)
        exact = torch.trace(torch.linalg.matrix_power(A, j)).item()
        z = (per_run.mean() - exact) / (per_run.std(ddof=1) / np.sqrt(len(per_run)))
        assert abs(z) < 4


def test_model_density_moments_and_restoration():
    x, y = classification_data(n=23, d=12)
    model = mlp((12, 8, 5, 3))
    data = uneven_batches(x, y)

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    H = exact_hessian(model, loss, data)
    snap = snapshot(model)
    r = spectral_density(model, loss, data, n_lanczos=12, n_vectors=3, seed=2, progress=False)
    assert_unchanged(model, snap)
    assert r.n_hvp == 36 and r.nodes.shape == (3, 12)
    v = first_start_vector(H.shape[0], 2)
    assert (r.weights[0] * r.nodes[0]).sum() == pytest.approx((v @ H @ v).item(), rel=1e-9)
    assert (r.weights[0] * r.nodes[0] ** 2).sum() == pytest.approx((H @ v).norm().item() ** 2,
                                                                  rel=1e-9)
    assert np.trapezoid(r.density, r.grid) == pytest.approx(1, rel=1e-12)
    ev = torch.linalg.eigvalsh(H).numpy()
    assert r.grid[0] < ev[0] and r.grid[-1] > ev[-1]  # extreme Ritz values converge first
    log = spectral_density(model, loss, data, n_lanczos=12, n_vectors=2, log_scale=True,
                           progress=False)
    assert log.log_scale and np.trapezoid(log.density, log.grid) == pytest.approx(1, rel=1e-12)
    assert log.grid[-1] > np.log10(ev[-1])


def test_bad_input():
    x, y = classification_data(n=23, d=12)
    model, data = mlp((12, 8, 5, 3)), uneven_batches(x, y)

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    for kwargs, word in [({"n_lanczos": 0}, "n_lanczos"), ({"n_vectors": 0}, "n_vectors"),
                         ({"sigma": -1.0}, "sigma"), ({"n_grid": 1}, "n_grid")]:
        with pytest.raises(ValueError, match=word):
            spectral_density(model, loss, data, progress=False, **kwargs)


def test_the_old_name_steps_still_works_with_a_deprecation_warning():
    A = torch.diag(torch.linspace(-1, 2, 12, dtype=torch.float64))
    new = lanczos_quadrature(lambda V: V @ A, 12, 4, 2, seed=1, like=LIKE)
    with pytest.warns(DeprecationWarning, match="steps= is renamed n_lanczos="):
        old = lanczos_quadrature(lambda V: V @ A, 12, steps=4, n_vectors=2, seed=1, like=LIKE)
    np.testing.assert_array_equal(old[0], new[0])
    np.testing.assert_array_equal(old[1], new[1])
    with pytest.raises(TypeError, match="got both steps="):
        lanczos_quadrature(lambda V: V @ A, 12, n_lanczos=4, steps=4, n_vectors=2, like=LIKE)
