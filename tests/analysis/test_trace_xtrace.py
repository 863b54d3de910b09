"""XTrace's leave-one-out algebra and calibrated stderr; exact traces where the budget allows."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from analysis import hessian_trace, supervised
from analysis.core import make_generator, randn
from analysis.curvature import curvature_operator
from analysis.trace import trace_estimate
from tests.oracles import classification_data, mlp, uneven_batches

LIKE = torch.zeros(1, dtype=torch.float64)


def _xtrace_by_definition(A, W):
    """The m leave-one-out estimates with explicit projectors (Epperly et al. 2024, Sec. 2.1),
    the residual probe normalised to the sphere of its (n - m + 1)-dimensional space."""
    Y = W @ A
    out = []
    for i in range(len(W)):
        Qi = torch.linalg.qr(torch.cat([Y[:i], Y[i + 1:]]).T)[0]
        P = Qi @ Qi.T
        r = W[i] - P @ W[i]
        r = r * np.sqrt(len(A) - len(Qi.T)) / r.norm()
        out.append(torch.trace(Qi.T @ A @ Qi) + r @ A @ r)
    return torch.stack(out)


def test_xtrace_estimates_and_variance_match_their_definitions():
    """The samples are the paper's t_i; the variance is s^2/m + mean_{i!=j} d_ij d_ji, with
    d_ij = t_i - (t_i of XTrace run without column j), all from explicit projectors."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(40, 40, generator=gen, dtype=torch.float64)
    A = X @ torch.diag(torch.linspace(-2, 9, 40, dtype=torch.float64) ** 3) @ X.T / 40
    r = trace_estimate(lambda V: V @ A, 40, 16, method="xtrace", seed=5, like=LIKE)
    W = randn((8, 40), make_generator(5), like=LIKE)
    t = _xtrace_by_definition(A, W)
    assert np.allclose(r.samples, t.numpy(), rtol=1e-9, atol=1e-9 * float(t.abs().max()))
    assert r.estimate == pytest.approx(float(t.mean()), rel=1e-10)
    m = len(W)
    d = torch.empty(m, m, dtype=torch.float64)
    for j in range(m):
        keep = [k for k in range(m) if k != j]
        tj = _xtrace_by_definition(A, W[keep])
        for a, i in enumerate(keep):
            d[i, j] = t[i] - tj[a]
    cov = sum(float(d[i, j] * d[j, i]) for i in range(m) for j in range(m) if i != j)
    var = float(t.var()) / m + cov / (m * (m - 1))
    assert r.stderr == pytest.approx(np.sqrt(max(var, float(t.var()) / m)), rel=1e-7)


def _dense(curvature, **kwargs):
    x, y = classification_data(n=23, d=12)
    model, data = mlp((12, 8, 5, 3)), uneven_batches(x, y)
    n = sum(p.numel() for p in model.parameters())
    op = curvature_operator(curvature, model, supervised(F.cross_entropy), data, params=None,
                            model_mode="eval", batch_size_fn=None, progress=False,
                            hvp_method="reverse", **kwargs)
    with op:
        M = op.matmat(torch.eye(n, dtype=torch.float64))
    return (M + M.T) / 2


def _preconditioner():
    gen = torch.Generator().manual_seed(7)
    return {name: 0.1 + torch.rand(p.shape, generator=gen, dtype=p.dtype)
            for name, p in mlp((12, 8, 5, 3)).named_parameters()}


@pytest.mark.parametrize("case,n_hvp", [("hessian", 40), ("preconditioned_ggn", 60),
                                         ("empirical_fisher", 40)])
def test_xtrace_z_scores_have_unit_sd_over_300_seeds(case, n_hvp):
    """z = (estimate - exact) / stderr over 300 seeds (167 parameters; the GGN has rank 46 and
    the empirical Fisher 23, so the budgets keep the sketch below the rank).

    With the paper's s/sqrt(m) (which drops the leave-one-out estimates' covariance) the SD of
    z was 1.27-1.69 (all three fail); with the leave-two-out variance it is 1.00 (Hessian),
    1.09 (GGN), 1.20 (empirical Fisher: m = 20 probes give a heavy-tailed variance estimate).
    The SD of 300 z has a standard error of about 4-6 %: the Hessian and GGN bounds are more
    than 3 standard errors away (the seeds are fixed, so the test is deterministic, not
    flaky). With Gaussian probes on the sphere-normalised residual (issue 30) the empirical
    Fisher's SD is 1.29 (1.22 over 600 seeds; the RMS stderr is 1.11 times the SD of the
    estimates): its bound is 1.35, and its z have a negative mean (-0.38) because the stderr
    grows with the error (correlation 0.47), so unbiasedness is asserted on the estimates.
    """
    A = (_dense("ggn", preconditioner=_preconditioner()) if case == "preconditioned_ggn"
         else _dense(case))
    exact = float(torch.trace(A))
    runs = [trace_estimate(lambda V: V @ A, len(A), n_hvp, method="xtrace", seed=s, like=LIKE)
            for s in range(300)]
    est = np.array([r.estimate for r in runs])
    z = (est - exact) / np.array([r.stderr for r in runs])
    assert 0.8 < z.std() < (1.35 if case == "empirical_fisher" else 1.25)
    assert abs(est.mean() - exact) < 4 * est.std() / np.sqrt(len(est))  # unbiased


class _Quadratic(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, n, dtype=torch.float64))


def _sum_of_squares(model, batch):
    return (model.w ** 2).sum() + 0 * batch[0].sum()


@pytest.mark.parametrize("method", ["hutch++", "xtrace", "hutchinson"])
@pytest.mark.parametrize("n_hvp", [6, 12, 13, 99])
def test_trace_of_2I_in_6_dimensions_is_12(method, n_hvp):
    """H = 2I (issue 30): 10.67 with stderr 6e-15 at n_hvp = 12 before (Hutch++ sketched 4 of
    6 directions and its 4 Rademacher probes of the rest coincided). With n <= n_hvp the n unit
    vectors give the exact trace from n products."""
    r = hessian_trace(_Quadratic(6), _sum_of_squares, [(torch.zeros(1, dtype=torch.float64),)],
                      n_hvp=n_hvp, method=method, progress=False)
    assert r.estimate == pytest.approx(12.0, rel=1e-14) and r.n_hvp == 6
    assert 0 < r.stderr < 1e-12
