"""The embedded data set's batching (analysis/datasets.py)."""
import pytest
import torch

from analysis.datasets import TensorDataset


def tiny():
    x = torch.arange(10.0).reshape(5, 2)
    return TensorDataset(x, torch.arange(5), -x[:3], torch.arange(3))


def test_batches_of_each_split():
    data = tiny()
    train, test = data.batches(2), data.batches(2, split="test")
    assert [len(b[1]) for b in train] == [2, 2, 1] and [len(b[1]) for b in test] == [2, 1]
    assert torch.equal(torch.cat([b[0] for b in test]), data.x_test)


@pytest.mark.parametrize("split", ["Test", "val", "", "training"])
def test_an_unknown_split_is_refused_not_read_as_test(split):
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'test'"):
        tiny().batches(2, split=split)


def test_a_split_that_is_not_a_string_is_refused():
    with pytest.raises(TypeError, match="split"):
        tiny().batches(2, split=None)
