"""AGD: auto-switchable optimizer using the stepwise gradient difference (Yue et al., NeurIPS 2023).

Per element, with m̂_t = m_t / (1 - β1^t) (spec §1.1, the paper's Algorithm 1):

    s_t = m̂_t - m̂_{t-1}   (s_1 = g_1)                   stepwise difference      (1)
    b_t = β2 b_{t-1} + (1 - β2) s_t²                      second moment of s       (2)
    D_t = max(sqrt(B_t), δ sqrt(1 - β2^t))   B = b or the amsgrad max of b           (3)
    x_{t+1} = x_t - α sqrt(1 - β2^t) / (1 - β1^t) · clip(m_t / D_t)                 (4)

that is x_{t+1} = x_t - α m̂_t / max(sqrt(b̂_t), δ): Adam-like where sqrt(b̂_t) > δ, SGD with EMA momentum and
learning rate α/δ elsewhere. ``sgd_fraction()`` reports the share of elements on the SGD branch.

No copy of m is kept: before m is updated, s_t = c_g (g_t + (c_m / c_g) m_{t-1}) with c_g = (1-β1)/bc1_t and
c_m = β1/bc1_t - 1/bc1_{t-1} (expand m_t in (1)); the factor c_g² goes into the b update. This also holds for β1 = 0.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._checks import check_betas, check_nonnegative, check_positive
from ._host import to_host
from ._scratch import scratch


@dataclass(frozen=True)
class _StepScalars:
    """The float64 scalars of step t (bias corrections are never tensors, so no host sync)."""
    diff_coef: float    # c_m / c_g: s_t = c_g (g_t + diff_coef · m_{t-1}); 0 at t = 1
    sq_coef: float      # (1 - β2) c_g²
    threshold: float    # δ sqrt(1 - β2^t), the auto-switch floor of sqrt(B)
    step_size: float    # α sqrt(1 - β2^t) / (1 - β1^t)


def _step_scalars(t: int, lr: float, beta1: float, beta2: float, delta: float) -> _StepScalars:
    bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
    c_g = (1.0 - beta1) / bc1
    diff_coef = 0.0 if t == 1 else (beta1 - bc1 / (1.0 - beta1 ** (t - 1))) / (1.0 - beta1)
    return _StepScalars(diff_coef=diff_coef, sq_coef=(1.0 - beta2) * c_g * c_g,
                        threshold=delta * math.sqrt(bc2), step_size=lr * math.sqrt(bc2) / bc1)


class AGD(Optimizer):
    """AGD (spec §1). ``clip`` bounds the ratio m/D before the lr scaling; ``weight_decouple`` selects
    decoupled decay x <- x (1 - α λ) (or x (1 - λ) with ``fixed_decay``) against L2 added to a copy of the
    gradient (``p.grad`` is never modified). ``foreach=None`` uses the multi-tensor path off the CPU."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 delta: float = 1e-5, weight_decay: float = 0.0, weight_decouple: bool = True,
                 fixed_decay: bool = False, amsgrad: bool = False, clip: float | None = None, *,
                 foreach: bool | None = None):
        defaults = dict(lr=lr, betas=betas, delta=delta, weight_decay=weight_decay,
                        weight_decouple=weight_decouple, fixed_decay=fixed_decay, amsgrad=amsgrad,
                        clip=clip, foreach=foreach)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_nonnegative("lr", group["lr"])
        check_betas(group["betas"])
        check_positive("delta", group["delta"])
        check_nonnegative("weight_decay", group["weight_decay"])
        if group["clip"] is not None:
            check_positive("clip", group["clip"])

    def _init_group(self, group: dict) -> list[Tensor]:
        """Create state where missing, advance the step counters; return the params that have a grad."""
        params = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AGD does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_diff_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"] and "max_exp_avg_diff_sq" not in state:   # also when switched on later
                state["max_exp_avg_diff_sq"] = state["exp_avg_diff_sq"].clone()
            state["step"] += 1
            params.append(p)
        return params

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One AGD step; with ``closure`` (called under grad mode) returns its loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = self._init_group(group)
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.device.type != "cpu" for p in params)
            (self._foreach_update if foreach else self._single_update)(group, params)
        return loss

    def _second_moment(self, group: dict, p: Tensor) -> Tensor:
        """B of eq. (3): the amsgrad running max of b when amsgrad is on, else b."""
        state = self.state[p]
        return state["max_exp_avg_diff_sq"] if group["amsgrad"] else state["exp_avg_diff_sq"]

    def _decay_factor(self, group: dict) -> float:
        return 1.0 - group["weight_decay"] * (1.0 if group["fixed_decay"] else group["lr"])

    def _single_update(self, group: dict, params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        wd, clip = group["weight_decay"], group["clip"]
        work = scratch(self)
        for p in params:
            state = self.state[p]
            c = _step_scalars(state["step"], group["lr"], beta1, beta2, group["delta"])
            m, b = state["exp_avg"], state["exp_avg_diff_sq"]
            g = p.grad
            if wd != 0 and group["weight_decouple"]:
                p.mul_(self._decay_factor(group))
            elif wd != 0:
                g = torch.add(g, p, alpha=wd, out=work.like(p, 1))      # L2 on a copy of the grad
            # eq. (1), up to the factor c_g
            s = torch.add(g, m, alpha=c.diff_coef, out=work.like(p, 0)) if c.diff_coef else g
            m.lerp_(g, 1.0 - beta1)
            b.mul_(beta2).addcmul_(s, s, value=c.sq_coef)                # eq. (2)
            if group["amsgrad"]:
                torch.maximum(state["max_exp_avg_diff_sq"], b, out=state["max_exp_avg_diff_sq"])
            denom = torch.sqrt(self._second_moment(group, p), out=work.like(p, 0))
            denom.clamp_min_(c.threshold)                                # eq. (3)
            if clip is None:                                             # eq. (4)
                p.addcdiv_(m, denom, value=-c.step_size)
            else:
                p.add_(torch.div(m, denom, out=denom).clamp_(-clip, clip), alpha=-c.step_size)

    def _foreach_update(self, group: dict, params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        wd, clip = group["weight_decay"], group["clip"]
        buckets: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in params:
            buckets[(p.device, p.dtype, self.state[p]["step"])].append(p)
        for (_, _, t), ps in buckets.items():
            c = _step_scalars(t, group["lr"], beta1, beta2, group["delta"])
            states = [self.state[p] for p in ps]
            ms = [st["exp_avg"] for st in states]
            bs = [st["exp_avg_diff_sq"] for st in states]
            grads = [p.grad for p in ps]
            if wd != 0 and group["weight_decouple"]:
                torch._foreach_mul_(ps, self._decay_factor(group))
            elif wd != 0:
                grads = torch._foreach_add(grads, ps, alpha=wd)
            diffs = torch._foreach_add(grads, ms, alpha=c.diff_coef) if c.diff_coef else grads
            torch._foreach_lerp_(ms, grads, 1.0 - beta1)
            torch._foreach_mul_(bs, beta2)
            torch._foreach_addcmul_(bs, diffs, diffs, value=c.sq_coef)
            if group["amsgrad"]:
                torch._foreach_maximum_([st["max_exp_avg_diff_sq"] for st in states], bs)
            denoms = torch._foreach_sqrt([self._second_moment(group, p) for p in ps])
            torch._foreach_clamp_min_(denoms, c.threshold)
            if clip is None:
                torch._foreach_addcdiv_(ps, ms, denoms, value=-c.step_size)
            else:
                ratios = torch._foreach_div(ms, denoms)
                torch._foreach_clamp_min_(ratios, -clip)
                torch._foreach_clamp_max_(ratios, clip)
                torch._foreach_add_(ps, ratios, alpha=-c.step_size)

    @torch.no_grad()
    def sgd_fraction(self, per_param: bool = False) -> float | dict[int, float]:
        """Share of elements on the SGD branch in each parameter's last step: sqrt(B) < δ sqrt(1 - β2^t).

        Computed on request from the state the last step left (B and t) and the group's delta, the same
        comparison the step made, so steps never count or synchronise with the device. Global: one
        float over all stepped parameters (NaN before the first step). ``per_param=True``: a dict from the
        parameter's index in ``param_groups`` order to its fraction (stepped parameters only).
        """
        index, keys, counts, sizes = 0, [], [], []
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                state = self.state.get(p)
                if state and state["step"] > 0:
                    threshold = group["delta"] * math.sqrt(1.0 - beta2 ** state["step"])
                    counts.append(torch.count_nonzero(self._second_moment(group, p).sqrt() < threshold))
                    keys.append(index)
                    sizes.append(p.numel())
                index += 1
        host = to_host(counts)
        if per_param:
            return {k: int(n) / size for k, n, size in zip(keys, host, sizes)}
        return int(sum(host)) / sum(sizes) if sizes else float("nan")

    @torch.no_grad()
    def preconditioner(self, sgd_mask: bool = False) -> dict[Tensor, Tensor]:
        """Per stepped parameter (keyed like ``state``), the diagonal P = max(sqrt(b̂_t), δ) of the textbook
        form x_{t+1} = x_t - α m̂_t / P (eq. 4 divided by sqrt(1 - β2^t)). ``sgd_mask=True``: instead, the boolean
        mask of the elements on the SGD branch (P = δ there), the comparison ``sgd_fraction`` counts."""
        out = {}
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and state["step"] > 0:
                    root_bc2 = math.sqrt(1.0 - group["betas"][1] ** state["step"])
                    root = self._second_moment(group, p).sqrt()
                    out[p] = (root < group["delta"] * root_bc2 if sgd_mask
                              else root.div_(root_bc2).clamp_min_(group["delta"]))
        return out
