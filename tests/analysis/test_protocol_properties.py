"""Property tests of the protocol (hypothesis, small example counts)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from analysis import mean_loss, preserved, select_params, supervised
from analysis.core import data_mean, flatten, unflatten
from tests.oracles import assert_unchanged, classification_data, cnn_bn, mlp, snapshot

CE = supervised(nn.CrossEntropyLoss())
FEW = settings(max_examples=15, deadline=None)
X, Y = classification_data(n=29, d=6)
MODEL = mlp((6, 5, 3))
WHOLE = mean_loss(MODEL, CE, [(X, Y)], progress=False)


@st.composite
def splits(draw, n=len(Y)):
    """Random cut points: the same samples split into batches of random sizes (empties too)."""
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=8)))
    return [0, *cuts, n]


@FEW
@given(splits())
def test_mean_loss_is_invariant_to_the_batching(cuts):
    data = [(X[a:b], Y[a:b]) for a, b in zip(cuts, cuts[1:])]
    assert mean_loss(MODEL, CE, data, progress=False) == pytest.approx(WHOLE, rel=1e-12)


@FEW
@given(splits(), st.integers(1, 3))
def test_data_mean_of_sums_is_the_sample_mean(cuts, width):
    """data_mean of per-batch means equals the mean of all samples, for every tensor returned."""
    values = torch.arange(len(Y) * width, dtype=torch.float64).reshape(len(Y), width)
    data = [values[a:b] for a, b in zip(cuts, cuts[1:])]
    got = data_mean(data, lambda batch: [batch.mean(0), batch.sum(1).mean()]).values
    torch.testing.assert_close(got[0], values.mean(0), rtol=1e-13, atol=0)
    torch.testing.assert_close(got[1], values.sum(1).mean(), rtol=1e-13, atol=0)


@FEW
@given(st.data())
def test_select_params_by_names_tensors_and_predicate_agree(data):
    model = cnn_bn()
    named = list(model.named_parameters())
    mask = data.draw(st.lists(st.booleans(), min_size=len(named), max_size=len(named))
                     .filter(any))
    chosen = [n for (n, _), keep in zip(named, mask) if keep]
    order = data.draw(st.permutations(chosen))  # the order of the request does not matter
    by_names = select_params(model, order)
    by_tensors = select_params(model, [dict(named)[n] for n in order])
    by_predicate = select_params(model, lambda n, p: n in chosen)
    assert by_names[0] == by_tensors[0] == by_predicate[0] == chosen
    assert all(a is b is c for a, b, c in zip(by_names[1], by_tensors[1], by_predicate[1]))


shapes = st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
                  min_size=1, max_size=5)


@FEW
@given(shapes, st.sampled_from([torch.float32, torch.float64]))
def test_flatten_unflatten_round_trip(sizes, dtype):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=gen, dtype=dtype) for s in sizes]
    flat = flatten(tensors)
    assert flat.shape == (sum(t.numel() for t in tensors),) and flat.dtype == dtype
    back = unflatten(flat, tensors)
    assert all(b.shape == t.shape and torch.equal(b, t) for b, t in zip(back, tensors))
    with pytest.raises(ValueError, match="elements"):
        unflatten(torch.cat([flat, torch.zeros(1, dtype=dtype)]), tensors)


@FEW
@given(st.sampled_from(["eval", "train"]), st.booleans(), st.floats(-2, 2, allow_nan=False))
def test_preserved_restores_after_an_exception(mode, was_training, shift):
    model = cnn_bn().train(was_training)
    x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model(x).sum().backward()  # user grads that must survive
    next(model.parameters()).requires_grad_(False)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="inside"):
        with preserved(model, mode):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(shift)
            model.train()(x)  # moves BatchNorm's running statistics
            for p in model.parameters():
                p.requires_grad_(True)
            raise RuntimeError("inside")
    assert_unchanged(model, snap)
