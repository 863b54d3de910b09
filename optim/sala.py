"""SALA: Sharpness-Aware Lookahead (Tan, Zhang, Liu, Gong; IEEE TPAMI 2024).

doi 10.1109/TPAMI.2024.3444002; as its authors' code (cltan023/sala2023) behaves.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._base import (Closure, WrapperOptimizer, check_in_dtype, grouped, optimizer_params,
                    param_dtype, real)
from ._sam_base import (SAM_EPS, GradGuard, ascend_, first_pass,
                        grad_changed, grad_marks, perturbation_norm, require_gradients,
                        restore_buffers, running_stats_buffers)
from ._sharded import global_square_sum, local
from ._validation import check_int, check_model, check_nonnegative, keyword_only
from .lookahead import check_alpha, swapped_slow_weights


class SALA(WrapperOptimizer):
    r"""Sharpness-Aware Lookahead over an already-built base optimizer (Tan et al. 2024).

    The paper's two stages (its abstract: stage 1 steers along a quadratic approximation of the
    trajectory at no extra cost, stage 2 takes SAM steps), the steps as in the authors' code,
    with a global step counter $s$, slow weights $\phi$, fast weights $\theta$ and the fast-slow
    distance $D$ (0 until the first slow update):

    $$
    \begin{aligned}
    &s \leftarrow s + 1, \quad g = \nabla L(\theta)\\
    &\text{if } s \bmod k = 0 \text{ (first inner step of a cycle):}\\
    &\qquad \text{if } D < \rho \text{ (stage 2, a SAM step):} \quad
      \theta \leftarrow \theta + \rho\, g_G / (\lVert g_G \rVert_2 + 10^{-12})
      \text{ per param group } G, \quad g = \nabla L(\theta)\\
    &\qquad \theta \leftarrow \phi
      \qquad\text{(stage 1: } g \text{ is from the old fast weights)}\\
    &\theta \leftarrow \mathrm{base\_step}(\theta, g)
      \qquad\text{(base state kept throughout)}\\
    &\text{if } s \bmod k = k - 1 \text{ (slow update; } \phi = \theta
      \text{ at the first one):}\\
    &\qquad \phi \leftarrow \phi + \alpha (\theta - \phi), \quad
      D = \lVert \theta - \phi \rVert = (1 - \alpha) \lVert \theta - \phi_{\text{old}} \rVert
      \text{ (per group, then combined)}\\
    &\qquad \text{if } D < \rho: \ \theta \leftarrow \phi
    \end{aligned}
    $$

    Running statistics (BatchNorm and the like) are updated in the SAM pass as in the authors'
    code, unlike the rest of the SAM family, which freezes them; a step interrupted by an
    exception puts them back. Complex parameters are handled as their ``view_as_real``.
    Meta-device parameters are refused by ``step`` (the stage switch reads the fast-slow
    distance, a value they do not hold). ``torch.compile(opt.step)`` runs ``step`` eagerly
    (``torch.compiler.disable``: it runs the closure and branches on host values). Param-group
    keys ``sala_alpha`` and ``sala_rho`` (the SAM radius); the stage threshold is the ``rho``
    given at construction (one hyperparameter in the authors' code). Per-parameter state
    ``slow``. Attributes: ``stage`` (1 or 2), ``distance``, counters ``n_steps`` and
    ``n_closure_calls`` (one pass per step, two on SAM steps: $1 + 1/k$ in stage 2).

    Args:
        base_optimizer: An already-built ``torch.optim.Optimizer``; its ``param_groups`` are
            shared.
        k: The sync period, >= 2 (with k = 1 the authors' code would move to slow weights
            that do not exist yet).
        alpha: The slow step $\alpha \in (0, 1]$.
        rho: The SAM radius and stage threshold $\rho \ge 0$.
        model: Keyword-only (positional is deprecated). The model, for DDP ``no_sync()`` in its
            first pass and for restoring running statistics after an interrupted step; None
            otherwise.

    Raises:
        ArgumentTypeError: an argument of the wrong kind.
        ValueError: an argument outside its range.
    """

    _counter_names = ("n_steps", "n_closure_calls", "distance")
    _state_keys = frozenset({"slow"})
    _step_supports_amp_scaling = True  # so that GradScaler.step reaches the error in step()

    @keyword_only("model")
    def __init__(self, base_optimizer: Optimizer, k: int = 5, alpha: float = 0.8,
                 rho: float = 0.05, *, model: nn.Module | None = None):
        defaults = dict(sala_alpha=check_alpha(alpha), sala_rho=check_nonnegative("rho", rho))
        check_in_dtype("rho", defaults["sala_rho"], optimizer_params(base_optimizer),
                       dtype_of=param_dtype)
        k = check_int("k", k, low=2)
        model = check_model("model", model)   # all checked before the base's groups are touched
        super().__init__(base_optimizer, defaults)
        self.k, self.rho, self.model = k, defaults["sala_rho"], model
        self.distance = 0.0
        self._guard = GradGuard()

    def _required_state(self, index: int, entry: dict[str, Any],
                        state_dict: dict[str, Any]) -> frozenset[str]:
        """Slow weights are created for every parameter at once: all or none."""
        started = any("slow" in e for e in state_dict["state"].values())
        return frozenset({"slow"}) if started else frozenset()

    @property
    def stage(self) -> int:
        """2 (SAM steps and synchronised fast weights) while ``distance < rho``, else 1."""
        return 2 if self.distance < self.rho else 1

    def _init_group(self, group: dict[str, Any]) -> list[Tensor]:
        """The parameters of ``group`` that have a gradient."""
        return [p for p in group["params"] if p.grad is not None]

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, grad_scaler: Any = None) -> Tensor:
        """One SALA step.

        On any exception in a pass (a KeyboardInterrupt, an out-of-memory error), the weights,
        running statistics and step counter are put back as the step found them, the
        gradients are cleared, and the exception propagates.

        Args:
            closure: Clears the gradients, computes the loss, calls ``backward()`` and returns
                the loss; called once, twice on the SAM steps of stage 2. Do not call
                ``backward()`` before ``step``.
            grad_scaler: Not supported (raises).

        Returns:
            The loss at the weights the step started from.

        Raises:
            ValueError: ``closure`` is None.
            NotImplementedError: a GradScaler is used, or a parameter is on the meta device.
            RuntimeError: gradients were already accumulated before the step, or a call of
                the closure produced no gradients.
        """
        if closure is None:
            raise ValueError("SALA.step() needs a closure (it evaluates the gradient itself)")
        if grad_scaler is not None or getattr(self, "grad_scale", None) is not None:
            raise NotImplementedError(
                "SALA does not support torch.amp.GradScaler: its closure's scaled "
                "gradients would reach the base optimizer; train SALA in float32 or "
                "bfloat16 autocast without a scaler"
            )
        if any(p.device.type == "meta" for p in self._params()):
            raise NotImplementedError(
                "SALA cannot step meta-device parameters: its stage switch compares the "
                "fast-slow distance with rho, a value meta tensors do not hold; materialise the "
                "model (to_empty() and an init) first")
        self._guard.check("SALA", self._params())
        saved = running_stats_buffers(self.model)
        weights: list[tuple[Tensor, Tensor]] = []   # the weights before a SAM ascent
        self.n_steps += 1
        try:
            loss = self._passes(self._counted(closure), weights)
        except BaseException:
            self.n_steps -= 1
            restore_buffers(weights + saved)
            self.zero_grad()
            raise
        finally:
            self._guard.remember(self._params())
        self.base_optimizer.step()
        if self.n_steps % self.k == self.k - 1:
            self._update_slow()
            if self.stage == 2:
                self._to_slow()
        return loss

    def _passes(self, closure: Closure, weights: list[tuple[Tensor, Tensor]]) -> Tensor:
        """The closure calls of a step and, on a SAM step, the ascent between them.

        The parameters then hold the point the base optimizer steps from. ``weights`` receives
        (parameter, copy) pairs of the weights before an ascent.
        """
        params = self._params()
        marks = grad_marks(params)
        cycle_start = self.n_steps % self.k == 0
        sam_step = cycle_start and self.stage == 2
        with first_pass(self.model) if sam_step else contextlib.nullcontext():
            loss = closure()
        require_gradients("SALA", any(grad_changed(p, m) for p, m in zip(params, marks)),
                          "first")
        if sam_step:
            weights.extend((p, p.detach().clone()) for p in params if p.grad is not None)
            self._sam_ascent()
            self.zero_grad()
            closure()
            require_gradients("SALA", any(p.grad is not None for p in params), "second")
        if cycle_start:
            self._to_slow()
        return loss

    def _sam_ascent(self) -> None:
        """Ascend: theta_p += rho_G grad_p / (||grads of group G||_2 + 1e-12), per group G."""
        for group in self.param_groups:
            params = self._init_group(group)
            if params:
                ascend_(
                    params,
                    [p.grad for p in params],
                    group["sala_rho"] / (perturbation_norm(params) + SAM_EPS),
                )

    def _to_slow(self) -> None:
        """Move to the slow weights: theta <- phi for every parameter with a gradient."""
        for group in self.param_groups:
            params = self._init_group(group)
            for ps, ss in grouped([local(p) for p in params],
                                  [local(self.state[p]["slow"]) for p in params]):
                torch._foreach_copy_(ps, ss)

    def _update_slow(self) -> None:
        """Slow update phi += alpha (theta - phi) (phi = theta on first use); sets ``distance``."""
        squares = []
        for group in self.param_groups:
            params = group["params"]
            for p in params:
                if "slow" not in self.state[p]:
                    self.state[p]["slow"] = p.detach().clone(memory_format=torch.preserve_format)
            group_sq = 0.0
            reals = [real(p) for p in params]
            owner = {id(r): p for r, p in zip(reals, params)}   # for the sums over shards
            for ps, ss in grouped(reals, [real(self.state[p]["slow"]) for p in params]):
                diffs = torch._foreach_sub(ps, ss)
                sq = torch.stack(torch._foreach_norm(diffs, 2, dtype=torch.float64)).square()
                group_sq += float(global_square_sum(sq, [owner[id(r)] for r in ps]))
                torch._foreach_add_(ss, diffs, alpha=group["sala_alpha"])
            squares.append((math.sqrt(group_sq) * (1.0 - group["sala_alpha"])) ** 2)
        self.distance = math.sqrt(sum(squares))

    def slow_weights(self) -> contextlib.AbstractContextManager:
        """Swap the slow weights in, for evaluation.

        Returns:
            A context manager: the parameters hold the slow weights inside (the fast ones before
            the first slow update, when there are no slow weights yet) and the fast ones after.
        """
        return swapped_slow_weights(
            [(p, self.state[p]["slow"]) for p in self._params() if "slow" in self.state[p]]
        )
