"""Issue 31: the SAM family (SAM, WSAM, AdaSAM with ``model=``) freezes every module with
running statistics in the perturbed pass, not only BatchNorm: InstanceNorm with
``track_running_stats=True``, any ``_NormBase``, and user modules with ``running_*`` buffers.
SALA updates them in its SAM pass, as its authors' code does."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optim
from optim._sam_base import has_running_stats


class RunningMax(nn.Module):
    """A user module that declares running statistics of its own (a ``running_max`` buffer)."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("running_max", torch.zeros(n, dtype=torch.float64))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.running_max.mul_(0.9).add_(0.1 * x.detach().abs().amax(dim=(0, 2)))
        return x


class InstanceNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(2, 4, 3)
        self.norm = nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
        self.user = RunningMax(4)
        self.head = nn.Linear(4 * 8, 3)

    def forward(self, x):
        return self.head(self.user(self.norm(self.conv(x))).flatten(1))


X = torch.randn(6, 2, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
Y = torch.arange(6) % 3

FAMILY = {
    "SAM": lambda m: optim.SAM(torch.optim.SGD(m.parameters(), lr=0.1), rho=0.5, model=m),
    "WSAM": lambda m: optim.WSAM(torch.optim.SGD(m.parameters(), lr=0.1), rho=0.5, model=m),
    "AdaSAM": lambda m: optim.AdaSAM(m.parameters(), lr=1e-2, rho=0.5, model=m),
}
SALA = lambda m: optim.SALA(torch.optim.SGD(m.parameters(), lr=0.1), k=2, rho=10.0,  # noqa: E731
                            model=m)   # k=2: every second step is a SAM step


def _stats(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def _two_steps(opt, model):
    """The buffers after the plain pass of the last step, and after the step."""
    after_plain = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        if not after_plain:
            after_plain.append(_stats(model))
        loss.backward()
        return loss

    for _ in range(2):
        after_plain.clear()
        opt.step(closure)
    return after_plain, _stats(model)


@pytest.mark.parametrize("name", FAMILY)
def test_running_statistics_move_only_in_the_plain_pass(name):
    model = InstanceNet().double()
    opt = FAMILY[name](model)
    after_plain, final = _two_steps(opt, model)
    assert opt.n_closure_calls == 4
    assert final.keys() == after_plain[0].keys()
    for key, value in final.items():
        assert torch.equal(value, after_plain[0][key]), key
    assert model.norm.momentum == 0.1


def test_sala_updates_running_statistics_in_its_sam_pass_as_its_authors_code():
    model = InstanceNet().double()
    opt = SALA(model)
    after_plain, final = _two_steps(opt, model)
    assert opt.n_closure_calls == 3   # SALA's second step is a SAM step
    assert not torch.equal(final["norm.running_mean"], after_plain[0]["norm.running_mean"])
    assert not torch.equal(final["user.running_max"], after_plain[0]["user.running_max"])


def test_the_two_step_api_restores_instance_norm_statistics():
    model = InstanceNet().double()
    opt = optim.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, model=model)
    F.cross_entropy(model(X), Y).backward()
    before = _stats(model)
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(X), Y).backward()
    opt.second_step(zero_grad=True)
    assert all(torch.equal(v, before[k]) for k, v in _stats(model).items())


def test_which_modules_count_as_holding_running_statistics():
    assert has_running_stats(nn.BatchNorm1d(3))
    assert has_running_stats(nn.InstanceNorm2d(3, track_running_stats=True))
    assert has_running_stats(RunningMax(3))
    assert not has_running_stats(nn.InstanceNorm2d(3))
    assert not has_running_stats(nn.BatchNorm1d(3, track_running_stats=False))
    assert not has_running_stats(nn.GroupNorm(1, 3))
    assert not has_running_stats(nn.Linear(2, 2))
