"""Shared test oracles: small float64 models, uneven batches, exact Hessians, model snapshots."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from analysis.core import default_batch_size


def mlp(sizes=(6, 8, 5, 3), act=nn.Tanh, dtype=torch.float64, seed=0, bias=True) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


class SmallCNN(nn.Module):
    """Conv1d + BatchNorm1d + ReLU + Linear on inputs of shape [N, L]."""

    def __init__(self, length=12, channels=3, classes=3):
        super().__init__()
        self.conv = nn.Conv1d(1, channels, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm1d(channels)
        self.fc = nn.Linear(channels * length, classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x.unsqueeze(1))))
        return self.fc(h.flatten(1))


def cnn_bn(length=12, dtype=torch.float64, seed=0) -> SmallCNN:
    """A CNN whose BatchNorm has non-trivial running statistics (eval mode uses them)."""
    torch.manual_seed(seed)
    model = SmallCNN(length).to(dtype)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, length, dtype=dtype))
    return model


def classification_data(n=23, d=6, classes=3, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def uneven_batches(x, y, sizes=(7, 3, 9, 4)):
    """Split (x, y) into batches of the given (uneven) sizes; the sizes must sum to len(x)."""
    assert sum(sizes) == len(x)
    out, i = [], 0
    for s in sizes:
        out.append((x[i:i + s], y[i:i + s]))
        i += s
    return out


def _flat_loss(model, loss_fn, data, names, params):
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    others = {n: p.detach() for n, p in model.named_parameters() if n not in set(names)}
    buffers = dict(model.named_buffers())
    sizes_of = [default_batch_size(b) for b in data]
    total = sum(sizes_of)

    class _View(nn.Module):  # lets loss_fn(model, batch) call a functional model
        def __init__(self, mapping):
            super().__init__()
            self.mapping = mapping

        def forward(self, *args, **kwargs):
            return functional_call(model, self.mapping, args, kwargs)

    def f(theta):
        chunks = torch.split(theta, sizes)
        mapping = {**others, **buffers,
                   **{n: c.view(s) for n, c, s in zip(names, chunks, shapes)}}
        view = _View(mapping)
        return sum(loss_fn(view, b) * n for b, n in zip(data, sizes_of)) / total

    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    return f, theta0


def _at_params(transform, model, loss_fn, data, names, model_mode):
    """``transform(f)(theta0)`` for the flat loss ``f`` of the named parameters."""
    named = dict(model.named_parameters())
    names = list(names or named)
    params = [named[n] for n in names]
    was = model.training
    model.train(model_mode == "train")
    try:
        f, theta0 = _flat_loss(model, loss_fn, data, names, params)
        return transform(f)(theta0).detach()
    finally:
        model.train(was)


def exact_hessian(model, loss_fn, data, names=None, model_mode="eval"):
    """Dense Hessian of the sample-weighted mean loss w.r.t. the named parameters."""
    return _at_params(torch.func.hessian, model, loss_fn, data, names, model_mode)


def exact_grad(model, loss_fn, data, names=None, model_mode="eval"):
    """Gradient of the sample-weighted mean loss w.r.t. the named parameters."""
    return _at_params(torch.func.grad, model, loss_fn, data, names, model_mode)


def snapshot(model: nn.Module) -> dict:
    """Everything analysis must restore: values, buffers, grads, flags."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "param_ids": {n: id(p) for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "grads": {n: None if p.grad is None else p.grad.clone()
                  for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert now["param_ids"] == snap["param_ids"]
    for key in ("params", "buffers"):
        assert now[key].keys() == snap[key].keys()
        for n in snap[key]:
            assert torch.equal(now[key][n], snap[key][n]), f"{key} {n} changed"
    for n, g in snap["grads"].items():
        h = now["grads"][n]
        assert (g is None) == (h is None), f"grad of {n} changed"
        if g is not None:
            assert torch.equal(g, h), f"grad of {n} changed"
    assert now["training"] == snap["training"]
    assert now["requires_grad"] == snap["requires_grad"]
