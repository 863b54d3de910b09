"""Single-vector Lanczos checks the operator's symmetry at every product (issue 31): the
coupling of consecutive Lanczos vectors, computed from two products, must agree."""
import pytest
import torch
from torch import nn

import analysis.operator
from analysis import supervised, top_eigenvalues
from analysis.lanczos import lanczos
from tests.analysis.test_hvp_symmetry import Asymmetric, data, weight_normed
from tests.oracles import classification_data

CE = supervised(nn.CrossEntropyLoss())


@pytest.mark.parametrize("k", [1, 2])
def test_an_asymmetric_operator_is_blamed_on_the_single_vector_path(k):
    """A backward that is not the derivative of its forward: was eigenvalues with
    converged=True (the probe needs two vectors in one product, which this path never makes)."""
    torch.manual_seed(0)
    model, batch = Asymmetric().double(), data()
    with pytest.raises(RuntimeError, match=r"not symmetric.*(lin\.weight|scale) \("):
        top_eigenvalues(model, CE, [batch], k=k, progress=False)


def test_pytorchs_fused_weight_norm_is_blamed(monkeypatch):
    """Without the exact route, the fused kernel's wrong second derivative (issue 31)."""
    monkeypatch.setattr(analysis.operator, "uses_weight_norm", lambda model: False)
    with pytest.raises(RuntimeError, match=r"not symmetric.*original.*_WeightNorm"):
        top_eigenvalues(weight_normed("parametrize"), CE, [data()], k=1, progress=False)


def conv32():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Tanh(),
                        nn.Flatten(), nn.Linear(64, 3))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    return net, [(x, y)]


def mlp(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 3)).to(dtype)
    x, y = classification_data(n=64, d=12)
    return net, [(x.to(dtype), y)]


@pytest.mark.parametrize("case", ["mlp32", "mlp64", "conv32"])
def test_symmetric_models_are_not_flagged(case):
    """No false positive: the screen's largest gap on these runs is about 1.5e-7 (float32) and
    4e-16 (float64) of the largest product norm, against a tolerance of 30 sqrt(eps)."""
    net, batches = conv32() if case == "conv32" else mlp(
        torch.float32 if case == "mlp32" else torch.float64)
    result = top_eigenvalues(net, CE, batches, k=3, tol=1e-4, max_hvp=200, progress=False)
    assert result.converged and len(result.eigenvalues) == 3


def test_a_plain_matmat_that_is_not_symmetric_raises():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(50, 50, generator=gen, dtype=torch.float64)
    S = A + A.T
    N = S + 0.05 * torch.randn(50, 50, generator=gen, dtype=torch.float64)
    like = torch.zeros(1, dtype=torch.float64)
    assert lanczos(lambda V: V @ S.T, 50, 2, like=like)[4]
    with pytest.raises(RuntimeError, match="not symmetric"):
        lanczos(lambda V: V @ N.T, 50, 2, like=like)
