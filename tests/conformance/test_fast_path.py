"""PyTorch's inference fast path of ``nn.TransformerEncoder`` / ``nn.MultiheadAttention``.

In eval mode without gradients, a masked ``nn.TransformerEncoder`` runs fused kernels on nested
tensors: no autograd, no vmap batching rule, and the padded positions of its output are zeros
(the differentiable "slow" path computes them). Every routine therefore evaluates the slow path,
the function whose derivatives it takes; the references below are direct float64 evaluations
of the same model with the fast path turned off (``torch.backends.mha``).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn

from analysis import average_sharpness, mean_loss, worst_case_sharpness
from landscape import line, plane, random_direction
from tests.oracles import assert_unchanged, snapshot

pytestmark = [pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
              pytest.mark.filterwarnings("ignore:There is a performance drop")]


class MaskedEncoder(nn.Module):
    """A one-layer ``nn.TransformerEncoder`` whose mean pooling reads the padded positions."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.enc, self.head = nn.TransformerEncoder(layer, 1), nn.Linear(4, 3)

    def forward(self, x, mask):
        return self.head(self.enc(x, src_key_padding_mask=mask).mean(1))


def encoder_problem():
    torch.manual_seed(0)
    model = MaskedEncoder().double().eval()
    x = torch.randn(4, 5, 4, dtype=torch.float64)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[1, 3:], mask[2, 4] = True, True  # left-aligned padding: the nested-tensor fast path
    return model, [(x, mask, torch.tensor([2, 0, 1, 0]))]


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0], batch[1]), batch[2])


@contextmanager
def slow_path():
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def slow_loss(model, data, shift=None):
    """The loss of ``model`` with ``shift`` (name -> tensor) added to a copy's weights."""
    model = copy.deepcopy(model)
    with torch.no_grad(), slow_path():
        for name, p in model.named_parameters():
            if shift is not None and name in shift:
                p.add_(shift[name])
        return loss_fn(model, data[0]).item()


def test_the_fast_path_is_another_function_here():
    """The premise: with a padding mask, the fast path's output differs from the slow path's."""
    model, data = encoder_problem()
    with torch.no_grad():
        fast = loss_fn(model, data[0]).item()
    assert abs(fast - slow_loss(model, data)) > 1e-3


@pytest.mark.parametrize("vectorize", [True, False, "auto"])
def test_plane_on_a_masked_transformer_encoder_is_the_slow_path(vectorize):
    """Item 9: ``plane(vectorize=True)`` raised (no batching rule for the fused layer)."""
    model, data = encoder_problem()
    d1, d2 = random_direction(model, seed=1), random_direction(model, seed=2)
    xs, ys = [-0.5, 0.0, 0.5], [0.0, 0.5]
    snap = snapshot(model)
    got = plane(model, loss_fn, data, d1, d2, xs, ys, vectorize=vectorize, progress=False)
    assert_unchanged(model, snap)
    assert torch.backends.mha.get_fastpath_enabled()
    want = np.array([[slow_loss(model, data, {n: a * d1[n] + b * d2[n] for n in d1})
                      for a in xs] for b in ys])
    np.testing.assert_allclose(got.losses, want, rtol=0, atol=1e-10)


def test_line_and_mean_loss_on_a_masked_transformer_encoder_are_the_slow_path():
    model, data = encoder_problem()
    d = random_direction(model, seed=3)
    got = line(model, loss_fn, data, d, [0.0, 1.0], vectorize=True, progress=False)
    np.testing.assert_allclose(got.losses, [slow_loss(model, data), slow_loss(model, data, d)],
                               rtol=0, atol=1e-10)
    assert abs(mean_loss(model, loss_fn, data, progress=False) - slow_loss(model, data)) < 1e-12


def test_worst_case_sharpness_on_a_masked_transformer_encoder_is_one_function():
    """Item 9: the ascent's gradient steps ran the slow path, its last (no-grad) step the fast
    one, and the larger of the two functions' values was reported (0.0523 for 0.0488)."""
    model, data = encoder_problem()
    snap = snapshot(model)
    got = worst_case_sharpness(model, loss_fn, data, rho=0.1, steps=5, progress=False)
    assert_unchanged(model, snap)
    base = slow_loss(model, data)
    assert abs(got.loss - base) < 1e-12
    assert abs(got.value - (slow_loss(model, data, got.delta) - base)) < 1e-10
    with slow_path():  # the routine on the slow path throughout: the same answer
        ref = worst_case_sharpness(model, loss_fn, data, rho=0.1, steps=5, progress=False)
    assert abs(got.value - ref.value) < 1e-10 and abs(got.sam_value - ref.sam_value) < 1e-10


def test_average_sharpness_on_a_masked_transformer_encoder_is_the_slow_path():
    model, data = encoder_problem()
    got = average_sharpness(model, loss_fn, data, sigma=0.05, n_samples=4, progress=False)
    with slow_path():
        ref = average_sharpness(model, loss_fn, data, sigma=0.05, n_samples=4, progress=False)
    assert abs(got.value - ref.value) < 1e-10
