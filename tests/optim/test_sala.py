"""SALA against the behaviour of its authors' code (cltan023/sala2023): trajectory, stage,
distance and forward-backward passes on a scripted run whose decaying lr moves it from stage 1 to
2."""
from __future__ import annotations

import math

import pytest
import torch

import optim
from tests.optim.reference import (RefSGD, Softmax, assert_trajectories_close, batch, grad, initial,
                             param_groups, run_model)

LRS = (1.0, 0.5)
DECAY = 0.8
STEPS = 30


def reference_sala(k, alpha, rho, steps=STEPS, lrs=LRS, groups=(("W",), ("b",))):
    """``groups``: the parameter names of each param group (one perturbation norm per group)."""
    theta, base = initial(), RefSGD(lrs, momentum=0.9)
    phi, dist, s, passes = None, 0.0, 0, 0
    trajectory, stages, dists, pass_counts = [], [], [], []
    for i in range(steps):
        base.lrs = tuple(lr * DECAY ** i for lr in lrs)
        xy = batch(i)
        s += 1
        g = grad(theta, xy)
        passes += 1
        if s % k == 0:
            if dist < rho:  # stage 2: SAM step from theta (= phi), one norm per param group
                norms = {n: math.sqrt(sum(float(g[m].norm()) ** 2 for m in names))
                         for names in groups for n in names}
                theta = {n: theta[n] + rho * g[n] / (norms[n] + 1e-12) for n in theta}
                g = grad(theta, xy)
                passes += 1
            theta = {n: v.clone() for n, v in phi.items()}
        theta = base.step(theta, g)
        if s % k == k - 1:
            if phi is None:
                phi = {n: v.clone() for n, v in theta.items()}
            d = {n: theta[n] - phi[n] for n in theta}
            dist = (1 - alpha) * math.sqrt(sum(float(d[n].norm()) ** 2 for n in d))
            phi = {n: phi[n] + alpha * d[n] for n in phi}
            if dist < rho:
                theta = {n: v.clone() for n, v in phi.items()}
        trajectory.append(theta)
        stages.append(2 if dist < rho else 1)
        dists.append(dist)
        pass_counts.append(passes)
    return trajectory, stages, dists, pass_counts


def scripted_run(k, alpha, rho):
    model = Softmax()
    opt = optim.SALA(torch.optim.SGD(param_groups(model, *LRS), momentum=0.9), k=k,
                     alpha=alpha, rho=rho)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: DECAY ** t)
    stages, dists, passes = [], [], []

    def record(i):
        sched.step()
        stages.append(opt.stage)
        dists.append(opt.distance)
        passes.append(opt.n_closure_calls)

    return opt, model, run_model(opt, model, STEPS, on_step=record), stages, dists, passes


@pytest.mark.parametrize("k,alpha,rho", [(3, 0.5, 0.25), (2, 0.8, 0.1), (4, 0.5, 1e3)])
def test_sala_matches_the_authors_algorithm(k, alpha, rho):
    opt, model, got, stages, dists, passes = scripted_run(k, alpha, rho)
    want, want_stages, want_dists, want_passes = reference_sala(k, alpha, rho)
    assert_trajectories_close(got, want)
    assert stages == want_stages
    assert passes == want_passes
    torch.testing.assert_close(torch.tensor(dists), torch.tensor(want_dists),
                               rtol=1e-10, atol=1e-12)
    assert opt.n_steps == STEPS


@pytest.mark.parametrize("k,alpha,rho", [(3, 0.5, 0.25), (2, 0.8, 0.1)])
def test_a_group_of_several_tensors_takes_one_norm(k, alpha, rho):
    """W and b in one param group: the SAM ascent divides by the norm over both, not by each
    tensor's."""
    model = Softmax()
    opt = optim.SALA(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), k=k,
                     alpha=alpha, rho=rho)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: DECAY ** t)
    stages = []
    got = run_model(opt, model, STEPS, on_step=lambda i: (sched.step(), stages.append(opt.stage)))
    want, want_stages, _, _ = reference_sala(k, alpha, rho, lrs=(0.5, 0.5), groups=(("W", "b"),))
    assert_trajectories_close(got, want)
    assert stages == want_stages and stages.count(2) > 3


def test_scripted_run_visits_both_stages_and_counts_passes():
    k = 3
    _, _, _, stages, _, passes = scripted_run(k, 0.5, 0.25)
    # the decaying lr brings the fast weights close to the slow ones
    assert 1 in stages and stages[-1] == 2
    first_two = stages.index(1)
    assert stages[:first_two] == [2] * first_two  # phi = theta at the first slow update: distance 0
    # one pass per step plus one per SAM step; SAM steps are the cycle starts s = k, 2k, ... in
    # stage 2
    sam_steps = sum(1 for s in range(k, STEPS + 1, k) if stages[s - 2] == 2)
    assert passes[-1] == STEPS + sam_steps


def test_stage_one_everywhere_with_tiny_rho_uses_one_pass_per_step():
    _, _, _, stages, dists, passes = scripted_run(3, 0.5, 1e-9)
    # distance 0 until the second slow update (s = 2k - 1): stage 2 and one SAM step, at s = k
    assert stages == [2] * 4 + [1] * (STEPS - 4)
    assert passes[-1] == STEPS + 1
    assert all(d > 1e-9 for d in dists[4:])


def test_slow_weights_context_and_lazy_creation():
    model = Softmax()
    opt = optim.SALA(torch.optim.SGD(model.parameters(), lr=0.5), k=3, alpha=0.5, rho=1e-9)
    run_model(opt, model, 1)
    assert "slow" not in opt.state[model.W]
    before = model.W.detach().clone()
    with opt.slow_weights():  # no slow weights yet: the fast ones
        assert torch.equal(model.W, before)
    run_model(opt, model, 3)  # s = 2 created them, stage 1 keeps fast != slow
    slow = opt.state[model.W]["slow"].clone()
    fast = model.W.detach().clone()
    assert not torch.equal(slow, fast)
    with opt.slow_weights():
        assert torch.equal(model.W, slow)
    assert torch.equal(model.W, fast)


def test_sala_needs_a_closure():
    model = Softmax()
    opt = optim.SALA(torch.optim.SGD(model.parameters(), lr=0.5))
    with pytest.raises(ValueError, match="closure"):
        opt.step()
