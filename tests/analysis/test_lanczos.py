"""Extreme eigenpairs against eigvalsh of the exact Hessian, closed forms and a saddle."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from analysis import top_eigenvalues
from analysis.lanczos import lanczos
from tests.oracles import (assert_unchanged, classification_data, cnn_bn, exact_hessian, mlp,
                           snapshot, uneven_batches)
from tests.analysis.problems import ce, check_pairs, expected


def setup(case):
    x, y = classification_data(n=23, d=12)
    model = mlp((12, 8, 5, 3)) if case == "mlp" else cnn_bn(12)
    data = uneven_batches(x, y)
    return model, data, exact_hessian(model, ce, data)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("case", ["mlp", "cnn_bn"])
def test_top_k_and_bottom_k_match_eigvalsh(case, which):
    model, data, H = setup(case)
    snap = snapshot(model)
    result = top_eigenvalues(model, ce, data, k=4, which=which, tol=1e-8, progress=False)
    assert result.converged and result.eigenvectors.shape == (4, H.shape[0])
    np.testing.assert_allclose(result.eigenvalues, expected(H, 4, which), rtol=1e-9, atol=1e-12)
    check_pairs(result, H, 1e-8)
    assert 0 < result.n_hvp <= 300
    assert_unchanged(model, snap)


def test_block_lanczos_resolves_multiplicity_and_thick_restart_converges():
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(150, 150, generator=gen, dtype=torch.float64))
    lam = torch.cat([torch.tensor([5.0, 5.0, 4.0, -6.0]),
                     torch.rand(146, generator=gen, dtype=torch.float64) * 2 - 1])
    A = Q @ torch.diag(lam) @ Q.T
    like = torch.zeros(1, dtype=torch.float64)
    theta, U, _, _, ok = lanczos(lambda V: V @ A, 150, 3, which="LA", block_size=2,
                                 tol=1e-10, like=like)
    assert ok
    torch.testing.assert_close(theta, torch.tensor([5.0, 5.0, 4.0]).double())
    # a small basis forces thick restarts; the answer and the residual bound are unchanged
    theta, U, res, n_hvp, ok = lanczos(lambda V: V @ A, 150, 2, which="SA", max_basis=8,
                                       tol=1e-10, like=like, max_hvp=2000)
    assert ok and n_hvp > 8
    torch.testing.assert_close(theta, torch.sort(lam)[0][:2])
    torch.testing.assert_close(torch.linalg.vector_norm(U @ A - theta[:, None] * U, dim=1), res,
                               rtol=1e-3, atol=1e-12)


class TwoLayerLinear(nn.Module):
    def __init__(self, d, o):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(1, d, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.zeros(o, 1, dtype=torch.float64))

    def forward(self, x):
        return x @ self.w1.T @ self.w2.T


def test_saddle_with_symmetric_spectrum():
    """L = ||W2 W1 X - Y||^2 / 2N at W = 0: Hessian [[0, -C^T], [-C, 0]], C = Y^T X / N, so its
    eigenvalues are +-sigma_i(C) and zeros (hidden width 1 keeps them simple)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    sigma = torch.linalg.svdvals(y.T @ x / 30).numpy()
    model = TwoLayerLinear(5, 3)

    def loss(m, b):
        return 0.5 * ((m(b[0]) - b[1]) ** 2).sum(1).mean()

    data = uneven_batches(x, y, (11, 19))
    top = top_eigenvalues(model, loss, data, k=3, which="LA", tol=1e-10, progress=False)
    bottom = top_eigenvalues(model, loss, data, k=3, which="SA", tol=1e-10, progress=False)
    np.testing.assert_allclose(top.eigenvalues, sigma, rtol=1e-9)
    np.testing.assert_allclose(bottom.eigenvalues, -sigma, rtol=1e-9)
    lm = top_eigenvalues(model, loss, data, k=2, which="LM", tol=1e-10, block_size=2,
                         progress=False)
    np.testing.assert_allclose(np.sort(lm.eigenvalues), [-sigma[0], sigma[0]], rtol=1e-9)


def test_closed_form_logistic_regression_spectrum():
    x, y = classification_data(n=23, d=5)
    model = nn.Linear(5, 1, bias=False).double()
    labels = (y > 0).double()

    def loss(m, b):
        return F.binary_cross_entropy_with_logits(m(b[0]).squeeze(1), b[1])

    s = torch.sigmoid(model(x).squeeze(1)).detach()
    H = x.T @ (x * (s * (1 - s))[:, None]) / 23
    result = top_eigenvalues(model, loss, uneven_batches(x, labels), k=5, tol=1e-10,
                             progress=False)
    np.testing.assert_allclose(result.eigenvalues, torch.linalg.eigvalsh(H).numpy()[::-1],
                               rtol=1e-9)


def test_param_subset_and_warm_start():
    model, data, _ = setup("cnn_bn")
    H = exact_hessian(model, ce, data, names=["fc.weight"])
    cold = top_eigenvalues(model, ce, data, k=2, params=["fc.weight"], progress=False)
    np.testing.assert_allclose(cold.eigenvalues, expected(H, 2, "LA"), rtol=1e-8)
    warm = top_eigenvalues(model, ce, data, k=2, params=["fc.weight"], v0=cold.eigenvectors,
                           progress=False)
    np.testing.assert_allclose(warm.eigenvalues, cold.eigenvalues, rtol=1e-8)
    assert warm.n_hvp < cold.n_hvp
    one = top_eigenvalues(model, ce, data, params=["fc.weight"], v0=cold.eigenvectors[0],
                          progress=False)
    assert one.n_hvp <= 6 and one.converged  # 1 product, then 5 looking for other copies


def test_budget_and_power_method():
    model, data, H = setup("mlp")
    short = top_eigenvalues(model, ce, data, k=3, max_hvp=4, progress=True)  # bar: no crash
    assert short.n_hvp <= 4 and not short.converged
    power = top_eigenvalues(model, ce, data, k=2, method="power", tol=1e-4, progress=False)
    np.testing.assert_allclose(power.eigenvalues, expected(H, 2, "LM"), rtol=1e-2)
    assert power.n_hvp <= 200
    torch.testing.assert_close(
        torch.as_tensor(power.residuals),
        torch.linalg.vector_norm(power.eigenvectors @ H
                                 - torch.as_tensor(power.eigenvalues)[:, None]
                                 * power.eigenvectors, dim=1), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kwargs", [{}, {"block_size": 2}, {"method": "power"}])
def test_a_budget_below_k_products_is_refused(kwargs):
    model, data, _ = setup("mlp")
    need = 4 if kwargs.get("block_size") == 2 else 3
    with pytest.raises(ValueError, match=f"max_hvp must be an int >= {need}, got {need - 1}"):
        top_eigenvalues(model, ce, data, k=3, max_hvp=need - 1, progress=False, **kwargs)
    tight = top_eigenvalues(model, ce, data, k=3, max_hvp=need, progress=False, **kwargs)
    assert len(tight.eigenvalues) == 3 and tight.eigenvectors.shape[0] == 3
    assert len(tight.residuals) == 3 and tight.n_hvp <= need


@pytest.mark.parametrize("max_basis", [0, -3, 1.5, True, np.float64(40.0)])
def test_a_bad_basis_size_is_refused(max_basis):
    model, data, _ = setup("mlp")
    with pytest.raises(ValueError, match="max_basis must be"):
        top_eigenvalues(model, ce, data, k=2, max_basis=max_basis, progress=False)


def test_bad_input_and_restoration_after_errors():
    model, data, H = setup("cnn_bn")
    n = H.shape[0]
    model.train()
    snap = snapshot(model)
    for kwargs, word in [({"k": 0}, "k must"), ({"k": n + 1}, "k must"), ({"which": "BE"}, "which"),
                         ({"method": "arpack"}, "method"), ({"tol": -1.0}, "tol"),
                         ({"max_hvp": 0}, "max_hvp"), ({"seed": -1}, "seed"),
                         ({"v0": torch.ones(n + 2).double()}, "v0"), ({"v0": [1.0]}, "v0"),
                         ({"method": "power", "which": "SA"}, "SA")]:
        with pytest.raises(ValueError, match=word):
            top_eigenvalues(model, ce, data, progress=False, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        top_eigenvalues(model, ce, [], progress=False)

    def raising(model, batch, count=[]):
        count.append(1)
        if len(count) == 6:
            raise RuntimeError("boom")
        return ce(model, batch)

    with pytest.raises(RuntimeError, match="boom"):
        top_eigenvalues(model, raising, data, progress=False)
    assert_unchanged(model, snap)


def test_float32_model_converges_at_its_attainable_accuracy():
    model, data, H = setup("mlp")
    data32 = [(x.float(), y) for x, y in data]
    result = top_eigenvalues(model.float(), ce, data32, k=2, tol=1e-9, progress=False)
    assert result.converged and result.eigenvectors.dtype == torch.float32
    np.testing.assert_allclose(result.eigenvalues, expected(H, 2, "LA"), rtol=1e-4)
