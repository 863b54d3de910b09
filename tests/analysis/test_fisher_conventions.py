"""Fisher / empirical-Fisher conventions (issue 25 items 1-3 and 8): ignored targets, curvlinops'
empirical-Fisher scale, ``UserDict`` batches, models ``torch.func`` cannot vmap."""
from __future__ import annotations

from collections import UserDict

import pytest
import torch
from torch import nn

from analysis import (FisherOperator, GGNOperator, hessian_trace, layerwise, split_loss,
                      supervised)
from analysis.curvature import EmpiricalFisherOperator
from tests.oracles import assert_unchanged, mlp, snapshot

CE = supervised(nn.CrossEntropyLoss())
MSE = supervised(nn.MSELoss())


def dense(op):
    return op.matmat(torch.eye(op.shape[0], dtype=torch.float64))


class Tagger(nn.Module):
    """A per-token tagger: logits ``[N, C, T]`` for tokens ``[N, T]``."""

    def __init__(self, vocab=7, width=4, classes=5):
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, width), nn.Linear(width, classes)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x))).transpose(1, 2)


def tagger_problem(n=6, t=5, seed=0):
    torch.manual_seed(seed)
    model = Tagger().double()
    x, y = torch.randint(0, 7, (n, t)), torch.randint(0, 5, (n, t))
    y[:, 3:], y[0] = -100, -100  # padding, and a datum with no observation at all
    return model, x, y


def ef_oracle(model, datum_loss, data, count):
    """(1/c) sum_i g_i g_i^T, g_i the gradient of datum i's summed observation losses."""
    params = list(model.parameters())
    grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        datum_loss(model, d), params, allow_unused=True, materialize_grads=True)])
        for d in data]
    G = torch.stack(grads)
    return G.T @ G / count


def test_ignored_targets_are_not_observations_in_the_fishers():
    model, x, y = tagger_problem()
    G = dense(GGNOperator(model, CE, [(x, y)], progress=False))
    exact = dense(FisherOperator(model, CE, [(x, y)], progress=False))
    torch.testing.assert_close(exact, G, rtol=1e-10, atol=1e-13)  # 17 % off before
    mc = dense(FisherOperator(model, CE, [(x, y)], kind="mc", mc_samples=300, progress=False))
    assert float((mc - G).norm() / G.norm()) < 0.06  # 0.17 before
    count = int((y != -100).sum())
    summed = nn.CrossEntropyLoss(reduction="sum")
    want = ef_oracle(model, lambda m, d: summed(m(d[0]), d[1]),
                     [(x[i:i + 1], y[i:i + 1]) for i in range(len(x))], count)
    ef = dense(EmpiricalFisherOperator(model, CE, [(x, y)], progress=False))
    torch.testing.assert_close(ef, want, rtol=1e-10, atol=1e-13)


def test_empirical_fisher_scale_is_curvlinops():
    """Positions of a datum are summed; the scale is one over the number of observations."""
    model, x, _ = tagger_problem(n=5)
    y = torch.randint(0, 5, x.shape)
    summed = nn.CrossEntropyLoss(reduction="sum")
    want = ef_oracle(model, lambda m, d: summed(m(d[0]), d[1]),
                     [(x[i:i + 1], y[i:i + 1]) for i in range(len(x))], y.numel())
    got = dense(FisherOperator(model, CE, [(x, y)], kind="empirical", progress=False))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)  # 1/5 of it before


@pytest.mark.parametrize("kind", ["mse", "ce", "bce"])
def test_empirical_fisher_estimates_the_fisher_with_model_labels(kind):
    model = mlp((4, 6, 3))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 4, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        f = model(x)
    if kind == "mse":
        loss, y = MSE, f + torch.randn(f.shape, generator=gen, dtype=f.dtype) / 2 ** 0.5
    elif kind == "ce":
        loss, y = CE, torch.multinomial(torch.softmax(f, 1), 1, generator=gen)[:, 0]
    else:
        loss = supervised(nn.BCEWithLogitsLoss())
        y = (torch.rand(f.shape, generator=gen, dtype=f.dtype) < torch.sigmoid(f)).double()
    ef = dense(FisherOperator(model, loss, [(x, y)], kind="empirical", progress=False))
    fisher = dense(FisherOperator(model, loss, [(x, y)], progress=False))
    torch.testing.assert_close(fisher, dense(GGNOperator(model, loss, [(x, y)], progress=False)))
    assert abs(float(ef.trace() / fisher.trace()) - 1) < 0.05  # MSE: 1/3 before


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, batch):
        return self.lin(batch["x"])


@pytest.mark.parametrize("criterion", [nn.MSELoss(), nn.CrossEntropyLoss(),
                                       nn.BCEWithLogitsLoss()], ids=["mse", "ce", "bce"])
def test_empirical_fisher_splits_userdict_batches(criterion):
    torch.manual_seed(0)
    model = DictModel().double()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = (torch.randint(0, 3, (8,)) if isinstance(criterion, nn.CrossEntropyLoss)
         else torch.rand(8, 3, dtype=torch.float64).round())

    def plain(m, b):  # no split: per-datum gradients by torch.func
        return criterion(m(b), b["y"])

    split = split_loss(lambda m, b: m(b), lambda o, b: criterion(o, b["y"]))
    ref = dense(EmpiricalFisherOperator(model, plain, [{"x": x, "y": y}], progress=False))
    want = ef_oracle(model, plain, [{"x": x[i:i + 1], "y": y[i:i + 1]} for i in range(8)], 8)
    torch.testing.assert_close(ref, want, rtol=1e-10, atol=1e-13)
    for loss in (plain, split):
        got = EmpiricalFisherOperator(model, loss, [UserDict({"x": x, "y": y})], progress=False,
                                      likelihood=None if loss is plain else (
                                          "categorical" if y.dim() == 1 else "gaussian"))
        scale = 1 if loss is plain or y.dim() == 1 else 3  # observations per datum
        torch.testing.assert_close(dense(got), ref * scale, rtol=1e-10, atol=1e-13)


def test_empirical_fisher_trace_and_layerwise_on_a_tiny_block():
    """Hutch++'s sketch spans the block (<= 33 parameters): no empty reshape."""
    model = mlp((3, 4, 2))
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 2, (9,))
    want = float(dense(EmpiricalFisherOperator(model, CE, [(x, y)], progress=False)).trace())
    tr = hessian_trace(model, CE, [(x, y)], curvature="empirical_fisher", progress=False)
    assert abs(tr.estimate - want) < 1e-8 * abs(want)
    lw = layerwise(model, CE, [(x, y)], curvature="empirical_fisher", progress=False)
    assert lw is not None


class Encoder(nn.Module):
    """nn.TransformerEncoder with a padding mask (the nested-tensor fast path in eval)."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.enc, self.out = nn.TransformerEncoder(layer, 1), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.enc(x, src_key_padding_mask=x[..., 0] > 1.0).mean(1))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha, self.out = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.mha(x, x, x)[0].mean(1))


class Renormed(nn.Module):
    """``Embedding(max_norm=)`` renormalises its rows in place in the forward."""

    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(6, 4, max_norm=10.0), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.emb(x).mean(1))


def distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=20, dim=8, n_layers=1, n_heads=2, hidden_dim=16,
                           max_position_embeddings=8, num_labels=3, dropout=0.0,
                           attention_dropout=0.0, seq_classif_dropout=0.0)
    return DistilBertForSequenceClassification(cfg).double().eval()


@pytest.mark.parametrize("make", ["encoder", "attention", "renormed", "distilbert"])
def test_empirical_fisher_on_models_torch_func_cannot_vmap(make):
    """Item 8: the output-gradient path is reverse mode only; without a split an exact loop."""
    torch.manual_seed(1)
    if make == "distilbert":
        model, x = distilbert(), torch.randint(0, 20, (4, 6))
        loss = plain = split_loss(lambda m, b: m(input_ids=b[0]).logits,
                                  lambda o, b: nn.functional.cross_entropy(o, b[1]))
    else:
        model = {"encoder": Encoder, "attention": Attention, "renormed": Renormed}[make]()
        model = model.double().eval()
        x = (torch.randint(0, 6, (4, 5)) if make == "renormed"
             else torch.randn(4, 5, 4, dtype=torch.float64))
        loss = plain = CE
    y = torch.randint(0, 3, (4,))
    data = [(x, y)]
    want = ef_oracle(model, plain, [(x[i:i + 1], y[i:i + 1]) for i in range(4)], 4)
    snap = snapshot(model)
    got = dense(EmpiricalFisherOperator(model, loss, data, progress=False,
                                        likelihood="categorical" if make == "distilbert"
                                        else None))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    def no_split(m, b):  # a loss_fn without split: per-datum gradients
        return plain(m, b)

    torch.testing.assert_close(dense(EmpiricalFisherOperator(model, no_split, data,
                                                             progress=False)),
                               want, rtol=1e-9, atol=1e-12)
    assert_unchanged(model, snap)
