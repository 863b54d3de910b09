r"""Diagonal preconditioners for the curvature routines (``preconditioner=``).

With a positive diagonal $P$ the routines work on $P^{-1/2} A P^{-1/2}$ for the curvature matrix
$A$ (Hessian, GGN, Fisher): symmetric, with the spectrum of $P^{-1} A$, the matrix whose largest
eigenvalue an adaptive optimizer's stability is decided by (Cohen et al. 2022, "Adaptive gradient
methods at the edge of stability": the preconditioned sharpness $\lambda_{\max}(P^{-1} H)$).
An eigenvector $u$ of $P^{-1/2} A P^{-1/2}$ gives $P^{-1/2} u$, the one of $P^{-1} A$.

Accepted forms of ``preconditioner``:

* a flat positive tensor over the selected parameters (``names`` order);
* a ``{parameter name: tensor}`` dict with one tensor of the parameter's shape per selected name;
* an optimizer with a ``preconditioner()`` method returning ``{parameter: tensor}`` (keyed like
  ``optimizer.state``), as sharpscape's adaptive optimizers do;
* a ``torch.optim.Adam`` / ``AdamW``, read from its state: $P = \sqrt{\hat v} + \epsilon$ with
  $\hat v$ = ``exp_avg_sq`` $/ (1 - \beta_2^t)$ (``max_exp_avg_sq`` with amsgrad), Cohen et al.'s
  definition (the learning rate stays in the threshold, not in ``P``).

Optimizers are read by duck typing only; ``analysis`` never imports ``optim``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .core import all_finite, flatten, numel

Preconditioner = None | Tensor | Mapping[str, Tensor] | Any

ACCEPTED = ("None, a flat positive tensor over the selected parameters, a {name: tensor} dict, "
            "an optimizer with preconditioner(), or a torch.optim.Adam/AdamW")


def adam_preconditioner(optimizer: torch.optim.Adam) -> dict[Tensor, Tensor]:
    r"""$P = \sqrt{\hat v} + \epsilon$ for every parameter a torch Adam/AdamW has stepped.

    Args:
        optimizer: A ``torch.optim.Adam`` or ``AdamW`` (``max_exp_avg_sq`` with amsgrad).

    Returns:
        ``{parameter: P}``.
    """
    out = {}
    for group in optimizer.param_groups:
        beta2 = group["betas"][1]
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
            bc2 = 1.0 - beta2 ** float(state["step"])
            out[p] = (v.detach() / bc2).sqrt_().add_(group["eps"])
    return out


def optimizer_preconditioner(optimizer: Any, model: nn.Module) -> dict[str, Tensor] | None:
    """``{name: P}`` from ``optimizer.preconditioner()`` or a torch Adam/AdamW's state.

    Args:
        optimizer: Any optimizer (read by duck typing).
        model: The model whose parameter names key the result.

    Returns:
        ``{name: P}`` for the parameters it has stepped; None if it has no diagonal
        preconditioner (e.g. SAM over SGD).
    """
    method = getattr(optimizer, "preconditioner", None)
    if callable(method):
        by_param = method()
    elif isinstance(optimizer, torch.optim.Adam):
        by_param = adam_preconditioner(optimizer)
    else:
        return None
    if by_param is None:
        return None
    return {name: by_param[p] for name, p in model.named_parameters() if p in by_param}


def per_parameter(preconditioner: Preconditioner, model: nn.Module) -> Mapping[str, Tensor] | None:
    """The optimizer and dict forms as ``{name: tensor}``.

    Args:
        preconditioner: Any accepted form (module docstring).
        model: The model whose parameter names key the result.

    Returns:
        ``{name: tensor}``; None and flat tensors pass through.

    Raises:
        TypeError: For an optimizer without a diagonal preconditioner.
    """
    if preconditioner is None or isinstance(preconditioner, (Tensor, Mapping)):
        return preconditioner
    named = optimizer_preconditioner(preconditioner, model)
    if named is None:
        raise TypeError(f"preconditioner must be {ACCEPTED}, got {type(preconditioner).__name__} "
                        "(without a diagonal preconditioner)")
    return named


def inverse_sqrt(preconditioner: Preconditioner, model: nn.Module, names: Sequence[str],
                 params: Sequence[Tensor]) -> Tensor | None:
    r"""$P^{-1/2}$ flat over the selected parameters, or None without a preconditioner.

    Args:
        preconditioner: Any accepted form (module docstring).
        model: The model.
        names: The selected parameters' names.
        params: The selected parameters.

    Returns:
        The flat $P^{-1/2}$ in the parameters' dtype and device, or None.

    Raises:
        ValueError: Naming the parameter when a selected one has no entry or a wrong shape,
            for a flat tensor of the wrong length, and when $P$ is not finite and positive.
        TypeError: For an optimizer without a diagonal preconditioner.
    """
    named = per_parameter(preconditioner, model)
    if named is None:
        return None
    like = params[0]
    if isinstance(named, Tensor):
        if named.dim() != 1 or named.numel() != numel(params):
            raise ValueError(f"preconditioner must be a 1-D tensor of length {numel(params)} (the "
                             f"selected parameter elements), got shape {tuple(named.shape)}")
        flat = named.detach().to(like.device, like.dtype)
    else:
        missing = [n for n in names if n not in named]
        if missing:
            raise ValueError(f"preconditioner has no entry for the parameters {missing} (an "
                             "optimizer has one only for parameters it has stepped)")
        for n, p in zip(names, params):
            if tuple(named[n].shape) != tuple(p.shape):
                raise ValueError(f"preconditioner[{n!r}] must have the parameter's shape "
                                 f"{tuple(p.shape)}, got {tuple(named[n].shape)}")
        flat = flatten([named[n].detach().to(like.device, like.dtype) for n in names])
    if not all_finite(flat) or not bool((flat > 0).all()):
        raise ValueError(f"preconditioner must be finite and positive, got values in "
                         f"[{flat.min().item():.3g}, {flat.max().item():.3g}]")
    return flat.rsqrt()


def stability_threshold(optimizer: Any) -> float | None:
    r"""The stability threshold $\frac{2 + 2\beta_1}{(1 - \beta_1)\, \eta}$ of an optimizer.

    That of preconditioned gradient descent with EMA momentum $\beta_1$ and learning rate
    $\eta$ (Cohen et al. 2022; $2 / \eta$ for $\beta_1 = 0$), from the first param
    group's ``lr`` and ``betas``.

    Args:
        optimizer: Any optimizer.

    Returns:
        The threshold; None when ``lr`` or ``betas`` is missing, or ``lr`` is not positive and
        finite.
    """
    groups = getattr(optimizer, "param_groups", None)
    if not groups or "lr" not in groups[0] or "betas" not in groups[0]:
        return None
    lr, beta1 = float(groups[0]["lr"]), float(groups[0]["betas"][0])
    if lr <= 0 or not math.isfinite(lr):
        return None
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
