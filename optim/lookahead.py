"""Lookahead (Zhang, Lucas, Hinton, Ba; NeurIPS 2019), and the slow-weight swap SALA shares."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._base import Closure, WrapperOptimizer, grouped
from ._sharded import local
from ._validation import check_int, check_number


@contextlib.contextmanager
def swapped_slow_weights(pairs: list[tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Swaps each (parameter, slow buffer) pair's values in, and back out on exit."""
    with torch.no_grad():
        for p, slow in pairs:
            _swap(local(p), local(slow))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, slow in pairs:
                _swap(local(p), local(slow))


def _swap(a: Tensor, b: Tensor) -> None:
    tmp = a.clone()
    a.copy_(b)
    b.copy_(tmp)


def check_alpha(alpha: Any) -> float:
    """The slow step alpha in (0, 1]."""
    return check_number("alpha", alpha, low=0, low_open=True, high=1)


class Lookahead(WrapperOptimizer):
    r"""Lookahead over an already-built base optimizer (Zhang et al. 2019, Algorithm 1).

    With inner optimizer $A$ (the base optimizer), slow weights $\phi$ and fast weights
    $\theta$:

    $$
    \begin{aligned}
    &\phi_0 = \theta_0\\
    &\text{for } t = 1, 2, \ldots:\\
    &\qquad \theta_{t,0} = \phi_{t-1}\\
    &\qquad \theta_{t,i} = \theta_{t,i-1} + A(L, \theta_{t,i-1}, d), \qquad i = 1, \ldots, k\\
    &\qquad \phi_t = \phi_{t-1} + \alpha\, (\theta_{t,k} - \phi_{t-1})
    \end{aligned}
    $$

    The base optimizer's state is kept across cycles (the paper's "maintain" option).
    Param-group key ``lookahead_alpha``; per-parameter state ``slow`` ($\phi$).
    ``slow_weights()`` swaps $\phi$ in for evaluation. Counters: ``n_steps``,
    ``n_closure_calls``.

    Args:
        base_optimizer: An already-built ``torch.optim.Optimizer``; its ``param_groups`` are
            shared.
        k: The number of inner steps per slow update, >= 1.
        alpha: The slow step $\alpha \in (0, 1]$.

    Raises:
        ArgumentTypeError: an argument of the wrong kind.
        ValueError: an argument outside its range.
    """

    _state_keys = frozenset({"slow"})

    def __init__(self, base_optimizer: Optimizer, k: int = 5, alpha: float = 0.5):
        alpha, k = check_alpha(alpha), check_int("k", k, low=1)   # before touching the base
        super().__init__(base_optimizer, dict(lookahead_alpha=alpha))
        self.k = k
        for group in self.param_groups:
            self._init_group(group)

    def _init_group(self, group: dict[str, Any]) -> list[Tensor]:
        """The slow buffers of ``group``, phi = theta where missing."""
        for p in group["params"]:
            if "slow" not in self.state[p]:
                self.state[p]["slow"] = p.detach().clone(memory_format=torch.preserve_format)
        return [self.state[p]["slow"] for p in group["params"]]

    def _required_state(self, index: int, entry: dict[str, Any],
                        state_dict: dict[str, Any]) -> frozenset[str]:
        """Every parameter has slow weights from construction on."""
        return frozenset({"slow"})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the base optimizer, with slow weights phi = theta.

        Args:
            param_group: As for ``torch.optim.Optimizer.add_param_group``.
        """
        super().add_param_group(param_group)
        if "base_optimizer" in self.__dict__:
            self._init_group(param_group)

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor | None:
        """One inner step of the base optimizer; every k-th step also the slow update.

        A step in which no parameter has a gradient (after the closure, if any) is no step,
        as in ``torch.optim``: it is not counted and never triggers the slow update.
        ``torch.compile(opt.step)`` runs it eagerly (``torch.compiler.disable``: dynamo cannot
        trace the per-parameter state dict it reads).

        Args:
            closure: Passed to the base optimizer's ``step`` (one pass for SGD/Adam); without
                it, ``step()`` follows the caller's own backward.

        Returns:
            What the base optimizer's step returns (the closure's loss).
        """
        loss = self.base_optimizer.step(None if closure is None else self._counted(closure))
        if all(p.grad is None for p in self._params()):
            return loss
        self.n_steps += 1
        if self.n_steps % self.k == 0:
            for group in self.param_groups:
                slow = [local(s) for s in self._init_group(group)]
                for ps, ss in grouped([local(p) for p in group["params"]], slow):
                    # phi += alpha (theta - phi)
                    torch._foreach_lerp_(ss, ps, group["lookahead_alpha"])
                    torch._foreach_copy_(ps, ss)  # theta <- phi
        return loss

    def slow_weights(self) -> contextlib.AbstractContextManager:
        """Swap the slow weights in, for evaluation.

        Returns:
            A context manager: the parameters hold the slow weights inside, the fast ones after.
        """
        return swapped_slow_weights([(p, self.state[p]["slow"]) for p in self._params()])
