"""``torch.compile``'d modules: analysed through the module they wrap.

A compiled module (``torch._dynamo``'s ``OptimizedModule``) shares its parameters with
``model._orig_mod`` but prefixes their names with ``_orig_mod.`` and runs graphs that
aot_autograd cannot differentiate twice. Public routines unwrap it with a one-line warning;
internal helpers that receive one anyway refuse it with an error saying what to pass.
"""
from __future__ import annotations

import warnings

from torch import nn


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.compile``'d module.

    Args:
        model: A module.

    Returns:
        True when it wraps a module as ``model._orig_mod``.
    """
    return isinstance(getattr(model, "_orig_mod", None), nn.Module)


def unwrap_compiled(model: nn.Module, argname: str = "model") -> nn.Module:
    """The module a compiled ``model`` wraps (with a warning), or ``model`` itself.

    Args:
        model: A module, compiled or not.
        argname: The argument's name in the warning.

    Returns:
        ``model._orig_mod`` for a compiled module, ``model`` otherwise.
    """
    if not is_compiled(model):
        return model
    warnings.warn(f"{argname} is a torch.compile'd module: analysing {argname}._orig_mod (the same "
                  "parameters, uncompiled; compiled graphs have no double backward)", UserWarning,
                  stacklevel=3)
    return model._orig_mod


def refuse_compiled(model: nn.Module, argname: str = "model") -> None:
    """Refuse a compiled module, saying how to pass the module it wraps.

    Args:
        model: A module.
        argname: The argument's name in the error.

    Raises:
        TypeError: ``model`` is a ``torch.compile``'d module.
    """
    if is_compiled(model):
        raise TypeError(f"{argname} must be an uncompiled module, got a torch.compile'd one; pass "
                        f"{argname}._orig_mod (the same parameters, with their own names)")
