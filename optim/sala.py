"""SALA: Sharpness-Aware Lookahead (Tan, Zhang, Liu, Gong; IEEE TPAMI 2024, doi 10.1109/TPAMI.2024.3444002),
as its authors' code (cltan023/sala2023) behaves."""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._two_pass import SAM_EPS, GradGuard, ascend_, first_pass, grouped, perturbation_norm
from ._validation import check_int, check_model, check_nonnegative
from .lookahead import check_alpha, swapped_slow_weights
from .wrapper import Closure, WrapperOptimizer


class SALA(WrapperOptimizer):
    """Sharpness-Aware Lookahead over an already-built base optimizer.

    The paper's two stages (its abstract: stage 1 steers along a quadratic approximation of the trajectory
    at no extra cost, stage 2 takes SAM steps; the steps as in the authors' code), with a global step
    counter s, slow weights phi and the fast-slow distance D (0 until the first slow update)::

        s <- s + 1;  g = grad L(theta)
        if s % k == 0:                                  first inner step of a cycle
            if D < rho:                                 stage 2: a SAM step
                theta <- theta + rho g_G / (||g_G||_2 + 1e-12)    one norm per param group G
                g = grad L(theta)                       (BatchNorm statistics are not frozen)
            theta <- phi                                stage 1: g is from the old fast weights
        theta <- base.step(theta, g)                    base state kept throughout
        if s % k == k - 1:                              slow update (phi = theta at the first one)
            phi <- phi + alpha (theta - phi)
            D = ||theta - phi||  = (1 - alpha) ||theta - phi_old||   (per group, then combined)
            if D < rho:  theta <- phi

    Param-group keys ``sala_alpha`` and ``sala_rho`` (the SAM radius); the stage threshold is the
    ``rho`` given at construction (one hyperparameter in the authors' code). Per-parameter state
    ``slow``. Attributes: ``stage`` (1 or 2), ``distance``, counters ``n_steps`` and ``n_closure_calls``
    (one pass per step, two on SAM steps: 1 + 1/k in stage 2). ``k >= 2``: with k = 1 the authors'
    code would move to slow weights that do not exist yet.
    """

    _counter_names = ("n_steps", "n_closure_calls", "distance")
    _state_keys = frozenset({"slow"})
    _step_supports_amp_scaling = True   # so that GradScaler.step reaches the error in step()

    def __init__(self, base_optimizer: Optimizer, k: int = 5, alpha: float = 0.8, rho: float = 0.05,
                 model: nn.Module | None = None):
        defaults = dict(sala_alpha=check_alpha(alpha), sala_rho=check_nonnegative("rho", rho))
        super().__init__(base_optimizer, defaults)
        self.k = check_int("k", k, low=2)
        self.rho = defaults["sala_rho"]
        self.model = check_model("model", model)
        self.distance = 0.0
        self._guard = GradGuard()

    @property
    def stage(self) -> int:
        """2 (SAM steps and synchronised fast weights) while ``distance < rho``, else 1."""
        return 2 if self.distance < self.rho else 1

    def _init_group(self, group: dict[str, Any]) -> list[Tensor]:
        """The parameters of ``group`` that have a gradient."""
        return [p for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, grad_scaler: Any = None) -> Tensor:
        """One SALA step; ``closure`` is called once, twice on the SAM steps of stage 2."""
        if closure is None:
            raise ValueError("SALA.step() needs a closure (it evaluates the gradient itself)")
        if grad_scaler is not None or getattr(self, "grad_scale", None) is not None:
            raise NotImplementedError("SALA does not support torch.amp.GradScaler: its closure's scaled "
                                      "gradients would reach the base optimizer; train SALA in float32 or "
                                      "bfloat16 autocast without a scaler")
        self._guard.check("SALA", self._params())
        closure = self._counted(closure)
        self.n_steps += 1
        cycle_start = self.n_steps % self.k == 0
        sam_step = cycle_start and self.stage == 2
        with first_pass(self.model) if sam_step else contextlib.nullcontext():
            loss = closure()
        if sam_step:
            self._sam_ascent()
            self.zero_grad()
            closure()
        if cycle_start:
            self._to_slow()
        self.base_optimizer.step()
        if self.n_steps % self.k == self.k - 1:
            self._update_slow()
            if self.stage == 2:
                self._to_slow()
        self._guard.remember(self._params())
        return loss

    def _sam_ascent(self) -> None:
        """theta_p += rho_G grad_p / (||grads of group G||_2 + 1e-12), per param group G."""
        for group in self.param_groups:
            params = self._init_group(group)
            if params:
                ascend_(params, [p.grad for p in params], group["sala_rho"] / (perturbation_norm(params) + SAM_EPS))

    def _to_slow(self) -> None:
        """theta <- phi for every parameter with a gradient."""
        for group in self.param_groups:
            params = self._init_group(group)
            for ps, ss in grouped(params, [self.state[p]["slow"] for p in params]):
                torch._foreach_copy_(ps, ss)

    def _update_slow(self) -> None:
        """phi += alpha (theta - phi) (phi created as theta on first use); sets ``distance``."""
        squares = []
        for group in self.param_groups:
            params = group["params"]
            for p in params:
                if "slow" not in self.state[p]:
                    self.state[p]["slow"] = p.detach().clone(memory_format=torch.preserve_format)
            group_sq = 0.0
            for ps, ss in grouped(params, [self.state[p]["slow"] for p in params]):
                diffs = torch._foreach_sub(ps, ss)
                group_sq += float(torch.stack(torch._foreach_norm(diffs, 2, dtype=torch.float64)).square().sum())
                torch._foreach_add_(ss, diffs, alpha=group["sala_alpha"])
            squares.append((math.sqrt(group_sq) * (1.0 - group["sala_alpha"])) ** 2)
        self.distance = math.sqrt(sum(squares))

    def slow_weights(self) -> contextlib.AbstractContextManager:
        """Context manager: the parameters hold the slow weights inside (the fast ones before the
        first slow update, when there are no slow weights yet) and the fast ones after."""
        return swapped_slow_weights([(p, self.state[p]["slow"]) for p in self._params() if "slow" in self.state[p]])
