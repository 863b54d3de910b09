"""What every optimizer of this package shares: checked state loading, pass counters, and wrapping.

``CheckedState`` tags ``state_dict()`` with the optimizer's class and refuses, before anything is
changed, a state dict made by another class or lacking the keys this one needs. ``CountingOptimizer``
adds ``n_steps`` (completed steps) and ``n_closure_calls`` (forward-backward passes run through
``step(closure)``), saved so that a resumed run continues them. ``WrapperOptimizer`` shares an
already-built base optimizer's ``param_groups`` (so LR schedulers attached to either act on both) and
saves the base optimizer's state inside its own.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim import Optimizer

from ._validation import HyperparameterTypeError

Closure = Callable[[], torch.Tensor]

def use_foreach(foreach: bool | None, tensors: list[torch.Tensor]) -> bool:
    """The multi-tensor path by default on accelerators (where it is faster), as torch.optim does."""
    if foreach is not None:
        return foreach
    return bool(tensors) and all(t.device.type != "cpu" for t in tensors)


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 for float16/bfloat16 parameters (moments, eps^2 and small norms underflow there), else p's
    dtype: the dtype of the state and arithmetic kept for ``p``."""
    return torch.promote_types(p.dtype, torch.float32)


def closure_loss(closure: Closure | None) -> torch.Tensor | None:
    """The loss of ``closure`` run under grad mode (the steps themselves run under no_grad), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


#: param-group keys that torch.optim fills in itself when an older state dict lacks them
_TORCH_FILLED = frozenset({"foreach", "maximize", "capturable", "differentiable", "fused",
                           "decoupled_weight_decay"})


def check_state_dict(optimizer: Optimizer, state_dict: Any, extra: tuple[str, ...] = (),
                     state_keys: frozenset[str] | None = None) -> None:
    """Raise ``ValueError`` unless ``state_dict`` can be ``optimizer``'s: its class tag (when present),
    the top-level keys ``state``, ``param_groups`` and ``extra``, the group and parameter counts, every
    hyperparameter key of ``optimizer.defaults``, and (``state_keys``) the per-parameter state keys."""
    name = type(optimizer).__name__
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict made by {name}.state_dict(), got {type(state_dict).__name__}")
    made_by = state_dict.get("optimizer")
    if made_by is not None and made_by != name:
        raise ValueError(f"state_dict was made by {made_by}, not by {name}")
    missing = sorted({"state", "param_groups", *extra} - state_dict.keys())
    if missing:
        raise ValueError(f"state_dict lacks {missing}: it was not made by {name}.state_dict()")
    groups = state_dict["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError(f"state_dict has param groups of sizes {sizes}, {name} has "
                         f"{[len(g['params']) for g in optimizer.param_groups]}")
    needed = set(optimizer.defaults) - _TORCH_FILLED
    for i, group in enumerate(groups):
        lacking = sorted(needed - group.keys())
        if lacking:
            raise ValueError(f"state_dict param group {i} lacks {lacking}: it was made by another optimizer "
                             f"class than {name}")
    if state_keys is not None:
        for index, state in state_dict["state"].items():
            foreign = sorted(set(state) - state_keys)
            if foreign:
                raise ValueError(f"state_dict holds per-parameter state {foreign} (parameter {index}) that "
                                 f"{name} does not use: it was made by another optimizer class")


class CheckedState(Optimizer):
    """An ``Optimizer`` whose ``load_state_dict`` checks class and keys before changing anything.

    Subclasses name the per-parameter state keys they may hold in ``_state_keys`` and any extra
    top-level entries of their state dict in ``_extra_keys``.
    """

    _state_keys: frozenset[str] | None = None
    _extra_keys: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["optimizer"] = type(self).__name__
        return state

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_dict(self, state_dict, self._extra_keys, self._state_keys)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_state_dict(state_dict)
        super().load_state_dict({k: v for k, v in state_dict.items() if k in ("state", "param_groups")})


class CountingOptimizer(CheckedState):
    """An optimizer that counts its steps and closure calls and resumes them."""

    #: attributes saved under ``state_dict()["counters"]``; subclasses extend the tuple.
    _counter_names: tuple[str, ...] = ("n_steps", "n_closure_calls")
    _extra_keys = ("counters",)

    def __init__(self, params, defaults: dict[str, Any]):
        super().__init__(params, defaults)
        self.n_steps = 0
        self.n_closure_calls = 0

    def _counted(self, closure: Closure) -> Closure:
        """``closure`` run with gradients enabled, each call adding one to ``n_closure_calls``."""

        def counted():
            self.n_closure_calls += 1
            with torch.enable_grad():
                return closure()

        return counted

    def _params(self) -> list[torch.Tensor]:
        """Every parameter of every param group, in ``param_groups`` order."""
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["counters"] = {name: getattr(self, name) for name in self._counter_names}
        return state

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().check_state_dict(state_dict)
        missing = sorted(set(self._counter_names) - set(state_dict["counters"]))
        if missing:
            raise ValueError(f"state_dict counters lack {missing}: it was not made by {type(self).__name__}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for name in self._counter_names:
            setattr(self, name, state_dict["counters"][name])


class WrapperOptimizer(CountingOptimizer):
    """An optimizer on top of ``base_optimizer`` whose ``param_groups`` are the base's own list.

    The wrapper's hyperparameters (``defaults``) are added to every param group under keys that
    do not collide with torch's optimizers (``sam_rho``, ``wsam_alpha``, ...).
    """

    _extra_keys = ("counters", "base")

    def __init__(self, base_optimizer: Optimizer, defaults: dict[str, Any]):
        if not isinstance(base_optimizer, Optimizer):
            raise HyperparameterTypeError("base_optimizer must be an already-built torch.optim.Optimizer, "
                            f"got {type(base_optimizer).__name__}")
        collide = sorted(k for k in defaults if k in base_optimizer.defaults)
        if collide:
            raise ValueError(f"base_optimizer already uses the param-group keys {collide}")
        # Optimizer.__init__ sets our defaults on the base's group dicts (the same dict objects).
        super().__init__(base_optimizer.param_groups, defaults)
        self._wrapper_defaults = dict(defaults)
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.defaults = {**base_optimizer.defaults, **defaults}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "base_optimizer" not in self.__dict__:  # called from Optimizer.__init__
            super().add_param_group(param_group)
            return
        self.base_optimizer.add_param_group(param_group)  # appends this very dict to the shared list
        for name, value in self._wrapper_defaults.items():
            param_group.setdefault(name, value)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["base"] = self.base_optimizer.state_dict()
        return state

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().check_state_dict(state_dict)
        base = self.base_optimizer
        if isinstance(base, CheckedState):
            base.check_state_dict(state_dict["base"])
        else:
            check_state_dict(base, state_dict["base"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_state_dict(state_dict)
        try:
            self.base_optimizer.load_state_dict(state_dict["base"])
            super().load_state_dict(state_dict)  # replaces self.param_groups by copies ...
        finally:
            self.param_groups = self.base_optimizer.param_groups  # ... so share the base's again

    @torch.no_grad()
    def preconditioner(self) -> dict[torch.Tensor, torch.Tensor] | None:
        """The base optimizer's diagonal preconditioner per stepped parameter: its own
        ``preconditioner()``, or for torch's Adam/AdamW sqrt(v̂) + eps with v̂ = exp_avg_sq / (1 - beta2^t)
        (``max_exp_avg_sq`` with amsgrad), the denominator of their step. None for other bases (SGD)."""
        base = self.base_optimizer
        if callable(getattr(base, "preconditioner", None)):
            return base.preconditioner()
        if not isinstance(base, torch.optim.Adam):
            return None
        out = {}
        for group in base.param_groups:
            for p in group["params"]:
                state = base.state.get(p)
                if state:
                    v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
                    out[p] = (v / (1.0 - group["betas"][1] ** float(state["step"]))).sqrt_().add_(group["eps"])
        return out
