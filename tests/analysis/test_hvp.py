"""Hessian-vector products against the exact Hessian (torch.func.hessian) and closed forms."""
import copy

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch import nn
from torch.nn import functional as F

from analysis import HessianOperator, hvp
from tests.oracles import (_flat_loss, assert_unchanged, classification_data, cnn_bn,
                           exact_hessian, mlp, snapshot, uneven_batches)


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def models_and_data():
    x, y = classification_data(n=23, d=12)
    data = uneven_batches(x, y)
    return [(mlp((12, 8, 5, 3)), data), (cnn_bn(12), data)]


def vectors(n, b=3, seed=1):
    return torch.randn(b, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("hvp_method", ["reverse", "forward"])
@pytest.mark.parametrize("case", [0, 1], ids=["mlp", "cnn_bn"])
def test_matvec_and_matmat_match_exact_hessian(case, hvp_method):
    model, data = models_and_data()[case]
    H = exact_hessian(model, ce, data)
    op = HessianOperator(model, ce, data, hvp_method=hvp_method)
    assert op.shape == H.shape
    V = vectors(H.shape[0])
    torch.testing.assert_close(op.matmat(V), V @ H, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matvec(V[0]), H @ V[0], rtol=1e-10, atol=1e-12)
    assert op.n_hvp == 4


def test_uneven_batches_are_weighted_by_sample_count():
    model, data = models_and_data()[0]
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    v = vectors(sum(p.numel() for p in model.parameters()), 1)[0]
    with torch.no_grad():  # works inside a caller's no_grad block too
        one_batch = hvp(model, ce, [(x, y)], v)
    torch.testing.assert_close(hvp(model, ce, data, v), one_batch, rtol=1e-10, atol=1e-12)


def test_train_mode_uses_batch_statistics_and_restores_buffers():
    model, data = models_and_data()[1]
    snap = snapshot(model)
    # Oracle: torch.autograd.functional.hessian on a copy whose BatchNorm uses batch statistics
    # without updating running stats. (torch.func transforms, which exact_hessian uses, give a
    # different, wrong Hessian for train-mode batch_norm in torch 2.13: finite differences of
    # the gradient agree with autograd and with us.)
    reference = copy.deepcopy(model).train()
    reference.bn.track_running_stats = False
    names = [n for n, _ in reference.named_parameters()]
    f, theta = _flat_loss(reference, ce, data, names, list(reference.parameters()))
    H = torch.autograd.functional.hessian(f, theta)
    v = vectors(H.shape[0], 1)[0]
    out = hvp(model, ce, data, v, model_mode="train")
    torch.testing.assert_close(out, H @ v, rtol=1e-10, atol=1e-12)
    eps = 1e-5  # central differences of the gradient: error O(eps^2)
    fd = (torch.func.grad(f)(theta + eps * v) - torch.func.grad(f)(theta - eps * v)) / (2 * eps)
    torch.testing.assert_close(out, fd, rtol=1e-6, atol=1e-8)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("select", ["names", "predicate"])
def test_param_subset_is_a_block_of_the_full_hessian(select):
    model, data = models_and_data()[1]
    names = [n for n, _ in model.named_parameters()]
    H = exact_hessian(model, ce, data)
    chosen = ["conv.weight", "fc.bias"]
    params = chosen if select == "names" else (lambda n, p: n in chosen)
    sizes = [p.numel() for p in model.parameters()]
    offsets = np.cumsum([0] + sizes)
    idx = torch.cat([torch.arange(offsets[i], offsets[i + 1])
                     for i, n in enumerate(names) if n in chosen])
    op = HessianOperator(model, ce, data, params=params)
    assert op.names == chosen
    V = vectors(len(idx))
    torch.testing.assert_close(op.matmat(V), V @ H[idx][:, idx], rtol=1e-10, atol=1e-12)


def test_single_batch_graph_is_reused_inside_a_with_block():
    model, data = models_and_data()[0]
    batch = [(torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data]))]
    calls = []

    def counting(model, batch):
        calls.append(1)
        return ce(model, batch)

    H = exact_hessian(model, ce, batch)
    V = vectors(H.shape[0], 4)
    snap = snapshot(model)
    with HessianOperator(model, counting, batch, check_deterministic=False) as op:
        out = torch.stack([op.matvec(v) for v in V])
        assert not model.training  # analysis mode (eval) inside the block
    torch.testing.assert_close(out, V @ H, rtol=1e-10, atol=1e-12)
    assert len(calls) == 1
    assert_unchanged(model, snap)


class WithUnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp((12, 6, 3), seed=3)
        self.head = nn.Linear(3, 2).double()  # never used by forward

    def forward(self, x):
        return self.body(x)


def test_parameters_without_gradient_give_zero_rows():
    model = WithUnusedHead()
    x, y = classification_data(n=23, d=12)
    data = uneven_batches(x, y)
    H = exact_hessian(model, ce, data)
    V = vectors(H.shape[0])
    out = HessianOperator(model, ce, data).matmat(V)
    torch.testing.assert_close(out, V @ H, rtol=1e-10, atol=1e-12)
    assert out[:, -8:].abs().max() == 0


def test_closed_forms_least_squares_and_logistic_regression():
    x, y = classification_data(n=23, d=5)
    ones = torch.eye(5, dtype=torch.float64)
    # MSE with mean over N * D_out: H = 2 / (N D_out) * I_{D_out} kron X^T X
    lin = nn.Linear(5, 3, bias=False).double()
    target = torch.randn(23, 3, dtype=torch.float64)
    def mse(m, b):
        return F.mse_loss(m(b[0]), b[1])
    H = HessianOperator(lin, mse, uneven_batches(x, target)).matmat(torch.eye(15).double())
    torch.testing.assert_close(H, torch.kron(torch.eye(3).double(), 2 * x.T @ x / 69),
                               rtol=1e-10, atol=1e-12)
    # binary logistic regression: H = X^T diag(s (1 - s)) X / N
    log = nn.Linear(5, 1, bias=False).double()
    labels = (y > 0).double()
    def bce(m, b):
        return F.binary_cross_entropy_with_logits(m(b[0]).squeeze(1), b[1])
    H = HessianOperator(log, bce, uneven_batches(x, labels)).matmat(ones)
    s = torch.sigmoid(log(x).squeeze(1)).detach()
    torch.testing.assert_close(H, x.T @ (x * (s * (1 - s))[:, None]) / 23, rtol=1e-10, atol=1e-12)


def test_to_scipy_gives_float64_numpy_and_works_with_eigsh():
    model, data = models_and_data()[0]
    H = exact_hessian(model, ce, data)
    lo = HessianOperator(model, ce, data).to_scipy()
    x = np.random.default_rng(0).standard_normal(H.shape[0])
    out = lo.matvec(x)
    assert out.dtype == np.float64 and out.shape == x.shape
    np.testing.assert_allclose(out, H.numpy() @ x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lo.matmat(np.stack([x, 2 * x], 1))[:, 1], 2 * out, rtol=1e-12)
    top = sla.eigsh(lo, k=1, which="LA", tol=1e-10)[0][0]
    assert top == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-8)


def test_float32_model():
    model, data = models_and_data()[0]
    H = exact_hessian(model, ce, data)
    data32 = [(x.float(), y) for x, y in data]
    v = vectors(H.shape[0], 1)[0]
    out = hvp(model.float(), ce, data32, v.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), H @ v, rtol=1e-4, atol=1e-5)


def test_model_is_restored_after_calls_and_after_errors():
    model, data = models_and_data()[1]
    model.train()
    ce(model, data[0]).backward()  # the user's grads must survive
    model.conv.bias.requires_grad_(False)
    snap = snapshot(model)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    op = HessianOperator(model, ce, data)
    op.matvec(vectors(n, 1)[0])
    assert_unchanged(model, snap)  # restored between calls: not left in eval mode
    with op:
        op.matvec(vectors(n, 1)[0])
    assert_unchanged(model, snap)

    def raising(model, batch, count=[]):
        count.append(1)
        if len(count) == 3:
            raise RuntimeError("boom")
        return ce(model, batch)

    with pytest.raises(RuntimeError, match="boom"):
        HessianOperator(model, raising, data).matvec(vectors(n, 1)[0])
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="non-finite"):
        hvp(model, lambda m, b: ce(m, b) * float("nan"), data, vectors(n, 1)[0])
    assert_unchanged(model, snap)


def test_bad_input_is_rejected_with_clear_errors():
    model, data = models_and_data()[0]
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="scalar"):
        hvp(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), data,
            torch.zeros(n, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"shape \\[b, {n}\\]"):
        hvp(model, ce, data, torch.zeros(n + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        hvp(model, ce, [], torch.zeros(n, dtype=torch.float64))
    with pytest.raises(ValueError, match="hvp_method"):
        HessianOperator(model, ce, data, hvp_method="finite")
    with pytest.raises(ValueError, match="model_mode"):
        HessianOperator(model, ce, data, model_mode="test")
    with pytest.raises(ValueError, match="forward"):
        HessianOperator(cnn_bn(), ce, data, model_mode="train", hvp_method="forward")
