"""``loss_fn(model, batch)`` as an ``nn.Module``, for ``torch.func.functional_call``."""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn
from torch.func import functional_call

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


def _slots(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, owner, attribute)`` of every parameter and buffer slot, one per distinct module.

    A module registered under two names (``self.alias = self.block``) is listed once, under
    its first name; a tensor shared by two distinct modules (tied weights) gets one slot in
    each.
    """
    return [(f"{prefix}.{attr}" if prefix else attr, owner, attr)
            for prefix, owner in module.named_modules()
            for table in (owner._parameters, owner._buffers)
            for attr, value in table.items() if value is not None]


def own_call(module: nn.Module, tensors: Mapping[str, Tensor], args: tuple) -> Any:
    """``module(*args)`` with the named tensors swapped in, the module left exactly as found.

    ``torch.func.functional_call(tie_weights=True)`` swaps a tensor under every name that
    reaches it; when a module is registered under two names, the second swap records the
    first one's replacement as the "original", and the model keeps a plain (or an escaped
    ``torch.func``) tensor in place of its parameter afterwards. Here every slot holding a
    swapped tensor (the same tensor in distinct modules: tied weights) is swapped exactly
    once, and ``functional_call`` runs with ``tie_weights=False``, so it restores every slot
    to the module's own tensor.

    Args:
        module: The module (e.g. a :class:`LossModule`).
        tensors: Name (as in ``module.named_parameters()`` / ``named_buffers()``) -> the
            tensor to use in its place; a name of a tied tensor stands for all its slots.
        args: The positional arguments of the call.

    Returns:
        What ``module(*args)`` returns with the tensors swapped.
    """
    slots = _slots(module)
    current = dict(module.named_parameters(remove_duplicate=False))
    current.update(dict(module.named_buffers(remove_duplicate=False)))
    by_id = {id(current[n]): t for n, t in tensors.items() if n in current}
    mapping = {n: t for n, t in tensors.items() if n not in current}  # functional_call decides
    mapping.update({name: by_id[id(getattr(owner, attr))] for name, owner, attr in slots
                    if id(getattr(owner, attr)) in by_id})
    return functional_call(module, mapping, args, tie_weights=False)


__all__ = ["LossModule", "own_call"]
