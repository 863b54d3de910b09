"""A causal LM's curvature products computed chunk by chunk over the tokens equal the unchunked.

``analysis.core.loss_ce.CHUNK_BYTES`` is set to a few rows of logits, so that the chunks split
sequences unevenly (21 tokens in chunks of 4 or 5); the values must equal autograd's unchunked
products to rounding, and the chunked path must have been taken.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import analysis.core.loss_ce as loss_ce
from analysis import FisherOperator, GGNOperator, HessianOperator, split_loss, supervised

VOCAB, SEQS, TOKENS = 50, 3, 7


class TinyLM(nn.Module):
    """Embedding, a tanh mixing layer over the causal prefix mean, a head (tied or biased)."""

    def __init__(self, tied: bool, bias: bool | None = None):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, VOCAB, bias=not tied if bias is None else bias)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        e = self.emb(ids)
        prefix = e.cumsum(1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)
        return self.head(torch.tanh(self.mix(prefix))).flatten(0, 1)  # [N T, V]


def problem(tied: bool, bias: bool | None = None, model_cls=TinyLM):
    torch.manual_seed(0)
    model = model_cls(tied, bias).double()
    ids = torch.randint(0, VOCAB, (SEQS, TOKENS))
    labels = torch.cat([ids[:, 1:], torch.full((SEQS, 1), -100)], 1).flatten()
    labels[3] = -100  # an ignored target inside a sequence
    labels[-1] = 0  # the last row observed (its chunk counts)
    return model, [(ids, labels)]


def seqs(batch):
    return len(batch[0])


def dense(op):
    return op.matmat(torch.eye(op.shape[0], dtype=torch.float64))


@pytest.fixture
def spied(monkeypatch):
    """Chunks of 4 or 5 rows of logits, and a count of the chunked second derivatives."""
    calls = []
    grad = loss_ce._LinearCrossEntropyGrad
    backward = grad.backward

    def counted(ctx, *args):
        calls.append(1)
        return backward(ctx, *args)

    monkeypatch.setattr(grad, "backward", staticmethod(counted))
    return calls


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_hessian_equals_autograd(spied, monkeypatch, tied, reduction):
    model, data = problem(tied)
    loss = supervised(nn.CrossEntropyLoss(reduction=reduction))
    want = dense(HessianOperator(model, loss, data, batch_size_fn=seqs, progress=False))
    assert not spied  # the logits fit one chunk: autograd's own cross-entropy
    for rows in (4, 5):
        monkeypatch.setattr(loss_ce, "CHUNK_BYTES", rows * VOCAB * 8)
        got = dense(HessianOperator(model, loss, data, batch_size_fn=seqs, progress=False))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert spied  # the chunked path ran


def test_chunked_hessian_of_a_view_with_ignore_index(spied, monkeypatch):
    """Logits reshaped by the loss (``.view(-1, V)``, a custom ``ignore_index``)."""
    model, (batch,) = problem(True)
    ids, labels = batch
    labels = labels.masked_fill(labels == -100, 7)

    def forward(m, b):
        return m(b[0]).view(SEQS, TOKENS, VOCAB)

    loss = split_loss(forward, lambda o, b: F.cross_entropy(o.view(-1, VOCAB), b[1],
                                                            ignore_index=7))
    want = dense(HessianOperator(model, loss, [(ids, labels)], batch_size_fn=seqs,
                                 progress=False))
    monkeypatch.setattr(loss_ce, "CHUNK_BYTES", 4 * VOCAB * 8)
    got = dense(HessianOperator(model, loss, [(ids, labels)], batch_size_fn=seqs,
                                progress=False))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert spied


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_ggn_and_fisher_equal_autograd_ggn(monkeypatch, tied):
    model, data = problem(tied)
    generic = split_loss(lambda m, b: m(b[0]), lambda o, b: F.cross_entropy(o, b[1]))
    vs = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    want = GGNOperator(model, generic, data, batch_size_fn=seqs, progress=False).matmat(vs)
    calls = []
    product = loss_ce.softmax_hessian_product

    def counted(*args, **kwargs):
        calls.append(1)
        return product(*args, **kwargs)

    monkeypatch.setattr("analysis.curvature.softmax_hessian_product", counted)
    monkeypatch.setattr(loss_ce, "CHUNK_BYTES", 5 * VOCAB * 8)
    loss = supervised(nn.CrossEntropyLoss())
    for op in (GGNOperator, FisherOperator):
        got = op(model, loss, data, batch_size_fn=seqs, progress=False).matmat(vs)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert calls  # the closed form ran, not autograd on the criterion


def test_softmax_hessian_product_matches_the_explicit_hessian(monkeypatch):
    torch.manual_seed(1)
    z, u = torch.randn(7, 4, 3, dtype=torch.float64), torch.randn(7, 4, 3, dtype=torch.float64)
    mask = (torch.arange(7 * 3).view(7, 1, 3) % 4 != 0).double()
    p = torch.softmax(z, 1)
    want = 0.3 * mask * (p * u - p * (p * u).sum(1, keepdim=True))
    monkeypatch.setattr(loss_ce, "CHUNK_BYTES", 2 * 12 * 8)  # chunks of 2, 2, 2, 1 rows
    got = loss_ce.softmax_hessian_product(z, u.clone(), 0.3, mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


# -- GGN and Fisher through the head's operands (no [M, V] tensor beyond one chunk) ----------

def oracle_ggn(model, batch):
    r"""Dense $J^\top H_L J$ from the full Jacobian of the logits and explicit per-row Hessians."""
    ids, labels = batch
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def logits(theta):
        pieces, at = {}, 0
        for n, p in zip(names, params):
            pieces[n] = theta[at:at + p.numel()].view_as(p)
            at += p.numel()
        return torch.func.functional_call(model, pieces, (ids,))

    jac = torch.autograd.functional.jacobian(logits, flat, vectorize=True)  # [M, V, P]
    p = torch.softmax(logits(flat).detach(), 1)
    keep = (labels != -100).double()
    hess = (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)) * (keep / keep.sum())[:, None,
                                                                                          None]
    return torch.einsum("rvp,rvw,rwq->pq", jac, hess, jac)


class ComputedHead(TinyLM):
    """The head's weight and bias computed from parameters (traced by autograd, not direct)."""

    def forward(self, ids):
        e = self.emb(ids)
        h = torch.tanh(self.mix(e.cumsum(1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)))
        bias = None if self.head.bias is None else self.head.bias * 1.5
        return F.linear(h, self.head.weight * 0.7, bias).flatten(0, 1)


class EditedLogits(TinyLM):
    """The head's output changed in place after the linear: not h W^T + b any more."""

    def forward(self, ids):
        z = super().forward(ids)
        z[:, :3] *= 2.0
        return z


class MatmulHead(TinyLM):
    """A head the recorder cannot see (``h @ W^T + b``, no ``F.linear``)."""

    def forward(self, ids):
        e = self.emb(ids)
        h = torch.tanh(self.mix(e.cumsum(1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)))
        z = h @ self.head.weight.T
        return (z if self.head.bias is None else z + self.head.bias).flatten(0, 1)


@pytest.fixture
def head_calls(monkeypatch):
    """Count the chunked head products (the GGN/Fisher path through the head's operands)."""
    calls = []
    product = loss_ce.linear_head_product

    def counted(*args, **kwargs):
        calls.append(1)
        return product(*args, **kwargs)

    monkeypatch.setattr("analysis.curvature.linear_head_product", counted)
    return calls


def ce_loss():
    return supervised(nn.CrossEntropyLoss())


def probes(n, k=3):
    """``k`` random vectors as rows (products with them check every entry of a matrix)."""
    return torch.randn(k, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("model_cls", [TinyLM, ComputedHead])
def test_head_chunked_ggn_and_fisher_equal_the_dense_oracle(monkeypatch, head_calls, tied, bias,
                                                            model_cls):
    model, data = problem(tied, bias, model_cls)
    want = oracle_ggn(model, data[0])
    # 21 tokens in chunks of 4, 4, 4, 4, 4, 1 and of 5, 5, 5, 5, 1 (sequences of 7 split)
    for rows, op in ((4, GGNOperator), (5, FisherOperator)):
        monkeypatch.setattr(loss_ce, "CHUNK_BYTES", rows * VOCAB * 8)
        head_calls.clear()
        vs = probes(want.shape[0])
        got = op(model, ce_loss(), data, batch_size_fn=seqs, progress=False).matmat(vs)
        torch.testing.assert_close(got, vs @ want, rtol=1e-10, atol=1e-12)
        assert len(head_calls) == len(vs)  # every product went through the head


@pytest.mark.parametrize("select", [
    ["head.weight"],                          # the head's weight only (direct)
    ["emb.weight", "mix.bias"],               # untied: the body only (traced through h)
    lambda name, p: name != "head.bias",      # the head's bias left out
])
def test_head_chunked_ggn_of_a_parameter_block(monkeypatch, head_calls, select):
    model, data = problem(False, True)
    names = [n for n, _ in model.named_parameters()]
    full = oracle_ggn(model, data[0])
    chosen = [n for n in names if (n in select if isinstance(select, list)
                                   else select(n, None))]
    at, index = 0, {}
    for n, p in model.named_parameters():
        index[n] = torch.arange(at, at + p.numel())
        at += p.numel()
    keep = torch.cat([index[n] for n in chosen])
    monkeypatch.setattr(loss_ce, "CHUNK_BYTES", 4 * VOCAB * 8)
    op = GGNOperator(model, ce_loss(), data, params=select, batch_size_fn=seqs, progress=False)
    vs = probes(len(keep))
    torch.testing.assert_close(op.matmat(vs), vs @ full[keep][:, keep], rtol=1e-10, atol=1e-12)
    assert head_calls


@pytest.mark.parametrize("model_cls", [EditedLogits, MatmulHead])
def test_unrecognised_heads_take_the_generic_path(monkeypatch, head_calls, model_cls):
    """Logits edited in place after the head, or a head without ``F.linear``: still right."""
    model, data = problem(False, True, model_cls)
    want = oracle_ggn(model, data[0])
    monkeypatch.setattr(loss_ce, "CHUNK_BYTES", 4 * VOCAB * 8)
    vs = probes(want.shape[0])
    for op in (GGNOperator, FisherOperator):
        got = op(model, ce_loss(), data, batch_size_fn=seqs, progress=False).matmat(vs)
        torch.testing.assert_close(got, vs @ want, rtol=1e-10, atol=1e-12)
    assert not head_calls


def test_head_chunked_ggn_inside_a_with_block(monkeypatch, head_calls):
    """The kept linearisation (``with op:``) gives the same products, several vectors at once."""
    model, data = problem(True)
    want = oracle_ggn(model, data[0])
    monkeypatch.setattr(loss_ce, "CHUNK_BYTES", 5 * VOCAB * 8)
    op = GGNOperator(model, ce_loss(), data, batch_size_fn=seqs, progress=False)
    vs = probes(op.shape[0], k=4)
    with op:
        got = torch.cat([op.matmat(vs[:1]), op.matmat(vs[1:])])
    torch.testing.assert_close(got, vs @ want, rtol=1e-10, atol=1e-12)
    assert len(head_calls) == len(vs)
