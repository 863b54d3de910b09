"""The optimizers' preconditioner() against their own steps (x_{t+1} - x_t = -lr m / P), and the
Tracker's preconditioned lambda_max against a dense P^-1/2 H P^-1/2."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis import Tracker
from analysis.preconditioning import stability_threshold
from optim import AGD, SAM, AdaSAM, Lookahead, NDAdam
from tests.oracles import classification_data, exact_hessian, mlp, uneven_batches
from tests.analysis.problems import LOSS, closure_for


def setup():
    model = mlp((6, 5, 3))
    x, y = classification_data()
    return model, uneven_batches(x, y)


def step_and_delta(model, opt, data, steps=4):
    """Train ``steps`` steps; the last step's parameter change per parameter."""
    for t in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(closure_for(model, opt, data[t % len(data)]))
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def bias_corrected_first_moment(state, beta1):
    return state["exp_avg"] / (1 - beta1 ** float(state["step"]))


@pytest.mark.parametrize("delta", [1e-5, 0.05])
def test_agd_preconditioner_is_its_step_denominator_and_mask_its_sgd_branch(delta):
    model, data = setup()
    opt = AGD(model.parameters(), lr=1e-2, delta=delta)
    change = step_and_delta(model, opt, data)
    P = opt.preconditioner()
    mask = opt.preconditioner(sgd_mask=True)
    for p, d in zip(model.parameters(), change):
        state = opt.state[p]
        b_hat = state["exp_avg_diff_sq"] / (1 - 0.999 ** state["step"])
        torch.testing.assert_close(P[p], b_hat.sqrt().clamp_min(delta), rtol=1e-12, atol=0)
        torch.testing.assert_close(d, -1e-2 * bias_corrected_first_moment(state, 0.9) / P[p])
        assert mask[p].dtype == torch.bool
    fraction = sum(int(m.sum()) for m in mask.values()) / sum(p.numel() for p in model.parameters())
    assert fraction == pytest.approx(opt.sgd_fraction())
    if delta == 0.05:
        assert 0 < fraction < 1   # both branches present, so the mask is really tested
        for p in model.parameters():
            assert bool((P[p][mask[p]] == delta).all())


def test_adam_like_preconditioners_are_their_step_denominators():
    cases = {
        "NDAdam": lambda m: NDAdam([{"params": list(m.parameters()), "nd": False}], lr=1e-2),
        "SAM(Adam)": lambda m: SAM(torch.optim.Adam(m.parameters(), lr=1e-2), rho=0.05),
        "Lookahead(AdamW)": lambda m: Lookahead(torch.optim.AdamW(m.parameters(), lr=1e-2,
                                                                  weight_decay=0.0), k=10),
    }
    for name, build in cases.items():
        model, data = setup()
        opt = build(model)
        change = step_and_delta(model, opt, data)
        P = opt.preconditioner()
        state_of = getattr(opt, "base_optimizer", opt).state
        for p, d in zip(model.parameters(), change):
            m_hat = bias_corrected_first_moment(state_of[p], 0.9)
            torch.testing.assert_close(d, -1e-2 * m_hat / P[p], msg=name)


def test_ndadam_vectors_and_adasam():
    model, data = setup()
    opt = NDAdam(model.parameters(), lr=1e-2)
    step_and_delta(model, opt, data)
    P = opt.preconditioner()
    for p in model.parameters():
        state = opt.state[p]
        v_hat = state["exp_avg_sq"] / (1 - 0.999 ** state["step"])
        assert P[p].shape == p.shape
        torch.testing.assert_close(P[p], (v_hat.sqrt() + 1e-8).expand_as(p))
    for bias_correction in (False, True):
        model, data = setup()
        opt = AdaSAM(model.parameters(), lr=1e-2, bias_correction=bias_correction)
        change = step_and_delta(model, opt, data)
        P = opt.preconditioner()
        for p, d in zip(model.parameters(), change):
            state = opt.state[p]
            m = bias_corrected_first_moment(state, 0.9) if bias_correction else state["exp_avg"]
            torch.testing.assert_close(d, -1e-2 * m / P[p])


def test_sam_over_sgd_has_no_preconditioner():
    model, _ = setup()
    assert SAM(torch.optim.SGD(model.parameters(), lr=0.1)).preconditioner() is None


def test_stability_threshold():
    model, _ = setup()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.999))
    assert stability_threshold(opt) == pytest.approx(3.8 / (0.1 * 1e-2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.0, 0.999))
    assert stability_threshold(opt) == pytest.approx(2 / 1e-2)
    assert stability_threshold(torch.optim.SGD(model.parameters(), lr=0.1)) is None


@pytest.mark.parametrize("make", [lambda ps: torch.optim.Adam(ps, lr=1e-2),
                                  lambda ps: AGD(ps, lr=1e-2, delta=0.05)])
def test_tracker_logs_preconditioned_lambda_max_and_ratio(make, monkeypatch):
    import analysis.lanczos

    calls = []   # (preconditioned, v0, eigenvector) of each Lanczos run of the tracker
    original = analysis.lanczos.top_eigenvalues

    def spy(*args, **kwargs):
        res = original(*args, **kwargs)
        calls.append((kwargs["preconditioner"] is not None, kwargs["v0"], res.eigenvectors[0]))
        return res

    monkeypatch.setattr(analysis.lanczos, "top_eigenvalues", spy)
    model, data = setup()
    opt = make(model.parameters())
    n = sum(p.numel() for p in model.parameters())
    tracker = Tracker(model, LOSS, every=2, curvature_data=data, lambda_max=True, layers=False,
                      lanczos_tol=1e-10, lanczos_max_hvp=n)
    for t in range(4):
        loss = opt.step(closure_for(model, opt, data[t % len(data)]))
        rec = tracker.step(opt, loss)
        if rec is None:
            continue
        if isinstance(opt, AGD):
            P = torch.cat([v.reshape(-1) for v in opt.preconditioner().values()])
        else:
            states = [opt.state[p] for p in model.parameters()]
            P = torch.cat([((st["exp_avg_sq"] / (1 - 0.999 ** float(st["step"]))).sqrt()
                            + 1e-8).reshape(-1) for st in states])
        H = exact_hessian(model, LOSS, data)
        lam = float(torch.linalg.eigvalsh(H / P.sqrt()[:, None] / P.sqrt()[None, :])[-1])
        assert rec["preconditioned_lambda_max"] == pytest.approx(lam, rel=1e-8)
        assert rec["preconditioned_eos_ratio"] == pytest.approx(lam * 0.1 * 1e-2 / 3.8, rel=1e-8)
        assert rec["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)
    for key in (False, True):   # each quantity is warm-started from its own last eigenvector
        (_, cold, first), (_, warm, _) = [c for c in calls if c[0] == key]
        assert cold is None and torch.equal(warm, first)


def test_tracker_without_preconditioner_logs_no_preconditioned_keys():
    model, data = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = Tracker(model, LOSS, every=1, curvature_data=data, lambda_max=True, layers=False)
    opt.step(closure_for(model, opt, data[0]))
    rec = tracker.step(opt)
    assert "lambda_max" in rec and not any(k.startswith("preconditioned") for k in rec)
    assert math.isfinite(rec["lambda_max"])
    assert np.isfinite(tracker.log(opt)["lambda_max"])
