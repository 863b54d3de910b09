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
from analysis.datasets import mnist1d

STEPS = 200
RATIO = 0.6

CONVERGENCE: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "AGD": lambda model: optim.AGD(model.parameters(), lr=3e-3, delta=1e-5),
    "AGD-sgd-branch": lambda model: optim.AGD(model.parameters(), lr=5e-2, delta=1e-1),
    # hidden unit vectors at the paper's larger vector lr; the classifier (no BN-softmax here) is plain Adam
    "NDAdam": lambda model: optim.NDAdam([{"params": [model[0].weight], "lr": 5e-2},
                                          {"params": [model[2].weight, model[0].bias, model[2].bias],
                                           "nd": False}], lr=1e-2),
    "SAM": lambda model: optim.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05, model=model),
    "WSAM": lambda model: optim.WSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05, model=model),
    "AdaSAM": lambda model: optim.AdaSAM(model.parameters(), lr=3e-3, rho=0.05, model=model),
    "Lookahead": lambda model: optim.Lookahead(torch.optim.Adam(model.parameters(), lr=1e-2), k=5, alpha=0.5),
    "SALA": lambda model: optim.SALA(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=5, alpha=0.8, rho=0.05, model=model),
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

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    end = train_loss()
    assert end < RATIO * start, f"{name}: training loss {start:.3f} -> {end:.3f}"
