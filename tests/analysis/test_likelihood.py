"""The Fisher's likelihood for a ``split_loss``: declared on the loss, refused with ways out that
exist where the Fisher was asked for (issue 25: ``curvature="fisher"`` said "declare it with
likelihood=", a keyword the routines do not take)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from analysis import (FisherOperator, GGNOperator, hessian_trace, spectral_density, split_loss,
                      top_eigenvalues)
from analysis.layerwise import layerwise
from tests.oracles import mlp

ROUTINES = {"top_eigenvalues": top_eigenvalues, "hessian_trace": hessian_trace,
            "spectral_density": spectral_density, "layerwise": layerwise}


def forward(model, batch):
    return model(batch[0])


def criterion(outputs, batch):
    return nn.functional.cross_entropy(outputs, batch[1])


def problem():
    model = mlp((3, 4, 3))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    return model, [(x, torch.randint(0, 3, (6,), generator=gen))]


def dense(op):
    return op.matmat(torch.eye(op.shape[0], dtype=torch.float64))


@pytest.mark.parametrize("routine", sorted(ROUTINES))
def test_a_routine_names_the_declaration_it_can_use(routine):
    model, data = problem()
    with pytest.raises(ValueError) as err:
        ROUTINES[routine](model, split_loss(forward, criterion), data, curvature="fisher",
                          progress=False)
    message = str(err.value)
    assert "curvature='fisher' needs the likelihood" in message
    assert "analysis.split_loss(forward, criterion, likelihood=...)" in message
    assert "curvature='ggn'" in message and "curvature='empirical_fisher'" in message
    # no keyword that the routines do not take
    assert "FisherOperator" not in message and "kind=" not in message
    assert "declare it with likelihood=" not in message


def test_fisher_operator_names_its_keyword_and_the_declaration():
    model, data = problem()
    with pytest.raises(ValueError, match=r"FisherOperator\(\.\.\., likelihood=\.\.\.\) or "
                                         r"analysis\.split_loss\(forward, criterion, "
                                         r"likelihood=\.\.\.\)"):
        FisherOperator(model, split_loss(forward, criterion), data, progress=False)


@pytest.mark.parametrize("how", ["split_loss", "attribute"])
def test_the_named_way_out_works_in_every_routine(how):
    """Declared on the loss, the exact Fisher of cross-entropy is the GGN (Martens 2020)."""
    model, data = problem()
    if how == "split_loss":
        loss = split_loss(forward, criterion, likelihood="categorical")
    else:
        loss = split_loss(forward, criterion)
        loss.likelihood = "categorical"
    ggn = dense(GGNOperator(model, loss, data, progress=False)).numpy()
    want = np.linalg.eigvalsh(ggn)[::-1]
    got = top_eigenvalues(model, loss, data, k=2, curvature="fisher", progress=False)
    np.testing.assert_allclose(got.eigenvalues, want[:2], rtol=1e-8)
    trace = hessian_trace(model, loss, data, curvature="fisher", n_hvp=99, progress=False)
    assert abs(trace.estimate - np.trace(ggn)) < 1e-9 * np.trace(ggn)
    density = spectral_density(model, loss, data, curvature="fisher", progress=False)
    assert abs(density.nodes.max() - want[0]) < 1e-8 * want[0]  # Lanczos spans all 31 dims
    op = FisherOperator(model, loss, data, progress=False)
    np.testing.assert_allclose(dense(op).numpy(), ggn, rtol=0, atol=1e-12)


def test_a_declared_likelihood_is_checked():
    with pytest.raises(ValueError, match="likelihood must be one of"):
        split_loss(forward, criterion, likelihood="poisson")
    model, data = problem()
    loss = split_loss(forward, criterion)
    loss.likelihood = "poisson"
    with pytest.raises(ValueError, match="loss_fn.likelihood must be one of"):
        top_eigenvalues(model, loss, data, curvature="fisher", progress=False)
