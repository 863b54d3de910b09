"""ND-Adam against an independent per-vector implementation of the paper's Algorithm 1, Adam for 1-D
parameters, the diagnostics, and the softmax logit regularisers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.oracles import classification_data, mlp

from optim import BNSoftmax, NDAdam, logit_penalty, normalize_vectors_, regularized_cross_entropy

# a linear weight, a conv kernel, a bias, a matrix kept as Adam
SHAPES = [(4, 3), (3, 2, 2), (5,), (2, 3)]


def _fixed(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def _loss(params: list[torch.Tensor]) -> torch.Tensor:
    c, d = _fixed(1), _fixed(2)
    return sum(0.5 * (p * ci).sum() ** 2 + (torch.sin(2.0 * p) * di).sum()
               for p, ci, di in zip(params, c, d))


def _grads(xs):
    xs = [x.detach().requires_grad_() for x in xs]
    return list(torch.autograd.grad(_loss(xs), xs))


ND = [True, True, False, False]   # what the optimizer must do with SHAPES given the groups in _run


def reference_ndadam(steps, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """Algorithm 1 written per vector with explicit loops; Adam (textbook form, L2 decay) for the
    others. Yields (params, per-vector-param mean angle, per-vector-param update/-ḡ cosine) after
    every step."""
    beta1, beta2 = betas
    xs = [x.clone() for x in _fixed(0)]
    ms = [torch.zeros_like(x) for x in xs]
    vs = [torch.zeros(len(x), dtype=x.dtype) if nd else torch.zeros_like(x)
          for x, nd in zip(xs, ND)]
    for t in range(1, steps + 1):
        bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
        angles, cosines = {}, {}
        grads = _grads(xs)
        # the documented start: the first gradient is taken, then the vectors are normalised
        if t == 1:
            for x, nd in zip(xs, ND):
                for r in range(len(x) if nd else 0):
                    x[r] = x[r] / x[r].norm()
        for i, (g, nd) in enumerate(zip(grads, ND)):
            if not nd:
                g = g + weight_decay * xs[i]
                ms[i] = beta1 * ms[i] + (1 - beta1) * g
                vs[i] = beta2 * vs[i] + (1 - beta2) * g * g
                xs[i] = xs[i] - lr * (ms[i] / bc1) / ((vs[i] / bc2).sqrt() + eps)
                continue
            new, row_angles, dot, uu, gg = xs[i].clone(), [], 0.0, 0.0, 0.0
            for r in range(len(xs[i])):
                w, gr = xs[i][r].flatten(), g[r].flatten()
                tangent = gr - (gr @ w) * w
                ms[i][r] = beta1 * ms[i][r] + (1 - beta1) * tangent.view(ms[i][r].shape)
                vs[i][r] = beta2 * vs[i][r] + (1 - beta2) * (tangent @ tangent)
                u = (ms[i][r].flatten() / bc1) / (math.sqrt(vs[i][r] / bc2) + eps)
                w_bar = w - lr * u
                w_new = w_bar / w_bar.norm()
                row_angles.append(math.acos(min(1.0, float(w_new @ w))))
                dot, uu, gg = (dot + float(u @ tangent), uu + float(u @ u),
                               gg + float(tangent @ tangent))
                new[r] = w_new.view(new[r].shape)
            xs[i] = new
            angles[i], cosines[i] = sum(row_angles) / len(row_angles), dot / math.sqrt(uu * gg)
        yield [x.clone() for x in xs], angles, cosines


def _run(steps, foreach=False, lr=1e-2, **kw):
    """NDAdam with the groups of ND; yields (params, angular_step(), update_cosine()) after every
    step."""
    params = [x.clone().requires_grad_() for x in _fixed(0)]
    opt = NDAdam([{"params": params[:3]}, {"params": params[3:], "nd": False}], lr=lr,
                 foreach=foreach, **kw)

    def closure():
        opt.zero_grad()
        loss = _loss(params)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
        yield [p.detach().clone() for p in params], opt.angular_step(), opt.update_cosine()


CONFIGS = {"default": {}, "decay-betas": {"weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-3}}


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_reference_step_by_step(config, foreach):
    for (ours, angles, cosines), (ref, ref_angles, ref_cosines) in zip(
            _run(25, foreach, **CONFIGS[config]), reference_ndadam(25, **CONFIGS[config])):
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        assert angles.keys() == ref_angles.keys() == {0, 1}
        for i in angles:
            assert angles[i] == pytest.approx(ref_angles[i], rel=1e-8, abs=1e-12)
            assert cosines[i] == pytest.approx(ref_cosines[i], rel=1e-8, abs=1e-12)


def test_foreach_and_single_paths_are_identical():
    runs = zip(_run(20, False, weight_decay=0.1), _run(20, True, weight_decay=0.1))
    for (a, an_a, co_a), (b, an_b, co_b) in runs:
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert an_a == an_b and co_a == co_b


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_unit_norms_are_preserved(dtype, tol):
    model = mlp(sizes=(6, 8, 3), dtype=dtype)
    # a conv-shaped vector parameter
    kernel = torch.randn(4, 2, 3, dtype=dtype, requires_grad=True)
    x, y = classification_data(dtype=dtype)
    opt = NDAdam([*model.parameters(), kernel], lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        (F.cross_entropy(model(x), y) + torch.sin(3 * kernel).sum()).backward()
        opt.step()
    for w in (model[0].weight, model[2].weight, kernel):
        norms = w.detach().flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=tol)


@pytest.mark.parametrize("foreach", [False, True])
def test_non_nd_params_follow_torch_adam(foreach):
    """1-D params (automatic) and a 2-D param with nd=False take exactly torch.optim.Adam's
    steps."""
    runs = []
    for make in (lambda ps: NDAdam([{"params": ps[2:3]}, {"params": ps[3:], "nd": False}], lr=1e-2,
                                   weight_decay=0.1, foreach=foreach),
                 lambda ps: torch.optim.Adam(ps[2:], lr=1e-2, weight_decay=0.1, foreach=foreach)):
        params = [x.clone().requires_grad_() for x in _fixed(0)]
        opt = make(params)
        for _ in range(20):
            opt.zero_grad()
            _loss(params).backward()
            opt.step()
        runs.append(params[2:])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_first_step_normalises_and_projection_keeps_direction():
    """Vectors are put on the sphere at their first step; a gradient along w itself (radial) is
    projected away."""
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64, requires_grad=True)
    opt = NDAdam([w], lr=0.1)
    w.grad = 5.0 * w.detach().clone()
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[0.6, 0.8], [0.0, 1.0]],
                                                        dtype=torch.float64))
    # a 1e-16 rounding residue, Adam-scaled
    assert opt.angular_step()[0] == pytest.approx(0.0, abs=1e-7)


def test_normalize_vectors():
    params = [torch.randn(3, 2, 2), torch.randn(4)]
    bias = params[1].clone()
    normalize_vectors_(params)
    torch.testing.assert_close(params[0].flatten(1).norm(dim=1), torch.ones(3))
    assert torch.equal(params[1], bias)


def test_nd_group_key_is_validated():
    with pytest.raises(ValueError, match="nd"):
        NDAdam([{"params": [torch.zeros(3, requires_grad=True)], "nd": True}])
    with pytest.raises(ValueError, match="nd"):
        NDAdam([{"params": [torch.zeros(3, 2, requires_grad=True)], "nd": "yes"}])


def test_step_after_own_backward():
    params = [x.clone().requires_grad_() for x in _fixed(0)]
    opt = NDAdam(params, lr=1e-2)
    _loss(params).backward()
    assert opt.step() is None
    assert opt.angular_step().keys() == {0, 1, 3}


def test_bn_softmax_against_hand_computation():
    torch.manual_seed(0)
    z = torch.randn(8, 3, dtype=torch.float64) * 4 + 1
    layer = BNSoftmax(3, scale=2.5).double()
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    out = layer(z)
    mean, var = z.mean(0), z.var(0, unbiased=False)
    torch.testing.assert_close(out, 2.5 * (z - mean) / torch.sqrt(var + 1e-3) + layer.bias)
    # running statistics as TF's decay 0.9 (PyTorch momentum 0.1) from (0, 1); eval mode uses them
    run_mean, run_var = 0.1 * mean, 0.9 + 0.1 * z.var(0, unbiased=True)
    layer.eval()
    torch.testing.assert_close(layer(z),
                               2.5 * (z - run_mean) / torch.sqrt(run_var + 1e-3) + layer.bias)
    assert not any(p is layer.scale for p in layer.parameters())
    assert [n for n, _ in layer.named_parameters()] == ["bias"]


def test_logit_penalty_and_regularised_loss_against_hand_computation():
    z = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    expected = 1e-3 * 0.5 * ((1 + 4 + 0.25) + (9 + 0 + 1)) / 2
    assert float(logit_penalty(z)) == pytest.approx(expected, rel=1e-15)
    assert float(logit_penalty(z, weight=0.0)) == 0.0
    ce = -(torch.log_softmax(z, 1)[0, 0] + torch.log_softmax(z, 1)[1, 2]) / 2
    assert float(regularized_cross_entropy(z, y)) == pytest.approx(float(ce) + expected, rel=1e-14)


@pytest.mark.parametrize("call,needle", [
    (lambda: logit_penalty(torch.zeros(2, 3), weight=-1.0), "weight"),
    (lambda: logit_penalty(torch.zeros(3)), "logits"),
    (lambda: BNSoftmax(3, scale=0.0), "scale"),
    (lambda: BNSoftmax(0), "num_classes"),
    (lambda: BNSoftmax(3)(torch.zeros(2, 3, 1)), "logits"),
])
def test_logit_regulariser_errors(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def test_zero_vector_is_rejected_before_any_state():
    w = torch.zeros(2, 3, requires_grad=True)
    opt = NDAdam([w])
    w.grad = torch.ones(2, 3)
    with pytest.raises(ValueError, match="all zeros"):
        opt.step()
    assert not any(opt.state.values())   # no half-built state left behind


def test_float16_vector_with_zero_tangent_gradient_stays_finite():
    """A row with a zero gradient has a zero tangent (v = 0): eps = 1e-8 underflows in float16, so
    the update was 0/0. State and arithmetic are float32 for float16 parameters; the row stays
    put."""
    w0 = torch.tensor([[3.0, 4.0, 0.0], [1.0, -2.0, 2.0]])
    out = {}
    for dtype in (torch.float16, torch.float32):
        w = w0.to(dtype).requires_grad_()
        opt = NDAdam([w], lr=0.1)
        for _ in range(3):
            w.grad = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.1, -0.3]], dtype=dtype)
            opt.step()
        assert torch.isfinite(w).all()
        assert all(math.isfinite(v) for v in (*opt.angular_step().values(),
                                              *opt.update_cosine().values()))
        out[dtype] = w.detach().float()
    torch.testing.assert_close(out[torch.float16], out[torch.float32], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out[torch.float16][0], torch.tensor([0.6, 0.8, 0.0]),
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_normalize_vectors_leaves_zero_rows_zero(dtype):
    # row 1's squares underflow float16
    w = torch.tensor([[0.0, 0.0], [3e-4, 4e-4], [3.0, 4.0]], dtype=dtype)
    normalize_vectors_([w])
    want = torch.tensor([[0.0, 0.0], [0.6, 0.8], [0.6, 0.8]], dtype=dtype)
    torch.testing.assert_close(w, want, rtol=1e-3, atol=1e-3)
