"""The curvature extension point: CurvatureOperator subclasses registered for ``curvature=``,
checked against dense float64 oracles, and the docs' how-to run as written."""
from __future__ import annotations

import copy
import pathlib
import re

import numpy as np
import pytest
import torch
from torch import nn

import analysis
import analysis.operator
from analysis import (CurvatureOperator, FisherOperator, GGNOperator, HessianOperator,
                      EmpiricalFisherOperator, hessian_trace, layerwise, register_curvature,
                      spectral_density, supervised, top_eigenvalues)
from analysis.curvature import OutputCurvatureOperator
from tests.oracles import classification_data, exact_hessian, mlp, uneven_batches

CE = supervised(nn.CrossEntropyLoss())
MSE = supervised(nn.MSELoss())
HOWTO = pathlib.Path(__file__).resolve().parents[2] / "docs" / "how-to" / "add-curvature.md"


@pytest.fixture(autouse=True)
def registry():
    """Every test leaves the registry as it found it (the fuzz tests list the built-ins)."""
    saved = dict(analysis.operator._REGISTRY)
    yield
    analysis.operator._REGISTRY.clear()
    analysis.operator._REGISTRY.update(saved)


class ScaledHessian(HessianOperator):
    """3 H: a registered curvature in three lines."""

    def batch_product(self, batch, V):
        return 3.0 * super().batch_product(batch, V)


class GaussNewton(OutputCurvatureOperator):
    """The Gauss-Newton J^T (2 I / m) J of a mean squared error over m output elements."""

    def output_product(self, outputs, batch):
        return lambda w: w * (2.0 / outputs.numel())


def problem():
    model = mlp((6, 5, 3))
    x, y = classification_data()
    return model, uneven_batches(x, y, (7, 3, 9, 4))


def test_builtins_are_registered_and_listed():
    assert analysis.registered_curvatures()[:4] == ("hessian", "ggn", "fisher",
                                                    "empirical_fisher")
    reg = analysis.operator._REGISTRY
    assert (reg["hessian"], reg["ggn"], reg["fisher"], reg["empirical_fisher"]) == (
        HessianOperator, GGNOperator, FisherOperator, EmpiricalFisherOperator)
    for cls in (HessianOperator, GGNOperator, FisherOperator, EmpiricalFisherOperator):
        # siblings over the base: none derives from another built-in
        assert issubclass(cls, CurvatureOperator)
        others = {HessianOperator, GGNOperator, FisherOperator, EmpiricalFisherOperator} - {cls}
        assert not any(issubclass(cls, o) for o in others), cls


def test_a_registered_scaled_hessian_in_every_routine():
    model, data = problem()
    register_curvature("scaled", ScaledHessian)
    H = 3.0 * exact_hessian(model, CE, data)
    n = H.shape[0]
    want = torch.linalg.eigvalsh(H).flip(0)
    top = top_eigenvalues(model, CE, data, k=2, tol=1e-10, curvature="scaled", progress=False)
    np.testing.assert_allclose(top.eigenvalues, want[:2].numpy(), rtol=1e-8)
    assert top.curvature == "scaled" and top.metadata["config"]["curvature"] == "scaled"
    tr = hessian_trace(model, CE, data, n_hvp=3 * n, curvature="scaled", progress=False)
    np.testing.assert_allclose(tr.estimate, float(torch.trace(H)), rtol=1e-10)
    assert tr.curvature == "scaled"
    dens = spectral_density(model, CE, data, n_lanczos=n, n_vectors=1, curvature="scaled",
                            progress=False)
    np.testing.assert_allclose(np.sort(dens.nodes[0]), want.flip(0).numpy(), atol=1e-8)
    blocks = layerwise(model, CE, data, tol=1e-10, n_hvp_trace=300, curvature="scaled",
                       progress=False)
    np.testing.assert_allclose(blocks.trace.sum(), float(torch.trace(H)), rtol=1e-10)
    assert blocks.curvature == "scaled"
    # hvp_method reaches a registered class that takes it
    fwd = top_eigenvalues(model, CE, data, k=1, tol=1e-10, curvature="scaled",
                          hvp_method="forward", progress=False)
    np.testing.assert_allclose(fwd.eigenvalues, want[:1].numpy(), rtol=1e-8)


def test_a_registered_gauss_newton_equals_the_hessian_of_a_linear_least_squares():
    """For a linear model the Gauss-Newton of the squared error is its exact Hessian."""
    gen = torch.Generator().manual_seed(0)
    x, t = (torch.randn(19, 5, generator=gen, dtype=torch.float64),
            torch.randn(19, 2, generator=gen, dtype=torch.float64))
    model, data = nn.Linear(5, 2).double(), uneven_batches(x, t, (8, 11))
    register_curvature("gauss_newton", GaussNewton)
    H = exact_hessian(model, MSE, data)
    top = top_eigenvalues(model, MSE, data, k=3, tol=1e-10, curvature="gauss_newton",
                          block_size=2, progress=False)  # eigenvalues of multiplicity 2
    np.testing.assert_allclose(top.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:3].numpy(),
                               rtol=1e-8)
    tr = hessian_trace(model, MSE, data, n_hvp=40, curvature="gauss_newton", progress=False)
    np.testing.assert_allclose(tr.estimate, float(torch.trace(H)), rtol=1e-10)
    assert tr.n_hvp == H.shape[0]   # n <= n_hvp: the exact trace from the n unit vectors


def test_the_how_to_runs_as_written_and_matches_the_oracle():
    code = re.search(r"```python\n(.*?)```", HOWTO.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) < 20
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, str(HOWTO), "exec"), namespace)  # noqa: S102 - our own docs
    model, loss_fn, data = namespace["model"], namespace["loss_fn"], namespace["data"]
    A = exact_hessian(model, loss_fn, data) + 0.1 * torch.eye(15, dtype=torch.float64)
    np.testing.assert_allclose(namespace["top"].eigenvalues,
                               torch.linalg.eigvalsh(A).flip(0)[:2].numpy(), rtol=1e-6)
    np.testing.assert_allclose(namespace["trace"].estimate, float(torch.trace(A)), rtol=1e-10)
    assert namespace["top"].curvature == "damped_hessian"


def test_registration_errors_are_clear():
    model, data = problem()
    with pytest.raises(ValueError, match=r"curvature must be one of 'hessian', 'ggn', 'fisher', "
                                         r"'empirical_fisher', got 'mine'"):
        top_eigenvalues(model, CE, data, curvature="mine", progress=False)
    with pytest.raises(TypeError, match="subclass of analysis.CurvatureOperator"):
        register_curvature("mine", nn.Linear)
    with pytest.raises(TypeError, match="subclass of analysis.CurvatureOperator"):
        register_curvature("mine", lambda *a, **k: None)
    with pytest.raises(TypeError, match="implement batch_product"):
        register_curvature("mine", OutputCurvatureOperator)
    with pytest.raises(TypeError, match="name must be a non-empty string"):
        register_curvature("", ScaledHessian)
    with pytest.raises(ValueError, match="'hessian' is already registered to "
                                         "analysis.hvp.HessianOperator; pass override=True"):
        register_curvature("hessian", ScaledHessian)
    register_curvature("hessian", HessianOperator)  # the same class again: nothing to do
    register_curvature("mine", ScaledHessian)
    with pytest.raises(ValueError, match="already registered"):
        register_curvature("mine", GaussNewton)
    assert register_curvature("mine", GaussNewton, override=True) is GaussNewton
    assert analysis.registered_curvatures()[-1] == "mine"
    with pytest.raises(ValueError, match='curvature="hessian" only'):
        top_eigenvalues(model, CE, data, curvature="mine", hvp_method="forward",
                        progress=False)


def test_batch_product_gets_columns_and_its_shape_is_checked():
    model, data = problem()
    seen = []

    class Identity(CurvatureOperator):
        def batch_product(self, batch, V):
            seen.append(tuple(V.shape))
            return V.clone()

    op = Identity(model, CE, data, progress=False)
    n = op.shape[0]
    V = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), V)
    assert seen == [(n, 3)] * len(data) and op.n_hvp == 3
    empty = op.matmat(V[:0])  # no vector: batch_product is never asked for k = 0
    assert empty.shape == (0, n) and len(seen) == len(data) and op.n_hvp == 3

    class Wrong(CurvatureOperator):
        def batch_product(self, batch, V):
            return V.T

    with pytest.raises(ValueError, match=r"Wrong.batch_product must return a tensor of shape "
                                         rf"\({n}, 3\)"):
        Wrong(model, CE, data, progress=False).matmat(V)
    with pytest.raises(TypeError, match="abstract"):
        CurvatureOperator(model, CE, data)


def test_batch_product_of_the_builtins_on_a_plain_column_block():
    """Called directly with a contiguous [n, k] V, each built-in's batch product is the
    one-batch operator's product."""
    model, data = problem()
    batch = data[0]
    for op in (HessianOperator(model, CE, [batch], progress=False),
               GGNOperator(model, CE, [batch], progress=False),
               FisherOperator(model, CE, [batch], kind="mc", progress=False),
               FisherOperator(model, CE, [batch], kind="empirical", progress=False)):
        V = torch.randn(op.shape[0], 2, dtype=torch.float64)
        with op, torch.enable_grad():
            direct = op.batch_product(batch, V)
        torch.testing.assert_close(direct, op.matmat(V.T.contiguous()).T, rtol=1e-12,
                                   atol=1e-14)


def test_fisher_kind_empirical_is_the_empirical_fisher_sibling():
    model, data = problem()
    op = FisherOperator(model, CE, data, kind="empirical")
    assert type(op) is EmpiricalFisherOperator and op.kind == "empirical"
    assert op.curvature == "empirical_fisher"
    V = torch.randn(2, op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), EmpiricalFisherOperator(model, CE, data).matmat(V),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="mc_samples"):  # validated as before the split
        FisherOperator(model, CE, data, kind="empirical", mc_samples=0)
    mc = FisherOperator(model, CE, data, kind="mc", mc_samples=2, seed=5)
    assert type(mc) is FisherOperator
    twin = copy.deepcopy(mc)  # __new__ takes the constructor's arguments: copies still work
    torch.testing.assert_close(twin.matmat(V), mc.matmat(V), rtol=0, atol=0)
