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

    def __init__(self, tied: bool):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, VOCAB, bias=not tied)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        e = self.emb(ids)
        prefix = e.cumsum(1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)
        return self.head(torch.tanh(self.mix(prefix))).flatten(0, 1)  # [N T, V]


def problem(tied: bool):
    torch.manual_seed(0)
    model = TinyLM(tied).double()
    ids = torch.randint(0, VOCAB, (SEQS, TOKENS))
    labels = torch.cat([ids[:, 1:], torch.full((SEQS, 1), -100)], 1).flatten()
    labels[3] = -100  # an ignored target inside a sequence
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
    want = dense(GGNOperator(model, generic, data, batch_size_fn=seqs, progress=False))
    calls = []
    product = loss_ce.softmax_hessian_product

    def counted(*args, **kwargs):
        calls.append(1)
        return product(*args, **kwargs)

    monkeypatch.setattr("analysis.curvature.softmax_hessian_product", counted)
    monkeypatch.setattr(loss_ce, "CHUNK_BYTES", 5 * VOCAB * 8)
    loss = supervised(nn.CrossEntropyLoss())
    for op in (GGNOperator, FisherOperator):
        got = dense(op(model, loss, data, batch_size_fn=seqs, progress=False))
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
