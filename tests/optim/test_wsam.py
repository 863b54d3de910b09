"""WSAM against Algorithm 1 of the paper (decoupled and coupled), and its limits."""
from __future__ import annotations

import pytest
import torch

import optim
from tests.optim.reference import (GROUP, RefSGD, Softmax, assert_trajectories_close, batch, clip,
                                   grad, initial, norm, param_groups, run_model)

LRS = (0.3, 0.1)
STEPS = 25


def reference_wsam(rho, gamma, decouple, adaptive, max_norm, steps=STEPS):
    a = gamma / (1 - gamma)
    theta, base, out = initial(), RefSGD(LRS, momentum=0.9, weight_decay=1e-3), []
    for i in range(steps):
        xy = batch(i)
        g = grad(theta, xy)
        scale = {k: theta[k].abs() if adaptive else torch.ones_like(v) for k, v in g.items()}
        n = norm({k: scale[k] * g[k] for k in g})
        e = {k: rho * scale[k] ** 2 * g[k] / (n + 1e-12) for k in g}
        g = clip(g, max_norm)
        g_tilde = clip(grad({k: theta[k] + e[k] for k in theta}, xy), max_norm)
        if decouple:
            stepped = base.step(theta, g)
            theta = {k: stepped[k] - LRS[GROUP[k]] * a * (g_tilde[k] - g[k]) for k in theta}
        else:
            theta = base.step(theta, {k: g[k] + a * (g_tilde[k] - g[k]) for k in g})
        out.append(theta)
    return out


def make_wsam(model, **kw):
    base = torch.optim.SGD(param_groups(model, *LRS), momentum=0.9, weight_decay=1e-3)
    return optim.WSAM(base, **kw)


@pytest.mark.parametrize("decouple,adaptive,max_norm", [
    (True, False, None), (False, False, None), (True, True, None), (False, True, 0.05),
    (True, False, 0.05)])
def test_wsam_matches_reference(decouple, adaptive, max_norm):
    rho = 1.0 if adaptive else 0.1
    model = Softmax()
    opt = make_wsam(model, rho=rho, gamma=0.8, decouple=decouple,
                    adaptive=adaptive, max_norm=max_norm)
    got = run_model(opt, model, STEPS)
    assert_trajectories_close(got, reference_wsam(rho, 0.8, decouple, adaptive, max_norm))
    assert (opt.n_steps, opt.n_closure_calls) == (STEPS, 2 * STEPS)
    assert all(g["wsam_alpha"] == pytest.approx(4.0) for g in opt.param_groups)


def test_max_norm_actually_clips_in_this_problem():
    g = grad(initial(), batch(0))
    assert norm(g) > 0.05


def test_gamma_half_coupled_is_sam():
    model_a, model_b = Softmax(), Softmax()
    wsam = make_wsam(model_a, rho=0.1, gamma=0.5, decouple=False)
    sam = optim.SAM(torch.optim.SGD(param_groups(model_b, *LRS),
                                    momentum=0.9, weight_decay=1e-3), rho=0.1)
    assert_trajectories_close(run_model(wsam, model_a, STEPS),
                              run_model(sam, model_b, STEPS), tol=1e-13)


@pytest.mark.parametrize("decouple", [True, False])
def test_gamma_zero_is_the_base_optimizer(decouple):
    model_a, model_b = Softmax(), Softmax()
    wsam = make_wsam(model_a, rho=0.1, gamma=0.0, decouple=decouple)
    base = torch.optim.SGD(param_groups(model_b, *LRS), momentum=0.9, weight_decay=1e-3)
    for a, b in zip(run_model(wsam, model_a, 10), run_model(base, model_b, 10)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_decoupled_sharpness_step_uses_the_scheduled_lr():
    """The sharpness term bypasses the base optimizer but follows the group's lr (read each
    step)."""
    model_a, model_b = Softmax(), Softmax()
    opt_a = make_wsam(model_a, rho=0.1, gamma=0.8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda t: 0.5)
    opt_b = optim.WSAM(torch.optim.SGD(param_groups(model_b, LRS[0] / 2, LRS[1] / 2), momentum=0.9,
                                       weight_decay=1e-3), rho=0.1, gamma=0.8)
    got = run_model(opt_a, model_a, 6, on_step=lambda i: sched.step())
    assert_trajectories_close(got, run_model(opt_b, model_b, 6), tol=1e-13)


def test_alpha_key_does_not_collide_with_rmsprop():
    model = Softmax()
    base = torch.optim.RMSprop(model.parameters(), lr=1e-2, alpha=0.99)
    opt = optim.WSAM(base, gamma=0.9)
    assert base.param_groups[0]["alpha"] == 0.99
    assert opt.param_groups[0]["wsam_alpha"] == pytest.approx(9.0)
    run_model(opt, model, 2)


def test_gradient_norms_report_the_last_step():
    model = Softmax()
    opt = make_wsam(model, rho=0.1, gamma=0.8)
    assert opt.gradient_norms() == {}
    run_model(opt, model, 1)
    theta, xy = initial(), batch(0)
    g = grad(theta, xy)
    n = norm(g)
    g_tilde = grad({k: theta[k] + 0.1 * g[k] / (n + 1e-12) for k in theta}, xy)
    stats = opt.gradient_norms()
    assert stats["grad"] == pytest.approx(n, rel=1e-12)
    assert stats["sharpness"] == pytest.approx(norm({k: g_tilde[k] - g[k] for k in g}), rel=1e-10)
    assert stats["ratio"] == pytest.approx(stats["sharpness"] / stats["grad"], rel=1e-12)


def _ported_loop(opt, model, zero_first: bool):
    """pytorch_optimizer's WSAM loop: backward before step(closure), a closure without zero_grad."""
    x, y = batch(0)

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if zero_first:
        opt.zero_grad(set_to_none=False)
    else:
        closure()
    opt.step(closure)


@pytest.mark.parametrize("name", ["WSAM", "SAM", "AdaSAM", "SALA"])
def test_gradients_present_on_entry_are_refused(name):
    """They would be added to the first pass (WSAM stored 2g); zeroed gradients are harmless."""
    model = Softmax()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = {"WSAM": lambda: optim.WSAM(base), "SAM": lambda: optim.SAM(base),
           "AdaSAM": lambda: optim.AdaSAM(model.parameters()),
           "SALA": lambda: optim.SALA(base, k=2)}[name]()
    run_model(opt, model, 2)  # the gradients our own steps leave behind are fine
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(RuntimeError, match="backward"):
        _ported_loop(opt, model, zero_first=False)
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    assert all(p.grad is not None for p in model.parameters())
    # zero_grad(set_to_none=False): zeros, one ordinary step
    _ported_loop(opt, model, zero_first=True)
    assert not all(torch.equal(before[k], v) for k, v in model.named_parameters())
