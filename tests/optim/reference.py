"""A float64 softmax-regression problem with hand-written gradients, and plain reference versions
of the base optimizers, for step-by-step tests of the SAM family, Lookahead and SALA.

Nothing here calls `optim`: the references are the papers' equations written out with plain
tensor arithmetic on dicts {"W": ..., "b": ...}.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

D, C = 5, 3  # features, classes
Params = dict[str, torch.Tensor]


class Softmax(nn.Module):
    """logits = x W^T + b; the optimizers see W and b through autograd."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(0.5 * torch.randn(C, D, generator=gen, dtype=torch.float64))
        self.b = nn.Parameter(0.1 * torch.randn(C, generator=gen, dtype=torch.float64))

    def forward(self, x):
        return x @ self.W.T + self.b


def batch(i: int, n: int = 12):
    gen = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=gen)
    return x, y


def loss(theta: Params, xy) -> float:
    x, y = xy
    return float(F.cross_entropy(x @ theta["W"].T + theta["b"], y))


def grad(theta: Params, xy) -> Params:
    """Hand-written gradient of the mean cross-entropy: (softmax - onehot) / n."""
    x, y = xy
    logits = x @ theta["W"].T + theta["b"]
    p = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    p = p / p.sum(dim=1, keepdim=True)
    r = (p - F.one_hot(y, C).to(p.dtype)) / len(y)
    return {"W": r.T @ x, "b": r.sum(0)}


def initial(seed: int = 0) -> Params:
    m = Softmax(seed)
    return {"W": m.W.detach().clone(), "b": m.b.detach().clone()}


def param_groups(model: Softmax, lr_w: float, lr_b: float) -> list[dict]:
    """Two groups with different lrs, so that per-group quantities are exercised."""
    return [{"params": [model.W], "lr": lr_w}, {"params": [model.b], "lr": lr_b}]


GROUP = {"W": 0, "b": 1}


def norm(t: Params) -> float:
    return math.sqrt(sum(float((v * v).sum()) for v in t.values()))


def clip(g: Params, max_norm: float | None) -> Params:
    """torch.nn.utils.clip_grad_norm_: scale by max_norm / (total + 1e-6) when that is < 1."""
    if max_norm is None:
        return g
    coef = min(1.0, max_norm / (norm(g) + 1e-6))
    return {k: v * coef for k, v in g.items()}


class RefSGD:
    """torch.optim.SGD semantics: g += wd w; buf = mu buf + g (buf = g at first); w -= lr buf."""

    def __init__(self, lrs, momentum=0.9, weight_decay=0.0):
        self.lrs, self.mu, self.wd, self.buf = lrs, momentum, weight_decay, {}

    def step(self, theta: Params, g: Params) -> Params:
        out = {}
        for k, w in theta.items():
            d = g[k] + self.wd * w
            self.buf[k] = d.clone() if k not in self.buf else self.mu * self.buf[k] + d
            out[k] = w - self.lrs[GROUP[k]] * self.buf[k]
        return out


def ce_closure(opt, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The closure of one step: zero the grads, cross-entropy of ``model(x)``, backward."""
    def closure():
        opt.zero_grad()
        value = F.cross_entropy(model(x), y)
        value.backward()
        return value

    return closure


def run_model(opt, model: nn.Module, steps: int, on_step=None, data=batch) -> list[Params]:
    """Trains with `loss = opt.step(closure)` on data(i); returns the parameters after each step
    (by their last name component, so a DDP-wrapped Softmax reads like the bare one)."""
    out = []
    for i in range(steps):
        x, y = data(i)
        opt.step(ce_closure(opt, model, x, y))
        if on_step is not None:
            on_step(i)
        out.append({n.split(".")[-1]: p.detach().clone() for n, p in model.named_parameters()})
    return out


def assert_trajectories_close(got: list[Params], want: list[Params], tol: float = 1e-10) -> None:
    assert len(got) == len(want)
    for t, (a, b) in enumerate(zip(got, want)):
        for k in a:
            err = float((a[k] - b[k]).abs().max())
            assert err <= tol * max(1.0, float(b[k].abs().max())), f"step {t}, {k}: error {err:.3e}"
