"""Behaviour every optimizer in `optim` shares: resume, schedulers, param groups, dtypes,
validation.

HOW TO ADD AN OPTIMIZER (one line each):
  * OPTIMIZERS["Name"] = factory(params, **overrides) -> optimizer. `params` is whatever torch.optim
    accepts (an iterable of tensors or a list of param-group dicts); `overrides` are keyword
    arguments of the optimizer under test (for a wrapper: of the wrapper, with the base built inside
    the factory). Keep the defaults modest (the tests run a few steps of a tiny float64 MLP).
  * BAD_HYPERPARAMETERS.append(("Name", {"rho": -1.0}, "rho")): the factory called with these
    overrides must raise ValueError whose message contains the substring (the hyperparameter's
    name).
Every optimizer is stepped only through `loss = opt.step(closure)`, the one uniform API.
"""
from __future__ import annotations

import io
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

import optim
from tests.oracles import classification_data, mlp

Factory = Callable[..., torch.optim.Optimizer]

OPTIMIZERS: dict[str, Factory] = {
    "AGD": lambda params, **kw: optim.AGD(
        params, **{"lr": 1e-2, "delta": 1e-3, "weight_decay": 1e-2, **kw}),
    "AGD-coupled-amsgrad-clip": lambda params, **kw: optim.AGD(
        params, **{"lr": 1e-2, "delta": 1e-3, "weight_decay": 1e-2, "weight_decouple": False,
                   "amsgrad": True, "clip": 0.5, **kw}),
    "NDAdam": lambda params, **kw: optim.NDAdam(params, **{"lr": 1e-2, "weight_decay": 1e-3, **kw}),
    "SAM": lambda params, lr=1e-2, **kw: optim.SAM(
        torch.optim.SGD(params, lr=lr, momentum=0.9), **kw),
    "SAM-adaptive-adam": lambda params, lr=1e-2, **kw: optim.SAM(
        torch.optim.Adam(params, lr=lr), **{"rho": 0.5, "adaptive": True, **kw}),
    "WSAM": lambda params, lr=1e-2, **kw: optim.WSAM(
        torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-3), **kw),
    "WSAM-coupled-adaptive-clip": lambda params, lr=1e-2, **kw: optim.WSAM(
        torch.optim.Adam(params, lr=lr),
        **{"decouple": False, "adaptive": True, "rho": 0.5, "max_norm": 0.5, **kw}),
    "AdaSAM": lambda params, **kw: optim.AdaSAM(params, **{"lr": 1e-2, **kw}),
    "AdaSAM-bias-correction": lambda params, **kw: optim.AdaSAM(
        params, **{"lr": 1e-2, "bias_correction": True, "foreach": True, **kw}),
    "Lookahead": lambda params, lr=1e-2, **kw: optim.Lookahead(
        torch.optim.Adam(params, lr=lr), **{"k": 3, **kw}),
    "SALA": lambda params, lr=1e-2, **kw: optim.SALA(
        torch.optim.SGD(params, lr=lr, momentum=0.9),
        **{"k": 2, "alpha": 0.5, "rho": 0.05, **kw}),
}

BAD_HYPERPARAMETERS: list[tuple[str, dict, str]] = [
    ("SAM", {"rho": -0.1}, "rho"), ("SAM", {"rho": float("inf")}, "rho"),
    ("WSAM", {"gamma": 1.0}, "gamma"), ("WSAM", {"gamma": -0.1}, "gamma"),
    ("WSAM", {"rho": -1.0}, "rho"),
    ("WSAM", {"max_norm": 0.0}, "max_norm"), ("WSAM", {"max_norm": float("nan")}, "max_norm"),
    ("AdaSAM", {"lr": -1e-3}, "lr"), ("AdaSAM", {"betas": (0.9, 1.0)}, "beta"),
    ("AdaSAM", {"eps": 0.0}, "eps"),
    ("AdaSAM", {"rho": -0.05}, "rho"),
    ("Lookahead", {"k": 0}, "k"), ("Lookahead", {"k": 2.5}, "k"),
    ("Lookahead", {"alpha": 0.0}, "alpha"),
    ("Lookahead", {"alpha": 1.5}, "alpha"),
    ("SALA", {"k": 1}, "k"), ("SALA", {"alpha": -0.1}, "alpha"), ("SALA", {"rho": -0.05}, "rho"),
    ("AGD", {"lr": -1e-3}, "lr"),
    ("AGD", {"lr": float("nan")}, "lr"),
    ("AGD", {"betas": (1.0, 0.999)}, "beta"),
    ("AGD", {"betas": (-0.1, 0.999)}, "beta"),
    ("AGD", {"betas": (0.9, 1.0)}, "beta"),
    ("AGD", {"betas": (0.9,)}, "betas"),
    ("AGD", {"delta": 0.0}, "delta"),
    ("AGD", {"delta": -1e-5}, "delta"),
    ("AGD", {"weight_decay": -1e-2}, "weight_decay"),
    ("AGD", {"clip": 0.0}, "clip"),
    ("AGD", {"clip": -5.0}, "clip"),
    ("NDAdam", {"lr": -1e-3}, "lr"),
    ("NDAdam", {"betas": (1.0, 0.999)}, "beta"),
    ("NDAdam", {"betas": (0.9, -0.5)}, "beta"),
    ("NDAdam", {"eps": -1e-8}, "eps"),
    ("NDAdam", {"weight_decay": -1.0}, "weight_decay"),
]

NAMES = sorted(OPTIMIZERS)


def _batch(i: int, dtype=torch.float64):
    x, y = classification_data(n=16, d=6, classes=3, dtype=torch.float64, seed=100 + i)
    return x.to(dtype), y


def _train(model, opt, steps: range, dtype=torch.float64, scheduler=None) -> list[float]:
    losses = []
    for i in steps:
        x, y = _batch(i, dtype)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
        if scheduler is not None:
            scheduler.step()
    return losses


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _roundtrip(obj):
    """Serialise as a user would (torch.save) and load back safely."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_exact(name):
    model = mlp(seed=0)
    opt = OPTIMIZERS[name](model.parameters())
    _train(model, opt, range(12))
    straight = _params(model)

    model = mlp(seed=0)
    opt = OPTIMIZERS[name](model.parameters())
    _train(model, opt, range(7))
    model_state, opt_state = _roundtrip(model.state_dict()), _roundtrip(opt.state_dict())
    del model, opt

    model = mlp(seed=1)  # a different init: everything must come from the saved state
    model.load_state_dict(model_state)
    opt = OPTIMIZERS[name](model.parameters())
    opt.load_state_dict(opt_state)
    _train(model, opt, range(7, 12))
    for a, b in zip(straight, _params(model)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_step_returns_loss_at_start_weights(name):
    model = mlp(seed=0)
    opt = OPTIMIZERS[name](model.parameters())
    _train(model, opt, range(3))
    x, y = _batch(3)
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y)
    (loss,) = _train(model, opt, range(3, 4))
    assert loss == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_scales_the_step(name):
    """A LambdaLR factor of 0.5 is the same run as half the lr; a factor of 1 is a different run."""
    runs = {}
    for label, lr, factor in [("sched", 1e-2, 0.5), ("half", 5e-3, 1.0), ("full", 1e-2, 1.0)]:
        model = mlp(seed=0)
        opt = OPTIMIZERS[name](model.parameters(), lr=lr)
        sched = LambdaLR(opt, lambda step, f=factor: f)
        _train(model, opt, range(6), scheduler=sched)
        runs[label] = _params(model)
    for a, b in zip(runs["sched"], runs["half"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert any(not torch.allclose(a, b) for a, b in zip(runs["sched"], runs["full"]))


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_use_their_own_lr(name):
    """A group with lr=0 stays put (after a first step, which may project onto constraints)."""
    model = mlp(seed=0)
    first, rest = list(model[0].parameters()), [p for m in list(model)[1:] for p in m.parameters()]
    opt = OPTIMIZERS[name]([{"params": first, "lr": 0.0}, {"params": rest}], lr=1e-2)
    assert len(opt.param_groups) == 2
    _train(model, opt, range(1))
    frozen, moving = [p.detach().clone() for p in first], [p.detach().clone() for p in rest]
    _train(model, opt, range(1, 5))
    for a, p in zip(frozen, first):
        assert torch.equal(a, p)
    assert all(not torch.equal(a, p) for a, p in zip(moving, rest))


@pytest.mark.parametrize("name", NAMES)
def test_float32_tracks_float64(name):
    out = {}
    for dtype in (torch.float32, torch.float64):
        model = mlp(seed=0, dtype=dtype)
        opt = OPTIMIZERS[name](model.parameters())
        _train(model, opt, range(5), dtype=dtype)
        assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
        for state in opt.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0:
                    assert v.dtype == dtype
        out[dtype] = _params(model)
    for a, b in zip(out[torch.float32], out[torch.float64]):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name,overrides,needle", BAD_HYPERPARAMETERS,
                         ids=[f"{n}-{next(iter(kw))}-{i}"
                              for i, (n, kw, _) in enumerate(BAD_HYPERPARAMETERS)])
def test_bad_hyperparameter_raises(name, overrides, needle):
    model = mlp(seed=0)
    with pytest.raises(ValueError, match=needle):
        OPTIMIZERS[name](model.parameters(), **overrides)


def _state_of(name: str) -> dict:
    model = mlp(seed=0)
    opt = OPTIMIZERS[name](model.parameters())
    _train(model, opt, range(2))
    return _roundtrip(opt.state_dict())


FOREIGN = {
    "torch-Adam": lambda: _roundtrip(torch.optim.Adam(mlp(seed=0).parameters()).state_dict()),
    "torch-SGD": lambda: _roundtrip(torch.optim.SGD(mlp(seed=0).parameters(), lr=0.1).state_dict()),
}


def _other_class(name: str) -> str:
    """An optimizer of OPTIMIZERS of another class than ``name``'s."""
    kind = type(OPTIMIZERS[name](mlp(seed=0).parameters()))
    return next(n for n in NAMES if type(OPTIMIZERS[n](mlp(seed=0).parameters())) is not kind)


@pytest.mark.parametrize("source", ["other", *FOREIGN])
@pytest.mark.parametrize("name", NAMES)
def test_loading_another_optimizers_state_raises_and_changes_nothing(name, source):
    model = mlp(seed=0)
    opt = OPTIMIZERS[name](model.parameters())
    _train(model, opt, range(3))
    before = _roundtrip(opt.state_dict())
    foreign = _state_of(_other_class(name)) if source == "other" else FOREIGN[source]()
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict(foreign)
    after = opt.state_dict()
    assert after.keys() == before.keys() and str(after) == str(before)
    if hasattr(opt, "base_optimizer"):
        assert opt.param_groups is opt.base_optimizer.param_groups


def test_numpy_scalars_are_hyperparameters_and_strings_are_not():
    import numpy as np

    params = list(mlp(seed=0).parameters())
    wsam = optim.WSAM(torch.optim.SGD(params, lr=0.1), gamma=np.float32(0.9), rho=np.float64(0.05))
    assert wsam.param_groups[0]["wsam_alpha"] == pytest.approx(9.0, rel=1e-6)
    assert optim.Lookahead(torch.optim.SGD(params, lr=0.1), k=np.int64(5)).k == 5
    assert optim.AGD(params, lr=np.float32(1e-3)).param_groups[0]["lr"] == pytest.approx(1e-3)
    for make, needle in [(lambda: optim.AGD(params, amsgrad="no"), "amsgrad"),
                         (lambda: optim.AGD(params, weight_decouple=1), "weight_decouple"),
                         (lambda: optim.SAM(torch.optim.SGD(params, lr=0.1), adaptive="yes"),
                          "adaptive"),
                         (lambda: optim.WSAM(torch.optim.SGD(params, lr=0.1), decouple="no"),
                          "decouple"),
                         (lambda: optim.AdaSAM(params, bias_correction="no"), "bias_correction"),
                         (lambda: optim.Lookahead(torch.optim.SGD(params, lr=0.1), k="5"), "k")]:
        with pytest.raises(TypeError, match=needle):
            make()


# --------------------------------------------------------------------------------------------------
# fused=True: one compiled kernel per tensor, with the eager per-tensor path as its fallback
# --------------------------------------------------------------------------------------------------

FUSED = {  # name -> (factory(params, fused), module holding the kernel, kernel attribute)
    "AGD": (lambda ps, fused: optim.AGD(ps, lr=1e-2, delta=1e-3, weight_decay=1e-2, fused=fused),
            "agd", "_AGD_KERNEL"),
    "AGD-amsgrad-clip-coupled": (lambda ps, fused: optim.AGD(ps, lr=1e-2, delta=1e-3,
                                                             weight_decay=1e-2,
                                                             weight_decouple=False, amsgrad=True,
                                                             clip=0.5, fused=fused),
                                 "agd", "_AGD_KERNEL"),
    "NDAdam": (lambda ps, fused: optim.NDAdam(ps, lr=1e-2, fused=fused),
               "ndadam", "_NDADAM_KERNEL"),
    "AdaSAM": (lambda ps, fused: optim.AdaSAM(ps, lr=1e-2, bias_correction=True, fused=fused),
               "adasam", "_ADASAM_KERNEL"),
}


def _fused_run(name: str, fused: bool, dtype=torch.float64, steps: int = 3):
    model = mlp(seed=0, dtype=dtype)
    opt = FUSED[name][0](model.parameters(), fused)
    _train(model, opt, range(steps), dtype=dtype)
    return _params(model), opt


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_falls_back_to_the_eager_path_bit_for_bit(name, monkeypatch):
    """Without a compiler, fused=True warns once and is the per-tensor path exactly (float64)."""
    import importlib

    from optim._fused import FusedKernel

    module = importlib.import_module(f"optim.{FUSED[name][1]}")
    kernel = getattr(module, FUSED[name][2])
    monkeypatch.setattr(module, FUSED[name][2], FusedKernel(kernel.fn, kernel.name))

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", no_compiler)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        fused, _ = _fused_run(name, True)
    eager, _ = _fused_run(name, False)
    assert all(torch.equal(a, b) for a, b in zip(fused, eager))


@pytest.mark.slow
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_matches_eager_to_rounding(name, dtype, rtol):
    import importlib

    fused, opt = _fused_run(name, True, dtype)
    kernel = getattr(importlib.import_module(f"optim.{FUSED[name][1]}"), FUSED[name][2])
    if kernel.error is not None:
        pytest.skip(f"torch.compile is not available here: {kernel.error}")
    eager, ref = _fused_run(name, False, dtype)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)
    if name == "NDAdam":
        for key in (0, 2):
            assert opt.angular_step()[key] == pytest.approx(ref.angular_step()[key],
                                                            rel=100 * rtol, abs=rtol)
            assert opt.update_cosine()[key] == pytest.approx(ref.update_cosine()[key],
                                                             rel=100 * rtol, abs=rtol)


# name -> factory(model, fused): several param groups with different settings, one parameter
# non-contiguous
GROUPED = {
    "AGD": lambda m, fused: optim.AGD(
        [{"params": [m[0].weight, m[0].bias], "amsgrad": True, "clip": 0.5},
         {"params": [m[2].weight, m[2].bias], "lr": 5e-3, "weight_decouple": False},
         {"params": [m[4].weight, m[4].bias], "fixed_decay": True, "weight_decay": 1e-3}],
        lr=1e-2, delta=1e-3, weight_decay=1e-2, fused=fused),
    "NDAdam": lambda m, fused: optim.NDAdam(
        [{"params": [m[0].weight, m[0].bias, m[2].weight]},
         {"params": [m[2].bias, m[4].weight, m[4].bias], "lr": 5e-3, "nd": False,
          "weight_decay": 1e-2}],
        lr=1e-2, fused=fused),
    "AdaSAM": lambda m, fused: optim.AdaSAM(
        [{"params": [m[0].weight, m[0].bias, m[2].weight]},
         {"params": [m[2].bias, m[4].weight, m[4].bias], "lr": 5e-3, "bias_correction": True}],
        lr=1e-2, fused=fused),
}


def _grouped_run(name: str, fused: bool, steps: int = 20):
    """float32 MLP whose first weight is a transposed (non-contiguous) view and whose last bias is a
    strided one (after fusable parameters of its group): fused=True takes both eagerly, each with
    its own state."""
    model = mlp(seed=0, dtype=torch.float32)
    model[0].weight = torch.nn.Parameter(model[0].weight.detach().t().contiguous().t())
    bias = model[4].bias.detach()
    model[4].bias = torch.nn.Parameter(torch.zeros(2 * len(bias))[::2].copy_(bias))
    assert not model[0].weight.is_contiguous() and not model[4].bias.is_contiguous()
    opt = GROUPED[name](model, fused)
    _train(model, opt, range(steps), dtype=torch.float32)
    return model, opt


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GROUPED))
def test_fused_matches_the_per_tensor_path_over_many_steps(name):
    """float32, 20 steps, several param groups (weight decay coupled and decoupled, amsgrad, clip,
    plain-Adam tensors, bias correction), two parameters the kernel cannot take: parameters and
    every state tensor agree with the eager per-tensor path to float32 rounding, and the kernel ran
    (no fallback)."""
    import importlib

    kernel = getattr(importlib.import_module(f"optim.{FUSED[name][1]}"), FUSED[name][2])
    # a fresh compile: earlier tests' shapes may have used up dynamo's recompile limit, after
    # which the kernel stays on its eager fallback for the rest of the process
    torch._dynamo.reset()
    kernel.error, kernel._compiled = None, None
    fused, opt = _grouped_run(name, True)
    if kernel.error is not None and "compile" in kernel.error.lower():
        pytest.skip(f"torch.compile is not available here: {kernel.error}")
    assert kernel.error is None
    eager, ref = _grouped_run(name, False)
    for a, b in zip(fused.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for p, q in zip(fused.parameters(), eager.parameters()):
        assert opt.state[p].keys() == ref.state[q].keys()
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, ref.state[q][key], rtol=1e-3,
                                           atol=1e-6, msg=f"{key}")
            else:
                assert value == ref.state[q][key]


def _skipping_run(name: str, fused: bool, steps: int = 6):
    """float64; the last bias has no gradient on steps 1 and 3, so its step count lags the
    group's."""
    model = mlp(seed=0)
    opt = FUSED[name][0](model.parameters(), fused)
    bias = list(model.parameters())[-1]
    for i in range(steps):
        x, y = _batch(i)

        def closure():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if i in (1, 3):
                bias.grad = None

        opt.step(closure)
    return _params(model), opt


@pytest.mark.slow
@pytest.mark.parametrize("name", ["AGD", "AGD-amsgrad-clip-coupled", "AdaSAM"])
def test_fused_scalars_follow_each_parameters_own_step_count(name, monkeypatch):
    """Parameters of one group at different step counts in one kernel call: each gets the scalars of
    its own step (one scalar row per distinct step count), as on the per-tensor path, to float64
    rounding. A fresh kernel and a higher recompilation limit: this test's variants come on top of
    every other test's."""
    import importlib

    from optim._fused import FusedKernel

    module = importlib.import_module(f"optim.{FUSED[name][1]}")
    original = getattr(module, FUSED[name][2])
    kernel = FusedKernel(original.fn, original.name)
    monkeypatch.setattr(module, FUSED[name][2], kernel)
    with torch._dynamo.config.patch(recompile_limit=64):
        fused, opt = _skipping_run(name, True)
    if kernel.error is not None:
        pytest.skip(f"torch.compile is not available here: {kernel.error}")
    steps = [opt.state[p]["step"] for p in opt.param_groups[0]["params"]]
    assert steps[-1] == steps[0] - 2
    eager, _ = _skipping_run(name, False)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_never_recompiles_for_a_new_learning_rate_or_step(name):
    """The step's scalars travel as tensor data: after the first step, new step counts and a
    learning-rate schedule compile nothing more."""
    from torch._dynamo.utils import counters

    model = mlp(seed=0)
    opt = FUSED[name][0](model.parameters(), True)
    _train(model, opt, range(1))
    compiled = counters["stats"]["unique_graphs"]
    scheduler = LambdaLR(opt, lambda epoch: 0.5 ** epoch)
    _train(model, opt, range(1, 6), scheduler=scheduler)
    assert opt.param_groups[0]["lr"] < 1e-2
    assert counters["stats"]["unique_graphs"] == compiled
