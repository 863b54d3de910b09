"""The determinism verdict is reused for the same objects and unchanged data, and recorded."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from analysis import supervised, top_eigenvalues
from analysis.core import guards
from tests.oracles import classification_data, mlp

LOSS = supervised(nn.CrossEntropyLoss())
pytestmark = pytest.mark.filterwarnings("ignore:Lanczos did not converge")


@pytest.fixture
def passes(monkeypatch):
    """Count the determinism check's pairs of passes (the cache starts empty)."""
    calls = []
    real = guards.repeated_passes
    monkeypatch.setattr(guards, "repeated_passes",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(guards, "_VERDICTS", {})
    return calls


def top(model, data, **kw):
    return top_eigenvalues(model, LOSS, data, max_hvp=3, tol=1e-1, progress=False, **kw)


def check(result):
    record = result.metadata["determinism"]
    assert record["guard_seconds"] >= 0
    return record["check"]


def test_the_verdict_is_reused_for_the_same_data_and_recorded(passes):
    model = mlp((6, 5, 3))
    x, y = classification_data()
    data = [(x[:10], y[:10]), (x[10:], y[10:])]
    assert check(top(model, data)) == "passes"
    assert check(top(model, data)) == "reused" and len(passes) == 1
    assert check(top(model, list(data))) == "passes"  # another data object
    assert check(top(model, data, model_mode="train")) == "passes"
    assert check(top(model, data, check_deterministic=False)) == "off"
    assert len(passes) == 3


@pytest.mark.parametrize("change", ["append", "edit_first", "edit_last", "replace_first"])
def test_a_changed_list_is_checked_again(passes, change):
    model = mlp((6, 5, 3))
    x, y = classification_data()
    data = [(x[:10], y[:10]), (x[10:20], y[10:20])]
    assert check(top(model, data)) == "passes"
    if change == "append":
        data.append((x[20:], y[20:]))
    elif change == "edit_first":
        data[0][0].mul_(2)
    elif change == "edit_last":
        data[-1][0].add_(1)
    else:
        data[0] = (x[20:30], y[20:30])
    assert check(top(model, data)) == "passes" and len(passes) == 2


def test_a_shuffled_loader_is_checked_every_time(passes):
    model = mlp((6, 5, 3))
    x, y = classification_data(n=23)
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # eval mode, no drop_last: the loss agrees, the first batch does not
        assert check(top(model, loader)) == "passes"
    assert len(passes) == 2
    fixed = DataLoader(TensorDataset(x, y), batch_size=5)
    assert [check(top(model, fixed)) for _ in range(2)] == ["passes", "reused"]
    dropping = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # refused each time: a failing verdict is never kept
        with pytest.raises(ValueError, match="shuffle"):
            top(model, dropping)


def test_a_random_forward_is_refused_again_after_a_passing_call(passes):
    model = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), nn.Linear(5, 3)).double()
    x, y = classification_data()
    data = [(x, y)]
    assert check(top(model, data)) == "passes"  # eval mode: Dropout off
    with pytest.raises(ValueError, match="Dropout"):
        top(model, data, model_mode="train")
