"""WSAM: Weighted Sharpness-Aware Minimization (Yue, Jiang, Ye, Gao, Liu, Zhang; KDD 2023).

arXiv 2305.15817.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._base import WrapperOptimizer, check_in_dtype, grouped, optimizer_params, param_dtype
from ._sam_base import TwoPassOptimizer, all_reduce_mean_
from ._sharded import global_norm, is_sharded, local
from ._validation import (check_bool, check_model, check_nonnegative, check_optional_positive,
                          check_probability, keyword_only)


class WSAM(TwoPassOptimizer, WrapperOptimizer):
    r"""Weighted SAM over an already-built base optimizer (SGD, Adam, AGD, ...).

    Yue et al. (KDD 2023) minimise, with $a = \gamma / (1 - \gamma)$ (their eq. (3)),
    $L(w) + a \bigl(\max_{\lVert e \rVert \le \rho} L(w + e) - L(w)\bigr)$. Their Algorithm 1,
    with the decoupled update the paper recommends:

    $$
    \begin{aligned}
    g_t &= \nabla L_B(w_t) \qquad\text{(per rank under DDP, then averaged; clipped)}\\
    e_t &= \rho\, g_t / (\lVert g_t \rVert_2 + 10^{-12}) \qquad\text{(adaptive: as ASAM)}\\
    \tilde g_t &= \nabla L_B(w_t + e_t) \qquad\text{(clipped)}\\
    \text{coupled:}\quad w_{t+1} &= \mathrm{base\_step}\bigl(w_t,\ g_t + a(\tilde g_t - g_t)\bigr)\\
    \text{decoupled:}\quad w_{t+1} &= \mathrm{base\_step}(w_t, g_t)
      - \eta_t\, a\, (\tilde g_t - g_t) \qquad\text{(default)}
    \end{aligned}
    $$

    with $\eta_t$ the group's current ``lr``. $\gamma = 0$ is the base optimizer;
    $\gamma = 0.5$ coupled is SAM. ``max_norm`` clips $g$ (after the average over ranks) and
    $\tilde g$ as ``clip_grad_norm_`` does, as the authors' atorch code does since Dec 2023.

    Param-group keys: ``sam_rho``, ``sam_adaptive``, ``wsam_alpha`` ($= a$). Per-parameter
    state: ``origin`` ($w$ during the perturbed pass), ``grad`` ($g$) and ``sharpness``
    ($\tilde g - g$ of the last step). Counters: ``n_steps``, ``n_closure_calls`` (2 per step).

    Args:
        base_optimizer: An already-built ``torch.optim.Optimizer``; its ``param_groups`` are
            shared.
        rho: The radius $\rho \ge 0$.
        gamma: The weight $\gamma \in [0, 1)$ of the sharpness term.
        adaptive: ASAM's scale-invariant ascent.
        decouple: Apply the sharpness gradient as a plain SGD step outside the base optimizer.
        max_norm: Clip each pass's gradient to this global norm (None: no clipping).
        model: Keyword-only (positional is deprecated). The model, for freezing running
            statistics and DDP ``no_sync()``; None for neither.

    Raises:
        ArgumentTypeError: an argument of the wrong kind.
        ValueError: an argument outside its range.
    """

    _state_keys = frozenset({"origin", "grad", "sharpness"})

    @keyword_only("model")
    def __init__(self, base_optimizer: Optimizer, rho: float = 0.05, gamma: float = 0.9,
                 adaptive: bool = False, decouple: bool = True, max_norm: float | None = None,
                 *, model: nn.Module | None = None):
        gamma = check_probability("gamma", gamma, high_open=True)
        defaults = dict(sam_rho=check_nonnegative("rho", rho),
                        sam_adaptive=check_bool("adaptive", adaptive),
                        wsam_alpha=gamma / (1.0 - gamma))
        check_in_dtype("rho", defaults["sam_rho"], optimizer_params(base_optimizer),
                       dtype_of=param_dtype)
        decouple = check_bool("decouple", decouple)
        max_norm = check_optional_positive("max_norm", max_norm)
        check_model("model", model)   # everything checked before the base's groups are touched
        super().__init__(base_optimizer, defaults)
        self.decouple, self.max_norm = decouple, max_norm
        self._set_model(model)

    def _required_state(self, index: int, entry: dict[str, Any],
                        state_dict: dict[str, Any]) -> frozenset[str]:
        """A parameter with a sharpness term needs the plain gradient it came from."""
        required = super()._required_state(index, entry, state_dict)
        needs_grad = "sharpness" in entry or "origin" in required   # or perturbed when saved
        return required | {"grad"} if needs_grad else required

    def _clip(self) -> None:
        """``clip_grad_norm_`` over all parameters with a gradient (no-op without ``max_norm``).

        Sharded (``DTensor``) parameters: the same clipping with the norm over all their pieces.
        """
        if self.max_norm is None:
            return
        params = [p for p in self._params() if p.grad is not None]
        if not any(is_sharded(p) for p in params):
            torch.nn.utils.clip_grad_norm_(params, self.max_norm)
            return
        grads = [local(p.grad) for p in params]
        total = global_norm([torch.linalg.vector_norm(g) for g in grads], params)
        # clip_grad_norm_'s factor; clip_grads_with_norm_ would read p.grad of the DTensors
        factor = (self.max_norm / (total + 1e-6)).clamp_(max=1.0)
        for (gs,) in grouped(grads):
            torch._foreach_mul_(gs, factor.to(gs[0].device))

    def _store_plain(self, params: list[Tensor]) -> None:
        """Keep g, averaged over ranks (the first pass was local) and clipped, in state."""
        all_reduce_mean_([p.grad for p in params])
        self._clip()
        for gs, bs in grouped([local(p.grad) for p in params],
                              [local(self._buffer(p, "grad")) for p in params]):
            torch._foreach_copy_(bs, gs)

    def _update(self, perturbed: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
        self._clip()
        for group, params in perturbed:
            sharp = [local(self._buffer(p, "sharpness")) for p in params]
            plain = [local(self.state[p]["grad"]) for p in params]
            for grads, ss, gs in grouped([local(p.grad) for p in params], sharp, plain):
                torch._foreach_copy_(ss, grads)
                torch._foreach_sub_(ss, gs)  # g~ - g
                torch._foreach_copy_(grads, gs)
                if not self.decouple:
                    torch._foreach_add_(grads, ss, alpha=group["wsam_alpha"])
        self.base_optimizer.step()
        if self.decouple:   # lr read after the base step, so a scheduler's current value
            for group, params in perturbed:
                for ps, ss in grouped([local(p) for p in params],
                                      [local(self.state[p]["sharpness"]) for p in params]):
                    torch._foreach_add_(ps, ss, alpha=-group["lr"] * group["wsam_alpha"])

    @torch.no_grad()
    def gradient_norms(self) -> dict[str, float]:
        r"""Diagnostics of the last step, over all parameters.

        Synchronises with the device only when called.

        Returns:
            ``grad`` $= \lVert g \rVert$ (after averaging and clipping), ``sharpness``
            $= \lVert \tilde g - g \rVert$ and their ``ratio``; empty before the first
            completed step.
        """
        params = [p for p in self._params() if "sharpness" in self.state[p]]
        if self.n_steps == 0 or not params:
            return {}
        plain = _norm([self.state[p]["grad"] for p in params], params)
        sharp = _norm([self.state[p]["sharpness"] for p in params], params)
        ratio = sharp / plain if plain > 0 else float("inf")
        return {"grad": plain, "sharpness": sharp, "ratio": ratio}


def _norm(tensors: list[Tensor], params: list[Tensor]) -> float:
    """Global L2 norm in float64, as a Python float.

    ``tensors`` are state of ``params``; sharded ones are summed over their pieces.
    """
    norms = [torch.linalg.vector_norm(local(t).double()) for t in tensors]
    if not any(is_sharded(p) for p in params):
        norms = [n.cpu() for n in norms]   # parameters may be on several devices
    return float(global_norm(norms, params))
