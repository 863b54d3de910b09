"""Convergence smoke test: every optimizer trains a small MLP on MNIST-1D.

HOW TO ADD AN OPTIMIZER (one line): CONVERGENCE["Name"] = factory(model) -> optimizer, built with
hyperparameters that suit a 40-64-10 ReLU MLP (float32, batch 128). The model is passed (not its
parameters) so that SAM-family wrappers can take `model=`. The test runs STEPS steps through
`opt.step(closure)` and requires the full training loss to fall below RATIO times its initial value.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optim
from tests.optim.reference import ce_closure
from analysis.datasets import mnist1d

STEPS = 200
RATIO = 0.6

CONVERGENCE: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "AGD": lambda model: optim.AGD(model.parameters(), lr=3e-3, delta=1e-5),
    "AGD-sgd-branch": lambda model: optim.AGD(model.parameters(), lr=5e-2, delta=1e-1),
    # hidden unit vectors at the paper's larger vector lr; the classifier (no BN-softmax here) is
    # plain Adam
    "NDAdam": lambda model: optim.NDAdam([{"params": [model[0].weight], "lr": 5e-2},
                                          {"params": [model[2].weight,
                                                      model[0].bias, model[2].bias],
                                           "nd": False}], lr=1e-2),
    "SAM": lambda model: optim.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                   rho=0.05, model=model),
    "WSAM": lambda model: optim.WSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                     rho=0.05, model=model),
    "AdaSAM": lambda model: optim.AdaSAM(model.parameters(), lr=3e-3, rho=0.05, model=model),
    "Lookahead": lambda model: optim.Lookahead(torch.optim.Adam(model.parameters(), lr=1e-2), k=5,
                                               alpha=0.5),
    "SALA": lambda model: optim.SALA(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=5,
                                     alpha=0.8, rho=0.05, model=model),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.mark.parametrize("name", sorted(CONVERGENCE))
def test_training_loss_falls(name):
    data = mnist1d()
    model = _model()
    opt = CONVERGENCE[name](model)

    def train_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(data.x), data.y))

    start = train_loss()
    batches = data.batches(128, shuffle_seed=0)
    for step in range(STEPS):
        x, y = batches[step % len(batches)]
        opt.step(ce_closure(opt, model, x, y))
    end = train_loss()
    assert end < RATIO * start, f"{name}: training loss {start:.3f} -> {end:.3f}"


class TwoBasins(nn.Module):
    """L(u, v) = -log(exp(-q_sharp) + exp(-q_flat)): a sharp basin (curvature 100 in u) holding the
    global minimum at u = 0, and a flat one (curvature 1, loss 0.1 higher) at u = 3. Training starts
    in the sharp one."""

    def __init__(self):
        super().__init__()
        self.x = nn.Parameter(torch.tensor([0.05, 0.5], dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        u, v = self.x
        sharp = 50.0 * u ** 2 + 0.5 * v ** 2
        flat = 0.5 * (u - 3.0) ** 2 + 0.5 * v ** 2 + 0.1
        return -torch.logsumexp(torch.stack([-sharp, -flat]), 0)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)


FLAT_BASIN: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "SAM": lambda m: optim.SAM(_sgd(m), rho=0.8),
    "WSAM": lambda m: optim.WSAM(_sgd(m), rho=0.8),
    "AdaSAM": lambda m: optim.AdaSAM(m.parameters(), lr=0.1, rho=0.8),
    "SALA": lambda m: optim.SALA(_sgd(m), k=2, alpha=0.5, rho=0.8),
}
#: the same runs without the sharpness term: they stay in the sharp basin
PLAIN: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "SGD": _sgd,
    "AMSGrad": lambda m: torch.optim.Adam(m.parameters(), lr=0.1, amsgrad=True),
    "Lookahead": lambda m: optim.Lookahead(_sgd(m), k=2, alpha=0.5),
}


def _final_u(factory) -> float:
    model = TwoBasins()
    opt = factory(model)

    def closure():
        opt.zero_grad()
        loss = model()
        loss.backward()
        return loss

    for _ in range(400):
        opt.step(closure)
    return float(model.x[0])


@pytest.mark.parametrize("name", sorted(FLAT_BASIN) + sorted(PLAIN))
def test_sharpness_aware_optimizers_leave_the_sharp_basin(name):
    """The SAM family ends in the flat basin (|u - 3| < 0.1); its base optimizers, at the same lr,
    converge to the sharp global minimum (|u| < 0.01), so this is a claim plain descent fails."""
    u = _final_u({**FLAT_BASIN, **PLAIN}[name])
    if name in FLAT_BASIN:
        assert abs(u - 3.0) < 0.1, f"{name} ended at u = {u:.3f}, not in the flat basin"
    else:
        assert abs(u) < 0.01, f"{name} ended at u = {u:.3f}"
