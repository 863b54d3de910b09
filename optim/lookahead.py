"""Lookahead (Zhang, Lucas, Hinton, Ba; NeurIPS 2019, Algorithm 1).

The base optimizer takes k fast steps from the slow weights; then phi <- phi + alpha (theta - phi)
and theta <- phi. The slow weights start at the parameters at construction (phi_0 = theta_0) and the
base optimizer's state is kept across cycles.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.optim import Optimizer

from .sam import grouped
from .wrapper import Closure, WrapperOptimizer


def check_k(k: int, minimum: int = 1) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < minimum:
        raise ValueError(f"k must be an integer >= {minimum}, got {k!r}")
    return k


def check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha <= 1.0):
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    return float(alpha)


@contextlib.contextmanager
def swapped_slow_weights(pairs: list[tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Swaps each (parameter, slow buffer) pair's values in, and back out on exit."""
    with torch.no_grad():
        for p, slow in pairs:
            _swap(p, slow)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, slow in pairs:
                _swap(p, slow)


def _swap(a: Tensor, b: Tensor) -> None:
    tmp = a.clone()
    a.copy_(b)
    b.copy_(tmp)


class Lookahead(WrapperOptimizer):
    """Lookahead over an already-built base optimizer.

    Param-group key ``lookahead_alpha``; per-parameter state ``slow`` (phi). ``step(closure)`` passes
    the closure to the base optimizer (one pass for SGD/Adam); ``step()`` after the caller's own
    backward also works. ``slow_weights()`` swaps phi in for evaluation. Counters: ``n_steps``,
    ``n_closure_calls``.
    """

    def __init__(self, base_optimizer: Optimizer, k: int = 5, alpha: float = 0.5):
        super().__init__(base_optimizer, dict(lookahead_alpha=check_alpha(alpha)))
        self.k = check_k(k)
        for group in self.param_groups:
            self._init_slow(group)

    def _init_slow(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            self.state[p]["slow"] = p.detach().clone(memory_format=torch.preserve_format)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if "base_optimizer" in self.__dict__:
            self._init_slow(param_group)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor | None:
        loss = self.base_optimizer.step(None if closure is None else self._counted(closure))
        self.n_steps += 1
        if self.n_steps % self.k == 0:
            for group in self.param_groups:
                params = group["params"]
                slows = [self.state[p]["slow"] for p in params]
                for ps, ss in grouped(params, slows):
                    torch._foreach_lerp_(ss, ps, group["lookahead_alpha"])  # phi += alpha (theta - phi)
                    torch._foreach_copy_(ps, ss)  # theta <- phi
        return loss

    def slow_weights(self) -> contextlib.AbstractContextManager:
        """Context manager: the parameters hold the slow weights inside, the fast ones after."""
        return swapped_slow_weights([(p, self.state[p]["slow"]) for g in self.param_groups
                                     for p in g["params"]])
