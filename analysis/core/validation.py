"""Argument validation for ``analysis``, ``landscape`` and ``figures``.

One signature, ``check_*(name, value, ...) -> value``, and one message format,
``"NAME must be <accepted range>, got VALUE"``: ``TypeError`` for a value of the wrong kind,
``ValueError`` for one outside its range. The ``TypeError`` is an :class:`ArgumentTypeError`,
also a ``ValueError``, so code that caught the ``ValueError`` of earlier versions (every check
raised ValueError then) keeps working. numpy scalars are accepted wherever Python numbers are;
``bool`` is never taken for a number. ``optim._validation`` has the same signature and wording.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np

__all__ = ["ArgumentTypeError", "check_number", "check_int", "check_positive", "check_nonnegative",
           "check_probability", "check_choice", "check_model_mode", "MODEL_MODES", "check_bool",
           "check_dtype", "check_device", "all_finite", "renamed_keywords"]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong kind (a ``TypeError``; also a ``ValueError``, see above)."""


def _fail(name: str, accepted: str, value: Any, error: type[Exception] = ValueError) -> Exception:
    return error(f"{name} must be {accepted}, got {value!r}")


def check_number(name: str, value: Any, *, integer: bool = False, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False,
                 allow_inf: bool = False) -> float | int:
    """``value`` as a Python ``int`` (``integer=True``) or finite ``float`` inside the bounds.

    Args:
        name: The argument's name, for the message.
        value: The value passed.
        integer: Require an integer (numpy integers too; never a bool).
        low: The lower bound (None: unbounded), inclusive unless ``low_open``.
        high: The upper bound (None: unbounded), inclusive unless ``high_open``.
        low_open: Exclude ``low``.
        high_open: Exclude ``high``.
        allow_inf: Admit ``+inf`` as an upper value (a "no limit" setting).

    Returns:
        The value as ``int`` or ``float``.

    Raises:
        ArgumentTypeError: ``value`` is of the wrong kind.
        ValueError: ``value`` is outside the accepted range.
    """
    kind = numbers.Integral if integer else numbers.Real
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
    accepted = " and ".join(b for b in (lo, hi) if b)
    accepted = ("an int" if integer else "a number" if allow_inf else "a finite number") + \
        (f" {accepted}" if accepted else "")
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _fail(name, accepted, value, ArgumentTypeError)
    out = int(value) if integer else float(value)
    if not integer and (math.isnan(out) or (math.isinf(out) and not (allow_inf and out > 0))):
        raise _fail(name, accepted, value)
    if low is not None and (out < low or (low_open and out == low)):
        raise _fail(name, accepted, value)
    if high is not None and (out > high or (high_open and out == high)):
        raise _fail(name, accepted, value)
    return out


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """An ``int`` (numpy integers too) with ``low <= value <= high``.

    Args:
        name: The argument's name, for the message.
        value: The value passed.
        low: The smallest accepted value (None: unbounded).
        high: The largest accepted value (None: unbounded).

    Returns:
        The value as ``int``.

    Raises:
        ArgumentTypeError: ``value`` is of the wrong kind.
        ValueError: ``value`` is outside the accepted range.
    """
    return check_number(name, value, integer=True, low=low, high=high)


def check_positive(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """A finite ``float`` > 0 (``+inf`` too if ``allow_inf``).

    Args:
        name: The argument's name, for the message.
        value: The value passed.
        allow_inf: Admit ``+inf``.

    Returns:
        The value as ``float``.

    Raises:
        ArgumentTypeError: ``value`` is of the wrong kind.
        ValueError: ``value`` is outside the accepted range.
    """
    return check_number(name, value, low=0, low_open=True, allow_inf=allow_inf)


def check_nonnegative(name: str, value: Any) -> float:
    """A finite ``float`` >= 0.

    Args:
        name: The argument's name, for the message.
        value: The value passed.

    Returns:
        The value as ``float``.

    Raises:
        ArgumentTypeError: ``value`` is of the wrong kind.
        ValueError: ``value`` is outside the accepted range.
    """
    return check_number(name, value, low=0)


def check_probability(name: str, value: Any, *, low_open: bool = False,
                      high_open: bool = False) -> float:
    """A ``float`` in [0, 1] (ends excluded on request).

    Args:
        name: The argument's name, for the message.
        value: The value passed.
        low_open: Exclude 0.
        high_open: Exclude 1.

    Returns:
        The value as ``float``.

    Raises:
        ArgumentTypeError: ``value`` is of the wrong kind.
        ValueError: ``value`` is outside the accepted range.
    """
    return check_number(name, value, low=0, high=1, low_open=low_open, high_open=high_open)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices`` (strings).

    Args:
        name: The argument's name, for the message.
        value: The value passed.
        choices: The accepted strings.

    Returns:
        ``value``.

    Raises:
        ArgumentTypeError: ``value`` is not a string.
        ValueError: ``value`` is a string not among ``choices``.
    """
    if not isinstance(value, str) or value not in choices:
        raise _fail(name, "one of " + ", ".join(repr(c) for c in choices), value,
                    ValueError if isinstance(value, str) else ArgumentTypeError)
    return value


MODEL_MODES = ("eval", "train")


def check_model_mode(model_mode: str) -> str:
    """Validate ``model_mode=``.

    Args:
        model_mode: "eval" or "train".

    Returns:
        ``model_mode``.

    Raises:
        ValueError: Any other string (``ArgumentTypeError`` for a non-string).
    """
    return check_choice("model_mode", model_mode, MODEL_MODES)


def check_bool(name: str, value: Any) -> bool:
    """A ``bool`` (numpy bools too); never a string or a number.

    Args:
        name: The argument's name, for the message.
        value: The value passed.

    Returns:
        The value as ``bool``.

    Raises:
        ArgumentTypeError: ``value`` is not a bool.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise _fail(name, "True or False", value, ArgumentTypeError)
    return bool(value)


def check_dtype(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """None or one of the torch dtypes ``choices``.

    Args:
        name: The argument's name, for the message.
        value: The value passed.
        choices: The accepted dtypes.

    Returns:
        ``value``.

    Raises:
        ArgumentTypeError: ``value`` is not a dtype.
        ValueError: ``value`` is a dtype not among ``choices``.
    """
    if value is not None and value not in choices:
        import torch
        raise _fail(name, "None or one of " + ", ".join(str(c) for c in choices), value,
                    ValueError if isinstance(value, torch.dtype) else ArgumentTypeError)
    return value


def check_device(name: str, value: Any) -> Any:
    """None, or a ``torch.device`` (or its string, e.g. "cpu", "cuda:0") of a usable device.

    Args:
        name: The argument's name, for the message.
        value: The value passed.

    Returns:
        None or the ``torch.device``.

    Raises:
        ArgumentTypeError: ``value`` is neither a device nor a string.
        ValueError: The device cannot be used here.
    """
    if value is None:
        return None
    import torch
    if not isinstance(value, (str, torch.device)):
        raise _fail(name, 'None, a torch.device or a device string such as "cpu"', value,
                    ArgumentTypeError)
    try:
        device = torch.device(value)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise _fail(name, f"a usable device ({err})", value) from None
    return device


def all_finite(tensor: Any) -> bool:
    """Whether every element of a tensor is finite.

    From one min/max reduction (NaN propagates through both, and an infinity is the minimum
    or the maximum), without the vector-sized boolean temporaries of
    ``isfinite(tensor).all()``.

    Args:
        tensor: A tensor (integer, floating or complex).

    Returns:
        True when no element is NaN or infinite.
    """
    import torch
    if tensor.numel() == 0 or not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    if tensor.is_complex():
        return all_finite(torch.view_as_real(tensor))
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def renamed_keywords(**old_to_new: str):
    """Accept the old names of renamed keyword arguments for one release, with a warning.

    A decorator: ``@renamed_keywords(tolerance="tol")`` lets callers still pass ``tolerance=``,
    which is forwarded as ``tol=`` with a ``DeprecationWarning`` naming both; passing both
    names is an error. The wrapped function's signature (``inspect.signature``) stays the
    new one.

    Args:
        **old_to_new: Each old keyword name mapped to its new name.

    Returns:
        The decorator.

    Raises:
        TypeError: At call time, when both the old and the new name are passed.
    """
    import functools
    import warnings

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{func.__name__}() got both {old}= (the old name) "
                                        f"and {new}=; pass only {new}=")
                    warnings.warn(f"{func.__name__}(): {old}= is renamed {new}=; the old name "
                                  "will be removed in the next release",
                                  DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)
        wrapper.__renamed_keywords__ = dict(old_to_new)
        return wrapper
    return decorate
