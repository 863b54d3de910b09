r"""Every routine on the held-out model zoo (tests/conformance/zoo.py) against float64 references.

Models x routines: Hessian-vector products against the dense Hessian (``torch.func.hessian`` on
the flat parameters, or central differences of autograd gradients where torch.func cannot
transform the model; for models over 100 parameters, of a block of whole tensors, ``params=``,
so that the file stays within a minute on one core), ``top_eigenvalues`` against
``numpy.linalg.eigh``, ``hessian_trace`` in its exact mode (``n_hvp`` >= n) against the
trace, the GGN against $\sum_b w_b J_b^\top H_b J_b$ from the Jacobian, the empirical Fisher
against per-datum gradients (curvlinops' scale), and ``line``/``plane`` against direct
evaluations at the moved weights; every routine leaves the model exactly as found (also the
tensors modules hold as plain attributes).
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from torch.func import functional_call

from analysis import GGNOperator, hessian_trace, hvp, top_eigenvalues
from analysis.core import default_batch_size
from analysis.curvature import EmpiricalFisherOperator
from landscape import line, plane, random_direction
from tests.conformance.zoo import ZOO, datum
from tests.oracles import assert_unchanged, exact_hessian, snapshot

pytestmark = [pytest.mark.filterwarnings("ignore:There is a performance drop"),
              pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")]

ROUTINES = ("hvp", "top_eigenvalues", "hessian_trace", "ggn", "empirical_fisher", "landscape")
FD_STEP = 1e-6


@functools.lru_cache(maxsize=None)
def case(name):
    try:
        return ZOO[name]()
    except ImportError as err:  # the Hugging Face models without transformers
        pytest.skip(f"{name}: {err}")


def named(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat_call(model, fn):
    """``g(theta) = fn(view, ...)`` with the model's parameters read from the flat ``theta``."""
    items = named(model)
    shapes, sizes = [p.shape for _, p in items], [p.numel() for _, p in items]

    def at(theta):
        chunks = torch.split(theta, sizes)
        return {n: c.view(s) for (n, _), c, s in zip(items, chunks, shapes)}

    theta = torch.cat([p.detach().reshape(-1) for _, p in items])
    return at, theta


def full_loss_grad(c, theta):
    """The gradient of the sample-weighted mean loss at the flat ``theta`` (autograd)."""
    at, _ = flat_call(c.model, None)
    theta = theta.detach().requires_grad_()
    sizes = [default_batch_size(b) for b in c.data]
    loss = sum(c.loss_fn(View(c.model, at(theta)), b) * n for b, n in zip(c.data, sizes))
    return torch.autograd.grad(loss / sum(sizes), theta)[0]


class View(torch.nn.Module):
    """The model called with the given parameters (``loss_fn(view, batch)``)."""

    def __init__(self, model, mapping):
        super().__init__()
        self.model, self.mapping = model, mapping

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.mapping, args, kwargs)


def in_mode(c):
    was = c.model.training
    c.model.train(c.model_mode == "train")
    return was


@functools.lru_cache(maxsize=None)
def dense_hessian(name):
    """The reference Hessian of the block (:func:`block`), float64 numpy (finite differences
    symmetrised)."""
    c = case(name)
    names, index = block(c.model)
    if c.reference == "func":
        return exact_hessian(c.model, c.loss_fn, c.data, names=names,
                             model_mode=c.model_mode).numpy()
    was = in_mode(c)
    try:
        _, theta = flat_call(c.model, None)
        cols = []
        for j in index:
            e = torch.zeros_like(theta)
            e[j] = FD_STEP
            cols.append((full_loss_grad(c, theta + e) - full_loss_grad(c, theta - e))[index]
                        / (2 * FD_STEP))
        H = torch.stack(cols, 1).numpy()
    finally:
        c.model.train(was)
    return (H + H.T) / 2


def tolerance(name):
    """Agreement expected with the reference: rounding for torch.func, O(h^2) for differences."""
    return 1e-9 if case(name).reference == "func" else 1e-6


def ggn_reference(c):
    r"""$\sum_b (n_b / N) J_b^\top H_b J_b$, the Jacobian row by row through autograd."""
    forward, criterion = c.loss_fn.split
    at, theta = flat_call(c.model, None)
    sizes = [default_batch_size(b) for b in c.data]
    total = 0
    for b, n in zip(c.data, sizes):
        theta_b = theta.clone().requires_grad_()
        out = forward(View(c.model, at(theta_b)), b)
        J = torch.stack([torch.autograd.grad(o, theta_b, retain_graph=True)[0]
                         for o in out.reshape(-1)])
        H_L = torch.func.hessian(lambda o: criterion(o, b))(out.detach())
        H_L = H_L.reshape(out.numel(), out.numel())
        total = total + (n / sum(sizes)) * (J.T @ H_L @ J)
    return total.detach().numpy()


def ef_reference(c):
    r"""$\frac{1}{N T} \sum_i g_i g_i^\top$, $g_i$ the gradient of datum i's summed terms.

    Curvlinops' convention: the criterion's $T$ observations per datum (sequence positions)
    are summed in $g_i$; the scale is one over all observations.
    """
    at, theta = flat_call(c.model, None)
    rows, count = [], 0
    for b in c.data:
        for i in range(default_batch_size(b)):
            theta_i = theta.clone().requires_grad_()
            loss = c.loss_fn(View(c.model, at(theta_i)), datum(b, i))
            rows.append(c.positions * torch.autograd.grad(loss, theta_i)[0])
            count += c.positions
    G = torch.stack(rows)
    return (G.T @ G / count).numpy()


def moved_loss(c, shift):
    """The mean loss with ``shift`` added to the parameters (a functional call)."""
    mapping = {n: p.detach() + shift[n] if n in shift else p.detach()
               for n, p in c.model.named_parameters()}
    sizes = [default_batch_size(b) for b in c.data]
    was = in_mode(c)
    try:
        with torch.no_grad():
            return sum(c.loss_fn(View(c.model, mapping), b).item() * n
                       for b, n in zip(c.data, sizes)) / sum(sizes)
    finally:
        c.model.train(was)


def block(model, size=100):
    """All parameters when they are at most ``size`` elements, else a block of whole tensors
    (every other one, in order, up to ``size / 2`` elements): names and flat indices."""
    items, offset = [], 0
    for n, p in named(model):
        items.append((n, offset, p.numel()))
        offset += p.numel()
    if offset > size:
        chosen, total = [], 0
        for i, (n, start, k) in enumerate(items):
            if i % 2 == 0 and total + k <= size // 2:
                chosen.append((n, start, k))
                total += k
        items = chosen
    return ([n for n, _, _ in items],
            np.concatenate([np.arange(start, start + k) for _, start, k in items]))


def vectors(n, k, seed=0):
    return torch.randn(k, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def attributes(model):
    """The tensors that modules hold as plain attributes (``nn.utils.weight_norm``'s weight)."""
    return {(m, k): v for m in model.modules() for k, v in vars(m).items()
            if isinstance(v, torch.Tensor)}


def unchanged(model, call):
    """``call()``, checking that it leaves ``model`` exactly as found.

    Also the very tensor objects modules hold as plain attributes: a vmapped forward left an
    escaped batched tensor as ``nn.utils.weight_norm``'s weight (the references' own forwards
    replace it too, so they run outside).
    """
    snap, held = snapshot(model), attributes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = call()
    assert_unchanged(model, snap)
    now = attributes(model)
    assert now.keys() == held.keys() and all(now[k] is v for k, v in held.items())
    return out


def run(name, routine):
    c = case(name)
    kw = dict(model_mode=c.model_mode, progress=False)
    H = None if routine in ("ggn", "empirical_fisher", "landscape") else dense_hessian(name)
    scale = 1.0 if H is None else max(np.abs(H).max(), 1e-3)
    if H is not None:
        kw["params"] = block(c.model)[0]
    if routine == "hvp":
        V = vectors(len(H), 2)
        got = unchanged(c.model, lambda: hvp(c.model, c.loss_fn, c.data, V, **kw)).numpy()
        np.testing.assert_allclose(got, V.numpy() @ H, rtol=0, atol=tolerance(name) * scale)
    elif routine == "top_eigenvalues":
        got = unchanged(c.model, lambda: top_eigenvalues(c.model, c.loss_fn, c.data, k=2,
                                                         tol=1e-10, **kw))
        assert got.converged
        want = np.linalg.eigvalsh(H)[::-1][:2]
        np.testing.assert_allclose(got.eigenvalues, want, rtol=0, atol=tolerance(name) * scale)
    elif routine == "hessian_trace":
        got = unchanged(c.model, lambda: hessian_trace(c.model, c.loss_fn, c.data,
                                                       n_hvp=len(H), **kw))
        assert got.n_hvp == len(H)  # the exact mode: one product per unit vector
        assert abs(got.estimate - np.trace(H)) < tolerance(name) * scale * len(H)
    elif routine in ("ggn", "empirical_fisher"):
        cls, ref = ((GGNOperator, ggn_reference) if routine == "ggn"
                    else (EmpiricalFisherOperator, ef_reference))
        want = ref(c)
        V = vectors(len(want), 2)
        got = unchanged(c.model, lambda: cls(c.model, c.loss_fn, c.data, **kw).matmat(V))
        np.testing.assert_allclose(got.numpy(), V.numpy() @ want, rtol=0,
                                   atol=1e-10 * max(np.abs(want).max(), 1e-3))
    else:
        d1, d2 = random_direction(c.model, seed=1), random_direction(c.model, seed=2)
        want = [moved_loss(c, {n: a * t for n, t in d1.items()}) for a in (-0.5, 0.5)]
        got = unchanged(c.model, lambda: line(c.model, c.loss_fn, c.data, d1, [-0.5, 0.5],
                                              **kw))
        np.testing.assert_allclose(got.losses, want, rtol=0, atol=1e-10)
        want = [[moved_loss(c, {n: a * d1[n] + 0.5 * d2[n] for n in d1}) for a in (0.0, 0.5)]]
        got = unchanged(c.model, lambda: plane(c.model, c.loss_fn, c.data, d1, d2, [0.0, 0.5],
                                               [0.5], **kw))
        np.testing.assert_allclose(got.losses, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("routine", ROUTINES)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo(name, routine):
    run(name, routine)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_reference_hessian_is_symmetric(name):
    """The references themselves: torch.func's Hessian is symmetric where it is used."""
    H = dense_hessian(name)
    assert np.abs(H - H.T).max() <= 1e-12 * max(np.abs(H).max(), 1.0)


def test_forward_mode_products_through_whole_tensor_weight_norm():
    """``nn.utils.weight_norm(dim=None)`` (a 0-dim g): the exact weight-norm route crashed in
    forward mode (``norm_except_dim``'s forward derivative has the wrong shape)."""
    c = case("weight_norm")
    H = dense_hessian("weight_norm")
    V = vectors(len(H), 2, seed=3)
    got = unchanged(c.model, lambda: hvp(c.model, c.loss_fn, c.data, V, hvp_method="forward",
                                         progress=False)).numpy()
    np.testing.assert_allclose(got, V.numpy() @ H, rtol=0, atol=1e-6 * np.abs(H).max())


@pytest.mark.parametrize("shape,dim", [((3, 4), 0), ((3, 4), 1), ((3, 4), -1), ((5,), 0),
                                       ((5,), -1), ((2, 3, 4), 2)])
def test_the_exact_weight_norm_route_is_the_same_function(shape, dim):
    """The composite route equals the fused op's values and shapes for every ``dim``."""
    from analysis.operator import CompositeWeightNorm
    v = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = 1.3 * torch.norm_except_dim(v, 2, dim)
    want = torch._weight_norm(v, g, dim)
    with CompositeWeightNorm():
        got = torch._weight_norm(v, g, dim)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
