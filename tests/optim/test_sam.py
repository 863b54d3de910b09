"""SAM / ASAM against the equations (Foret et al. eq. 2; ASAM's w^2-scaled ascent), plus the
machinery the SAM family shares: BatchNorm freezing, the two-step API, fp32 norms, validation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optim
from tests.oracles import cnn_bn
from tests.optim.reference import (RefSGD, Softmax, assert_trajectories_close, batch, grad, initial,
                                   norm, param_groups, run_model)

LRS = (0.3, 0.1)
STEPS = 25


def reference_sam(rho: float, adaptive: bool, steps: int = STEPS) -> list:
    theta, base, out = initial(), RefSGD(LRS, momentum=0.9, weight_decay=1e-3), []
    for i in range(steps):
        xy = batch(i)
        g = grad(theta, xy)
        if adaptive:
            n = norm({k: theta[k].abs() * g[k] for k in g})
            e = {k: rho * theta[k] ** 2 * g[k] / (n + 1e-12) for k in g}
        else:
            n = norm(g)
            e = {k: rho * g[k] / (n + 1e-12) for k in g}
        g_sam = grad({k: theta[k] + e[k] for k in theta}, xy)
        theta = base.step(theta, g_sam)
        out.append(theta)
    return out


def make_sam(model, **kw):
    base = torch.optim.SGD(param_groups(model, *LRS), momentum=0.9, weight_decay=1e-3)
    return optim.SAM(base, **kw)


@pytest.mark.parametrize("adaptive,rho", [(False, 0.1), (True, 1.0)])
def test_sam_matches_reference(adaptive, rho):
    model = Softmax()
    opt = make_sam(model, rho=rho, adaptive=adaptive)
    got = run_model(opt, model, STEPS)
    assert_trajectories_close(got, reference_sam(rho, adaptive))
    assert (opt.n_steps, opt.n_closure_calls) == (STEPS, 2 * STEPS)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert all(g["sam_rho"] == rho and g["sam_adaptive"] == adaptive for g in opt.param_groups)


def test_rho_zero_is_the_base_optimizer():
    model_a, model_b = Softmax(), Softmax()
    sam = make_sam(model_a, rho=0.0)
    base = torch.optim.SGD(param_groups(model_b, *LRS), momentum=0.9, weight_decay=1e-3)
    for a, b in zip(run_model(sam, model_a, 10), run_model(base, model_b, 10)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_step_api_equals_closure_step():
    model_a, model_b = Softmax(), Softmax()
    opt_a, opt_b = make_sam(model_a, rho=0.1), make_sam(model_b, rho=0.1)
    want = run_model(opt_a, model_a, 5)
    for i in range(5):
        x, y = batch(i)
        F.cross_entropy(model_b(x), y).backward()
        opt_b.first_step(zero_grad=True)
        F.cross_entropy(model_b(x), y).backward()
        opt_b.second_step(zero_grad=True)
        assert all(torch.equal(want[i][k], getattr(model_b, k)) for k in want[i])


def _bn_model(momentum):
    model = cnn_bn()
    model.bn.momentum = momentum
    return model


def _bn_buffers(model):
    return {k: v.clone() for k, v in model.bn.named_buffers()}


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("name", ["SAM", "WSAM", "AdaSAM"])
def test_batchnorm_stats_change_only_in_the_first_pass(name, momentum):
    model = _bn_model(momentum)
    if name == "AdaSAM":
        opt = optim.AdaSAM(model.parameters(), lr=1e-2, rho=0.5, model=model)
    else:
        opt = getattr(optim, name)(torch.optim.SGD(model.parameters(), lr=0.1),
                                   rho=0.5, model=model)
    x = torch.randn(16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.arange(16) % 3
    twin = _bn_model(momentum)  # what one plain forward pass does to the statistics
    with torch.no_grad():
        twin(x)
    passes = []

    def closure():
        opt.zero_grad()
        passes.append(_bn_buffers(model))
        value = F.cross_entropy(model(x), y)
        value.backward()
        return value

    opt.step(closure)
    after = _bn_buffers(model)
    assert len(passes) == 2
    for k, v in _bn_buffers(twin).items():
        assert torch.equal(passes[1][k], v), k  # the first pass updated them ...
        assert torch.equal(after[k], v), k  # ... and the perturbed pass did not
    assert model.bn.momentum == momentum
    assert not torch.equal(after["running_mean"], passes[0]["running_mean"])


def test_batchnorm_frozen_between_first_and_second_step():
    model = _bn_model(0.1)
    opt = optim.SAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    x = torch.randn(8, 12, dtype=torch.float64)
    model(x).sum().backward()
    opt.first_step(zero_grad=True)
    frozen = _bn_buffers(model)
    model(x).sum().backward()
    during = _bn_buffers(model)
    assert torch.equal(during["running_mean"], frozen["running_mean"])
    assert torch.equal(during["running_var"], frozen["running_var"])
    opt.second_step(zero_grad=True)  # num_batches_tracked is put back here
    assert all(torch.equal(v, frozen[k]) for k, v in _bn_buffers(model).items())
    assert model.bn.momentum == 0.1


def test_perturbation_norm_is_accumulated_in_float32():
    p = nn.Parameter(torch.zeros(4096, dtype=torch.float16))
    opt = optim.SAM(torch.optim.SGD([p], lr=0.0), rho=0.5)
    p.grad = torch.full_like(p, 100.0)  # ||g|| = 6400 but sum of squares overflows float16
    opt.first_step()
    assert torch.isfinite(p).all()
    torch.testing.assert_close(torch.linalg.vector_norm(p.float()).item(), 0.5, rtol=1e-3, atol=0)
    opt.second_step()
    assert torch.equal(p, torch.zeros_like(p))  # restored exactly


def test_wrapper_errors():
    model = Softmax()
    with pytest.raises(ValueError, match="base_optimizer"):
        optim.SAM(model.parameters())
    with pytest.raises(ValueError, match="model"):
        optim.SAM(torch.optim.SGD(model.parameters(), lr=0.1), model="net")
    opt = optim.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()


def test_key_collision_with_base_is_refused():
    model = Softmax()
    lookahead = optim.Lookahead(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="lookahead_alpha"):
        optim.Lookahead(lookahead)


def test_add_param_group_reaches_the_base():
    model, extra = Softmax(), nn.Parameter(torch.ones(2, dtype=torch.float64))
    base = torch.optim.SGD([model.W], lr=0.1, momentum=0.9)
    opt = optim.SAM(base, rho=0.2)
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert base.param_groups[-1]["params"] == [extra]
    assert base.param_groups[-1]["sam_rho"] == 0.2 and base.param_groups[-1]["momentum"] == 0.9


AMP_FAMILY = {
    "SAM": lambda m: optim.SAM(torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9), rho=0.1),
    "WSAM": lambda m: optim.WSAM(torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9),
                                 rho=0.1, max_norm=1.0),
    "AdaSAM": lambda m: optim.AdaSAM(m.parameters(), lr=0.05, rho=0.1),
}


def _amp_run(name, scaler=None, steps=5, overflow_at=()):
    """float32 training with ``opt.step(closure, grad_scaler=scaler)``; the closure calls numbered
    in ``overflow_at`` (0-based) produce an infinite loss. Returns model, optimizer and the scales
    seen."""
    model = Softmax().float()
    opt = AMP_FAMILY[name](model)
    calls, scales = [0], []
    for i in range(steps):
        x, y = batch(i)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x.float()), y)
            if calls[0] in overflow_at:
                loss = loss * float("inf")
            calls[0] += 1
            (loss if scaler is None else scaler.scale(loss)).backward()
            return loss

        if scaler is None:
            opt.step(closure)
        else:
            opt.step(closure, grad_scaler=scaler)
            scaler.update()
            scales.append(scaler.get_scale())
    return model, opt, scales


@pytest.mark.parametrize("name", sorted(AMP_FAMILY))
def test_grad_scaler_run_equals_the_float32_run(name):
    """With the scale 2^20 (a power of two, so unscaling is exact) the run is the float32 run bit
    for bit; a step with the scaled gradients would be 2^20 times too large."""
    plain, _, _ = _amp_run(name)
    scaled, opt, scales = _amp_run(name, torch.amp.GradScaler("cpu", init_scale=2.0 ** 20))
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(a, b)
    assert scales == [2.0 ** 20] * 5 and opt.n_steps == 5


@pytest.mark.parametrize("overflow_at", [(2,), (3,)], ids=["first-pass", "second-pass"])
@pytest.mark.parametrize("name", sorted(AMP_FAMILY))
def test_grad_scaler_skips_a_step_with_inf_and_backs_off(name, overflow_at):
    """An inf in either pass of step 2 leaves the weights and the optimizer state as they were, and
    the scaler halves its scale; with the first pass overflowing, the second pass is not run."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)
    before, _, _ = _amp_run(name, torch.amp.GradScaler("cpu", init_scale=2.0 ** 20), steps=1)
    model, opt, scales = _amp_run(name, scaler, steps=2, overflow_at=overflow_at)
    for a, b in zip(before.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert scales == [2.0 ** 20, 2.0 ** 19]
    assert opt.n_steps == 1 and opt.phase == "ready"
    assert opt.n_closure_calls == 2 + (1 if overflow_at == (2,) else 2)


def test_grad_scaler_step_with_backward_before_is_refused():
    """The pattern ``scaler.scale(loss).backward(); scaler.step(sam, closure)`` (which let the
    closure's scaled gradients reach the update) raises, naming the recipe."""
    model = Softmax().float()
    opt = AMP_FAMILY["SAM"](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x.float()), y)
        scaler.scale(loss).backward()
        return loss

    closure()
    with pytest.warns(FutureWarning), pytest.raises(RuntimeError, match="grad_scaler=scaler"):
        scaler.step(opt, closure)


def test_sala_refuses_a_grad_scaler():
    model = Softmax().float()
    opt = optim.SALA(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(NotImplementedError, match="GradScaler"):
        opt.step(lambda: None, grad_scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("name", ["SAM", "WSAM", "AdaSAM"])
def test_phase_is_saved_between_the_two_steps(name):
    """A state saved after first_step() resumes at w + e: second_step() of the loaded optimizer
    restores w and makes the same step as the uninterrupted run."""
    def make(model):
        base = torch.optim.SGD(param_groups(model, *LRS), momentum=0.9)
        return {"SAM": lambda: optim.SAM(base, rho=0.1), "WSAM": lambda: optim.WSAM(base, rho=0.1),
                "AdaSAM": lambda: optim.AdaSAM(param_groups(model, *LRS), rho=0.1)}[name]()

    x, y = batch(0)
    runs = []
    for resume in (False, True):
        model = Softmax()
        opt = make(model)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        assert opt.phase == "perturbed"
        if resume:
            state = opt.state_dict()
            assert state["phase"] == "perturbed"
            opt = make(model)   # the model holds w + e
            opt.load_state_dict(state)
            with pytest.raises(RuntimeError, match="twice"):
                opt.first_step()
        F.cross_entropy(model(x), y).backward()
        opt.second_step()
        assert opt.phase == "ready"
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
