"""AGD against an independent plain implementation of the paper's Algorithm 1, its SGD limit, and
sgd_fraction."""
from __future__ import annotations

import math

import pytest
import torch

from optim import AGD

SHAPES = [(4, 3), (5,)]


def _scales() -> list[torch.Tensor]:
    """Per-element curvature scales from 1e-4 to 1: small ones stay on the SGD branch, large ones
    switch."""
    flat = torch.logspace(-4, 0, sum(math.prod(s) for s in SHAPES), dtype=torch.float64)
    return [chunk.view(s) for chunk, s in zip(flat.split([math.prod(s) for s in SHAPES]), SHAPES)]


def _loss(params: list[torch.Tensor]) -> torch.Tensor:
    return sum((c * (0.5 * (p - 1.0) ** 2 + 0.3 * torch.sin(3.0 * p))).sum()
               for c, p in zip(_scales(), params))


def _start() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def _grads(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    xs = [x.detach().requires_grad_() for x in xs]
    return list(torch.autograd.grad(_loss(xs), xs))


def reference_agd(steps, lr=1e-2, betas=(0.9, 0.999), delta=1e-3, weight_decay=0.0,
                  weight_decouple=True, fixed_decay=False, amsgrad=False, clip=None):
    """Algorithm 1 written out literally (m_prev copied), one float64 tensor per parameter.
    Yields (params, fraction of elements with sqrt(B) < delta sqrt(1 - beta2^t)) after every
    step."""
    beta1, beta2 = betas
    xs = _start()
    ms = [torch.zeros_like(x) for x in xs]
    bs = [torch.zeros_like(x) for x in xs]
    bmaxs = [torch.zeros_like(x) for x in xs]
    for t in range(1, steps + 1):
        gs = _grads(xs)
        sgd, total = 0, 0
        for i in range(len(xs)):
            g = gs[i]
            if weight_decay and weight_decouple:
                xs[i] = xs[i] * (1 - (weight_decay if fixed_decay else lr * weight_decay))
            elif weight_decay:
                g = g + weight_decay * xs[i]
            m_prev = ms[i].clone()
            ms[i] = beta1 * ms[i] + (1 - beta1) * g
            bc1, bc1_prev, bc2 = 1 - beta1 ** t, 1 - beta1 ** (t - 1), 1 - beta2 ** t
            s = ms[i] / bc1 if t == 1 else ms[i] / bc1 - m_prev / bc1_prev
            bs[i] = beta2 * bs[i] + (1 - beta2) * s * s
            bmaxs[i] = torch.maximum(bmaxs[i], bs[i])
            big_b = bmaxs[i] if amsgrad else bs[i]
            floor = delta * math.sqrt(bc2)
            sgd += int((big_b.sqrt() < floor).sum())
            total += big_b.numel()
            r = ms[i] / torch.clamp(big_b.sqrt(), min=floor)
            if clip is not None:
                r = r.clamp(-clip, clip)
            xs[i] = xs[i] - lr * math.sqrt(bc2) / bc1 * r
        yield [x.clone() for x in xs], sgd / total


def _run(steps, foreach=False, **kw):
    """AGD itself through step(closure); yields (params, sgd_fraction()) after every step."""
    params = [x.clone().requires_grad_() for x in _start()]
    opt = AGD(params, foreach=foreach, **{"lr": 1e-2, "delta": 1e-3, **kw})

    def closure():
        opt.zero_grad()
        loss = _loss(params)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
        yield [p.detach().clone() for p in params], opt.sgd_fraction()


CONFIGS = {
    "default": {},
    "decoupled-wd": {"weight_decay": 0.5},
    "fixed-decay": {"weight_decay": 1e-3, "fixed_decay": True},
    "coupled-wd": {"weight_decay": 1e-4, "weight_decouple": False},
    "amsgrad": {"amsgrad": True},
    "clip": {"clip": 1.0},
    "all": {"weight_decay": 1e-4, "weight_decouple": False, "amsgrad": True, "clip": 2.0,
            "betas": (0.8, 0.99)},
    "beta1-zero": {"betas": (0.0, 0.999)},
}


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_reference_step_by_step(config, foreach):
    fractions = []
    for (ours, frac), (ref, ref_frac) in zip(_run(25, foreach, **CONFIGS[config]),
                                             reference_agd(25, **CONFIGS[config])):
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        assert frac == ref_frac
        fractions.append(frac)
    assert any(0 < f < 1 for f in fractions)  # both branches were exercised


@pytest.mark.parametrize("config", ["default", "coupled-wd", "all"])
def test_foreach_and_single_paths_are_identical(config):
    for (a, fa), (b, fb) in zip(_run(20, False, **CONFIGS[config]),
                                _run(20, True, **CONFIGS[config])):
        assert fa == fb
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_clip_bounds_each_element_step():
    """At t = 1, |m/D| = (1 - beta1)/sqrt(1 - beta2) ~ 3.2 where |g| > delta: clip=1 caps it at
    1."""
    lr, clip = 1e-2, 1.0
    params = [x.clone().requires_grad_() for x in _start()]
    opt = AGD(params, lr=lr, delta=1e-12, clip=clip)
    opt.zero_grad()
    _loss(params).backward()
    before = [p.detach().clone() for p in params]
    opt.step()
    bound = lr * math.sqrt(1 - 0.999) / (1 - 0.9) * clip
    for b, p in zip(before, params):
        torch.testing.assert_close((b - p.detach()).abs(),
                                   torch.full_like(b, bound), rtol=1e-12, atol=0)


def test_huge_delta_is_ema_momentum_sgd_at_lr_over_delta():
    lr, delta, beta1 = 1e3, 1e4, 0.9
    xs = _start()
    ms = [torch.zeros_like(x) for x in xs]
    for t, (ours, frac) in enumerate(_run(25, lr=lr, delta=delta), start=1):
        for i, g in enumerate(_grads(xs)):
            ms[i] = beta1 * ms[i] + (1 - beta1) * g
            xs[i] = xs[i] - (lr / delta) * ms[i] / (1 - beta1 ** t)
        for a, b in zip(ours, xs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert frac == 1.0


def _constant_grad_optimizer(amsgrad=False):
    """Three params whose constant gradients are, element-wise, 10 delta, 0.1 delta, or half of
    each."""
    delta = 1e-3
    big, small = torch.full((6,), 10 * delta), torch.full((6,), 0.1 * delta)
    half = torch.cat([big[:2], small[:2]])
    params = [torch.zeros(6, requires_grad=True), torch.zeros(6, requires_grad=True),
              torch.zeros(4, requires_grad=True)]
    opt = AGD([{"params": params[:2]}, {"params": params[2:]}], lr=1e-3,
              delta=delta, amsgrad=amsgrad)
    for p, g in zip(params, [big, small, half]):
        p.grad = g.clone()
    return opt, params


def test_sgd_fraction_zero_one_and_between():
    opt, _ = _constant_grad_optimizer()
    assert math.isnan(opt.sgd_fraction()) and opt.sgd_fraction(per_param=True) == {}
    opt.step()  # t = 1: s = g, so sqrt(b_hat) = |g|: SGD branch exactly where |g| < delta
    assert opt.sgd_fraction(per_param=True) == {0: 0.0, 1: 1.0, 2: 0.5}
    assert opt.sgd_fraction() == pytest.approx((0 + 6 + 2) / 16, abs=0)


def test_sgd_fraction_keys_count_unstepped_parameters():
    """A parameter without a gradient is not stepped, yet keeps its index in param_groups order."""
    opt, params = _constant_grad_optimizer()
    params[0].grad = None
    opt.step()
    assert opt.sgd_fraction(per_param=True) == {1: 1.0, 2: 0.5}
    assert opt.sgd_fraction() == pytest.approx((6 + 2) / 10, abs=0)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_sgd_fraction_follows_the_last_step(amsgrad):
    """A constant gradient g = 10 delta with beta2 = 0.5: adaptive at t = 1 (|g| > delta). Then s =
    0, so b_hat_t = 0.5^t g^2 / (1 - 0.5^t) falls below delta^2 by t = 10 (SGD branch), while the
    amsgrad max keeps B_hat = 0.5 g^2 / (1 - 0.5^t) above it (adaptive)."""
    delta = 1e-3
    p = torch.zeros(5, requires_grad=True)
    opt = AGD([p], lr=1e-3, betas=(0.9, 0.5), delta=delta, amsgrad=amsgrad)
    fractions = []
    for _ in range(10):
        p.grad = torch.full((5,), 10 * delta)
        opt.step()
        fractions.append(opt.sgd_fraction())
    assert fractions[0] == 0.0 and fractions[-1] == (0.0 if amsgrad else 1.0)


def test_step_does_not_synchronise(monkeypatch):
    """No Tensor -> Python conversion happens inside step() (each would be a device sync on
    CUDA)."""
    opt, params = _constant_grad_optimizer(amsgrad=True)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name,
                            lambda *a, n=name, **k: pytest.fail(f"Tensor.{n} in step"))
    for foreach in (False, True):
        for group in opt.param_groups:
            group["foreach"] = foreach
        opt.step()
    monkeypatch.undo()
    assert opt.sgd_fraction(per_param=True) == {0: 0.0, 1: 1.0, 2: 0.5}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_has_no_sync():
    params = [torch.randn(50, 20, device="cuda", requires_grad=True),
              torch.randn(20, device="cuda", requires_grad=True)]
    opt = AGD(params, amsgrad=True, clip=1.0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert 0.0 <= opt.sgd_fraction() <= 1.0


def test_coupled_weight_decay_leaves_grad_alone():
    params = [x.clone().requires_grad_() for x in _start()]
    opt = AGD(params, weight_decay=0.3, weight_decouple=False)
    for foreach in (False, True):
        opt.param_groups[0]["foreach"] = foreach
        opt.zero_grad()
        _loss(params).backward()
        grads = [p.grad.clone() for p in params]
        opt.step()
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, params))


def test_step_after_own_backward_equals_step_closure():
    outs = []
    for use_closure in (True, False):
        params = [x.clone().requires_grad_() for x in _start()]
        opt = AGD(params, lr=1e-2, delta=1e-3)

        def closure():
            opt.zero_grad()
            loss = _loss(params)
            loss.backward()
            return loss

        for _ in range(5):
            expected = float(_loss(params).detach())
            if use_closure:
                assert float(opt.step(closure).detach()) == expected
            else:
                closure()
                assert opt.step() is None
        outs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_amsgrad_switched_on_later_starts_from_b():
    """Turning amsgrad on at step 2 starts the max from b_1: B_2 = max(b_1, b_2)."""
    params = [x.clone().requires_grad_() for x in _start()]
    opt = AGD(params, lr=1e-2, delta=1e-3)
    b_1 = None
    for amsgrad in (False, True):
        opt.param_groups[0]["amsgrad"] = amsgrad
        opt.zero_grad()
        _loss(params).backward()
        opt.step()
        b_1 = opt.state[params[0]]["exp_avg_diff_sq"].clone() if b_1 is None else b_1
    state = opt.state[params[0]]
    assert torch.equal(state["max_exp_avg_diff_sq"], torch.maximum(b_1, state["exp_avg_diff_sq"]))
    assert not torch.equal(b_1, state["exp_avg_diff_sq"])
