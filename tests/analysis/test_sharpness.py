"""Worst-case and average sharpness against closed forms on quadratics, trust-region
solutions, reparameterisation invariance, m-sharpness batching, restoration and two ranks."""
import copy
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from analysis import (average_sharpness, mean_loss, sharpness_vs_curvature, supervised,
                      worst_case_sharpness)
from analysis.core import ArgumentTypeError
from analysis.sharpness.apgd import apgd_checkpoints
from analysis.sharpness.perturbation import adaptivity
from tests.oracles import _flat_loss as flat_loss
from tests.oracles import (assert_unchanged, classification_data, cnn_bn, mlp, snapshot,
                           uneven_batches)
from tests.analysis.problems import (DATA, QUIET, Quadratic, check_restored_on_failure, quad_loss,
                                     w_star)
from tests.ranks import spawn

CE = supervised(nn.CrossEntropyLoss())
MSE = supervised(nn.MSELoss())


def spd(eigs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64)) @ q.T


def trust_region(g, H, rho):
    """``max_{||d|| <= rho} g'd + d'Hd/2`` for PSD H: ``d = (lam I - H)^-1 g`` with ``||d|| = rho``
    (lam > lambda_max found by bisection on the secular equation)."""
    eye = torch.eye(len(g), dtype=H.dtype)
    lo = torch.linalg.eigvalsh(H).max().item()
    hi = lo + g.norm().item() / rho + 1.0
    for _ in range(200):
        lam = 0.5 * (lo + hi)
        d = torch.linalg.solve(lam * eye - H, g)
        lo, hi = (lam, hi) if d.norm() > rho else (lo, lam)
    return (g @ d + 0.5 * d @ H @ d).item()


def perturbed_increase(model, loss_fn, data, delta):
    """``L(w + delta) - L(w)`` evaluated independently of the code under test."""
    mode = "train" if model.training else "eval"  # the model as it is
    base = mean_loss(model, loss_fn, data, model_mode=mode)
    copy = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in delta:
                p.add_(delta[n])
    try:
        return mean_loss(model, loss_fn, data, model_mode=mode) - base
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(copy[n])


# ----------------------------------------------------------------------------- closed forms

def test_checkpoints_follow_apgd_schedule():
    # p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 of 100 iterations (Croce & Hein 2020)
    assert sorted(apgd_checkpoints(100)) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_worst_case_l2_at_a_minimum_is_half_rho2_lambda_max():
    A = spd([5.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.0])
    model = Quadratic(A, w_star(7))
    snap = snapshot(model)
    for rho, restarts in [(0.1, 1), (0.7, 3)]:
        r = worst_case_sharpness(model, quad_loss, DATA, rho=rho, steps=30, restarts=restarts,
                                 **QUIET)
        assert r.value == pytest.approx(0.5 * rho ** 2 * 5.0, rel=1e-8)
        assert r.sam_value == 0.0  # zero gradient: the one-step estimate sees nothing
        assert r.delta_norm == pytest.approx(rho, rel=1e-12) and r.delta_norm <= rho * (1 + 1e-12)
        assert perturbed_increase(model, quad_loss, DATA, r.delta) == pytest.approx(r.value,
                                                                                    rel=1e-12)
        assert r.n_forward == restarts * (30 + 1) + 1 and r.n_backward == r.n_forward - restarts
    assert_unchanged(model, snap)


def test_worst_case_linf_with_diagonal_hessian_is_half_rho2_trace():
    h = torch.tensor([4.0, 1.0, 0.5, 2.0, 0.1], dtype=torch.float64)
    model = Quadratic(torch.diag(h), w_star(5))
    r = worst_case_sharpness(model, quad_loss, DATA, rho=0.2, norm="linf", steps=5, **QUIET)
    assert r.value == pytest.approx(0.5 * 0.04 * h.sum().item(), rel=1e-12)
    assert torch.allclose(r.delta["w"].abs(), torch.full((5,), 0.2, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(6,), (3, 2)])
def test_adaptive_worst_case_is_half_rho2_lambda_max_of_dad(shape):
    A = spd([3.0, 2.0, 1.5, 1.0, 0.3, 0.1], seed=2)
    ws = w_star(shape)
    model = Quadratic(A, ws)
    rho = 0.3
    rows = ws.reshape(len(ws), -1)
    for adaptive, c in [(True, ws.abs()),
                        ("filter", rows.norm(dim=1, keepdim=True).expand_as(rows).reshape(shape))]:
        D = torch.diag(c.reshape(-1))
        expected = 0.5 * rho ** 2 * torch.linalg.eigvalsh(D @ A @ D).max().item()
        r = worst_case_sharpness(model, quad_loss, DATA, rho=rho, adaptive=adaptive, steps=60,
                                 **QUIET)
        assert r.value == pytest.approx(expected, rel=1e-7)
        assert (r.delta["w"] / c).norm().item() <= rho * (1 + 1e-12)
    # L-infinity box |delta_i| <= rho |w_i| with a diagonal Hessian: every corner is optimal
    h = torch.diag(A).clone()
    model = Quadratic(torch.diag(h), ws)
    r = worst_case_sharpness(model, quad_loss, DATA, rho=rho, norm="linf", adaptive=True,
                             steps=5, **QUIET)
    assert r.value == pytest.approx(0.5 * rho ** 2 * (h * ws.reshape(-1) ** 2).sum().item(),
                                    rel=1e-12)


def test_worst_case_with_gradient_matches_trust_region_and_beats_sam():
    A = spd([4.0, 2.0, 1.0, 0.5, 0.0], seed=3)
    ws = w_star(5)
    model = Quadratic(A, ws, w=ws + 0.4 * w_star(5, seed=7))
    g = A @ (model.w.detach() - ws)
    for rho in (0.05, 0.5, 3.0):
        r = worst_case_sharpness(model, quad_loss, DATA, rho=rho, steps=20, **QUIET)
        assert r.value == pytest.approx(trust_region(g, A, rho), rel=1e-5)
        d = rho * g / g.norm()
        assert r.sam_value == pytest.approx((g @ d + 0.5 * d @ A @ d).item(), rel=1e-12)
        assert r.value >= r.sam_value and r.delta_norm <= rho * (1 + 1e-12)
        assert perturbed_increase(model, quad_loss, DATA, r.delta) == pytest.approx(r.value)
    # one step from the SAM point, with a tiny radius where that point is already the best
    r = worst_case_sharpness(model, quad_loss, DATA, rho=1e-6, steps=1, **QUIET)
    assert torch.allclose(r.delta["w"], 1e-6 * g / g.norm(), rtol=1e-3)
    assert perturbed_increase(model, quad_loss, DATA, r.delta) == pytest.approx(r.value, rel=1e-9)


def apgd_by_hand(f, theta, rho, steps):
    """Croce & Hein (2020), Alg. 1, step by step for ``max f(theta + d) - f(theta)`` over the L2
    ball, started at the SAM point (f: flat float64 parameters -> loss, as in the oracles).
    Returns the best value and the number of step halvings."""
    grad = torch.func.grad(f)

    def value(d):
        return (f(theta + d) - f(theta)).item()

    def proj(d):
        return d * min(1.0, rho / d.norm().item())

    fractions = [0.0, 0.22]
    while fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06) <= 1:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    checks = {math.ceil(round(q * steps, 9)) for q in fractions[1:]}
    g = grad(theta)
    x = old = best = rho * g / g.norm()
    fx = f_best = best_then = value(x)
    eta, halvings, since, last_check, reduced = 2 * rho, 0, 0, 0, False
    for k in range(1, steps + 1):
        ascent = grad(theta + x)
        z = proj(x + eta * ascent / ascent.norm())
        new = z if k == 1 else proj(x + 0.75 * (z - x) + 0.25 * (x - old))
        f_new = value(new)
        since += f_new > fx
        old, x, fx = x, new, f_new
        if fx > f_best:
            best, f_best = x, fx
        if k in checks:
            halve = since < 0.75 * (k - last_check) or (not reduced and f_best <= best_then)
            since, last_check, reduced, best_then = 0, k, halve, f_best
            if halve:
                eta, halvings = eta / 2, halvings + 1
                x = old = best
                fx = f_best
    return f_best, halvings


def test_apgd_replays_the_authors_algorithm_step_by_step():
    x, y = classification_data(n=40)
    model = relu_net(seed=1)
    data = [(x, y)]
    names = [n for n, _ in model.named_parameters()]
    f, theta = flat_loss(model, lambda net, b: nn.functional.cross_entropy(net(b[0]), b[1]),
                         data, names, list(model.parameters()))
    for rho, steps in [(1.0, 20), (2.0, 37)]:
        expected, halvings = apgd_by_hand(f, theta, rho, steps)
        r = worst_case_sharpness(model, CE, data, rho=rho, steps=steps, **QUIET)
        assert halvings > 0 and r.value > r.sam_value
        assert r.value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("norm,adaptive", [("l2", False), ("linf", False), ("l2", True),
                                           ("linf", "filter")])
def test_worst_case_on_a_network_respects_the_set_and_restores_the_model(norm, adaptive):
    x, y = classification_data(n=23, d=12)
    model = cnn_bn()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    snap = snapshot(model)
    data = uneven_batches(x, y)
    rho = 0.05
    r = worst_case_sharpness(model, CE, data, rho=rho, norm=norm, adaptive=adaptive, steps=8,
                             restarts=2, model_mode="train", **QUIET)
    assert_unchanged(model, snap)
    assert r.value >= r.sam_value > 0
    assert r.delta_norm <= rho * (1 + 1e-12)
    if adaptive is True:  # the reported norm is that of delta / |w|; zero weights stay put
        w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        delta = torch.cat([d.reshape(-1) for d in r.delta.values()])
        assert (w == 0).any() and torch.all(delta[w == 0] == 0)  # BatchNorm's zero bias
        ratio = delta[w != 0] / w[w != 0].abs()
        assert torch.linalg.vector_norm(ratio).item() == pytest.approx(r.delta_norm, rel=1e-9)
    twin = copy.deepcopy(model).train()  # train-mode forwards move the running statistics
    assert perturbed_increase(twin, CE, data, r.delta) == pytest.approx(r.value, rel=1e-9)


def test_params_selection_perturbs_only_the_chosen_parameters():
    x, y = classification_data()
    model = mlp()
    r = worst_case_sharpness(model, CE, [(x, y)], rho=0.1, steps=3, params=["2.weight"], **QUIET)
    assert list(r.delta) == ["2.weight"]
    assert perturbed_increase(model, CE, [(x, y)], r.delta) == pytest.approx(r.value, rel=1e-10)


def test_average_sharpness_gaussian_and_uniform_match_the_trace_in_expectation():
    h = torch.tensor([3.0, 1.0, 0.5, 2.0, 0.25, 1.5], dtype=torch.float64)
    A = spd(h.tolist(), seed=4)
    ws = w_star(6)
    model = Quadratic(A, ws)
    sigma = 0.1
    cases = [(dict(), 0.5 * sigma ** 2 * h.sum().item()),
             (dict(adaptive=True), 0.5 * sigma ** 2 * (torch.diag(A) * ws ** 2).sum().item()),
             (dict(norm="linf"), 0.5 * sigma ** 2 / 3 * h.sum().item())]
    for i, (kwargs, expected) in enumerate(cases):
        r = average_sharpness(model, quad_loss, DATA, sigma=sigma, n_samples=400, seed=i,
                              **kwargs, **QUIET)
        assert abs(r.value - expected) < 4 * r.stderr
        assert r.stderr < 0.1 * expected and r.n_forward == 401
    again = average_sharpness(model, quad_loss, DATA, sigma=sigma, n_samples=400, seed=0, **QUIET)
    assert again.value == average_sharpness(model, quad_loss, DATA, sigma=sigma, n_samples=400,
                                            seed=0, **QUIET).value


def test_average_sharpness_z_scores_are_standard_normal():
    h = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    model = Quadratic(torch.diag(h), w_star(3))
    expected = 0.5 * 0.04 * h.sum().item()
    z = [(r.value - expected) / r.stderr for r in
         (average_sharpness(model, quad_loss, DATA, sigma=0.2, n_samples=64, seed=s, **QUIET)
          for s in range(40))]
    assert abs(np.mean(z)) < 4 / math.sqrt(40)  # unbiased: mean z ~ N(0, 1/40)
    assert 0.5 < np.std(z) < 1.6


def test_antithetic_pairs_cancel_the_gradient_term():
    x, y = classification_data()
    model = mlp()
    plain = average_sharpness(model, CE, [(x, y)], sigma=0.01, n_samples=64, **QUIET)
    pairs = average_sharpness(model, CE, [(x, y)], sigma=0.01, n_samples=64, antithetic=True,
                              **QUIET)
    assert pairs.stderr < 0.3 * plain.stderr
    assert abs(pairs.value - plain.value) < 4 * math.hypot(pairs.stderr, plain.stderr)
    assert len(pairs.samples) == 32 and pairs.n_forward == 65


# ----------------------------------------------------------------------------- invariance

def relu_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def test_adaptive_sharpness_is_invariant_to_relu_rescaling_and_plain_is_not():
    x, y = classification_data(n=30)
    data = [(x, y)]
    model, scaled = relu_net(), relu_net()
    c = 4.0
    with torch.no_grad():
        scaled[0].weight.mul_(c)
        scaled[0].bias.mul_(c)
        scaled[2].weight.div_(c)
    assert torch.allclose(model(x), scaled(x), rtol=1e-12)

    def both(fn, **kw):
        return fn(model, CE, data, **kw, **QUIET).value, fn(scaled, CE, data, **kw, **QUIET).value

    for adaptive in (True, "filter"):
        a, b = both(worst_case_sharpness, rho=0.1, adaptive=adaptive, steps=10)
        assert a == pytest.approx(b, rel=1e-9)
        a, b = both(average_sharpness, sigma=0.1, adaptive=adaptive, n_samples=8)
        assert a == pytest.approx(b, rel=1e-9)
    a, b = both(worst_case_sharpness, rho=0.1, steps=10)
    assert abs(a - b) > 0.05 * a


# ----------------------------------------------------------------------------- m-sharpness

def regression(n=23, d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, 1, generator=gen, dtype=torch.float64) \
        + 0.3 * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    torch.manual_seed(seed)
    return x, y, nn.Linear(d, 1, bias=False).double()


def test_m_sharpness_on_uneven_batches_is_the_mean_of_per_batch_values():
    x, y, model = regression()
    rho, m = 0.3, 5
    r = worst_case_sharpness(model, MSE, uneven_batches(x, y), rho=rho, m=m, steps=20, **QUIET)
    assert r.batch_sizes.tolist() == [5, 5, 5, 5, 3]
    w = model.weight.detach().reshape(-1)
    for b, start in enumerate(range(0, 23, m)):
        xb, yb = x[start:start + m], y[start:start + m]
        alone = worst_case_sharpness(model, MSE, [(xb, yb)], rho=rho, steps=20, seed=b, **QUIET)
        assert r.batch_values[b] == pytest.approx(alone.value, rel=1e-12)
        H = 2 * xb.T @ xb / len(xb)  # MSE: L = |x w - y|^2 / n
        g = 2 * xb.T @ (xb @ w - yb.reshape(-1)) / len(xb)
        assert r.batch_values[b] == pytest.approx(trust_region(g, H, rho), rel=1e-5)
    assert r.value == pytest.approx(np.dot(r.batch_values, r.batch_sizes) / 23, rel=1e-12)
    assert r.loss == pytest.approx(mean_loss(model, MSE, [(x, y)]), rel=1e-12)
    full = worst_case_sharpness(model, MSE, uneven_batches(x, y), rho=rho, m=23, steps=20, **QUIET)
    assert full.value == pytest.approx(
        worst_case_sharpness(model, MSE, [(x, y)], rho=rho, steps=20, **QUIET).value, rel=1e-12)
    with pytest.raises(ValueError, match="m must be at most the number of samples"):
        worst_case_sharpness(model, MSE, uneven_batches(x, y), m=24, **QUIET)


def test_m_sharpness_splits_dict_batches():
    x, y, model = regression()

    def loss_fn(model, batch):
        return ((model(batch["x"]) - batch["y"]) ** 2).mean()

    data = [{"x": x[:10], "y": y[:10]}, {"x": x[10:], "y": y[10:]}]
    r = worst_case_sharpness(model, loss_fn, data, rho=0.2, m=8, steps=5, **QUIET)
    s = worst_case_sharpness(model, MSE, uneven_batches(x, y), rho=0.2, m=8, steps=5, **QUIET)
    assert r.batch_sizes.tolist() == [8, 8, 7]
    assert np.allclose(r.batch_values, s.batch_values, rtol=1e-12)


# ----------------------------------------------------------------------------- second order

def test_sharpness_vs_curvature_at_a_minimum():
    A = spd([2.0, 1.0, 0.5, 0.1])
    model = Quadratic(A, w_star(4))
    r = sharpness_vs_curvature(model, quad_loss, DATA, rhos=[0.01, 0.1, 1.0], **QUIET)
    assert r.lambda_max == pytest.approx(2.0, rel=1e-8)
    assert np.allclose(r.prediction, 0.5 * np.array([0.01, 0.1, 1.0]) ** 2 * 2.0, rtol=1e-8)
    assert np.allclose(r.ratio, 1.0, rtol=1e-8)  # exactly quadratic: the picture holds at all rho
    assert r.n_hvp > 0 and r.n_forward > 0


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,match", [
    (dict(rho=0.0), "rho"), (dict(rho=-1.0), "rho"), (dict(norm="l1"), "norm"),
    (dict(steps=0), "steps"), (dict(restarts=0), "restarts"), (dict(m=0), "m must"),
    (dict(adaptive="layer"), "adaptive"), (dict(seed=-1), "seed"),
])
def test_worst_case_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        worst_case_sharpness(mlp(), CE, [classification_data()], **kwargs, **QUIET)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sigma=0.0), "sigma"), (dict(n_samples=1), "n_samples"), (dict(norm="l3"), "norm"),
    (dict(n_samples=5, antithetic=True), "even"),
])
def test_average_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        average_sharpness(mlp(), CE, [classification_data()], **kwargs, **QUIET)


def test_empty_data_is_rejected():
    for m in (None, 4):
        with pytest.raises(ValueError, match="empty"):
            worst_case_sharpness(mlp(), CE, [], m=m, **QUIET)


@pytest.mark.parametrize("failure", ["nan", "raise"])
@pytest.mark.parametrize("fn", [worst_case_sharpness, average_sharpness])
def test_model_restored_when_the_loss_fails_partway(fn, failure):
    check_restored_on_failure(lambda *args: fn(*args, **QUIET), failure)


# ----------------------------------------------------------------------------- two ranks

def _rank_main(rank, path, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        x, y = classification_data(n=23)
        batches = uneven_batches(x, y)
        shard = batches[:1] if rank == 0 else batches[1:]  # 7 and 16 samples
        model = mlp()
        avg = average_sharpness(model, CE, shard, sigma=0.05, n_samples=6, **QUIET)
        worst = worst_case_sharpness(model, CE, shard, rho=0.1, steps=4, **QUIET)
        msharp = worst_case_sharpness(model, CE, shard, rho=0.1, steps=4, m=5, **QUIET)
        torch.save({"avg": avg.value, "stderr": avg.stderr, "worst": worst.value,
                    "m": msharp.value, "m_loss": msharp.loss,
                    "m_batches": torch.as_tensor(msharp.batch_values)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_single_process_result():
    """Full-data values equal one process on all the data; m-sharpness (each rank cuts its own
    shard into batches of m) equals the sample-weighted mean of each shard's m-sharpness."""
    x, y = classification_data(n=23)
    model = mlp()
    avg = average_sharpness(model, CE, [(x, y)], sigma=0.05, n_samples=6, **QUIET)
    worst = worst_case_sharpness(model, CE, [(x, y)], rho=0.1, steps=4, **QUIET)
    batches = uneven_batches(x, y)
    per_shard = [worst_case_sharpness(model, CE, shard, rho=0.1, steps=4, m=5, **QUIET)
                 for shard in (batches[:1], batches[1:])]  # 7 samples: 5 + 2; 16: 5 + 5 + 5 + 1
    msharp = (7 * per_shard[0].value + 16 * per_shard[1].value) / 23
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        spawn(_rank_main, (os.path.join(tmp, "store"), out), timeout=300)
        for rank in range(2):
            got = torch.load(f"{out}.{rank}", weights_only=True)
            assert got["avg"] == pytest.approx(avg.value, rel=1e-8)
            assert got["stderr"] == pytest.approx(avg.stderr, rel=1e-8)
            assert got["worst"] == pytest.approx(worst.value, rel=1e-8)
            assert got["m"] == pytest.approx(msharp, rel=1e-10)
            assert got["m_loss"] == pytest.approx(mean_loss(model, CE, [(x, y)]), rel=1e-10)
            np.testing.assert_allclose(got["m_batches"].numpy(), per_shard[rank].batch_values,
                                       rtol=1e-12)


@pytest.mark.parametrize("adaptive,error", [("Filter", ValueError), (1, ArgumentTypeError),
                                            (0.5, ArgumentTypeError)])
def test_adaptive_is_refused_in_the_one_exception_style(adaptive, error):
    with pytest.raises(error, match="adaptive must be False, True, 'elementwise' or 'filter'"):
        adaptivity(adaptive)
