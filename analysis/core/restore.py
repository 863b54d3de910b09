"""Snapshot and restore of a model around an analysis call.

Analysis never leaves a model changed: parameter values, buffers (BatchNorm running
statistics), ``.grad`` tensors, ``training`` flags and ``requires_grad`` flags are put back
exactly, also when the call raises.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from .compiled import refuse_compiled
from .sharding import is_dtensor
from .validation import check_model_mode

RENORMALISING = (nn.Embedding, nn.EmbeddingBag)  # ``max_norm`` rewrites rows in every forward


def _written_by_forward(model: nn.Module) -> set[int]:
    """Ids of the parameters that the model's own forward rewrites in place.

    ``nn.Embedding(max_norm=...)`` (and ``EmbeddingBag``) renormalise the rows they look up,
    in place, in every forward pass (with or without gradients).
    """
    return {id(p) for m in model.modules()
            if isinstance(m, RENORMALISING) and m.max_norm is not None
            for p in m.parameters(recurse=False)}


def _tensor_attributes(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Tensors that modules hold as plain attributes (neither parameters nor buffers).

    ``nn.utils.weight_norm`` keeps the weight it computes before every forward as such an
    attribute: a forward inside ``torch.func.vmap`` would leave an escaped batched tensor
    there (the module then cannot be copied or pickled), any other forward a tensor holding
    the library's autograd graph.
    """
    return [(mod, name, value) for mod in model.modules()
            for name, value in vars(mod).items() if isinstance(value, torch.Tensor)]


@contextmanager
def preserved(model: nn.Module, model_mode: str = "eval", *, weights: bool = True,
              trainable: Iterable[nn.Parameter] | None = None) -> Iterator[nn.Module]:
    """Put ``model`` in ``model_mode`` for the duration of the block, then restore it.

    Grads are set to None inside the block, so backward passes inside never touch the
    user's gradient tensors; on exit (also when the block raises) the training flags,
    ``requires_grad`` flags, grads, buffers and (with ``weights``) parameter values are put
    back exactly, and so are tensors that modules hold as plain attributes (the weight
    that ``nn.utils.weight_norm`` computes in each forward). FSDP2 units (``fully_shard``)
    whose parameters were sharded on entry are resharded on exit: a forward pass without
    backward (no_grad, or ``reshard_after_forward=False``) would otherwise leave their
    all-gathered plain parameters registered in place of the DTensor shards.

    PyTorch's inference fast path of ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoder(Layer)`` (``torch.backends.mha``) is off inside the block, so every
    forward the library makes, with or without gradients, runs the differentiable path: the
    fast path has no autograd and no vmap batching rule, and with a padding mask its
    nested-tensor output is zero at the padded positions, a different function from the one
    whose derivatives are taken (a loss that reads those positions would mix two functions).

    Args:
        model: An uncompiled module.
        model_mode: "eval" or "train", the mode inside the block.
        weights: Snapshot every parameter's values too (needed by routines that perturb the
            weights; curvature routines, which never write to parameters, pass False to save
            memory). Parameters that the model's forward itself rewrites
            (``nn.Embedding(max_norm=...)``, ``EmbeddingBag``) are snapshotted either way.
        trainable: If given, exactly these parameters get ``requires_grad=True`` inside the
            block and all others ``False`` (so autograd does no work for unselected
            parameters).

    Yields:
        ``model``.

    Raises:
        ValueError: A ``model_mode`` other than "eval" or "train".
        TypeError: ``model`` is a ``torch.compile``'d module.
    """
    check_model_mode(model_mode)
    refuse_compiled(model)
    params = list(model.parameters())
    flags = [(m, m.training) for m in model.modules()]
    requires = [(p, p.requires_grad) for p in params]
    grads = [(p, p.grad) for p in params]
    written = _written_by_forward(model)
    values = [(p, p.detach().clone()) for p in params if weights or id(p) in written]
    buffers = [(mod, name, buf, buf.detach().clone())
               for mod in model.modules() for name, buf in mod._buffers.items() if buf is not None]
    sharded = [m for m in model.modules() if hasattr(m, "_get_fsdp_state")
               and all(is_dtensor(p) for p in m.parameters(recurse=False))]
    attributes = _tensor_attributes(model)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        for p in params:
            p.grad = None
        if trainable is not None:
            chosen = {id(p) for p in trainable}
            for p in params:
                p.requires_grad_(id(p) in chosen)
        model.train(model_mode == "train")
        torch.backends.mha.set_fastpath_enabled(False)
        yield model
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m in sharded:
            m.reshard()
        for mod, name, value in attributes:
            mod.__dict__[name] = value
        with torch.no_grad():
            for p, v in values:
                p.copy_(v)
            for mod, name, buf, v in buffers:
                mod._buffers[name] = buf
                buf.copy_(v)
        for p, g in grads:
            p.grad = g
        for p, r in requires:
            p.requires_grad_(r)
        for m, t in flags:
            m.training = t
