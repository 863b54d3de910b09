"""A module registered under two names (issue 31): routines leave the model exactly as found.

``self.alias = self.block`` (as transformers 4.x T5 did with ``shared``) made
``functional_call(tie_weights=True)`` put a plain (or an escaped ``torch.func``) tensor in
place of ``block.weight``.
"""
import numpy as np
import pytest
import torch
from torch import nn

from analysis import top_eigenvalues
from analysis.core import own_call, supervised
from landscape import plane, random_direction
from tests.oracles import assert_unchanged, classification_data, snapshot


class Net(nn.Module):
    def __init__(self, alias: bool):
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Linear(6, 5, dtype=torch.float64)
        self.head = nn.Linear(5, 3, dtype=torch.float64)
        if alias:
            self.alias = self.block

    def forward(self, x):
        return self.head(torch.tanh(self.block(x)))


def _data():
    x, y = classification_data(n=12)
    return [(x[:7], y[:7]), (x[7:], y[7:])]


LOSS = supervised(nn.CrossEntropyLoss())
ROUTINES = {
    "empirical_fisher": lambda m: top_eigenvalues(m, LOSS, _data(), k=2, progress=False,
                                                  curvature="empirical_fisher").eigenvalues,
    "forward_hvp": lambda m: top_eigenvalues(m, LOSS, _data(), k=2, progress=False,
                                             hvp_method="forward").eigenvalues,
    "vmapped_plane": lambda m: plane(
        m, LOSS, _data(), random_direction(m, seed=1), random_direction(m, seed=2),
        [-0.5, 0.0, 0.5], [-0.5, 0.5], vectorize=True, progress=False).losses,
}


@pytest.mark.parametrize("name", sorted(ROUTINES))
def test_aliased_module_unchanged_and_same_result(name):
    aliased, plain = Net(alias=True), Net(alias=False)
    snap = snapshot(aliased)
    got = ROUTINES[name](aliased)
    assert_unchanged(aliased, snap)
    assert isinstance(aliased.block.weight, nn.Parameter)
    assert aliased.block.weight is aliased.alias.weight
    aliased(torch.zeros(2, 6, dtype=torch.float64))  # no escaped torch.func tensor left
    np.testing.assert_allclose(got, ROUTINES[name](plain), rtol=1e-10, atol=1e-12)


def test_own_call_swaps_tied_weights_in_every_module():
    """A tensor shared by two distinct modules is swapped in both (tied weights)."""
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    model[1].weight = model[0].weight
    model.alias = model[0]
    new = torch.eye(3)
    x = torch.randn(2, 3)
    assert torch.equal(own_call(model, {"0.weight": new}, (x,)), x)
    assert isinstance(model[0].weight, nn.Parameter) and model[1].weight is model[0].weight
