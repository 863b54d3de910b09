"""Trace estimators: unbiased over seeds, calibrated standard errors, Hutch++ exact on low rank."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from analysis import hessian_trace, layerwise
from analysis.trace import trace_estimate
from tests.oracles import (assert_unchanged, classification_data, cnn_bn, exact_hessian, mlp,
                           snapshot, uneven_batches)

LIKE = torch.zeros(1, dtype=torch.float64)


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def spectrum_matrix(n=120, seed=0):
    """Q diag(lambda) Q^T with a few outliers, a bulk and negative values."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = torch.cat([torch.tensor([40.0, 25.0, 10.0, -8.0]),
                     torch.randn(n - 4, generator=gen, dtype=torch.float64)])
    return Q @ torch.diag(lam) @ Q.T


def test_rademacher_hutchinson_is_exact_on_diagonal_matrices():
    D = torch.diag(torch.linspace(-3, 5, 50, dtype=torch.float64))
    r = trace_estimate(lambda V: V @ D, 50, 7, method="hutchinson", like=LIKE)
    assert r.estimate == pytest.approx(torch.trace(D).item(), abs=1e-12)
    assert r.stderr == pytest.approx(0, abs=1e-12) and r.n_hvp == 7


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_estimators_are_unbiased_with_calibrated_stderr(method):
    A = spectrum_matrix()
    exact = torch.trace(A).item()
    runs = [trace_estimate(lambda V: V @ A, 120, 30, method=method, seed=s, like=LIKE)
            for s in range(300)]
    est = np.array([r.estimate for r in runs])
    z = (est.mean() - exact) / (est.std(ddof=1) / np.sqrt(len(est)))
    assert abs(z) < 4
    # the reported stderr matches the spread over seeds (chi-square-like tolerance)
    rms = np.sqrt(np.mean([r.stderr ** 2 for r in runs]))
    low = 0.5 if method == "xtrace" else 0.75  # XTrace's error estimate is a heuristic
    assert low < rms / est.std(ddof=1) < 1.33
    if method == "hutchinson":  # variance 2 (||A||_F^2 - sum A_ii^2) / m
        var = 2 * ((A ** 2).sum() - (torch.diagonal(A) ** 2).sum()).item() / 30
        assert 0.75 < est.var(ddof=1) / var < 1.33


def test_hutch_plus_plus_beats_hutchinson_on_outliers_and_is_exact_on_low_rank():
    A = spectrum_matrix()
    spread = {m: np.std([trace_estimate(lambda V: V @ A, 120, 60, method=m, seed=s,
                                        like=LIKE).estimate for s in range(40)])
              for m in ("hutchinson", "hutch++")}
    assert spread["hutch++"] < spread["hutchinson"] / 2
    X = torch.randn(200, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = trace_estimate(lambda V: V @ (X @ X.T), 200, 30, like=LIKE)
    assert r.estimate == pytest.approx(torch.trace(X @ X.T).item(), rel=1e-12)
    assert r.stderr < 1e-9


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stderr_is_floored_at_the_rounding_level_on_low_rank(method, dtype):
    """Exact but for rounding: the stderr covers the actual error and stays at rounding level."""
    like, eps = torch.zeros(1, dtype=dtype), torch.finfo(dtype).eps
    ratios = []
    for seed in range(8):
        X = torch.randn(200, 1 + seed % 4, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
        A = X @ X.T - (2 * seed % 2) * X[:, :1] @ X[:, :1].T   # indefinite for odd seeds
        A = A.to(dtype)
        exact = torch.trace(A.double()).item()
        r = trace_estimate(lambda V: V @ A, 200, 33, method=method, seed=seed, like=like)
        ratios.append(abs(r.estimate - exact) / r.stderr)
        assert r.stderr < 100 * eps * float(torch.linalg.eigvalsh(A.double()).abs().sum())
    assert max(ratios) <= 1.5  # XTrace's Gaussian probes (issue 30): 1.007 at seed 0


@pytest.mark.parametrize("rank", [3, 10])
def test_xtrace_is_exact_below_half_the_budget(rank):
    X = torch.randn(200, rank, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r = trace_estimate(lambda V: V @ (X @ X.T), 200, 22, method="xtrace", like=LIKE)
    assert r.n_hvp == 22 and r.estimate == pytest.approx(torch.trace(X @ X.T).item(), rel=1e-10)


def test_xtrace_beats_hutch_plus_plus_on_outliers():
    """SD over 300 seeds: XTrace 2.17, Hutch++ 2.59 (its sphere-normalised residual, issue 30,
    brought it within the noise of 40 seeds)."""
    A = spectrum_matrix()
    spread = {m: np.std([trace_estimate(lambda V: V @ A, 120, 60, method=m, seed=s,
                                        like=LIKE).estimate for s in range(300)])
              for m in ("xtrace", "hutch++")}
    assert spread["xtrace"] < spread["hutch++"]


def test_quadratic_loss_model_with_low_rank_hessian():
    """Least squares with fewer samples than weights: rank H <= N, Hutch++ is exact."""
    gen = torch.Generator().manual_seed(0)
    x, t = (torch.randn(8, 30, generator=gen, dtype=torch.float64),
            torch.randn(8, 2, generator=gen, dtype=torch.float64))
    model = nn.Linear(30, 2, bias=False).double()

    def mse(m, b):
        return F.mse_loss(m(b[0]), b[1])

    data = uneven_batches(x, t, (5, 3))
    r = hessian_trace(model, mse, data, n_hvp=48, progress=False)
    exact = 2 * (x ** 2).sum().item() / (8 * 2) * 2  # tr(2/(N D) I_D kron X^T X)
    assert r.estimate == pytest.approx(exact, rel=1e-10) and r.n_hvp == 48


@pytest.mark.parametrize("case", ["mlp", "cnn_bn"])
def test_model_trace_z_scores_over_seeds(case):
    x, y = classification_data(n=23, d=12)
    model = mlp((12, 8, 5, 3)) if case == "mlp" else cnn_bn(12)
    data = uneven_batches(x, y)
    exact = torch.trace(exact_hessian(model, ce, data)).item()
    snap = snapshot(model)
    runs = [hessian_trace(model, ce, data, n_hvp=12, seed=s, progress=False) for s in range(12)]
    assert_unchanged(model, snap)
    est = np.array([r.estimate for r in runs])
    se = np.array([r.stderr for r in runs])
    assert abs(est.mean() - exact) / np.sqrt((se ** 2).mean() / len(est)) < 4.5
    full = hessian_trace(model, ce, data, n_hvp=3 * 200, progress=False)  # sketch covers n
    assert full.estimate == pytest.approx(exact, rel=1e-9) and 0 < full.stderr < 1e-12 * abs(exact)


def test_layerwise_blocks_match_exact_blocks():
    x, y = classification_data(n=23, d=12)
    model = cnn_bn(12)
    data = uneven_batches(x, y)
    names = [n for n, _ in model.named_parameters()]
    H = exact_hessian(model, ce, data)
    sizes = np.cumsum([0] + [p.numel() for p in model.parameters()])
    result = layerwise(model, ce, data, n_hvp_trace=3 * 110, progress=False)
    assert result.blocks == ["conv", "bn", "fc"]
    for b, block in enumerate(result.blocks):
        idx = torch.cat([torch.arange(sizes[i], sizes[i + 1]) for i, n in enumerate(names)
                         if n in result.params[block]])
        sub = H[idx][:, idx]
        assert result.top_eigenvalue[b] == pytest.approx(torch.linalg.eigvalsh(sub)[-1].item(),
                                                         rel=1e-6)
        assert result.trace[b] == pytest.approx(torch.trace(sub).item(), rel=1e-9, abs=1e-12)
    assert result.trace.sum() == pytest.approx(torch.trace(H).item(), rel=1e-9)
    assert result.converged.all() and set(result.as_dict()) == {"conv", "bn", "fc"}
    custom = layerwise(model, ce, data, groups={"weights": lambda n, p: n.endswith("weight")},
                       n_hvp_trace=12, progress=False)
    assert custom.blocks == ["weights"] and custom.n_params[0] == 9 + 3 + 108


def test_bad_input():
    x, y = classification_data(n=23, d=12)
    model, data = mlp((12, 8, 5, 3)), uneven_batches(x, y)
    for kwargs, word in [({"method": "xdiag"}, "method"), ({"n_hvp": 3}, "n_hvp"),
                         ({"n_hvp": 1, "method": "hutchinson"}, "n_hvp"), ({"seed": 1.5}, "seed"),
                         ({"chunk": 0}, "chunk")]:
        with pytest.raises(ValueError, match=word):
            hessian_trace(model, ce, data, progress=False, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        hessian_trace(model, ce, [], progress=False)
    with pytest.raises(ValueError, match="groups"):
        layerwise(model, ce, data, groups={}, progress=False)


def test_hutchinson_stderr_is_the_sample_standard_deviation_of_the_probes_over_sqrt_m():
    """The unbiased sample variance (ddof=1) of the m Hutchinson probe values, over m."""
    A = spectrum_matrix()
    r = trace_estimate(lambda V: V @ A, 120, 30, method="hutchinson", seed=3, like=LIKE)
    m = len(r.samples)
    assert m == 30
    sample_var = ((r.samples - r.samples.mean()) ** 2).sum() / (m - 1)
    assert r.stderr == pytest.approx(np.sqrt(sample_var / m), rel=1e-12)


def test_hutch_plus_plus_stderr_is_the_plug_in_variance_of_its_residual_probes(monkeypatch):
    """sqrt(mean(v_i) / g), v_i = 2 ||P A w_i||^2 - 2 (w_i^T A w_i)^2 / d, from explicit
    projectors P = I - Q^T Q (d = n - k) and the residual probes w_i the estimator drew."""
    import analysis.trace as trace
    drawn = {}

    def spy(g, Q, *args, **kwargs):
        drawn["Q"], drawn["W"] = Q, original(g, Q, *args, **kwargs)
        return drawn["W"]

    original = trace._sphere_residual
    monkeypatch.setattr(trace, "_sphere_residual", spy)
    A = spectrum_matrix()
    r = trace_estimate(lambda V: V @ A, 120, 30, method="hutch++", seed=3, like=LIKE)
    Q, W = drawn["Q"], drawn["W"]
    P = torch.eye(120, dtype=torch.float64) - Q.T @ Q
    d, g = 120 - len(Q), len(W)
    q = ((W @ A) * W).sum(1)
    v = 2 * (W @ A @ P).square().sum(1) - 2 * q ** 2 / d
    assert g == 10 and np.allclose(r.samples, q.numpy(), rtol=1e-12)
    assert r.stderr == pytest.approx(float(v.mean() / g) ** 0.5, rel=1e-10)
    assert r.stderr != pytest.approx(float(q.var() / g) ** 0.5, rel=1e-3)  # not the sample one


@pytest.mark.parametrize("method", ["hutch++", "xtrace", "hutchinson"])
def test_budget_of_n_products_computes_the_exact_trace_from_n_products(monkeypatch, method):
    """Documented cost: with n <= n_hvp the trace is exact from the n unit vectors, and no
    more products are spent (nor reported) whatever n_hvp allows."""
    A = spectrum_matrix(n=10)
    spent = []

    def matmat(V):
        spent.append(len(V))
        return V @ A

    r = trace_estimate(matmat, 10, 99, method=method, like=LIKE)
    assert sum(spent) == 10 and r.n_hvp == 10 and len(r.samples) == 0
    assert r.estimate == pytest.approx(torch.trace(A).item(), rel=1e-12)
    # the same through a model: the operator's products are counted where they are made
    from analysis import HessianOperator
    x, y = classification_data(n=23, d=4)
    model, data = mlp((4, 3, 3)), uneven_batches(x, y)
    n = sum(p.numel() for p in model.parameters())
    rows = []
    matmat_of = HessianOperator.matmat
    monkeypatch.setattr(HessianOperator, "matmat",
                        lambda self, vs: rows.append(len(vs)) or matmat_of(self, vs))
    tr = hessian_trace(model, ce, data, n_hvp=10 * n, method=method, progress=False)
    assert sum(rows) == n and tr.n_hvp == n
    assert tr.estimate == pytest.approx(torch.trace(exact_hessian(model, ce, data)).item(),
                                        rel=1e-10)
