"""Lanczos with the basis in another dtype or on another device, and the in-place thick restart,
against eigvalsh of the exact Hessian."""
import numpy as np
import pytest
import torch

from analysis import spectral_density, top_eigenvalues
from analysis.lanczos import Basis, lanczos
from tests.oracles import classification_data, exact_hessian, mlp, uneven_batches
from tests.analysis.problems import ce, expected


@pytest.fixture(scope="module")
def problem():
    x, y = classification_data(n=23, d=12)
    model, data = mlp((12, 8, 5, 3)), uneven_batches(x, y)
    return model, data, exact_hessian(model, ce, data)


def test_float32_basis_matches_float64_within_float32_accuracy(problem):
    model, data, H = problem
    kw = dict(k=3, tol=1e-5, progress=False)
    ref = top_eigenvalues(model, ce, data, **kw)
    low = top_eigenvalues(model, ce, data, basis_dtype=torch.float32, **kw)
    assert ref.converged and low.converged
    assert low.eigenvectors.dtype == torch.float64  # results stay in the model's dtype
    np.testing.assert_allclose(low.eigenvalues, ref.eigenvalues, rtol=1e-5)
    np.testing.assert_allclose(low.eigenvalues, expected(H, 3, "LA"), rtol=1e-5)
    rayleigh = torch.einsum("kn,nm,km->k", low.eigenvectors, H, low.eigenvectors)
    np.testing.assert_allclose(rayleigh.numpy(), expected(H, 3, "LA"), rtol=1e-5)


def test_basis_on_the_cpu_is_a_no_op_for_a_cpu_model(problem):
    """(The GPU model with a CPU basis cannot be run on this machine, which has no GPU.)"""
    model, data, _ = problem
    a = top_eigenvalues(model, ce, data, k=2, progress=False)
    b = top_eigenvalues(model, ce, data, k=2, progress=False, basis_device="cpu")
    np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
    assert torch.equal(a.eigenvectors, b.eigenvectors) and a.n_hvp == b.n_hvp
    d = spectral_density(model, ce, data, 10, 2, progress=False)
    e = spectral_density(model, ce, data, 10, 2, progress=False, basis_device=torch.device("cpu"),
                         basis_dtype=torch.float64)
    np.testing.assert_array_equal(d.nodes, e.nodes)


@pytest.mark.parametrize("basis_dtype", [None, torch.float32])
def test_in_place_thick_restart_finds_the_exact_eigenvalues(problem, basis_dtype):
    """A basis of k + 3 vectors forces many restarts; n = 167 is not a multiple of the kept
    count, so every column block of the in-place rotation matters."""
    model, data, H = problem
    for which in ("LA", "SA"):
        res = top_eigenvalues(model, ce, data, k=2, which=which, max_basis=5, tol=1e-5,
                              max_hvp=3000, progress=False, basis_dtype=basis_dtype)
        assert res.converged and res.n_hvp > 5
        np.testing.assert_allclose(res.eigenvalues, expected(H, 2, which), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("head", [0, 1, 2, 3, 4, 7])
def test_rotate_equals_the_out_of_place_product(head):
    """The in-place rotation over a basis split into head and tail at every boundary (inside
    the kept rows, at their end, inside the rotated rows, beyond them)."""
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(7, 23, generator=gen, dtype=torch.float64)
    Y = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    basis = Basis(7, 23, head=head, dtype=torch.float64, device="cpu")
    basis.put(0, V)
    assert torch.equal(basis.get(0, 7), V) and torch.equal(basis.get(2, 5), V[2:5])
    basis.rotate_(Y, 5)
    torch.testing.assert_close(basis.get(0, 3), Y.T @ V[:5], rtol=1e-14, atol=1e-14)
    assert torch.equal(basis.get(3, 7), V[3:])
    if head >= 3:
        kept = basis.release(3)
        torch.testing.assert_close(kept, Y.T @ V[:5], rtol=1e-14, atol=1e-14)
        assert basis.parts == []


def test_lanczos_on_a_dense_matrix_with_a_float32_basis():
    gen = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(90, 90, generator=gen, dtype=torch.float64))
    lam = torch.linspace(-1, 3, 90, dtype=torch.float64)
    A = Q @ torch.diag(lam) @ Q.T
    theta, U, _, _, ok = lanczos(lambda V: V @ A, 90, 3, max_basis=8, tol=1e-5, max_hvp=3000,
                                 like=torch.zeros(1, dtype=torch.float64),
                                 basis_dtype=torch.float32)
    assert ok and U.dtype == torch.float64
    torch.testing.assert_close(theta, lam.flip(0)[:3], rtol=1e-5, atol=0)


@pytest.mark.parametrize("kwargs,error", [
    ({"basis_dtype": torch.float16}, ValueError), ({"basis_dtype": "float32"}, TypeError),
    ({"basis_device": "nowhere"}, ValueError), ({"basis_device": 0}, TypeError)])
def test_bad_basis_arguments_name_themselves(problem, kwargs, error):
    model, data, _ = problem
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        top_eigenvalues(model, ce, data, progress=False, **kwargs)
    with pytest.raises(error, match=name):
        spectral_density(model, ce, data, progress=False, **kwargs)


def _torch_peak(fn) -> int:
    """Peak bytes of live torch CPU allocations while ``fn`` runs (profiler allocation events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return int(np.cumsum([e.nbytes() for e in events]).max())


def _memory_problem():
    """A tanh MLP of 51,405 parameters, one batch of 8, and its parameter count."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(50, 200), torch.nn.Tanh(),
                                torch.nn.Linear(200, 200), torch.nn.Tanh(),
                                torch.nn.Linear(200, 5))
    x, y = torch.randn(8, 50), torch.randint(0, 5, (8,))
    return model, x, y, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("k", [1, 10])
def test_memory_is_the_basis_plus_one_product(k):
    """Allocation sizes, not timings: with one batch (graph reuse) the peak is the basis plus
    one product (the gradient graph, the product and its output); the pending block is not
    copied, and the eigenvectors are formed in the basis, which is freed before they are
    returned, so they hold exactly k rows."""
    model, x, y, n = _memory_problem()
    max_basis = max(30, 3 * k + 2)
    out = []
    peak = _torch_peak(lambda: out.append(top_eigenvalues(
        model, ce, [(x, y)], k=k, tol=1e-12, max_hvp=max_basis + 8, progress=False)))
    res = out[0]
    assert res.n_hvp == max_basis + 8  # the basis filled and was restarted
    assert res.eigenvectors.untyped_storage().nbytes() == k * n * 4
    assert peak / (4 * n) <= max_basis + 4


def _orthonormal_basis(m: int, n: int, seed: int = 0) -> tuple[Basis, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    V = torch.linalg.qr(torch.randn(n, m, dtype=torch.float64, generator=gen))[0].T.contiguous()
    basis = Basis(m, n, head=0, dtype=torch.float64, device="cpu")
    basis.put(0, V)
    return basis, V


@pytest.mark.parametrize("scale", [1e-3, 1e-6])
def test_a_vector_nearly_in_the_basis_is_orthogonalised_to_rounding(scale):
    """Cancellation: one classical Gram-Schmidt pass would leave components of size
    ``eps * ||w|| / scale`` on the basis; the DGKS criterion makes the second pass."""
    from analysis.lanczos import _orthogonalise
    m, n = 20, 400
    basis, V = _orthonormal_basis(m, n)
    gen = torch.Generator().manual_seed(1)
    c = torch.randn(m, dtype=torch.float64, generator=gen)
    w = V.T @ c + scale * torch.randn(n, dtype=torch.float64, generator=gen)
    q, coef = _orthogonalise(w.clone()[None], basis, m, gen)
    assert (V @ q[0]).abs().max() < 1e-14
    assert abs(torch.linalg.vector_norm(q[0]).item() - 1) < 1e-14
    rebuilt = V.T @ coef[:m, 0] + q[0] * coef[m, 0]
    assert (rebuilt - w).abs().max() < 1e-14 * torch.linalg.vector_norm(w)


def test_one_pass_when_little_of_the_norm_is_removed(monkeypatch):
    """A vector far from the basis is orthogonal to rounding after one pass (the saving)."""
    import analysis.lanczos as lz
    m, n = 20, 400
    basis, V = _orthonormal_basis(m, n)
    gen = torch.Generator().manual_seed(2)
    block = torch.randn(2, n, dtype=torch.float64, generator=gen)
    calls = []
    project = lz._project_out
    monkeypatch.setattr(lz, "_project_out", lambda *a: calls.append(1) or project(*a))
    q, _ = lz._orthogonalise(block, basis, m, gen)
    assert len(calls) == 2  # one pass per row
    assert ((V @ q.T).abs().max() < 1e-14
            and (q @ q.T - torch.eye(2, dtype=q.dtype)).abs().max() < 1e-14)


@pytest.mark.parametrize("ratio,replaced", [(1e-10, True), (1e-6, False)])
def test_a_row_that_loses_more_than_half_its_digits_counts_as_vanished(ratio, replaced):
    """Breakdown threshold ``sqrt(eps)``: a row whose part outside the basis is at most
    ``sqrt(eps)`` of its norm has lost at least half its digits to cancellation (its direction
    is known to ``eps / ratio`` only); it is an invariant subspace, replaced by a fresh random
    unit vector orthogonal to everything, and its tiny coefficient is kept. Above the
    threshold the row's own direction is kept."""
    from analysis.lanczos import _orthogonalise
    m, n = 5, 60
    basis, V = _orthonormal_basis(m, n)
    gen = torch.Generator().manual_seed(3)
    outside = torch.randn(n, dtype=torch.float64, generator=gen)
    outside -= V.T @ (V @ outside)
    outside /= torch.linalg.vector_norm(outside)
    w = V.T @ torch.ones(m, dtype=torch.float64) / m ** 0.5 + ratio * outside  # norm ~1
    q, coef = _orthogonalise(w.clone()[None], basis, m, gen)
    assert (V @ q[0]).abs().max() < 1e-14
    assert abs(torch.linalg.vector_norm(q[0]).item() - 1) < 1e-14
    assert coef[m, 0].item() == pytest.approx(ratio, rel=1e-5)  # the coefficient is kept
    cosine = abs(float(q[0] @ outside))
    assert (cosine < 0.5) if replaced else (cosine > 1 - 1e-9)
    rebuilt = V.T @ coef[:m, 0] + q[0] * coef[m, 0]  # exact, or to sqrt(eps) when replaced
    assert (rebuilt - w).abs().max() < 2 * ratio


def test_a_small_budget_allocates_a_small_basis():
    """Allocation sizes, not timings: with max_hvp=10 the basis takes the 10 + 1 rows the budget
    can fill, not the default max_basis of 30 (PyHessian's 10-product run holds ~10 vectors);
    the peak is those rows plus one product."""
    model, x, y, n = _memory_problem()
    out = []
    peak = _torch_peak(lambda: out.append(top_eigenvalues(
        model, ce, [(x, y)], k=1, tol=1e-12, max_hvp=10, progress=False)))
    assert out[0].n_hvp == 10
    assert peak / (4 * n) <= 10 + 1 + 4


@pytest.mark.parametrize("budget, max_basis, rows, expect", [
    (20, None, None, 30), (20, None, 2, 3), (40, 12, None, 12), (40, 12, 2, 3)])
def test_the_allocated_rows_change_no_result(problem, monkeypatch, budget, max_basis, rows,
                                             expect):
    """The same eigenpairs, bit for bit, whether the basis is allocated at the budget (21 rows
    of max_basis 30; 12 of 12), at max_basis (the former allocation), or grown on demand from
    2 rows (3: at least the head), through thick restarts and the new starts of k >= 2."""
    import analysis.lanczos as module

    model, data, _ = problem
    kw = dict(k=3, tol=1e-10, max_hvp=budget, max_basis=max_basis, progress=False)
    capped = top_eigenvalues(model, ce, data, **kw)
    allocated = []

    class Forced(module.Krylov):
        def __init__(self, *args, **kwargs):
            allocated.append(min(args[0], kwargs["rows"]))  # what lanczos allocates
            kwargs["rows"] = rows
            super().__init__(*args, **kwargs)
            allocated.append(self.T.shape[0])

    monkeypatch.setattr(module, "Krylov", Forced)
    other = top_eigenvalues(model, ce, data, **kw)
    assert allocated == [min(budget + 1, max_basis or 30), expect]
    np.testing.assert_array_equal(capped.eigenvalues, other.eigenvalues)
    assert torch.equal(capped.eigenvectors, other.eigenvectors)
    assert capped.n_hvp == other.n_hvp == budget
