"""Peers' curvature test cases, re-implemented from their published definitions.

* curvlinops (``GGNLinearOperator``, ``EFLinearOperator``, ``FisherMCLinearOperator``): the GGN
  $\\sum_b c_b J_b^\\top H_b J_b$, the empirical Fisher $c \\sum_n g_n g_n^\\top$ with $g_n$ the
  gradient of datum $n$'s unreduced loss and $c$ the reduction factor (1/(N C) for MSE and
  BCE-with-logits, 1/N for cross-entropy), the Monte-Carlo Fisher converging to the GGN; mean
  and sum reductions, dict inputs, MSE / CE / BCE-with-logits.
* BackPACK (``DiagGGNExact``): the exact GGN diagonal on a sample of its problems (linear,
  convolution, sigmoid/ReLU nets), read from our operator by products with unit vectors.
* hessian-eigenthings: the operator is symmetric, and the eigenpairs of a known matrix are found.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from analysis import (FisherOperator, GGNOperator, HessianOperator, split_loss, supervised,
                      top_eigenvalues)
from analysis.curvature import EmpiricalFisherOperator

LOSSES = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}


def targets(kind, out, gen):
    if kind == "ce":
        return torch.randint(0, out.shape[1], out.shape[:1], generator=gen)
    if kind == "bce":
        return torch.rand(out.shape, generator=gen, dtype=out.dtype).round()
    return torch.randn(out.shape, generator=gen, dtype=out.dtype)


def case(kind, n=7, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 3)).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = targets(kind, model(x), gen)
    return model, x, y


def flat_model(model):
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(th, x):
        pieces = torch.split(th, [s.numel() for s in shapes])
        return functional_call(model, {k: t.view(s) for k, t, s in zip(names, pieces, shapes)},
                               (x,))
    return f, theta


def dense_ggn(model, criterion, batches):
    """sum_b w_b J_b^T H_b J_b, w_b = n_b / N for mean reduction and 1 for sum."""
    f, theta = flat_model(model)
    total, n = 0.0, sum(len(x) for x, _ in batches)
    for x, y in batches:
        out = f(theta, x).detach()
        J = jacrev(f)(theta, x).reshape(out.numel(), -1)
        H = hessian(lambda o: criterion(o.view(out.shape), y))(out.reshape(-1))
        w = len(x) / n if criterion.reduction == "mean" else 1.0
        total = total + w * J.T @ H @ J
    return total


def dense(op):
    return op.matmat(torch.eye(op.shape[0], dtype=torch.float64))


@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_curvlinops_ggn(kind, reduction):
    model, x, y = case(kind)
    criterion = LOSSES[kind](reduction=reduction)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    got = dense(GGNOperator(model, supervised(criterion), batches, progress=False))
    torch.testing.assert_close(got, dense_ggn(model, criterion, batches), rtol=1e-10,
                               atol=1e-13)


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_curvlinops_ggn_on_dict_inputs_equals_fisher(kind):
    model, x, y = case(kind)
    criterion = LOSSES[kind]()
    loss = split_loss(lambda m, b: m(b["x"]), lambda o, b: criterion(o, b["y"]))
    data = [{"x": x, "y": y}]
    ggn = dense(GGNOperator(model, loss, data, progress=False))
    torch.testing.assert_close(ggn, dense_ggn(model, criterion, [(x, y)]), rtol=1e-10,
                               atol=1e-13)
    likelihood = {"mse": "gaussian", "ce": "categorical", "bce": "bernoulli"}[kind]
    fisher = FisherOperator(model, loss, data, likelihood=likelihood, progress=False)
    torch.testing.assert_close(dense(fisher), ggn, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_curvlinops_empirical_fisher(kind):
    model, x, y = case(kind)
    criterion = LOSSES[kind]()
    unreduced = LOSSES[kind](reduction="sum")
    params = list(model.parameters())
    grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        unreduced(model(x[i:i + 1]), y[i:i + 1]), params)]) for i in range(len(x))]
    G = torch.stack(grads)
    c = 1 / len(x) if kind == "ce" else 1 / y.numel()  # curvlinops' reduction factor
    for data in ([(x, y)], [(x[:3], y[:3]), (x[3:], y[3:])]):
        if len(data) > 1:  # batches weighted by their data, each on its own normalisation
            want = sum(len(b[0]) / len(x) * c * len(x) / len(b[0]) * (
                G[i:i + len(b[0])].T @ G[i:i + len(b[0])])
                for b, i in zip(data, (0, 3)))
        else:
            want = c * G.T @ G
        got = EmpiricalFisherOperator(model, supervised(criterion), data, progress=False)
        torch.testing.assert_close(dense(got), want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_curvlinops_mc_fisher_converges_to_the_ggn(kind):
    model, x, y = case(kind)
    loss = supervised(LOSSES[kind]())
    ggn = dense(GGNOperator(model, loss, [(x, y)], progress=False))
    errors = [float((dense(FisherOperator(model, loss, [(x, y)], kind="mc", mc_samples=s,
                                          progress=False)) - ggn).norm() / ggn.norm())
              for s in (4, 3000)]
    assert errors[1] < 0.03 and errors[1] < errors[0] / 4, errors


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(1, 2, 3), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x.unsqueeze(1))).flatten(1))


BACKPACK = {
    "linear": lambda: nn.Linear(6, 3),
    "sigmoid_mlp": lambda: nn.Sequential(nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, 3)),
    "relu_mlp": lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)),
    "conv": ConvNet,
}


@pytest.mark.parametrize("name", sorted(BACKPACK))
@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_backpack_exact_ggn_diagonal(name, kind):
    torch.manual_seed(0)
    model = BACKPACK[name]().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = targets(kind, model(x), gen)
    criterion = LOSSES[kind]()
    op = GGNOperator(model, supervised(criterion), [(x, y)], progress=False)
    n = op.shape[0]
    diag = torch.stack([op.matvec(e)[i] for i, e in
                        enumerate(torch.eye(n, dtype=torch.float64))])
    torch.testing.assert_close(diag, torch.diagonal(dense_ggn(model, criterion, [(x, y)])),
                               rtol=1e-10, atol=1e-13)


class Quadratic(nn.Module):
    """loss = theta^T A theta / 2 with a known symmetric A (hessian-eigenthings' test)."""

    def __init__(self, A):
        super().__init__()
        self.A, self.theta = A, nn.Parameter(torch.randn(len(A), dtype=A.dtype))

    def forward(self, x):
        return 0.5 * self.theta @ self.A @ self.theta + 0 * x.sum()


def test_eigenthings_symmetric_operator_and_known_eigenpairs():
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))[0]
    values = torch.linspace(-2, 5, 12, dtype=torch.float64)
    A = Q @ torch.diag(values) @ Q.T
    model = Quadratic(A)
    data = [torch.zeros(2, 1, dtype=torch.float64)]
    op = HessianOperator(model, lambda m, b: m(b), data, progress=False)
    H = dense(op)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-13)
    torch.testing.assert_close(H, A, rtol=1e-12, atol=1e-12)
    res = top_eigenvalues(model, lambda m, b: m(b), data, k=3, tol=1e-12, progress=False)
    np.testing.assert_allclose(res.eigenvalues, values.flip(0)[:3].numpy(), rtol=1e-9)
    for value, vec in zip(res.eigenvalues, res.eigenvectors):
        vec = torch.as_tensor(vec, dtype=torch.float64).reshape(-1)
        torch.testing.assert_close(A @ vec, value * vec, rtol=0, atol=1e-7)
