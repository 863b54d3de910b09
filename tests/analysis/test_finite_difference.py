"""Finite-difference Hessian-vector products (analysis.finite_difference) against the exact
Hessian: step rule, Richardson, error estimate, bit-exact restoration, eigenvalues."""
import math

import pytest
import torch
from torch.nn import functional as F

from analysis.core import preserved
from analysis.finite_difference import fd_matmat, fd_step, FiniteDifference
from analysis.lanczos import lanczos
from tests.oracles import (assert_unchanged, classification_data, exact_hessian, mlp, snapshot,
                           uneven_batches)


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def setup(dtype=torch.float64):
    model = mlp(dtype=dtype)
    x, y = classification_data(n=23, d=6)
    return model, uneven_batches(x.to(dtype), y)


def products(model, data, vs, **options):
    params = list(model.parameters())
    fd = FiniteDifference(params, **options)
    with preserved(model, "eval", weights=False, trainable=params):
        out = fd_matmat(fd, model, ce, data, vs)
    return out, fd


def vectors(n, k=3, dtype=torch.float64):
    return torch.randn(k, n, generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.mark.parametrize("richardson", [True, False])
def test_float64_products_match_the_exact_hessian(richardson):
    model, data = setup()
    H = exact_hessian(model, ce, data)
    vs = vectors(H.shape[0])
    got, fd = products(model, data, vs, richardson=richardson)
    exact = vs @ H
    err = (got - exact).norm(dim=1) / exact.norm(dim=1)
    assert err.max() < (1e-9 if richardson else 1e-8)
    # the estimate is conservative: at least the true error of every product
    true = (got - exact).norm(dim=1)
    assert all(e >= t for e, t in zip(fd.errors, true.tolist()))
    meta = fd.metadata()
    assert meta["hvp_method"] == "finite_difference" and meta["n_products"] == 3
    assert meta["relative_error_estimate"] < 1e-5
    w = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in model.parameters()))
    assert meta["step"] == pytest.approx(fd_step(torch.float64, w, float(vs[-1].norm()),
                                                 richardson))


def test_the_step_rule():
    eps = torch.finfo(torch.float32).eps
    assert fd_step(torch.float32, 3.0, 2.0, richardson=False) == pytest.approx(eps ** (1 / 3) * 2)
    assert fd_step(torch.float32, 3.0, 2.0, richardson=True) == pytest.approx(eps ** 0.2 * 2)
    assert fd_step(torch.float32, 3.0, 2.0) == fd_step(torch.float32, 3.0, 2.0, False)
    with pytest.raises(ValueError, match="vector_norm"):
        fd_step(torch.float32, 3.0, 0.0)


def test_float32_products_and_the_estimate():
    model, data = setup(torch.float32)
    H = exact_hessian(setup()[0], ce, setup()[1])
    vs = vectors(H.shape[0])
    exact = vs @ H
    for richardson, bound in ((True, 1e-3), (False, 1e-2)):
        got, fd = products(model, data, vs.float(), richardson=richardson)
        err = ((got.double() - exact).norm(dim=1) / exact.norm(dim=1)).max()
        assert err < bound, (richardson, float(err))
        assert max(fd.relative_errors) >= err


def test_a_fixed_step_and_no_estimate():
    model, data = setup()
    H = exact_hessian(model, ce, data)
    vs = vectors(H.shape[0], k=1)
    got, fd = products(model, data, vs, richardson=False, estimate_error=False, step=1e-5)
    assert torch.allclose(got, vs @ H, rtol=1e-7, atol=1e-9)
    assert fd.steps == [1e-5] and fd.metadata()["error_estimate"] is None
    # a large fixed step gives a visibly biased product, and the estimate says so
    got, fd = products(model, data, vs, richardson=False, step=0.03)
    err = float((got - vs @ H).norm())
    assert err > 1e-2 and fd.errors[0] >= err


def test_weights_are_restored_bit_exactly():
    model, data = setup()
    model.train()
    next(model.parameters()).grad = torch.ones_like(next(model.parameters()))
    before = snapshot(model)
    n = sum(p.numel() for p in model.parameters())
    products(model, data, vectors(n, k=2) * 1e3)
    assert_unchanged(model, before)

    def broken(model, batch):
        if model[0].weight.detach().sub(before["params"]["0.weight"]).abs().max() > 0:
            raise RuntimeError("boom")
        return ce(model, batch)

    fd = FiniteDifference(list(model.parameters()))
    with pytest.raises(RuntimeError, match="boom"):
        with preserved(model, "eval", weights=False):
            fd_matmat(fd, model, broken, data, vectors(n, k=1))
    assert_unchanged(model, before)


def test_zero_vector_is_refused():
    model, data = setup()
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="nonzero"):
        products(model, data, torch.zeros(1, n, dtype=torch.float64))


def test_top_eigenvalue_within_1e5_of_the_exact_one():
    model, data = setup()
    H = exact_hessian(model, ce, data)
    exact = torch.linalg.eigvalsh(H).flip(0)[:2]
    params = list(model.parameters())
    fd = FiniteDifference(params)
    with preserved(model, "eval", weights=False, trainable=params):
        theta = lanczos(lambda vs: fd_matmat(fd, model, ce, data, vs), H.shape[0], 2, tol=1e-8,
                        like=H)[0]
    assert torch.allclose(theta, exact, rtol=1e-5, atol=0)
    assert fd.metadata()["relative_error_estimate"] < 1e-4
