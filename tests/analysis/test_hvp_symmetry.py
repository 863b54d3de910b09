"""Weight norm's second derivative and the symmetry probe (issue 25 item 5, issue 31)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from analysis import GGNOperator, HessianOperator, split_loss, supervised, top_eigenvalues
from tests.oracles import assert_unchanged, snapshot

CE = supervised(nn.CrossEntropyLoss())


def weight_normed(api):
    torch.manual_seed(0)
    first = nn.Linear(3, 4)
    if api == "parametrize":
        first = parametrizations.weight_norm(first)
    else:
        with pytest.warns(FutureWarning):
            first = nn.utils.weight_norm(first)
    return nn.Sequential(first, nn.Tanh(), nn.Linear(4, 2)).double()


def fd_hessian(model, loss_fn, batch, h=1e-5):
    """Central differences of autograd gradients (first derivatives are right)."""
    params = list(model.parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def grad_at(t):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(t, params)
        g = torch.autograd.grad(loss_fn(model, batch), params)
        return torch.cat([x.reshape(-1) for x in g])

    cols = []
    for j in range(len(theta)):
        e = torch.zeros_like(theta)
        e[j] = h
        cols.append((grad_at(theta + e) - grad_at(theta - e)) / (2 * h))
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta, params)
    return torch.stack(cols, 1)


def data():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(10, 3, generator=gen, dtype=torch.float64),
            torch.randint(0, 2, (10,), generator=gen))


@pytest.mark.parametrize("api", ["parametrize", "hook"])
@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_weight_norm_hessian_matches_finite_differences(api, method):
    model, batch = weight_normed(api), data()
    want = fd_hessian(model, CE, batch)
    snap = snapshot(model)
    op = HessianOperator(model, CE, [batch], hvp_method=method, progress=False)
    got = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)  # 0.48 off before
    top = top_eigenvalues(model, CE, [batch], k=3, tol=1e-10, hvp_method=method, progress=False)
    np.testing.assert_allclose(top.eigenvalues, torch.linalg.eigvalsh(want).flip(0)[:3].numpy(),
                               rtol=1e-7)
    assert_unchanged(model, snap)


def test_symmetry_probe_blames_the_fused_weight_norm(monkeypatch):
    """Without the routing the fused kernel's asymmetry is caught on the first products."""
    model, batch = weight_normed("parametrize"), data()
    op = HessianOperator(model, CE, [batch], progress=False)
    op._weight_norm = False  # the mutant: PyTorch's fused kernel
    vs = torch.randn(2, op.shape[0], dtype=torch.float64,
                     generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=r"not symmetric.*original.*_WeightNorm"):
        op.matmat(vs)


class FrozenScale(torch.autograd.Function):
    """x * s with a backward that treats ``x`` as a constant in its own second derivative."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return g * s, (g * x.detach()).sum_to_size(s.shape)


class Asymmetric(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.scale = nn.Linear(3, 2), nn.Parameter(torch.ones(2))

    def forward(self, x):
        return FrozenScale.apply(self.lin(x), self.scale)


def test_symmetry_probe_names_the_parameters():
    torch.manual_seed(0)
    model, batch = Asymmetric().double(), data()
    op = HessianOperator(model, CE, [batch], progress=False)
    vs = torch.randn(2, op.shape[0], dtype=torch.float64)
    op.matvec(vs[0])  # single vectors are not probed
    with pytest.raises(RuntimeError, match=r"not symmetric.*(lin\.weight|scale) \("):
        op.matmat(vs)
    op.matmat(vs)  # once only


def test_symmetry_probe_is_silent_on_symmetric_operators():
    model, batch = weight_normed("parametrize"), data()
    op = GGNOperator(model, CE, [batch], progress=False)
    op.matmat(torch.randn(3, op.shape[0], dtype=torch.float64))
    assert op._probe is False  # the probe ran


class TiedLM(nn.Module):
    """Embedding with a padding row, tied to the output layer (Gemma2's layout)."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid = nn.Embedding(6, 4, padding_idx=0), nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x)))).transpose(1, 2)


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=12, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                       max_position_embeddings=16, pad_token_id=0, tie_word_embeddings=True,
                       attn_implementation="eager")
    return Gemma2ForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("make", ["tied", "gemma2"])
def test_forward_hvp_equals_reverse_with_tied_padding_rows(make):
    torch.manual_seed(0)
    if make == "gemma2":
        model = gemma2()
        x = torch.randint(1, 12, (2, 5))
        x[:, -1] = 0  # padding tokens
        loss = split_loss(lambda m, b: m(input_ids=b[0]).logits.transpose(1, 2),
                          lambda o, b: nn.functional.cross_entropy(o, b[1]))
        y = torch.randint(0, 12, (2, 5))
        params = ["model.embed_tokens.weight", "model.norm.weight"]
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.model.embed_tokens.padding_idx == 0
    else:
        model, x, y, loss, params = TiedLM().double(), torch.randint(0, 6, (5, 4)), None, CE, None
        x[:, -1] = 0
        y = torch.randint(0, 6, (5, 4))
    snap = snapshot(model)
    ops = [HessianOperator(model, loss, [(x, y)], params=params, hvp_method=m, progress=False)
           for m in ("reverse", "forward")]
    V = torch.randn(3, ops[0].shape[0], dtype=torch.float64)
    rev, fwd = (op.matmat(V) for op in ops)
    # Gemma2RMSNorm computes in float32: agreement to its rounding
    assert float((fwd - rev).norm() / rev.norm()) < (1e-6 if make == "gemma2" else 1e-12)
    assert_unchanged(model, snap)
