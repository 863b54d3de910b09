"""Keskar epsilon-sharpness and the PAC-Bayes sigma search against closed forms on quadratics."""
import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from analysis import keskar_sharpness, pac_bayes_sigma, supervised
from analysis.sharpness.pac_bayes import classification_error
from tests.oracles import (assert_unchanged, classification_data, cnn_bn, mlp, snapshot,
                           uneven_batches)
from tests.analysis.problems import (DATA, QUIET, Quadratic, check_restored_on_failure, quad_loss,
                                     w_star)

CE = supervised(nn.CrossEntropyLoss())


def diagonal_quadratic(n, seed=0, c=0.0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.rand(n, generator=gen, dtype=torch.float64) * scale + 0.1
    return h, Quadratic(h, w_star(n, seed=seed + 1), c=c)


def test_keskar_full_space_on_a_diagonal_quadratic():
    h, model = diagonal_quadratic(7, c=0.4)
    x = model.w.detach()
    snap = snapshot(model)
    for eps in (1e-3, 5e-2):
        r = keskar_sharpness(model, quad_loss, DATA, eps=eps, **QUIET)
        bound = eps * (x.abs() + 1)
        expected = 100 * 0.5 * (h * bound ** 2).sum().item() / (1 + 0.4)
        assert r.value == pytest.approx(expected, rel=1e-9)
        assert r.loss == pytest.approx(0.4) and r.n_iter <= 10 and r.subspace is None
    assert_unchanged(model, snap)


def test_keskar_random_subspace_on_an_isotropic_quadratic():
    n, p, h = 9, 3, 2.5
    model = Quadratic(h * torch.eye(n, dtype=torch.float64), w_star(n), c=0.1)
    r = keskar_sharpness(model, quad_loss, DATA, eps=1e-2, subspace_dim=p, seed=3, **QUIET)
    A = r.subspace
    assert A.shape == (n, p)
    assert torch.allclose(A.T @ A, torch.eye(p, dtype=torch.float64), atol=1e-12)
    # orthonormal A: L(w + A y) - L(w) = h |y|^2 / 2, largest at the corners of the box
    bound = 1e-2 * ((A.T @ model.w.detach()).abs() + 1)
    assert r.value == pytest.approx(100 * 0.5 * h * (bound ** 2).sum().item() / 1.1, rel=1e-9)
    again = keskar_sharpness(model, quad_loss, DATA, eps=1e-2, subspace_dim=p, seed=3, **QUIET)
    assert torch.equal(again.subspace, A)


def test_keskar_on_a_network_restores_the_model():
    x, y = classification_data(n=23, d=12)
    model = cnn_bn()
    snap = snapshot(model)
    r = keskar_sharpness(model, CE, uneven_batches(x, y), eps=1e-3, max_iter=3,
                         model_mode="train", **QUIET)
    assert_unchanged(model, snap)
    assert r.value > 0 and r.n_iter <= 3 and r.n_backward > 0


def scipy_keskar(model, x, y, eps, seed, max_iter, subspace=None):
    """Keskar et al.'s metric with scipy's L-BFGS-B on an inline objective: ``(value, nit)``.

    The start is the one ``keskar_sharpness`` draws: after the subspace's Gaussian, a uniform
    point of the box from the generator of ``seed``.
    """
    from scipy.optimize import Bounds, minimize
    from torch.func import functional_call
    from torch.nn import functional as F

    from analysis.core import flatten, make_generator, randn, uniform, unflatten

    names, params = zip(*model.named_parameters())
    w = flatten([p.detach() for p in params])
    A = torch.eye(len(w), dtype=torch.float64) if subspace is None else subspace

    def loss_at(v):
        out = functional_call(model, dict(zip(names, unflatten(v, params))), (x,))
        return F.cross_entropy(out, y)

    gen = make_generator(seed)
    if subspace is not None:
        randn((len(w) * A.shape[1],), gen, like=w)
    bound = (eps * ((A.T @ w).abs() + 1)).numpy()
    y0 = uniform(bound.shape, gen, like=w).numpy() * bound
    base, best = loss_at(w).item(), []

    def negative(yv):
        v = (w + A @ torch.from_numpy(yv)).requires_grad_(True)
        value = loss_at(v)
        best.append(value.item())
        return -value.item(), -(A.T @ torch.autograd.grad(value, v)[0]).numpy()

    r = minimize(negative, y0, jac=True, method="L-BFGS-B", bounds=Bounds(-bound, bound),
                 options={"maxiter": max_iter})
    return 100 * (max(best + [base]) - base) / (1 + base), r.nit


@pytest.mark.parametrize("subspace_dim", [None, 4])
def test_keskar_is_scipys_lbfgsb_on_a_network(subspace_dim):
    """The value and the iterations equal scipy's L-BFGS-B run on the same objective."""
    x, y = classification_data(n=23, d=6)
    model = mlp()
    r = keskar_sharpness(model, CE, uneven_batches(x, y), eps=5e-2, subspace_dim=subspace_dim,
                         seed=4, max_iter=10, **QUIET)
    value, nit = scipy_keskar(model, x, y, 5e-2, 4, 10, r.subspace)
    assert r.n_iter == nit and r.value > 0
    assert r.value == pytest.approx(value, rel=1e-8)


def test_pac_bayes_sigma_matches_the_quadratic_closed_form():
    # E[L(w + sigma xi)] - L(w) = sigma^2 tr(A) / 2  =>  sigma* = sqrt(2 Delta / tr A)
    h, model = diagonal_quadratic(4000, scale=2.0)
    delta = 0.1
    r = pac_bayes_sigma(model, quad_loss, DATA, target=delta, tol=1e-4, **QUIET)
    expected = math.sqrt(2 * delta / h.sum().item())
    assert r.converged and abs(r.increase - delta) <= 1e-4
    assert r.sigma == pytest.approx(expected, rel=0.02)  # Monte-Carlo error ~ 0.4 %
    assert r.flatness == pytest.approx(1 / r.sigma ** 2)
    # magnitude-aware: per-weight variance sigma^2 w_i^2 + eps^2
    w = model.w.detach()
    r = pac_bayes_sigma(model, quad_loss, DATA, target=delta, tol=1e-4,
                        magnitude_aware=True, magnitude_eps=1e-3, **QUIET)
    expected = math.sqrt((2 * delta - 1e-6 * h.sum().item()) / (h * w ** 2).sum().item())
    assert r.converged and r.sigma == pytest.approx(expected, rel=0.02)


def test_pac_bayes_flatness_overflows_to_inf_for_a_tiny_sigma():
    """sigma_max = 1e-200: the noise is below rounding, the target is not reached, and
    1 / sigma^2 (1e400) is reported as inf instead of raising ZeroDivisionError (a fuzz find)."""
    h, model = diagonal_quadratic(40, scale=2.0)
    r = pac_bayes_sigma(model, quad_loss, DATA, target=0.1, sigma_max=1e-200, max_iter=3,
                        **QUIET)
    assert r.sigma <= 1e-200 and r.flatness == math.inf and not r.converged


def test_pac_bayes_error_metric_reaches_the_target():
    x, y = classification_data(n=200, d=6)
    model = mlp(sizes=(6, 16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        CE(model, (x, y)).backward()
        opt.step()
    snap = snapshot(model)
    r = pac_bayes_sigma(model, CE, [(x, y)], target=0.1, metric="error", **QUIET)
    assert_unchanged(model, snap)
    assert r.converged and abs(r.increase - 0.1) <= 1e-2
    # independent draws at the sigma found raise the error by about the target
    base = classification_error(model, (x, y)).item()
    gen = torch.Generator().manual_seed(123)
    rises = []
    with torch.no_grad():
        for _ in range(30):
            noisy = copy.deepcopy(model)
            for q, p in zip(noisy.parameters(), model.parameters()):
                q.copy_(p + r.sigma * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            rises.append(classification_error(noisy, (x, y)).item() - base)
    assert abs(sum(rises) / len(rises) - 0.1) < 0.04


def test_pac_bayes_reports_when_the_target_is_out_of_reach():
    h, model = diagonal_quadratic(3)
    r = pac_bayes_sigma(model, quad_loss, DATA, target=1e6, **QUIET)
    assert not r.converged and r.sigma == 2.0 and r.n_evaluations == 1


@pytest.mark.parametrize("fn,kwargs,match", [
    (keskar_sharpness, dict(eps=0.0), "eps"), (keskar_sharpness, dict(max_iter=0), "max_iter"),
    (keskar_sharpness, dict(subspace_dim=0), "subspace_dim"),
    (keskar_sharpness, dict(subspace_dim=10 ** 6), "subspace_dim"),
    (pac_bayes_sigma, dict(target=-0.1), "target"), (pac_bayes_sigma, dict(metric="acc"), "metric"),
    (pac_bayes_sigma, dict(n_samples=0), "n_samples"),
    (pac_bayes_sigma, dict(max_iter=0), "max_iter"),
    (pac_bayes_sigma, dict(magnitude_aware=True, magnitude_eps=-1.0), "magnitude_eps"),
])
def test_flatness_rejects_bad_arguments(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(mlp(), CE, [classification_data()], **kwargs, **QUIET)


@pytest.mark.parametrize("failure", ["nan", "raise"])
@pytest.mark.parametrize("fn", [keskar_sharpness, pac_bayes_sigma])
def test_model_restored_when_the_loss_fails_partway(fn, failure):
    check_restored_on_failure(lambda *args: fn(*args, **QUIET), failure)


@pytest.mark.parametrize("fn,old,new,value", [
    (keskar_sharpness, "maxiter", "max_iter", 2), (pac_bayes_sigma, "depth", "max_iter", 2),
    (pac_bayes_sigma, "tolerance", "tol", 0.05),
])
def test_renamed_keywords_still_work_for_one_release_with_a_warning(fn, old, new, value):
    x, y = classification_data()
    model, data = mlp(), [(x, y)]
    with pytest.warns(DeprecationWarning, match=f"{old}= is renamed {new}="):
        r_old = fn(model, CE, data, **{old: value}, **QUIET)
    r_new = fn(model, CE, data, **{new: value}, **QUIET)
    assert dataclasses.replace(r_old, metadata={}) == dataclasses.replace(r_new, metadata={})
    assert r_old.metadata["config"][new] == value and old not in r_old.metadata["config"]
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=new):
        fn(model, CE, data, **{old: 0}, **QUIET)
    with pytest.raises(TypeError, match="got both"):
        fn(model, CE, data, **{old: value, new: value}, **QUIET)
