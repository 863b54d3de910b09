"""Third-party architectures (Hugging Face transformers, built from tiny configs with random
weights; nothing is downloaded): GPT-2 (tied embeddings, dropout, SDPA attention), a BERT
encoder on dict batches with padding, ViT and ResNet (BatchNorm).

Every analysed model uses the SDPA attention (the Hugging Face default); the references are
exact and computed on an eager-attention copy with the same weights, in float64: ARPACK's top
eigenvalues at rounding level, the dense Hessian and gradient of a block of parameters (double
backward row by row through autograd; ``torch.func.hessian`` is not used: on these models it
returns a non-symmetric matrix), direct evaluations at the perturbed weights, and the
second-order model of the loss for the sharpness measures.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

transformers = pytest.importorskip("transformers")

import analysis  # noqa: E402
from analysis import (Tracker, average_sharpness, full_grad_norm, hessian_trace, hvp,  # noqa: E402
                      keskar_sharpness, mean_loss, pac_bayes_sigma, spectral_density,
                      supervised, top_eigenvalues, worst_case_sharpness)
from analysis.core import default_batch_size  # noqa: E402
from landscape import interpolate, line, plane, random_direction  # noqa: E402
from optim import AGD, SALA, WSAM, AdaSAM, NDAdam  # noqa: E402

from tests.oracles import assert_unchanged, exact_grad, mlp, snapshot  # noqa: E402

transformers.logging.set_verbosity_error()
ARCHS = ("gpt2", "bert", "vit", "resnet")
RTOL = 1e-6  # agreement with the eager copy: HF's eager attention takes its softmax in float32


def hf_loss(model, batch):
    return model(**batch).loss


def lm_loss64(model, batch):
    """GPT-2's causal-LM loss in the model's dtype (HF's own ``.loss`` is float32 always)."""
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten())


def _labels(n, classes, gen):
    return torch.randint(0, classes, (n,), generator=gen)


def build(arch: str, *, attn: str = "sdpa", seed: int = 0, dtype=torch.float64, **extra):
    """(model in eval mode, two uneven batches) of a tiny random ``arch``."""
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config,
                              GPT2LMHeadModel, ResNetConfig, ResNetForImageClassification,
                              ViTConfig, ViTForImageClassification)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(100)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                         bos_token_id=0, eos_token_id=0, attn_implementation=attn, **extra)
        model = GPT2LMHeadModel(cfg)
        ids = [torch.randint(0, 16, (n, 6), generator=gen) for n in (3, 2)]
        data = [{"input_ids": i, "labels": i} for i in ids]
    elif arch == "bert":
        cfg = BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=8, num_labels=3,
                         attn_implementation=attn)
        model = BertForSequenceClassification(cfg)
        data = []
        for n in (3, 2):
            mask = torch.ones(n, 6, dtype=torch.long)
            mask[0, 4:] = 0  # padding
            data.append({"input_ids": torch.randint(0, 16, (n, 6), generator=gen),
                         "attention_mask": mask,
                         "token_type_ids": torch.zeros(n, 6, dtype=torch.long),
                         "labels": _labels(n, 3, gen)})
    elif arch == "vit":
        cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=8,
                        num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                        num_labels=3, attn_implementation=attn)
        model = ViTForImageClassification(cfg)
        data = [{"pixel_values": torch.randn(n, 1, 8, 8, generator=gen),
                 "labels": _labels(n, 3, gen)}
                for n in (3, 2)]
    else:
        cfg = ResNetConfig(num_channels=1, embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1],
                           layer_type="basic", num_labels=3)
        model = ResNetForImageClassification(cfg)
        data = [{"pixel_values": torch.randn(n, 1, 16, 16, generator=gen),
                 "labels": _labels(n, 3, gen)}
                for n in (3, 2)]
        model.train()
        with torch.no_grad():  # running statistics away from their initial 0 / 1
            for batch in data:
                model(**batch)
    model = model.to(dtype).eval()
    data = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in b.items()} for b in data]
    return model, data


def eager_copy(arch, model):
    ref, _ = build(arch, attn="eager")
    ref.load_state_dict(model.state_dict())
    return ref


def state(model):
    """The snapshot of oracles plus the tied weight's identity."""
    snap = snapshot(model)
    snap["tied"] = tied(model)
    return snap


def tied(model):
    out = getattr(model, "lm_head", None)
    return None if out is None else out.weight is model.transformer.wte.weight


def assert_state(model, snap):
    assert_unchanged(model, snap)
    assert tied(model) == snap["tied"]


def loss_at(model, loss_fn, data, weights):
    """Sample-weighted mean loss of a copy of ``model`` holding ``weights`` (a direct oracle)."""
    model = copy.deepcopy(model)
    targets = model.state_dict(keep_vars=True)  # tied weights under each of their names
    sizes = [len(b["labels"]) for b in data]
    with torch.no_grad():
        for name, w in weights.items():
            targets[name].copy_(w)
        return sum(float(loss_fn(model, b)) * n for b, n in zip(data, sizes)) / sum(sizes)


def dense_block(model, loss_fn, data, names):
    """Dense Hessian and gradient of the sample-weighted mean loss w.r.t. the parameters
    ``names``: one double backward per row, straight through PyTorch's autograd."""
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    sizes = [len(b["labels"]) for b in data]
    loss = sum(loss_fn(model, b) * n for b, n in zip(data, sizes)) / sum(sizes)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(gi, params, retain_graph=True)])
            for gi in g]
    return torch.stack(rows).detach().double().numpy(), g.detach().double().numpy()


class Case:
    """A model (SDPA attention), its data, and the references of an eager copy: the top
    eigenvalues by ARPACK at rounding level, and the dense Hessian and gradient of a block of
    trailing parameters (at most 60 elements)."""

    def __init__(self, arch):
        self.arch = arch
        self.model, self.data = build(arch)
        self.ref = eager_copy(arch, self.model)
        named = list(self.model.named_parameters())
        sizes = np.array([p.numel() for _, p in named])
        first = next(i for i in range(len(sizes)) if sizes[i:].sum() <= 60)
        self.block = [n for n, _ in named[first:]]
        self.loss = lm_loss64 if arch == "gpt2" else hf_loss
        self.H, self.g = dense_block(self.ref, self.loss, self.data, self.block)
        self.lam = np.linalg.eigvalsh(self.H)
        op = analysis.HessianOperator(self.ref, self.loss, self.data)
        with op:
            top = eigsh(op.to_scipy(), k=2, which="LA", tol=1e-12, return_eigenvectors=False)
        self.top = np.sort(top)[::-1]


@pytest.fixture(scope="module", params=ARCHS)
def case(request):
    return Case(request.param)


def test_curvature_equals_exact_references(case):
    model, data, block, loss = case.model, case.data, case.block, case.loss
    snap = state(model)
    res = top_eigenvalues(model, loss, data, k=2, progress=False)
    assert res.converged
    np.testing.assert_allclose(res.eigenvalues, case.top, rtol=RTOL)
    assert_state(model, snap)
    scale = np.abs(case.lam).max()
    for which, expected in (("LA", case.lam[::-1][:2]), ("SA", case.lam[:2])):
        res = top_eigenvalues(model, loss, data, k=2, which=which, params=block, progress=False)
        np.testing.assert_allclose(res.eigenvalues, expected, rtol=RTOL, atol=RTOL * scale)
    n = len(case.g)
    tr = hessian_trace(model, loss, data, n_hvp=3 * n, params=block, progress=False)
    assert 0 < tr.stderr < 1e-12 * abs(tr.estimate)   # exact: only the rounding floor
    assert tr.estimate == pytest.approx(np.trace(case.H), rel=RTOL, abs=RTOL * scale)
    assert_state(model, snap)
    dens = spectral_density(model, loss, data, n_lanczos=n, n_vectors=1, params=block,
                            progress=False)
    np.testing.assert_allclose(np.sort(dens.nodes[0]), case.lam, atol=RTOL * scale)
    full = spectral_density(model, loss, data, n_lanczos=8, n_vectors=1, progress=False)
    assert full.nodes.max() <= case.top[0] * (1 + 1e-6)  # Ritz values interlace
    assert_state(model, snap)
    v = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for method in ("reverse", "forward"):
        out = hvp(model, loss, data, v, params=block, hvp_method=method).numpy()
        np.testing.assert_allclose(out, case.H @ v.numpy(), rtol=RTOL, atol=RTOL * scale)
    assert_state(model, snap)


def _trust_region_max(g, H, rho):
    """max over ||d|| <= rho of g.d + d.H.d / 2 (the boundary solution d = (mu - H)^-1 g)."""
    lam, Q = np.linalg.eigh(H)
    c = Q.T @ g
    lo, hi = lam[-1] + 1e-12, lam[-1] + np.linalg.norm(g) / rho + 1.0
    for _ in range(200):  # ||d(mu)|| decreases in mu > lambda_max
        mu = 0.5 * (lo + hi)
        lo, hi = (mu, hi) if np.linalg.norm(c / (mu - lam)) > rho else (lo, mu)
    d = c / (hi - lam)
    return float(c @ d + 0.5 * d @ (lam * d))


def test_sharpness_equals_second_order_model(case):
    model, data, loss = case.model, case.data, case.loss
    snap = state(model)
    rho, block = 1e-3, case.block
    worst = worst_case_sharpness(model, loss, data, rho=rho, steps=5, params=block,
                                 progress=False)
    assert worst.value >= worst.sam_value - 1e-12 and worst.delta_norm <= rho * (1 + 1e-9)
    assert worst.value == pytest.approx(_trust_region_max(case.g, case.H, rho), rel=2e-3)
    assert_state(model, snap)
    sigma, pairs = 1e-4, 4
    avg = average_sharpness(model, loss, data, sigma=sigma, n_samples=2 * pairs, seed=5,
                            antithetic=True, params=block, progress=False)
    gen = torch.Generator().manual_seed(5)  # the routine's draws, one standard normal per pair
    deltas = [sigma * torch.randn(len(case.g), generator=gen, dtype=torch.float64).numpy()
              for _ in range(pairs)]
    expected = np.array([0.5 * d @ case.H @ d for d in deltas])
    np.testing.assert_allclose(avg.samples, expected, rtol=1e-3)
    assert_state(model, snap)


def test_plane_and_interpolation_equal_direct_evaluation(case):
    model, data, loss = case.model, case.data, case.loss
    snap = state(model)
    d1, d2 = random_direction(model, seed=1), random_direction(model, seed=2)
    xs, ys = np.array([-0.2, 0.1]), np.array([0.15])
    res = plane(model, loss, data, d1, d2, xs, ys, progress=False)
    w = dict(model.named_parameters())
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            point = {n: w[n].detach() + x * d1[n] + y * d2[n] for n in d1}
            assert res.losses[i, j] == pytest.approx(loss_at(case.ref, loss, data, point),
                                                     rel=1e-10)
    assert_state(model, snap)
    other, _ = build(case.arch, seed=1)
    alphas = np.array([0.3, 0.7])
    res = interpolate(model, other, loss, data, alphas, progress=False)
    a, b = model.state_dict(), other.state_dict()
    for alpha, value in zip(alphas, res.losses):
        point = {n: (1 - alpha) * a[n] + alpha * b[n] for n in a if a[n].is_floating_point()}
        assert value == pytest.approx(loss_at(case.ref, loss, data, point), rel=1e-10)
    chord = (1 - alphas) * res.loss_a + alphas * res.loss_b
    assert res.barrier == pytest.approx(np.max(res.losses - chord), rel=1e-12)
    assert_state(model, snap)


def _nd_groups(params):
    """ND-Adam's unit-vector constraint where every weight vector is nonzero (an embedding's
    padding row is zero: that tensor gets plain Adam)."""
    params = list(params)
    zero = [p for p in params
            if p.dim() >= 2 and bool((p.detach().flatten(1).norm(dim=1) == 0).any())]
    return [{"params": [p for p in params if all(p is not z for z in zero)]},
            {"params": zero, "nd": False}]


OPTIMIZERS = {
    "AGD": lambda ps, m: AGD(ps, lr=1e-3),
    "WSAM": lambda ps, m: WSAM(torch.optim.SGD(ps, lr=1e-2), rho=0.01, model=m),
    "NDAdam": lambda ps, m: NDAdam(_nd_groups(ps), lr=1e-3),
    "AdaSAM": lambda ps, m: AdaSAM(ps, lr=1e-3, rho=0.01, model=m),
    "SALA": lambda ps, m: SALA(torch.optim.SGD(ps, lr=1e-2), k=2, rho=0.01, model=m),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_tracker_steps_under_each_optimizer(arch):
    base, data = build(arch)
    for name, make in OPTIMIZERS.items():
        model = copy.deepcopy(base).train()  # GPT-2: dropout on in training
        opt = make(model.parameters(), model)
        tracker = Tracker(model, hf_loss, every=2, eval_data=data, curvature_data=data[:1],
                          lambda_max=True, grad_norm=True, lanczos_max_hvp=8)
        for step in range(2):
            batch = data[step % 2]

            def closure():
                opt.zero_grad()
                loss = hf_loss(model, batch)
                loss.backward()
                return loss
            loss = opt.step(tracker.count(closure))
            rec = tracker.step(opt, loss)
        assert tied(model) == (True if arch == "gpt2" else None), name
        assert model.training, name
        model.eval()
        # (GPT-2's HF loss is float32: sums in float32 and float64 differ at rounding level)
        assert rec["train_loss"] == pytest.approx(mean_loss(model, hf_loss, data), rel=1e-6), name
        assert np.isnan(rec["train_acc"]) == (arch == "gpt2"), name  # none for shifted LM labels
        if arch != "gpt2":
            hits = sum(float((model(**b).logits.argmax(-1) == b["labels"]).sum()) for b in data)
            assert rec["train_acc"] == pytest.approx(hits / 5), name
        grad = exact_grad(model, hf_loss, data[:1])
        assert rec["grad_norm"] == pytest.approx(float(grad.norm()), rel=1e-9), name
        assert np.isfinite(rec["lambda_max"]), name


def test_tracker_eval_fn_is_sample_weighted():
    model, data = build("gpt2")

    def eval_fn(model, batch):
        loss = model(**batch).loss
        return {"loss": loss, "ppl": torch.exp(loss), "tokens": float(batch["input_ids"].numel())}

    tracker = Tracker(model, hf_loss, every=1, eval_data=data, test_data=data[1:], eval_fn=eval_fn)
    rec = tracker.log()
    with torch.no_grad():
        ppl = [float(torch.exp(hf_loss(model, b))) for b in data]
    assert rec["train_ppl"] == pytest.approx((3 * ppl[0] + 2 * ppl[1]) / 5, rel=1e-12)
    assert rec["train_tokens"] == pytest.approx((3 * 18 + 2 * 12) / 5)
    assert rec["test_ppl"] == pytest.approx(ppl[1], rel=1e-12)
    bad = Tracker(model, hf_loss, eval_data=data, eval_fn=lambda m, b: {"n": len(b["labels"])}
                  if len(b["labels"]) == 3 else {"m": 1.0})
    with pytest.raises(ValueError, match="same metrics"):
        bad.log()


def test_bf16_gpt2_agrees_with_its_float32_copy():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                     eos_token_id=0)
    low = GPT2LMHeadModel(cfg).to(torch.bfloat16).eval()
    high = GPT2LMHeadModel(cfg).eval()
    high.load_state_dict(low.state_dict())  # the same (bf16-representable) weights
    ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": ids, "labels": ids}]
    assert hf_loss(low, data[0]).dtype == torch.float32  # HF upcasts: loss dtype != params'
    snap = state(low)
    ref = top_eigenvalues(high, hf_loss, data, k=2, progress=False)
    with pytest.warns(RuntimeWarning, match="bfloat16"):
        strict = top_eigenvalues(low, hf_loss, data, k=2, progress=False)  # tol=1e-6: unattainable
    assert not strict.converged
    loose = top_eigenvalues(low, hf_loss, data, k=2, tol=3e-2, progress=False)
    for res in (strict, loose):
        np.testing.assert_allclose(res.eigenvalues, ref.eigenvalues, rtol=1e-2)
    assert loose.converged and np.all(loose.residuals <= 3e-2 * np.abs(loose.eigenvalues))
    assert_state(low, snap)
    block = ["transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.weight", "transformer.ln_f.bias"]
    t_low, t_high = (hessian_trace(m, hf_loss, data, n_hvp=3 * 48, params=block,
                                   progress=False).estimate for m in (low, high))  # exact
    assert t_low == pytest.approx(t_high, rel=3e-2)  # the bf16 products themselves: 1.6 %
    d_low, d_high = (spectral_density(m, hf_loss, data, n_lanczos=12, n_vectors=1,
                                      progress=False).nodes.max() for m in (low, high))
    assert d_low == pytest.approx(d_high, rel=1e-2)
    d1, d2 = random_direction(low, seed=1), random_direction(low, seed=2)
    surfaces = [plane(m, hf_loss, data, d1, d2, [0.0, 0.5], [0.25], progress=False).losses
                for m in (low, high)]
    np.testing.assert_allclose(*surfaces, rtol=2e-2)
    other = GPT2LMHeadModel(cfg).to(torch.bfloat16).eval()
    res = interpolate(low, other, hf_loss, data, [0.5], progress=False)
    assert np.isfinite(res.losses).all() and res.loss_a == pytest.approx(surfaces[1][0, 0],
                                                                         rel=2e-2)
    assert np.isfinite(line(low, hf_loss, data, d1, [0.5], progress=False).losses).all()
    assert worst_case_sharpness(low, hf_loss, data, rho=0.05, steps=2, progress=False).value >= 0
    assert np.isfinite(average_sharpness(low, hf_loss, data, n_samples=2, progress=False).value)
    assert_state(low, snap)


def test_loss_dtype_may_differ_from_the_parameters():
    model = mlp()
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    data = [(x[:5], torch.arange(5) % 3), (x[5:], torch.arange(4) % 3)]
    ce = nn.CrossEntropyLoss()

    def loss32(model, batch):
        return ce(model(batch[0]).float(), batch[1])

    snap = snapshot(model)
    d = random_direction(model, seed=0)
    res = line(model, loss32, data, d, [0.0, 0.5], progress=False)
    assert res.losses[0] == pytest.approx(mean_loss(model, loss32, data), rel=1e-6)
    assert plane(model, loss32, data, d, d, [0.1], [0.2], progress=False).losses[0, 0] == \
        pytest.approx(line(model, loss32, data, d, [0.3], progress=False).losses[0], rel=1e-6)
    assert np.isfinite(interpolate(model, mlp(seed=1), loss32, data, [0.5], progress=False).barrier)
    assert worst_case_sharpness(model, loss32, data, rho=0.01, steps=2, progress=False).value >= 0
    assert np.isfinite(average_sharpness(model, loss32, data, n_samples=2, progress=False).value)
    assert np.isfinite(keskar_sharpness(model, loss32, data, max_iter=2, progress=False).value)
    assert pac_bayes_sigma(model, loss32, data, n_samples=2, max_iter=3, progress=False).sigma > 0
    assert_unchanged(model, snap)


def test_sdpa_products_use_the_math_backend_and_restore_the_setting():
    model, data = build("gpt2")
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # the user's choice: flash only
        out = hvp(model, lm_loss64, data, v)          # flash has no double backward: math inside
        assert torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.math_sdp_enabled()
        with pytest.raises(RuntimeError):  # outside the products, the user's setting holds
            torch.autograd.grad(torch.autograd.grad(hf_loss(model, data[0]),
                                                    model.transformer.h[0].attn.c_attn.weight,
                                                    create_graph=True)[0].sum(),
                                model.transformer.h[0].attn.c_attn.weight)
    ref = eager_copy("gpt2", model)
    np.testing.assert_allclose(out.numpy(), hvp(ref, lm_loss64, data, v).numpy(), rtol=1e-9,
                               atol=1e-12)


def test_op_without_double_backward_is_named():
    class Distances(nn.Module):
        def __init__(self):
            super().__init__()
            self.centres = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))

        def forward(self, x):
            return -torch.cdist(x, self.centres)

    x = torch.randn(5, 3, dtype=torch.float64)
    data = [(x, torch.arange(5) % 4)]
    loss = supervised(nn.CrossEntropyLoss())
    with pytest.raises(NotImplementedError,
                       match="_cdist_backward has no second derivative.*params="):
        top_eigenvalues(Distances(), loss, data, progress=False)
    assert worst_case_sharpness(Distances(), loss, data, steps=2, progress=False).value >= 0


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None):
        super().__init__()
        self.net, self.reentrant = mlp(), reentrant

    def forward(self, x):
        hidden = self.net[:2]
        h = hidden(x) if self.reentrant is None else \
            checkpoint(hidden, x, use_reentrant=self.reentrant)
        return self.net[2:](h)


def test_activation_checkpointing_is_exact_or_refused():
    x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    data = [(x, torch.arange(7) % 3)]
    loss = supervised(nn.CrossEntropyLoss())
    plain, ok, bad = Checkpointed(None), Checkpointed(False), Checkpointed(True)
    v = torch.randn(sum(p.numel() for p in plain.parameters()), dtype=torch.float64)
    for mode in ("eval", "train"):
        assert torch.equal(hvp(ok, loss, data, v, model_mode=mode), hvp(plain, loss, data, v))
    assert full_grad_norm(ok, loss, data) == full_grad_norm(plain, loss, data)
    with pytest.raises(RuntimeError, match="hvp_method=\"reverse\""):
        hvp(ok, loss, data, v, hvp_method="forward")
    for call in (lambda: hvp(bad, loss, data, v), lambda: full_grad_norm(bad, loss, data),
                 lambda: worst_case_sharpness(bad, loss, data, steps=1, progress=False)):
        with pytest.raises(RuntimeError, match="use_reentrant=False"):
            call()
    # Hugging Face: checkpointing is active in train mode only (dropout off for determinism)
    model, data = build("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    reference = hvp(model, hf_loss, data, v, model_mode="train")
    in_eval = hvp(model, hf_loss, data, v)
    model.gradient_checkpointing_enable()
    np.testing.assert_allclose(hvp(model, hf_loss, data, v, model_mode="train").numpy(),
                               reference.numpy(), rtol=1e-12, atol=1e-14)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        hvp(model, hf_loss, data, v, model_mode="train")
    assert torch.equal(hvp(model, hf_loss, data, v), in_eval)  # eval mode: no checkpointing


def test_compiled_module_is_unwrapped_or_refused():
    model = mlp()
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    data = [(x, torch.arange(8) % 3)]
    loss = supervised(nn.CrossEntropyLoss())
    compiled = torch.compile(model)
    with pytest.warns(UserWarning, match=r"torch.compile'd module: analysing model._orig_mod"):
        res = top_eigenvalues(compiled, loss, data, k=1, progress=False)
    assert res.names == [n for n, _ in model.named_parameters()]
    assert res.eigenvalues[0] == pytest.approx(
        top_eigenvalues(model, loss, data, k=1, progress=False).eigenvalues[0], rel=1e-12)
    with pytest.warns(UserWarning, match="model_b._orig_mod"):
        interpolate(model, torch.compile(mlp(seed=1)), loss, data, [0.5], progress=False)
    with pytest.raises(TypeError, match=r"pass model._orig_mod"):
        analysis.preserved(compiled).__enter__()


def test_default_sample_count_of_nested_batches():
    ids = torch.zeros(5, 7, dtype=torch.long)
    assert default_batch_size(({"input_ids": ids, "mask": ids}, torch.zeros(5))) == 5
    assert default_batch_size([[torch.zeros(4, 2)], {"y": torch.zeros(4)}, torch.tensor(1.0)]) == 4
    with pytest.raises(ValueError, match="batch_size_fn"):
        default_batch_size(({"input_ids": ids}, torch.zeros(3)))
    with pytest.raises(ValueError, match="batch_size_fn"):
        default_batch_size({"text": ["a", "b"]})
    # weighting: uneven dict batches give the loss of the whole data set in one batch
    model, data = build("bert")
    whole = [{k: torch.cat([b[k] for b in data]) for k in data[0]}]
    nested = [(b, b["labels"]) for b in data]
    assert mean_loss(model, lambda m, b: hf_loss(m, b[0]), nested) == \
        pytest.approx(mean_loss(model, hf_loss, whole), rel=1e-12)


def test_full_grad_norm_with_an_unused_parameter():
    model = mlp()
    model.register_parameter("unused", nn.Parameter(torch.ones(3, dtype=torch.float64)))
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    data = [(x[:5], torch.arange(5) % 3), (x[5:], torch.arange(3) % 3)]
    loss = supervised(nn.CrossEntropyLoss())
    names = [n for n, _ in model.named_parameters() if n != "unused"]
    expected = float(exact_grad(model, loss, data, names).norm())
    assert full_grad_norm(model, loss, data) == pytest.approx(expected, rel=1e-12)


def test_interpolate_ignores_non_persistent_buffers():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8)
    torch.manual_seed(0)
    a, b = LlamaForCausalLM(cfg).double().eval(), LlamaForCausalLM(cfg).double().eval()
    assert any("inv_freq" in n for n, _ in a.named_buffers()) and \
        not any("inv_freq" in n for n in a.state_dict())
    ids = torch.randint(0, 16, (3, 6), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids, "labels": ids}]
    snap = snapshot(a)
    res = interpolate(a, b, hf_loss, data, [0.5], progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    middle = {n: (sa[n] + sb[n]) / 2 for n in sa}
    assert res.losses[0] == pytest.approx(loss_at(a, hf_loss, data, middle), rel=1e-6)
    assert_unchanged(a, snap)
    gpt2, _ = build("gpt2")
    with pytest.raises(ValueError, match="model_b lacks tensors of the model"):
        interpolate(a, gpt2, hf_loss, data, [0.5], progress=False)


def test_forward_hvp_treats_embedding_padding_rows_as_constants():
    model, data = build("bert")  # word embeddings with padding_idx=0: PyTorch gives row 0 no grad
    assert model.bert.embeddings.word_embeddings.padding_idx == 0
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    reverse, forward = (hvp(model, hf_loss, data, v, hvp_method=m) for m in ("reverse", "forward"))
    np.testing.assert_allclose(forward.numpy(), reverse.numpy(), rtol=1e-10, atol=1e-12)


def test_lanczos_basis_capped_by_memory(monkeypatch):
    import analysis.lanczos as lanczos
    model, data = build("vit")
    n = sum(p.numel() for p in model.parameters())
    full = top_eigenvalues(model, hf_loss, data, k=2, progress=False)
    monkeypatch.setattr(lanczos, "BASIS_BYTES", 6 * n * 8)  # six float64 vectors: restarts
    capped = top_eigenvalues(model, hf_loss, data, k=2, progress=False)
    assert capped.converged and capped.n_hvp > full.n_hvp
    np.testing.assert_allclose(capped.eigenvalues, full.eigenvalues, rtol=1e-6)
