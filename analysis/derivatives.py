"""Derivatives of the loss through the ops of a model.

Gradients, and the second derivatives that curvature products need:

* Fused scaled-dot-product-attention kernels (flash, memory-efficient, cuDNN: the Hugging Face
  default ``attn_implementation="sdpa"``, timm's fused attention) have a backward but neither a
  double backward nor a forward-mode derivative. :func:`curvature_ops` selects the math backend,
  built from ordinary differentiable ops (its values equal eager attention to rounding), for the
  products it encloses only: ``sdpa_kernel`` restores the caller's backend choice on exit.
* Any other op without a second derivative raises an error naming the op and the fix, instead
  of PyTorch's "derivative for ... is not implemented".
* A reentrant ``torch.utils.checkpoint`` is refused inside :func:`explained_errors`: its segments
  are invisible to ``torch.autograd.grad``, which raises when their inputs need gradients and
  otherwise silently returns ``None`` (zero) for the parameters inside, after torch's warning
  "None of the inputs have requires_grad=True", which the block turns into this error.
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .core.loss_ce import ChunkedCrossEntropy

_NO_DOUBLE_BACKWARD = re.compile(r"derivative for (\S+) is not implemented")
_NO_FORWARD_AD = re.compile(r"forward AD with (\S+) that does not support it")
_ONCE = "marked with @once_differentiable"
_NO_INPUT_GRAD = "None of the inputs have requires_grad=True"
_FUNC_LIMITS = ("saved tensor hooks", "setup_context")
REENTRANT = ("torch.utils.checkpoint(use_reentrant=True) hides the parameters of its segments "
             "from torch.autograd.grad (their gradients would silently be zero); use "
             "use_reentrant=False (exact results; the default of Hugging Face's "
             "gradient_checkpointing_enable()), or analyse in model_mode=\"eval\", where Hugging "
             "Face models do not checkpoint")


def _no_second_derivative(op: str) -> str:
    """Why curvature products fail at ``op``, with the fixes that apply to that kind of op."""
    head = (f"{op} has no second derivative in PyTorch, and Hessian-vector products "
            "differentiate the gradient")
    if "loss" in op.lower():  # the loss itself (CTC, ...): every parameter is before it
        return (f"{head}. It is an op of the loss, after every parameter, so no params= "
                "selection avoids it and no curvature (Hessian, GGN, Fisher) can be computed "
                "through it: write the loss with ops that have second derivatives, or use the "
                "first-order measures (worst_case_sharpness, average_sharpness, "
                "keskar_sharpness), which need gradients only")
    if any(name in op.lower() for name in ("attention", "flash", "efficient", "cudnn")):
        return (f"{head}. Fused attention is switched to the math backend automatically; "
                "for this kernel, use an implementation without it (for Hugging Face models "
                "attn_implementation=\"eager\")")
    return (f"{head}: use an implementation of the layer without this op, or leave the "
            "parameters before it out with params= (the curvature of those after it is "
            "computed), or use the first-order measures (worst_case_sharpness, ...)")


def _explained(err: Exception) -> str | None:
    """The message of ``err`` rephrased with the op and the fix.

    None if ``err`` is not about derivatives.
    """
    text = str(err)
    if (found := _NO_DOUBLE_BACKWARD.search(text)) or _ONCE in text:
        op = found[1].strip("'\"") if found else "a custom autograd.Function (@once_differentiable)"
        return _no_second_derivative(op)
    if (found := _NO_FORWARD_AD.search(text)) is not None:
        return (f"{found[1]} has no forward-mode derivative, which torch.func's products need "
                "(hvp_method=\"forward\", and the per-sample gradients of "
                "curvature=\"empirical_fisher\"); use hvp_method=\"reverse\" with another "
                "curvature")
    if any(limit in text for limit in _FUNC_LIMITS):
        return (f"hvp_method=\"forward\" (torch.func) cannot differentiate this model "
                f"({text.splitlines()[0]}); this is the case for torch.utils.checkpoint and other "
                "custom autograd.Functions: use hvp_method=\"reverse\"")
    if "Checkpointing is not compatible with .grad()" in text:
        return REENTRANT
    return None


@contextmanager
def explained_errors(enabled: bool = True) -> Iterator[None]:
    """Re-raise derivative errors of the block with the op's name and the fix.

    The block's forward and backward passes that need gradients; a reentrant
    ``torch.utils.checkpoint`` is refused (module docstring).

    Args:
        enabled: Explain the errors (False: a no-op).

    Yields:
        None.

    Raises:
        RuntimeError: A reentrant checkpoint, or an op without the derivative needed (the
            original error chained).
        NotImplementedError: Likewise, where PyTorch raised that type.
    """
    if not enabled:
        yield
        return
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=_NO_INPUT_GRAD, category=UserWarning)
            yield
    except UserWarning as err:
        raise RuntimeError(REENTRANT) from err
    except (RuntimeError, NotImplementedError) as err:
        better = _explained(err)
        if better is None:
            raise
        raise type(err)(better) from err


@contextmanager
def curvature_ops() -> Iterator[None]:
    """The math SDPA backend, explained derivative errors and a chunked LM cross-entropy.

    For the enclosed products only. A language model's head and cross-entropy are computed
    chunk by chunk over the tokens where the logits exceed one chunk
    (:class:`analysis.core.loss_ce.ChunkedCrossEntropy`): the memory of a product then grows
    with one chunk of logits, not several copies of them; values are unchanged to rounding.

    Yields:
        None.
    """
    with explained_errors(), sdpa_kernel(SDPBackend.MATH), ChunkedCrossEntropy():
        yield


def gradients(loss: Tensor, params: Sequence[Tensor], *, create_graph: bool = False
              ) -> list[Tensor | None]:
    r"""The gradient $\partial\, \mathrm{loss} / \partial\, \mathrm{params}$.

    Args:
        loss: A scalar tensor.
        params: The tensors to differentiate with respect to.
        create_graph: Keep the graph of the gradient (for a second derivative).

    Returns:
        One gradient per parameter, ``None`` for parameters the loss does not depend on.

    Raises:
        RuntimeError: An op without the derivative needed (explained, see
            :func:`explained_errors`).
    """
    with explained_errors():
        return list(torch.autograd.grad(loss, params, create_graph=create_graph,
                                        allow_unused=True))
