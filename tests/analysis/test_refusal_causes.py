"""Refusals name the actual cause (issue 31).

A stochastic layer in train mode (ConvNeXt's drop path) was reported as "a shuffled
DataLoader or random augmentation"; CTC's missing second derivative was refused with fixes
(attn_implementation, params=) that do not apply to an op of the loss.
"""
import pytest
import torch
from torch import nn

from analysis import hessian_trace, top_eigenvalues, worst_case_sharpness
from analysis.core import supervised
from tests.oracles import classification_data, uneven_batches

CE = supervised(nn.CrossEntropyLoss())


class ConvNextDropPath(nn.Module):
    """Stochastic depth as ConvNeXt writes it: not an nn.Dropout subclass."""

    def forward(self, x):
        if not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, dtype=x.dtype).ge(0.3).to(x.dtype)
        return x * keep / 0.7


class Noisy(nn.Module):
    """A layer drawing random numbers whose name says nothing."""

    def forward(self, x):
        return x + 0.1 * torch.randn_like(x) if self.training else x


def _model(layer):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), layer, nn.Linear(5, 3)).double()


def _data():
    x, y = classification_data(n=23, d=6)
    return uneven_batches(x, y)


@pytest.mark.parametrize("layer, named", [(ConvNextDropPath, "ConvNextDropPath"),
                                          (Noisy, "Dropout, drop path")])
def test_stochastic_layer_in_train_mode_is_named(layer, named):
    with pytest.raises(ValueError, match="batches are the same") as raised:
        hessian_trace(_model(layer()), CE, _data(), n_hvp=4, model_mode="train", progress=False)
    message = str(raised.value)
    assert f"stochastic layers in train mode ({named}" in message
    assert "model_mode='eval'" in message and "shuffled" not in message
    hessian_trace(_model(layer()), CE, _data(), n_hvp=4, progress=False)  # eval: deterministic


def test_random_data_is_still_blamed_on_the_data():
    x, y = classification_data(n=23, d=6)

    class Augmented:
        def __iter__(self):
            yield x + 0.1 * torch.randn_like(x), y

    with pytest.raises(ValueError, match="shuffled DataLoader.*random augmentation"):
        hessian_trace(_model(nn.Identity()), CE, Augmented(), n_hvp=4, progress=False)


def _ctc(model, batch):
    x, y = batch
    log_probs = model(x).log_softmax(-1).transpose(0, 1)  # [T, N, C]
    n, t = x.shape[:2]
    return nn.functional.ctc_loss(log_probs, y, torch.full((n,), t), torch.full((n,), y.shape[1]))


def test_ctc_refusal_gives_fixes_that_apply():
    torch.manual_seed(0)
    model = nn.Linear(4, 6, dtype=torch.float64)
    data = [(torch.randn(2, 8, 4, dtype=torch.float64), torch.randint(1, 6, (2, 3)))]
    with pytest.raises(RuntimeError, match="ctc_loss_backward has no second derivative") as err:
        top_eigenvalues(model, _ctc, data, progress=False)
    message = str(err.value)
    assert "op of the loss, after every parameter" in message
    assert "worst_case_sharpness" in message
    assert "attn_implementation" not in message and "leave the parameters" not in message
    assert worst_case_sharpness(model, _ctc, data, steps=2, progress=False).value >= 0
