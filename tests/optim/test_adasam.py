"""AdaSAM against Algorithm 1 of the paper."""
from __future__ import annotations

import pytest
import torch

import optim
from tests.optim.reference import (GROUP, Softmax, assert_trajectories_close, batch, grad, initial,
                                   norm, param_groups, run_model)

LRS = (0.05, 0.02)
STEPS = 25


def reference_adasam(rho, betas, eps, bias_correction, steps=STEPS):
    b1, b2 = betas
    theta = initial()
    m = {k: torch.zeros_like(v) for k, v in theta.items()}
    v = {k: torch.zeros_like(t) for k, t in theta.items()}
    v_hat = {k: torch.full_like(t, eps ** 2) for k, t in theta.items()}
    out = []
    for t in range(1, steps + 1):
        xy = batch(t - 1)
        g = grad(theta, xy)
        n = norm(g)
        s = grad({k: theta[k] + rho * g[k] / (n + 1e-12) for k in theta}, xy)
        new = {}
        for k in theta:
            m[k] = b1 * m[k] + (1 - b1) * s[k]
            v[k] = b2 * v[k] + (1 - b2) * s[k] ** 2
            v_hat[k] = torch.maximum(v_hat[k], v[k])
            if bias_correction:
                step = m[k] / (1 - b1 ** t) / torch.sqrt(v_hat[k] / (1 - b2 ** t))
            else:
                step = m[k] / torch.sqrt(v_hat[k])
            new[k] = theta[k] - LRS[GROUP[k]] * step
        theta = new
        out.append(theta)
    return out


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_adasam_matches_algorithm_1(foreach, bias_correction):
    model = Softmax()
    opt = optim.AdaSAM(param_groups(model, *LRS), rho=0.1, betas=(0.8, 0.95), eps=1e-3,
                       bias_correction=bias_correction, foreach=foreach)
    got = run_model(opt, model, STEPS)
    assert_trajectories_close(got, reference_adasam(0.1, (0.8, 0.95), 1e-3, bias_correction))
    assert (opt.n_steps, opt.n_closure_calls) == (STEPS, 2 * STEPS)


def test_eps_enters_only_through_the_initial_v_hat():
    model = Softmax()
    opt = optim.AdaSAM(model.parameters(), eps=0.5)
    run_model(opt, model, 1)
    v_hat = opt.state[model.W]["max_exp_avg_sq"]
    assert torch.all(v_hat >= 0.25)  # the floor eps^2 from the initial value
    assert torch.equal(v_hat, torch.clamp(opt.state[model.W]["exp_avg_sq"], min=0.25))


def test_zero_rho_is_amsgrad_without_bias_correction_or_eps():
    """rho = 0, first step from m = v = 0: x - lr (1 - b1) g / sqrt((1 - b2) g^2), no bias
    correction."""
    model = Softmax()
    w0 = model.W.detach().clone()
    opt = optim.AdaSAM(model.parameters(), lr=0.01, betas=(0.9, 0.99), rho=0.0, eps=1e-12)
    run_model(opt, model, 1)
    g = grad(initial(), batch(0))["W"]
    want = w0 - 0.01 * 0.1 * g / torch.sqrt(0.01 * g ** 2)
    torch.testing.assert_close(model.W.detach(), want, rtol=1e-12, atol=1e-14)


def test_float16_parameters_step_like_float32():
    """eps^2 = 1e-16 underflows to 0 in float16 (and with it v^, so m / sqrt(v^) was NaN from step
    1): the moments are float32 for float16 parameters, and the result is the float32 step rounded
    once."""
    gen = torch.Generator().manual_seed(0)
    w0, grads = torch.randn(4, 3, generator=gen), [1e-3 * torch.randn(4, 3, generator=gen)
                                                   for _ in range(6)]
    grads[0][0, 0] = 0.0   # an element with s = 0: 0 / sqrt(eps^2) must stay 0
    out = {}
    for dtype in (torch.float16, torch.float32):
        w = w0.to(dtype).requires_grad_()
        opt = optim.AdaSAM([w], lr=1e-2, rho=0.0)
        for t in range(3):
            w.grad = grads[2 * t].to(dtype)
            opt.first_step(zero_grad=True)
            w.grad = grads[2 * t + 1 if t else 0].to(dtype)
            opt.second_step(zero_grad=True)
        assert torch.isfinite(w).all() and opt.state[w]["exp_avg"].dtype == torch.float32
        out[dtype] = w.detach().float()
    torch.testing.assert_close(out[torch.float16], out[torch.float32], rtol=1e-3, atol=1e-3)
