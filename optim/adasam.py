"""AdaSAM: SAM with adaptive learning rate and momentum (Sun et al., arXiv 2303.00565, Algorithm 1).

With s_t the gradient at the SAM point x_t + rho * g_t / ||g_t|| (same minibatch, global norm):

    m_t = beta1 m_{t-1} + (1 - beta1) s_t
    v_t = beta2 v_{t-1} + (1 - beta2) s_t^2
    v^_t = max(v^_{t-1}, v_t),            v^_{-1} = eps^2   (eps enters only here)
    x_{t+1} = x_t - lr * m_t / sqrt(v^_t)

No bias correction and no additive eps (``bias_correction=True`` divides m by 1 - beta1^t and v^
by 1 - beta2^t, as Adam does). Two forward-backward passes per step.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ._checks import check_betas, check_nonnegative, check_positive
from .sam import SharpnessAware, check_rho, grouped
from .wrapper import CountingOptimizer


def use_foreach(foreach: bool | None, tensors: Sequence[Tensor]) -> bool:
    """The multi-tensor path by default on accelerators (where it is faster), as torch.optim does."""
    if foreach is not None:
        return foreach
    return bool(tensors) and all(t.device.type != "cpu" for t in tensors)


class AdaSAM(SharpnessAware, CountingOptimizer):
    """AdaSAM (Algorithm 1 of the paper). Its own optimizer, not a wrapper.

    Per-parameter state: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v), ``max_exp_avg_sq`` (v^, starts at
    eps^2), ``origin`` (x_t during the perturbed pass). Counters: ``n_steps``, ``n_closure_calls``.
    """

    _rho_key = "rho"
    _adaptive_key = None

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 rho: float = 0.05, eps: float = 1e-8, model: nn.Module | None = None, *,
                 bias_correction: bool = False, foreach: bool | None = None):
        check_nonnegative("lr", lr)
        check_positive("eps", eps)
        check_betas(betas)
        defaults = dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])), rho=check_rho(rho), eps=float(eps),
                        bias_correction=bool(bias_correction))
        super().__init__(params, defaults)
        self.foreach = foreach
        self._set_model(model)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Back to x; the AMSGrad-type update with the gradient s at the SAM point."""
        for group, params in self._return_to_origin():
            if not params:
                continue
            for p in params:
                self._init_state(p, group["eps"])
            states = [self.state[p] for p in params]
            for s in states:
                s["step"] += 1
            steps = [s["step"] for s in states]
            multi = use_foreach(self.foreach, params) and len(set(steps)) == 1
            fn = _multi_tensor_adasam if multi else _single_tensor_adasam
            fn(params, [p.grad for p in params], [s["exp_avg"] for s in states],
               [s["exp_avg_sq"] for s in states], [s["max_exp_avg_sq"] for s in states],
               steps=steps, lr=group["lr"], betas=group["betas"],
               bias_correction=group["bias_correction"])
        self._finish_step(zero_grad)

    def _init_state(self, p: Tensor, eps: float) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["max_exp_avg_sq"] = torch.full_like(p, eps * eps, memory_format=torch.preserve_format)

    @torch.no_grad()
    def preconditioner(self) -> dict[Tensor, Tensor]:
        """Per stepped parameter (keyed like ``state``), the diagonal P = sqrt(v^_t) of the step (with
        ``bias_correction``, sqrt(v^_t / (1 - beta2^t)) against the bias-corrected m)."""
        out = {}
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and state.get("step", 0) > 0:
                    _, v_scale = _step_size(group["lr"], group["betas"], state["step"], group["bias_correction"])
                    out[p] = (state["max_exp_avg_sq"] * v_scale).sqrt_()
        return out


def _step_size(lr: float, betas: tuple[float, float], step: int, bias_correction: bool
               ) -> tuple[float, float]:
    """(lr / (1 - beta1^t), 1 / (1 - beta2^t)) with bias correction, else (lr, 1)."""
    if not bias_correction:
        return lr, 1.0
    return lr / (1.0 - betas[0] ** step), 1.0 / (1.0 - betas[1] ** step)


def _single_tensor_adasam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, steps, lr, betas,
                          bias_correction) -> None:
    beta1, beta2 = betas
    for p, s, m, v, v_max, step in zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps):
        step_size, v_scale = _step_size(lr, betas, step, bias_correction)
        m.mul_(beta1).add_(s, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(s, s, value=1.0 - beta2)
        torch.maximum(v_max, v, out=v_max)
        denom = (v_max * v_scale).sqrt_() if bias_correction else v_max.sqrt()
        p.addcdiv_(m, denom, value=-step_size)


def _multi_tensor_adasam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, steps, lr, betas,
                         bias_correction) -> None:
    """The same update with ``torch._foreach_*`` (all ``steps`` equal)."""
    beta1, beta2 = betas
    step_size, v_scale = _step_size(lr, betas, steps[0], bias_correction)
    for ps, ss, ms, vs, v_maxs in grouped(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs):
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, ss, alpha=1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, ss, ss, value=1.0 - beta2)
        torch._foreach_maximum_(v_maxs, vs)
        denom = torch._foreach_sqrt(torch._foreach_mul(v_maxs, v_scale) if bias_correction else v_maxs)
        torch._foreach_addcdiv_(ps, ms, denom, value=-step_size)
