"""Cross-check against PyHessian on the same model and data (uneven batches)."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from analysis import hessian_trace, supervised, top_eigenvalues
from tests.oracles import classification_data, mlp, uneven_batches

pyhessian = pytest.importorskip("pyhessian")


@pytest.fixture
def float64_default():
    """PyHessian draws its vectors with torch.randn(size) in the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def test_eigenvalues_and_trace_agree_with_pyhessian(float64_default):
    x, y = classification_data(n=23, d=12)
    data = uneven_batches(x, y)
    model = mlp((12, 8, 5, 3))
    criterion = nn.CrossEntropyLoss()
    peer = pyhessian.hessian(copy.deepcopy(model), criterion, dataloader=data, cuda=False)

    theirs, _ = peer.eigenvalues(top_n=2, tol=1e-7, maxIter=500)
    ours = top_eigenvalues(model, supervised(criterion), data, k=2, which="LM", tol=1e-10,
                           progress=False)
    np.testing.assert_allclose(ours.eigenvalues, theirs, rtol=1e-4)
    default, _ = peer.eigenvalues()  # PyHessian's defaults: top-1, tol=1e-3
    assert default[0] == pytest.approx(ours.eigenvalues[0], rel=3e-2)

    samples = np.array(peer.trace(maxIter=200, tol=-np.inf))  # never stop early
    assert len(samples) == 200
    trace = hessian_trace(model, supervised(criterion), data, n_hvp=150, progress=False)
    spread = np.hypot(samples.std(ddof=1) / np.sqrt(len(samples)), trace.stderr)
    assert abs(samples.mean() - trace.estimate) < 4 * spread
