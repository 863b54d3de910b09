"""torch.optim's generic optimizer conventions applied to every optimizer of ``optim``.

Re-implemented from the published definitions of torch's OptimizerInfo checks
(``torch/testing/_internal/common_optim.py`` and ``test/test_optim.py``): param groups with
their own hyperparameters, parameters without a gradient, ``copy.deepcopy`` and ``pickle``,
state-dict formats (torch's tensor ``step``), low-precision dtypes resumed bit for bit,
multi-tensor and fused paths against the per-tensor one, ``torch.compile(opt.step)``, complex
parameters as their ``view_as_real``, meta-device parameters, LR schedulers and closures. The
facts carry over; the code is written here.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import optim

X = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
T = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


class Net(nn.Module):
    """y = s * (x W^T + b) with a 0-dim scale s: matrix, vector and 0-dim parameters."""

    def __init__(self, dtype=torch.float64, device=None, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(3, 4, generator=gen).to(device=device, dtype=dtype))
        self.b = nn.Parameter(0.1 * torch.randn(3, generator=gen).to(device=device, dtype=dtype))
        self.s = nn.Parameter(torch.tensor(1.3).to(device=device, dtype=dtype))

    def forward(self, x):
        return self.s * (x @ self.W.T + self.b)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


#: every optimizer, its multi-tensor path where it has one; (params, model) -> optimizer
OPTIMIZERS = {
    "AGD": lambda ps, m: optim.AGD(ps, lr=1e-2, foreach=False),
    "AGD-foreach": lambda ps, m: optim.AGD(ps, lr=1e-2, foreach=True),
    "NDAdam": lambda ps, m: optim.NDAdam(ps, lr=1e-2, foreach=False),
    "NDAdam-foreach": lambda ps, m: optim.NDAdam(ps, lr=1e-2, foreach=True),
    "AdaSAM": lambda ps, m: optim.AdaSAM(ps, lr=1e-2, model=m, foreach=False),
    "AdaSAM-foreach": lambda ps, m: optim.AdaSAM(ps, lr=1e-2, model=m, foreach=True),
    "SAM": lambda ps, m: optim.SAM(_sgd(ps), rho=0.05, model=m),
    "ASAM": lambda ps, m: optim.SAM(_sgd(ps), rho=0.05, adaptive=True, model=m),
    "WSAM": lambda ps, m: optim.WSAM(torch.optim.Adam(ps, lr=1e-2), rho=0.05, model=m),
    "SALA": lambda ps, m: optim.SALA(_sgd(ps), k=2, rho=0.5, model=m),   # stage 2: SAM steps
    "Lookahead": lambda ps, m: optim.Lookahead(torch.optim.Adam(ps, lr=1e-2), k=2),
}
#: the fused (compiled) paths, compared with the per-tensor ones
FUSED = {
    "AGD": lambda ps: optim.AGD(ps, lr=1e-2, fused=True),
    "NDAdam": lambda ps: optim.NDAdam(ps, lr=1e-2, fused=True),
    "AdaSAM": lambda ps: optim.AdaSAM(ps, lr=1e-2, fused=True),
}
EAGER = {"AGD": "AGD", "NDAdam": "NDAdam", "AdaSAM": "AdaSAM"}


def build(name, dtype=torch.float64, device=None, seed=0):
    model = Net(dtype, device, seed)
    return model, OPTIMIZERS[name](list(model.parameters()), model)


def closure_for(model, opt, x=X, t=T):
    def closure():
        opt.zero_grad()
        loss = ((model(x.to(model.W.dtype)) - t.to(model.W.dtype)) ** 2).mean()
        loss.backward()
        return loss
    return closure


def run(model, opt, steps):
    for _ in range(steps):
        opt.step(closure_for(model, opt))


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.isfinite(x).all() and torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_param_groups_keep_their_own_hyperparameters(name):
    """A group with lr = 0 never moves while the other group trains."""
    model = Net()
    groups = [{"params": [model.W, model.s]}, {"params": [model.b], "lr": 0.0}]
    opt = OPTIMIZERS[name](groups, model)
    b0, w0 = model.b.detach().clone(), model.W.detach().clone()
    run(model, opt, 4)
    assert torch.equal(model.b, b0)
    assert not torch.equal(model.W, w0)
    assert [g["lr"] for g in opt.param_groups][1] == 0.0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_parameter_without_gradient_is_skipped(name):
    """torch.optim: a parameter whose grad is None is not updated and gets no state."""
    model = Net()
    frozen = nn.Parameter(torch.randn(2, 2, dtype=torch.float64))
    opt = OPTIMIZERS[name]([{"params": list(model.parameters()) + [frozen]}], model)
    before = frozen.detach().clone()
    run(model, opt, 4)
    assert torch.equal(frozen, before)
    assert set(opt.state.get(frozen, {})) <= {"slow"}   # Lookahead: slow = theta from the start


@pytest.mark.parametrize("name", ["AGD", "NDAdam", "Lookahead"])
def test_a_step_without_any_gradient_is_no_step(name):
    """step() with every grad None changes nothing, counts nothing and creates no state."""
    model, opt = build(name)
    run(model, opt, 1)
    opt.zero_grad(set_to_none=True)
    before, counted = params_of(model), getattr(opt, "n_steps", None)
    state = copy.deepcopy({id(p): dict(s) for p, s in opt.state.items()})
    for _ in range(3):   # Lookahead k=2: would reach its slow update
        opt.step()
    assert_same(params_of(model), before)
    assert getattr(opt, "n_steps", None) == counted
    assert all(torch.equal(v, state[id(p)][k]) if torch.is_tensor(v) else v == state[id(p)][k]
               for p, s in opt.state.items() for k, v in s.items())


def _copy(how, obj):
    if how == "deepcopy":
        return copy.deepcopy(obj)
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_copy_steps_exactly_as_the_original(name, how):
    model, opt = build(name)
    run(model, opt, 3)
    twin_model, twin = _copy(how, (model, opt))
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public <= set(vars(twin))
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert all(a is b for a, b in zip(twin_params, twin_model.parameters(), strict=True))
    run(model, opt, 3)
    run(twin_model, twin, 3)
    assert_same(params_of(twin_model), params_of(model))
    for counter in ("n_steps", "n_closure_calls"):
        assert getattr(twin, counter, None) == getattr(opt, counter, None)


def _torch_format(state_dict):
    """torch.optim's format of the per-parameter step: a float32 0-d tensor."""
    out = copy.deepcopy(state_dict)
    for entry in out["state"].values():
        if "step" in entry:
            entry["step"] = torch.tensor(float(entry["step"]), dtype=torch.float32)
    return out


@pytest.mark.parametrize("name", ["AGD", "NDAdam", "AdaSAM"])
def test_a_tensor_step_is_converted_exactly(name):
    model, opt = build(name)
    run(model, opt, 20)
    expected = params_of(model)
    model, opt = build(name)
    run(model, opt, 10)
    saved = _torch_format(opt.state_dict())
    resumed_model, resumed = build(name)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(saved)
    assert all(type(s["step"]) is int for s in resumed.state.values())
    run(resumed_model, resumed, 10)
    assert_same(params_of(resumed_model), expected)


@pytest.mark.parametrize("bad", [2.5, float("nan"), -1.0])
def test_a_tensor_step_that_is_no_whole_number_is_refused(bad):
    model, opt = build("AGD")
    run(model, opt, 2)
    saved = opt.state_dict()
    saved["state"][0]["step"] = torch.tensor(bad)
    fresh_model, fresh = build("AGD")
    with pytest.raises(ValueError, match="step of parameter 0 must be a whole number"):
        fresh.load_state_dict(saved)
    assert not fresh.state


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_low_precision_resumes_bit_identically(name, dtype):
    model, opt = build(name, dtype)
    run(model, opt, 6)
    expected = params_of(model)
    model, opt = build(name, dtype)
    run(model, opt, 3)
    moments = {k: v.dtype for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed_model, resumed = build(name, dtype, seed=1)
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["opt"])
    assert {k: v.dtype for s in resumed.state.values() for k, v in s.items()
            if torch.is_tensor(v)} == moments
    run(resumed_model, resumed, 3)
    assert_same(params_of(resumed_model), expected)


@pytest.mark.parametrize("name", ["AGD", "NDAdam", "AdaSAM"])
def test_multi_tensor_path_matches_per_tensor(name):
    model, opt = build(name)
    twin_model, twin = build(f"{name}-foreach")
    run(model, opt, 5)
    run(twin_model, twin, 5)
    for a, b in zip(params_of(twin_model), params_of(model)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", FUSED)
def test_fused_path_matches_per_tensor_on_every_shape(name):
    """0-dim, vector and matrix parameters, float64 (the fused path once skipped 0-dim ones)."""
    model, opt = build(EAGER[name])
    fused_model = Net()
    fused = FUSED[name](list(fused_model.parameters()))
    s0 = fused_model.s.detach().clone()
    with _no_fallback():
        run(fused_model, fused, 5)
    run(model, opt, 5)
    assert not torch.equal(fused_model.s, s0)
    for a, b in zip(params_of(fused_model), params_of(model)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _no_fallback:
    """Fail if the fused path warned that it fell back to the eager one."""

    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings(record=True)
        self._log = self._cm.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        fallbacks = [w for w in self._log if "torch.compile failed" in str(w.message)]
        if fallbacks:
            pytest.skip(f"no compiler here: {fallbacks[0].message}")
        return False


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_compiled_step_matches_eager(name):
    """torch.compile(opt.step, backend="eager") works and steps as the eager step does."""
    torch._dynamo.reset()
    model, opt = build(name)
    twin_model, twin = build(name)
    compiled = torch.compile(twin.step, backend="eager")
    for _ in range(3):
        opt.step(closure_for(model, opt))
        compiled(closure_for(twin_model, twin))
    for a, b in zip(params_of(twin_model), params_of(model)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch._dynamo.reset()


class ComplexNet(nn.Module):
    """A complex least-squares model; ``as_real`` holds the same numbers as a real tensor."""

    def __init__(self, as_real=False):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        z = torch.randn(3, 4, dtype=torch.complex128, generator=gen)
        self.as_real = as_real
        self.Z = nn.Parameter(torch.view_as_real(z).clone() if as_real else z)

    def forward(self, x):
        z = torch.view_as_complex(self.Z) if self.as_real else self.Z
        return (x.to(z.dtype) @ z.T).abs()


def _complex_run(name, as_real):
    model = ComplexNet(as_real)
    params = [{"params": [model.Z], "nd": False}] if as_real and "NDAdam" in name \
        else list(model.parameters())
    opt = OPTIMIZERS[name](params, model)
    for _ in range(5):
        opt.step(closure_for_complex(model, opt))
    z = model.Z.detach()
    return z if as_real else torch.view_as_real(z)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_complex_parameters_step_as_their_real_view(name):
    torch.testing.assert_close(_complex_run(name, False), _complex_run(name, True),
                               rtol=1e-12, atol=1e-14)


def test_ndadam_refuses_complex_unit_vectors():
    with pytest.raises(ValueError, match="nd must be False or None for complex parameters"):
        optim.NDAdam([{"params": [nn.Parameter(torch.ones(2, 2, dtype=torch.complex64))],
                       "nd": True}])


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "SALA"])
def test_meta_parameters_construct_and_step_on_meta(name):
    model, opt = build(name, torch.float32, device="meta")
    opt.step(closure_for(model, opt, X.to("meta"), T.to("meta")))
    assert all(p.is_meta for p in model.parameters())
    assert all(v.is_meta for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def test_sala_refuses_meta_parameters_by_name():
    model, opt = build("SALA", torch.float32, device="meta")
    with pytest.raises(NotImplementedError, match="SALA cannot step meta-device parameters"):
        opt.step(closure_for(model, opt, X.to("meta"), T.to("meta")))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_lr_scheduler_steps_the_group_lr(name):
    model, opt = build(name)
    lrs = [g["lr"] for g in opt.param_groups]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        run(model, opt, 1)
        scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == [lr / 4 for lr in lrs]
    base = getattr(opt, "base_optimizer", opt)
    assert base.param_groups is opt.param_groups


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_returns_the_closures_loss_at_the_start_weights(name):
    model, opt = build(name)
    with torch.no_grad():
        expected = float(((model(X) - T) ** 2).mean())
    assert float(opt.step(closure_for(model, opt))) == expected


@pytest.mark.parametrize("name", ["SAM", "WSAM", "AdaSAM"])
def test_grad_scaler_step_matches_the_unscaled_step(name):
    """The SAM family's API takes a GradScaler (``step(closure, grad_scaler=)``)."""
    model, opt = build(name)
    run(model, opt, 3)
    twin_model, twin = build(name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for _ in range(3):
        def closure():
            twin.zero_grad()
            loss = ((twin_model(X) - T) ** 2).mean()
            scaler.scale(loss).backward()
            return loss
        twin.step(closure, grad_scaler=scaler)
        scaler.update()
    for a, b in zip(params_of(twin_model), params_of(model)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_sala_refuses_a_grad_scaler():
    model, opt = build("SALA")
    with pytest.raises(NotImplementedError, match="GradScaler"):
        opt.step(closure_for(model, opt), grad_scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("name", FUSED)
def test_fused_path_matches_per_tensor_on_complex_parameters(name):
    runs = []
    for make in (lambda ps: OPTIMIZERS[name](ps, None), FUSED[name]):
        model = ComplexNet()
        opt = make(list(model.parameters()))
        with _no_fallback():
            for _ in range(4):
                opt.step(closure_for_complex(model, opt))
        runs.append(model.Z.detach())
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-12, atol=1e-14)


def closure_for_complex(model, opt):
    def closure():
        opt.zero_grad()
        loss = ((model(X) - T.abs()) ** 2).mean()
        loss.backward()
        return loss
    return closure
