"""SALA: Sharpness-Aware Lookahead (Tan, Zhang, Liu, Gong; IEEE TPAMI 2024), as its authors' code
(cltan023/sala2023) behaves.

A global step counter s, slow weights phi created at the first slow update (s = k - 1) as a copy
of the fast weights, and the last measured distance D between fast and (new) slow weights:

* s % k == 0 (the first inner step of a cycle): if D < rho (stage 2), SAM ascent from theta with a
  per-param-group gradient norm and a second pass at theta + e (BatchNorm stats are NOT frozen);
  then theta <- phi for every parameter with a gradient. In stage 1 the gradient used at phi is
  thus the one from the previous fast weights (an extrapolation along the trajectory).
* the base optimizer steps (its state is kept throughout).
* s % k == k - 1: phi <- phi + alpha (theta - phi), D = ||theta - phi_new|| = (1 - alpha) ||theta - phi_old||,
  and if D < rho the fast weights are synchronised (theta <- phi).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .lookahead import check_alpha, check_k, swapped_slow_weights
from .sam import SAM_EPS, check_model, check_rho, first_pass, grouped, perturbation_norm
from .wrapper import Closure, WrapperOptimizer


class SALA(WrapperOptimizer):
    """Sharpness-Aware Lookahead over an already-built base optimizer.

    Param-group keys ``sala_alpha`` and ``sala_rho`` (the SAM radius); the stage threshold is the
    ``rho`` given at construction (as in the authors' code). Per-parameter state ``slow``.
    Attributes: ``stage`` (1 or 2), ``distance`` (last measured fast-slow distance), counters
    ``n_steps`` and ``n_closure_calls`` (one pass per step, two on SAM steps: 1 + 1/k in stage 2).
    ``k`` must be >= 2: with k = 1 the authors' code would move to slow weights that do not exist yet.
    """

    _counter_names = ("n_steps", "n_closure_calls", "distance")

    def __init__(self, base_optimizer: Optimizer, k: int = 5, alpha: float = 0.8, rho: float = 0.05,
                 model: nn.Module | None = None):
        defaults = dict(sala_alpha=check_alpha(alpha), sala_rho=check_rho(rho))
        super().__init__(base_optimizer, defaults)
        self.k = check_k(k, minimum=2)
        self.rho = defaults["sala_rho"]
        self.model = check_model(model)
        self.distance = 0.0

    @property
    def stage(self) -> int:
        """2 (SAM steps and synchronised fast weights) while ``distance < rho``, else 1."""
        return 2 if self.distance < self.rho else 1

    def _with_grad(self) -> list[tuple[dict, list[Tensor]]]:
        return [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]

    def _to_slow(self) -> None:
        """theta <- phi for every parameter with a gradient."""
        for _, params in self._with_grad():
            for ps, ss in grouped(params, [self.state[p]["slow"] for p in params]):
                torch._foreach_copy_(ps, ss)

    def _sam_ascent(self) -> None:
        """theta_p += rho_G * grad_p / (||grads of group G|| + 1e-12), per param group G."""
        for group, params in self._with_grad():
            if not params:
                continue
            norm = perturbation_norm(params)
            factor = group["sala_rho"] / (norm + SAM_EPS)
            for (ps,) in grouped(params):
                torch._foreach_add_(ps, torch._foreach_mul([p.grad for p in ps], factor.to(ps[0])))

    def _update_slow(self) -> None:
        """phi += alpha (theta - phi) (phi created as theta on first use); sets ``distance``."""
        squares = []
        for group in self.param_groups:
            params = group["params"]
            for p in params:
                if "slow" not in self.state[p]:
                    self.state[p]["slow"] = p.detach().clone(memory_format=torch.preserve_format)
            alpha = group["sala_alpha"]
            group_sq = 0.0
            for ps, ss in grouped(params, [self.state[p]["slow"] for p in params]):
                diffs = torch._foreach_sub(ps, ss)
                group_sq += float(torch.stack(torch._foreach_norm(diffs, 2, dtype=torch.float64)
                                              ).square().sum())
                torch._foreach_add_(ss, diffs, alpha=alpha)
            squares.append((math.sqrt(group_sq) * (1.0 - alpha)) ** 2)
        self.distance = math.sqrt(sum(squares))

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:
        """One SALA step; ``closure`` is called once, twice on the SAM steps of stage 2."""
        if closure is None:
            raise ValueError("SALA.step() needs a closure (it evaluates the gradient itself)")
        closure = self._counted(closure)
        self.n_steps += 1
        cycle_start = self.n_steps % self.k == 0
        sam_step = cycle_start and self.stage == 2
        with first_pass(self.model) if sam_step else contextlib.nullcontext():
            loss = closure()
        if cycle_start:
            if sam_step:
                self._sam_ascent()
                self.zero_grad()
                closure()
            self._to_slow()
        self.base_optimizer.step()
        if self.n_steps % self.k == self.k - 1:
            self._update_slow()
            if self.stage == 2:
                self._to_slow()
        return loss

    def slow_weights(self) -> contextlib.AbstractContextManager:
        """Context manager: the parameters hold the slow weights inside (the fast ones before the
        first slow update, when there are no slow weights yet) and the fast ones after."""
        return swapped_slow_weights([(p, self.state[p]["slow"]) for g in self.param_groups
                                     for p in g["params"] if "slow" in self.state[p]])
