"""``supervised`` returns a ``Supervised`` loss that code recognises with ``isinstance``, and
``LossModule`` (``loss_fn`` as a module) swaps a model's tensors for the whole loss."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from analysis import supervised
from analysis.core import LossModule, Supervised, split_loss
from landscape import stacked
from tests.oracles import classification_data, mlp


def test_supervised_is_a_recognisable_loss_with_its_criterion_and_reduction():
    model = mlp()
    x, y = classification_data(n=11)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_fn = supervised(criterion)
    assert isinstance(loss_fn, Supervised)
    assert loss_fn.criterion is criterion and loss_fn.reduction == "sum"
    assert loss_fn(model, (x, y, "extra")).item() == criterion(model(x), y).item()
    forward, on_targets = loss_fn.split
    assert torch.equal(forward(model, (x, y)), model(x))
    assert on_targets(model(x), (x, y)).item() == criterion(model(x), y).item()
    plain = supervised(nn.functional.cross_entropy)  # no reduction attribute: a mean
    assert plain.reduction == "mean"
    assert plain(model, (x, y)).item() == pytest.approx(nn.functional.cross_entropy(model(x), y)
                                                        .item(), rel=1e-15)
    with pytest.raises(ValueError, match="criterion.reduction must be one of"):
        supervised(nn.CrossEntropyLoss(reduction="none"))


def test_the_stacked_path_takes_supervised_losses_only():
    """Recognised by its class, not by the shape of its code: a function with the same body
    and a subclass that changes the call are not the criterion alone."""
    model = mlp()
    ce = nn.CrossEntropyLoss()
    parts = {"0.weight": [(0, torch.ones_like(model[0].weight))]}
    assert stacked.sequential_plan(model, supervised(ce), parts).criterion is ce

    class Regularised(Supervised):
        def __call__(self, model, batch):
            return super().__call__(model, batch) + model[0].weight.square().sum()

    def same_body(model, batch):
        return ce(model(batch[0]), batch[1])

    same_body.criterion = ce
    for other in (Regularised(ce), same_body, split_loss(lambda m, b: m(b[0]),
                                                         lambda o, b: ce(o, b[1]))):
        assert stacked.sequential_plan(model, other, parts) is None
        assert not stacked.fixed_passes(model, other, [classification_data(n=5)], None, "eval")


def test_loss_module_swaps_the_tensors_for_the_whole_loss():
    """Also the tensors ``loss_fn`` reads itself (a penalty), not only ``model.forward``'s."""
    model = mlp().train()
    x, y = classification_data(n=7)
    ce = supervised(nn.CrossEntropyLoss())

    def penalised(m, batch):
        return ce(m, batch) + m[0].weight.square().sum()

    module = LossModule(model, penalised)
    assert module.training and not LossModule(model.eval(), penalised).training
    assert dict(module.named_parameters()).keys() == {f"model.{n}" for n, _ in
                                                       model.named_parameters()}
    zero = {f"model.{n}": torch.zeros_like(p) for n, p in model.named_parameters()}
    got = functional_call(module, zero, ((x, y),))
    assert got.item() == pytest.approx(math.log(3.0), rel=1e-12)
    assert module((x, y)).item() == penalised(model, (x, y)).item()
