"""Hyperparameter validation for the optimizers (standard library only, besides torch).

The same signature and wording as ``analysis.core.validation`` (``optim`` may import only torch
and the standard library, so it keeps this module of its own): ``check_*(name, value, ...) ->
value`` and the message ``"NAME must be <accepted range>, got VALUE"``. A value of the wrong kind
raises :class:`ArgumentTypeError`, a ``TypeError`` that is also a ``ValueError`` (the error
``torch.optim`` raises for any bad hyperparameter); a value outside its range raises
``ValueError``. numpy scalars are accepted; ``bool`` is not a number.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
import warnings
from typing import Any, Callable, Sequence


class ArgumentTypeError(TypeError, ValueError):
    """A hyperparameter of the wrong kind (a ``TypeError``; also a ``ValueError``).

    The same class name and meaning as ``analysis.core.validation.ArgumentTypeError``.
    """


#: The name this exception had before it matched ``analysis``; kept as an alias.
HyperparameterTypeError = ArgumentTypeError


def _fail(name: str, accepted: str, value: Any, error: type[Exception] = ValueError) -> Exception:
    return error(f"{name} must be {accepted}, got {value!r}")


def check_number(name: str, value: Any, *, integer: bool = False, low: float | None = None,
                 high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> float | int:
    """Check a number against its bounds.

    Args:
        name: The argument's name, for the message.
        value: The value to check.
        integer: Require an ``int`` (numpy integers too) instead of a finite real number.
        low: Lower bound, inclusive unless ``low_open``.
        high: Upper bound, inclusive unless ``high_open``.
        low_open: Exclude ``low`` itself.
        high_open: Exclude ``high`` itself.

    Returns:
        ``value`` as a Python ``int`` or finite ``float``.

    Raises:
        ArgumentTypeError: ``value`` is not a number (or not an integer when ``integer``).
        ValueError: ``value`` is not finite or lies outside the bounds.
    """
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
    bounds = " and ".join(b for b in (lo, hi) if b)
    accepted = ("an int" if integer else "a finite number") + (f" {bounds}" if bounds else "")
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _fail(name, accepted, value, ArgumentTypeError)
    out = int(value) if integer else float(value)
    if not math.isfinite(out) or (low is not None and (out < low or low_open and out == low)) \
            or (high is not None and (out > high or high_open and out == high)):
        raise _fail(name, accepted, value)
    return out


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """An ``int`` with ``low <= value <= high`` (see :func:`check_number`)."""
    return check_number(name, value, integer=True, low=low, high=high)


def check_positive(name: str, value: Any) -> float:
    """A finite ``float`` > 0 (see :func:`check_number`)."""
    return check_number(name, value, low=0, low_open=True)


def check_nonnegative(name: str, value: Any) -> float:
    """A finite ``float`` >= 0 (see :func:`check_number`)."""
    return check_number(name, value, low=0)


def check_probability(name: str, value: Any, *, low_open: bool = False,
                      high_open: bool = False) -> float:
    """A ``float`` in [0, 1], ends excluded on request (see :func:`check_number`)."""
    return check_number(name, value, low=0, high=1, low_open=low_open, high_open=high_open)


def check_bool(name: str, value: Any) -> bool:
    """A ``bool`` or a numpy bool; never a string or a number.

    Raises:
        ArgumentTypeError: ``value`` is not a bool.
    """
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not (isinstance(value, bool) or numpy_bool):
        raise _fail(name, "True or False", value, ArgumentTypeError)
    return bool(value)


def check_betas(name: str, value: Any) -> tuple[float, float]:
    """A pair (beta1, beta2), each in [0, 1).

    Raises:
        ArgumentTypeError: ``value`` is not a pair of numbers.
        ValueError: a beta lies outside [0, 1).
    """
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise _fail(name, "a pair (beta1, beta2) with each in [0, 1)", value, ArgumentTypeError)
    return tuple(check_probability(f"{name}[{i}]", b, high_open=True) for i, b in enumerate(value))


def check_optional_positive(name: str, value: Any) -> float | None:
    """``None`` (off) or a finite ``float`` > 0."""
    return None if value is None else check_positive(name, value)


def check_optional_bool(name: str, value: Any) -> bool | None:
    """``None`` (automatic) or a ``bool``."""
    return None if value is None else check_bool(name, value)


def check_adam_group(group: dict, denominator: str, check_denominator: Callable) -> None:
    """Validate in place the keys the Adam-like param groups share.

    Args:
        group: The param group: ``lr``, ``betas``, ``weight_decay``, ``foreach``, ``fused`` and
            the denominator's floor are checked and replaced by their checked values.
        denominator: The floor's key (AGD's ``delta``, NDAdam's ``eps``).
        check_denominator: ``check_*(name, value)`` for the floor.
    """
    group["lr"] = check_nonnegative("lr", group["lr"])
    group["betas"] = check_betas("betas", group["betas"])
    group[denominator] = check_denominator(denominator, group[denominator])
    group["weight_decay"] = check_nonnegative("weight_decay", group["weight_decay"])
    for flag in ("foreach", "fused"):
        group[flag] = check_optional_bool(flag, group[flag])


def check_model(name: str, value: Any) -> Any:
    """``None`` or a ``torch.nn.Module`` (duck-typed on ``modules``, so no torch import).

    Raises:
        ArgumentTypeError: ``value`` is neither.
    """
    if value is not None and not callable(getattr(value, "modules", None)):
        raise ArgumentTypeError(f"{name} must be a torch.nn.Module or None, "
                                f"got {type(value).__name__}")
    return value


def keyword_only(*names: str) -> Callable[[Callable], Callable]:
    """Decorator: ``names``, now keyword-only, still accepted positionally for one release.

    A call that passes them positionally (in the order of ``names``, after the function's
    positional parameters) works as before, with a ``DeprecationWarning``.

    Args:
        *names: The keyword-only parameters that used to be positional, in their old order.

    Returns:
        The decorator.
    """
    def decorate(fn: Callable) -> Callable:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        n = sum(p.kind in kinds for p in inspect.signature(fn).parameters.values())
        owner = fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            extra = args[n:]
            if extra:
                if len(extra) > len(names):
                    raise TypeError(f"{owner}() takes at most {n - 1 + len(names)} positional "
                                    f"arguments, got {len(args) - 1}")
                for name, value in zip(names, extra):
                    if name in kwargs:
                        raise TypeError(f"{owner}() got multiple values for argument {name!r}")
                    kwargs[name] = value
                given = ", ".join(f"{name}=" for name in names[:len(extra)])
                warnings.warn(f"{owner}: passing {given} positionally is deprecated and will be an "
                              f"error in the next release; pass it as a keyword ({given}...)",
                              DeprecationWarning, stacklevel=2)
            return fn(*args[:n], **kwargs)

        return wrapper

    return decorate
