"""Hyperparameter validation for the optimizers (standard library only, like the rest of optim beside torch).

Same signature and wording as ``analysis.core.validation``: ``check_*(name, value, ...) -> value``,
``"NAME must be <accepted range>, got VALUE"``; ``TypeError`` for the wrong kind of value,
``ValueError`` outside the range. numpy scalars are accepted; ``bool`` is not a number. The wrong kind
raises ``HyperparameterTypeError``, a ``TypeError`` that is also a ``ValueError``, the error
``torch.optim`` raises for any bad hyperparameter.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence


class HyperparameterTypeError(TypeError, ValueError):
    """A hyperparameter of the wrong kind (a ``TypeError``, and a ``ValueError`` as in ``torch.optim``)."""


def check_number(name: str, value: Any, *, integer: bool = False, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False) -> float | int:
    """``value`` as an ``int`` (``integer=True``) or a finite ``float`` within the (inclusive unless open) bounds."""
    bounds = [f"{'>' if o else '>='} {b}" if i == 0 else f"{'<' if o else '<='} {b}"
              for i, (b, o) in enumerate(((low, low_open), (high, high_open))) if b is not None]
    accepted = " ".join(["an int" if integer else "a finite number", " and ".join(bounds)]).strip()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise HyperparameterTypeError(f"{name} must be {accepted}, got {value!r}")
    out = int(value) if integer else float(value)
    if not math.isfinite(out) or (low is not None and (out < low or low_open and out == low)) \
            or (high is not None and (out > high or high_open and out == high)):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return out


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    return check_number(name, value, integer=True, low=low, high=high)


def check_positive(name: str, value: Any) -> float:
    return check_number(name, value, low=0, low_open=True)


def check_nonnegative(name: str, value: Any) -> float:
    return check_number(name, value, low=0)


def check_probability(name: str, value: Any, *, low_open: bool = False, high_open: bool = False) -> float:
    return check_number(name, value, low=0, high=1, low_open=low_open, high_open=high_open)


def check_bool(name: str, value: Any) -> bool:
    """A ``bool`` or a numpy bool; never a string or a number."""
    if not (isinstance(value, bool) or type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        raise HyperparameterTypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_betas(name: str, value: Any) -> tuple[float, float]:
    """A pair (beta1, beta2), each in [0, 1)."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise HyperparameterTypeError(f"{name} must be a pair (beta1, beta2) with each in [0, 1), got {value!r}")
    return tuple(check_probability(f"{name}[{i}]", b, high_open=True) for i, b in enumerate(value))


def check_optional_positive(name: str, value: Any) -> float | None:
    """``None`` (off) or a finite ``float`` > 0."""
    return None if value is None else check_positive(name, value)


def check_optional_bool(name: str, value: Any) -> bool | None:
    """``None`` (automatic) or a ``bool``."""
    return None if value is None else check_bool(name, value)


def check_adam_group(group: dict, denominator: str, check_denominator) -> None:
    """Validate in place the keys that the Adam-like groups share: ``lr``, ``betas``, ``weight_decay``,
    ``foreach``, ``fused`` and the denominator's floor (AGD's ``delta``, NDAdam's ``eps``)."""
    group["lr"] = check_nonnegative("lr", group["lr"])
    group["betas"] = check_betas("betas", group["betas"])
    group[denominator] = check_denominator(denominator, group[denominator])
    group["weight_decay"] = check_nonnegative("weight_decay", group["weight_decay"])
    for flag in ("foreach", "fused"):
        group[flag] = check_optional_bool(flag, group[flag])


def check_model(name: str, value: Any) -> Any:
    """``None`` or a ``torch.nn.Module`` (checked by duck typing on ``modules``, so no torch import)."""
    if value is not None and not callable(getattr(value, "modules", None)):
        raise HyperparameterTypeError(f"{name} must be a torch.nn.Module or None, got {type(value).__name__}")
    return value
