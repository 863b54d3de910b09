"""Machinery shared by the optimizers of this package that count passes or wrap a base optimizer.

``CountingOptimizer`` keeps two counters, ``n_steps`` (completed optimizer steps) and
``n_closure_calls`` (forward-backward passes run through ``step(closure)``), and saves them in
``state_dict()`` so that a resumed run continues them. ``WrapperOptimizer`` shares an already-built
base optimizer's ``param_groups`` (so LR schedulers attached to either act on both) and saves the
base optimizer's state inside its own state dict.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim import Optimizer

Closure = Callable[[], torch.Tensor]


class CountingOptimizer(Optimizer):
    """An ``Optimizer`` that counts its steps and closure calls and resumes them."""

    #: attributes saved under ``state_dict()["counters"]``; subclasses extend the tuple.
    _counter_names: tuple[str, ...] = ("n_steps", "n_closure_calls")

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

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["counters"] = {name: getattr(self, name) for name in self._counter_names}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        counters = state_dict.pop("counters")
        super().load_state_dict(state_dict)
        for name in self._counter_names:
            setattr(self, name, counters[name])


class WrapperOptimizer(CountingOptimizer):
    """An optimizer on top of ``base_optimizer`` whose ``param_groups`` are the base's own list.

    The wrapper's hyperparameters (``defaults``) are added to every param group under keys that
    do not collide with torch's optimizers (``sam_rho``, ``wsam_alpha``, ...).
    """

    def __init__(self, base_optimizer: Optimizer, defaults: dict[str, Any]):
        if not isinstance(base_optimizer, Optimizer):
            raise ValueError("base_optimizer must be an already-built torch.optim.Optimizer, "
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.base_optimizer.load_state_dict(state_dict.pop("base"))
        super().load_state_dict(state_dict)  # replaces self.param_groups by copies ...
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
