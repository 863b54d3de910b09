"""``loss_fn(model, batch)`` as an ``nn.Module``, for ``torch.func.functional_call``."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .protocol import LossFn


class LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``: the whole loss as one module.

    ``torch.func.functional_call(LossModule(model, loss_fn), {"model." + name: tensor},
    (batch,))`` swaps ``model``'s tensors for the whole loss computation, while ``loss_fn``
    keeps its ``(model, batch)`` signature: attribute access and ``parameters()`` inside
    ``loss_fn`` see the swapped tensors, not only ``model.forward``. The wrapper's
    ``training`` flag copies the model's (``.train()`` would recurse into the model).

    Args:
        model: the model, registered as the submodule ``model`` (its tensors are named
            ``"model." + name``).
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.training = model.training

    def forward(self, batch: Any) -> Tensor:
        """``loss_fn(model, batch)``.

        Args:
            batch: one batch of the data.

        Returns:
            The loss ``loss_fn`` returns.
        """
        return self.loss_fn(self.model, batch)


__all__ = ["LossModule"]
