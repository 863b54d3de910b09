"""Lookahead against Algorithm 1 of Zhang et al., resume and slow weights."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import optim
from tests.optim.reference import (RefSGD, Softmax, assert_trajectories_close, batch, grad, initial,
                                   param_groups, run_model)

LRS = (0.3, 0.1)
STEPS = 23


def reference_lookahead(k, alpha, steps=STEPS):
    theta, base, out = initial(), RefSGD(LRS, momentum=0.9), []
    phi = {n: v.clone() for n, v in theta.items()}  # phi_0 = theta_0
    for t in range(1, steps + 1):
        theta = base.step(theta, grad(theta, batch(t - 1)))  # base state kept across cycles
        if t % k == 0:
            phi = {n: phi[n] + alpha * (theta[n] - phi[n]) for n in phi}
            theta = {n: v.clone() for n, v in phi.items()}
        out.append(theta)
    return out


def make(model, **kw):
    return optim.Lookahead(torch.optim.SGD(param_groups(model, *LRS), momentum=0.9), **kw)


@pytest.mark.parametrize("k,alpha", [(5, 0.5), (3, 0.8)])
def test_lookahead_matches_reference(k, alpha):
    model = Softmax()
    opt = make(model, k=k, alpha=alpha)
    assert_trajectories_close(run_model(opt, model, STEPS), reference_lookahead(k, alpha))
    assert (opt.n_steps, opt.n_closure_calls) == (STEPS, STEPS)


def test_alpha_one_is_the_base_optimizer():
    model_a, model_b = Softmax(), Softmax()
    base = torch.optim.SGD(param_groups(model_b, *LRS), momentum=0.9)
    for a, b in zip(run_model(make(model_a, k=3, alpha=1.0), model_a, 10),
                    run_model(base, model_b, 10)):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_step_after_own_backward_equals_closure_step():
    model_a, model_b = Softmax(), Softmax()
    opt_a, opt_b = make(model_a, k=2), make(model_b, k=2)
    want = run_model(opt_a, model_a, 5)
    for i in range(5):
        opt_b.zero_grad()
        x, y = batch(i)
        F.cross_entropy(model_b(x), y).backward()
        assert opt_b.step() is None
        assert all(torch.equal(want[i][n], getattr(model_b, n)) for n in want[i])


def test_slow_weights_swap_in_and_out():
    model = Softmax()
    opt = make(model, k=4, alpha=0.5)
    run_model(opt, model, 6)  # mid-cycle: fast != slow
    fast, slow = model.W.detach().clone(), opt.state[model.W]["slow"].clone()
    assert not torch.equal(fast, slow)
    with opt.slow_weights():
        assert torch.equal(model.W, slow)
    assert torch.equal(model.W, fast)
    with pytest.raises(KeyError):
        with opt.slow_weights():
            raise KeyError("eval failed")
    assert torch.equal(model.W, fast) and torch.equal(opt.state[model.W]["slow"], slow)


def test_resume_keeps_sharing_param_groups_and_counters():
    model = Softmax()
    opt = make(model, k=3)
    run_model(opt, model, 4)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) >= {"state", "param_groups", "base", "counters"}
    fresh = make(Softmax(seed=5), k=3)
    fresh.load_state_dict(state)
    assert fresh.param_groups is fresh.base_optimizer.param_groups
    assert fresh.n_steps == 4 and fresh.param_groups[0]["lookahead_alpha"] == 0.5
    sched = torch.optim.lr_scheduler.LambdaLR(fresh, lambda t: 0.1)
    assert fresh.base_optimizer.param_groups[0]["lr"] == pytest.approx(LRS[0] * 0.1)
    assert sched.get_last_lr()[0] == pytest.approx(LRS[0] * 0.1)
