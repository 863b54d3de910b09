"""Optimizer state is never left wrong (issue 30): a SAM-family step interrupted in either pass
leaves the model and optimizer as the step found them; state dicts are checked for every
per-parameter key before anything is loaded; a closure that produced no gradients raises;
hyperparameters that overflow in the parameters' dtype are refused in ``__init__``."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import optim
from tests.oracles import cnn_bn
from tests.optim.reference import Softmax, batch

X = torch.randn(16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
Y = torch.arange(16) % 3

FAMILY = {  # SALA with k=2: its second step is a SAM step
    "SAM": lambda m: optim.SAM(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), rho=0.3,
                               model=m),
    "WSAM": lambda m: optim.WSAM(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), rho=0.3,
                                 model=m),
    "AdaSAM": lambda m: optim.AdaSAM(m.parameters(), lr=1e-2, rho=0.3, model=m),
    "SALA": lambda m: optim.SALA(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), k=2,
                                 rho=10.0, model=m),
}


class Boom(Exception):
    pass


def _closure(model, opt, fail_at=None, calls=None, error=Boom):
    calls = [] if calls is None else calls

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        if len(calls) == fail_at:   # fails after the forward, as an OOM in backward would
            raise error("out of memory")
        loss.backward()
        return loss

    return closure


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("failing_pass", [1, 2])
@pytest.mark.parametrize("name", FAMILY)
def test_an_exception_in_either_pass_leaves_the_step_undone(name, failing_pass, error):
    model, twin = cnn_bn(), cnn_bn()
    opt, twin_opt = FAMILY[name](model), FAMILY[name](twin)
    for m, o in ((model, opt), (twin, twin_opt)):   # SALA: the next step is a SAM step
        o.step(_closure(m, o))
    before = _snapshot(model)
    calls = []
    with pytest.raises(error, match="out of memory"):
        opt.step(_closure(model, opt, fail_at=failing_pass, calls=calls, error=error))
    assert len(calls) == failing_pass
    assert _same(_snapshot(model), before)            # weights and BatchNorm statistics
    assert model.bn.momentum == 0.1
    assert all(p.grad is None for p in model.parameters())
    assert getattr(opt, "phase", "ready") == "ready"
    buf = io.BytesIO()    # a checkpoint saved now holds the unperturbed state and resumes
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = cnn_bn()
    resumed.load_state_dict(saved["model"])
    resumed_opt = FAMILY[name](resumed)
    resumed_opt.load_state_dict(saved["opt"])
    for m, o in ((model, opt), (twin, twin_opt), (resumed, resumed_opt)):
        o.step(_closure(m, o))
    assert _same(_snapshot(model), _snapshot(twin))   # the next step is the uninterrupted one
    assert _same(_snapshot(resumed), _snapshot(twin))
    assert opt.n_steps == twin_opt.n_steps


def test_a_two_step_user_can_cancel_a_failed_perturbed_pass():
    model = Softmax()
    opt = optim.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
    before = _snapshot(model)
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert not _same(_snapshot(model), before)
    opt.cancel_step()
    assert _same(_snapshot(model), before) and opt.phase == "ready"
    opt.cancel_step()   # a no-op when not perturbed
    assert _same(_snapshot(model), before)


def test_step_from_a_perturbed_state_returns_to_the_origin_first():
    """A state saved between first_step() and second_step() (the model then at w + e) resumes
    with step(closure): it warns, goes back to w, and takes the step from w."""
    runs = []
    for interrupted in (False, True):
        model = Softmax()
        opt = optim.WSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
        x, y = batch(0)
        if interrupted:
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            state = opt.state_dict()
            opt = optim.WSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
            opt.load_state_dict(state)
            with pytest.warns(RuntimeWarning, match="perturbed"):
                opt.step(_softmax_closure(model, opt, x, y))
        else:
            opt.step(_softmax_closure(model, opt, x, y))
        runs.append(_snapshot(model))
    assert _same(*runs)


def _softmax_closure(model, opt, x, y, backward=(1, 2)):
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if len(calls) in backward:
            loss.backward()
        return loss

    return closure


# ---------------------------------------------------------------------------------------------
# a closure that produced no gradients
# ---------------------------------------------------------------------------------------------

SOFTMAX_FAMILY = {
    "SAM": lambda m: optim.SAM(torch.optim.SGD(m.parameters(), lr=0.1), rho=0.1),
    "WSAM": lambda m: optim.WSAM(torch.optim.SGD(m.parameters(), lr=0.1), rho=0.1),
    "AdaSAM": lambda m: optim.AdaSAM(m.parameters(), lr=0.1, rho=0.1),
    "SALA": lambda m: optim.SALA(torch.optim.SGD(m.parameters(), lr=0.1), k=2, rho=10.0),
}


@pytest.mark.parametrize("backward", [(), (1,), "stale"])
@pytest.mark.parametrize("name", SOFTMAX_FAMILY)
def test_a_closure_without_backward_raises(name, backward):
    model = Softmax()
    opt = SOFTMAX_FAMILY[name](model)
    x, y = batch(0)
    opt.step(_softmax_closure(model, opt, x, y))   # SALA: the next step is a SAM step
    before = _snapshot(model)
    if backward == "stale":   # no zero_grad, no backward: the last step's gradients
        def closure():
            return F.cross_entropy(model(x), y)
        which = "first"
    else:
        closure = _softmax_closure(model, opt, x, y, backward=backward)
        which = "second" if backward else "first"
    with pytest.raises(RuntimeError, match=f"{which} call of the closure produced no gradients"):
        opt.step(closure)
    assert _same(_snapshot(model), before)
    assert getattr(opt, "phase", "ready") == "ready"


def test_two_step_api_without_gradients_raises():
    model = Softmax()
    opt = optim.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="first_step.. found no gradients"):
        opt.first_step()
    assert opt.phase == "ready"
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="second_step.. found no gradients"):
        opt.second_step()
    assert _same(_snapshot(model), before) and opt.phase == "ready"


# ---------------------------------------------------------------------------------------------
# state dicts lacking a per-parameter key
# ---------------------------------------------------------------------------------------------

def _trained(make, steps=3):
    model = Softmax()
    opt = make(model)
    for i in range(steps):
        x, y = batch(i)
        opt.step(_softmax_closure(model, opt, x, y))
    return model, opt


MISSING = {  # name -> (factory, where: "own" or "base", parameter index, key removed)
    "AdaSAM-step": (lambda m: optim.AdaSAM(m.parameters()), "own", 1, "step"),
    "AdaSAM-max": (lambda m: optim.AdaSAM(m.parameters()), "own", 0, "max_exp_avg_sq"),
    "Lookahead-slow": (lambda m: optim.Lookahead(torch.optim.SGD(m.parameters(), lr=0.1)), "own",
                       1, "slow"),
    "SALA-slow": (lambda m: optim.SALA(torch.optim.SGD(m.parameters(), lr=0.1), k=2), "own", 0,
                  "slow"),
    "AGD-exp_avg": (lambda m: optim.AGD(m.parameters()), "own", 0, "exp_avg"),
    "NDAdam-angle": (lambda m: optim.NDAdam(m.parameters()), "own", 0, "angle"),
    "NDAdam-exp_avg_sq": (lambda m: optim.NDAdam(m.parameters()), "own", 1, "exp_avg_sq"),
    "WSAM-grad": (lambda m: optim.WSAM(torch.optim.SGD(m.parameters(), lr=0.1)), "own", 0,
                  "grad"),
    "SAM-Adam-exp_avg": (lambda m: optim.SAM(torch.optim.Adam(m.parameters())), "base", 1,
                         "exp_avg"),
    "Lookahead-AdamW-step": (lambda m: optim.Lookahead(torch.optim.AdamW(m.parameters())),
                             "base", 0, "step"),
}


@pytest.mark.parametrize("case", MISSING)
def test_a_state_dict_lacking_a_per_parameter_key_is_refused_before_loading(case):
    make, where, index, key = MISSING[case]
    _, source = _trained(make)
    state = source.state_dict()
    entries = (state["base"] if where == "base" else state)["state"]
    del entries[index][key]
    model, opt = _trained(make, steps=1)
    before = str(opt.state_dict())
    weights = _snapshot(model)
    with pytest.raises(ValueError, match=rf"\['{key}'\] of parameter {index} "):
        opt.load_state_dict(state)
    assert str(opt.state_dict()) == before and _same(_snapshot(model), weights)


@pytest.mark.parametrize("name", ["SAM", "WSAM", "AdaSAM"])
def test_a_perturbed_state_dict_needs_the_origin(name):
    model = Softmax()
    opt = SOFTMAX_FAMILY[name](model)
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    state = opt.state_dict()
    del state["state"][0]["origin"]
    fresh = SOFTMAX_FAMILY[name](Softmax())
    with pytest.raises(ValueError, match=r"\['origin'\] of parameter 0 "):
        fresh.load_state_dict(state)
    assert fresh.phase == "ready"


# ---------------------------------------------------------------------------------------------
# hyperparameters that overflow in the parameters' dtype
# ---------------------------------------------------------------------------------------------

def _params(dtype):
    return [torch.nn.Parameter(torch.ones(3, 2, dtype=dtype))]


OVERFLOW = [  # (factory(params), dtype, the hyperparameter named)
    (lambda ps: optim.AdaSAM(ps, eps=1e300), torch.float64, "eps"),
    (lambda ps: optim.AdaSAM(ps, eps=1e20), torch.float32, "eps"),
    (lambda ps: optim.AdaSAM(ps, eps=1e-30), torch.float32, "eps"),      # eps**2 rounds to 0
    (lambda ps: optim.AdaSAM([{"params": ps, "eps": 1e200}]), torch.float64, "eps"),
    (lambda ps: optim.AdaSAM(ps, lr=1e39), torch.float32, "lr"),
    (lambda ps: optim.AdaSAM(ps, rho=1e5), torch.float16, "rho"),
    (lambda ps: optim.AGD(ps, delta=1e39), torch.float32, "delta"),
    (lambda ps: optim.AGD(ps, lr=1e5), torch.float16, "lr"),
    (lambda ps: optim.NDAdam(ps, eps=1e39), torch.float32, "eps"),
    (lambda ps: optim.SAM(torch.optim.SGD(ps, lr=0.1), rho=1e39), torch.float32, "rho"),
    (lambda ps: optim.WSAM(torch.optim.SGD(ps, lr=0.1), rho=1e39), torch.float32, "rho"),
    (lambda ps: optim.SALA(torch.optim.SGD(ps, lr=0.1), rho=1e39), torch.float32, "rho"),
]


@pytest.mark.parametrize("i", range(len(OVERFLOW)))
def test_hyperparameters_that_overflow_are_refused(i):
    make, dtype, name = OVERFLOW[i]
    with pytest.raises(ValueError, match=rf"^{name} must be .*finite.* in {str(dtype)[6:]}\), got"):
        make(_params(dtype))


def test_the_largest_accepted_eps_gives_a_finite_step():
    """The bound is sound: AdaSAM at eps just inside it steps without overflow."""
    for dtype, eps in ((torch.float64, 1e154), (torch.float32, 1e19), (torch.float32, 1e-22)):
        model = Softmax().to(dtype)
        opt = optim.AdaSAM(model.parameters(), eps=eps, lr=1e-3)
        x, y = batch(0)
        opt.step(_softmax_closure(model, opt, x.to(dtype), y))
        assert all(torch.isfinite(p).all() for p in model.parameters())


FAILED_WRAPS = {  # a wrapper refused for one bad argument, then built right on the same base
    "SAM-rho-overflow": (lambda b: optim.SAM(b, rho=1e39), lambda b: optim.SAM(b, rho=0.1)),
    "SAM-model": (lambda b: optim.SAM(b, rho=0.5, model="net"), lambda b: optim.SAM(b, rho=0.1)),
    "WSAM-decouple": (lambda b: optim.WSAM(b, rho=0.5, decouple="no"),
                      lambda b: optim.WSAM(b, rho=0.1)),
    "WSAM-max_norm": (lambda b: optim.WSAM(b, gamma=0.5, max_norm=-1.0),
                      lambda b: optim.WSAM(b, rho=0.1)),
    "SALA-k": (lambda b: optim.SALA(b, rho=0.5, k=1), lambda b: optim.SALA(b, rho=0.1)),
    "Lookahead-k": (lambda b: optim.Lookahead(b, alpha=0.9, k=0),
                    lambda b: optim.Lookahead(b, alpha=0.5)),
}


@pytest.mark.parametrize("case", FAILED_WRAPS)
def test_a_refused_wrapper_leaves_the_base_optimizer_untouched(case):
    """Otherwise the refused wrapper's values stay in the base's param groups and the next
    wrapper built on it silently takes them instead of its own arguments."""
    bad, good = FAILED_WRAPS[case]
    base = torch.optim.SGD(_params(torch.float32), lr=0.1)
    keys = [set(g) for g in base.param_groups]
    with pytest.raises(ValueError):
        bad(base)
    assert [set(g) for g in base.param_groups] == keys
    opt = good(base)
    want = good(torch.optim.SGD(_params(torch.float32), lr=0.1)).param_groups[0]
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == \
        {k: v for k, v in want.items() if k != "params"}
