"""AGD: auto-switchable optimizer using the stepwise gradient difference.

Yue, Ye, Jiang, Liu, Zhang; NeurIPS 2023, arXiv 2312.01658.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ._fused import FusedKernel
from ._diagnostics import stepped, to_host
from ._workspace import Scratch, scratch
from ._validation import check_adam_group, check_bool, check_optional_positive, check_positive
from ._base import CheckedState, check_in_dtype, closure_loss, param_dtype, real, use_foreach
from ._sharded import check_grad, local, sum_over


@dataclass(frozen=True)
class _StepScalars:
    """The float64 scalars of step t (bias corrections are never tensors, so no host sync)."""

    diff_coef: float  # c_m / c_g: s_t = c_g (g_t + diff_coef · m_{t-1}); 0 at t = 1
    sq_coef: float  # (1 - β2) c_g²
    threshold: float  # δ sqrt(1 - β2^t), the auto-switch floor of sqrt(B)
    step_size: float  # α sqrt(1 - β2^t) / (1 - β1^t)


def _step_scalars(t: int, lr: float, beta1: float, beta2: float, delta: float) -> _StepScalars:
    bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
    c_g = (1.0 - beta1) / bc1
    diff_coef = 0.0 if t == 1 else (beta1 - bc1 / (1.0 - beta1 ** (t - 1))) / (1.0 - beta1)
    return _StepScalars(
        diff_coef=diff_coef,
        sq_coef=(1.0 - beta2) * c_g * c_g,
        threshold=delta * math.sqrt(bc2),
        step_size=lr * math.sqrt(bc2) / bc1,
    )


class AGD(CheckedState):
    r"""AGD, the paper's Algorithm 1 (Yue et al. 2023), per element.

    With $\hat m_t = m_t / (1 - \beta_1^t)$ and learning rate $\alpha$:

    $$
    \begin{aligned}
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t\\
    s_t &= \hat m_t - \hat m_{t-1} \quad (s_1 = g_1)
      \qquad\text{(stepwise difference of the moments)}\\
    b_t &= \beta_2 b_{t-1} + (1 - \beta_2) s_t^2, \qquad
      B_t = b_t \text{ or, with amsgrad, } \max(B_{t-1}, b_t)\\
    D_t &= \max\bigl(\sqrt{B_t},\ \delta \sqrt{1 - \beta_2^t}\bigr)
      \qquad\text{(the auto-switch)}\\
    x_{t+1} &= x_t - \alpha\, \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\,
      \mathrm{clip}(m_t / D_t)
    \end{aligned}
    $$

    that is $x_{t+1} = x_t - \alpha \hat m_t / \max(\sqrt{\hat b_t}, \delta)$: Adam-like where
    $\sqrt{\hat b_t} > \delta$, SGD with EMA momentum and learning rate $\alpha/\delta$
    elsewhere. ``sgd_fraction()`` reports the share of elements on the SGD branch.

    ``clip`` bounds the ratio $m/D$ before the lr scaling; ``weight_decouple`` selects decoupled
    decay $x \leftarrow x (1 - \alpha\lambda)$ (or $x (1 - \lambda)$ with ``fixed_decay``)
    against L2 added to a copy of the gradient (``p.grad`` is never modified). No copy of $m$ is
    kept: before $m$ is updated, $s_t = c_g (g_t + (c_m / c_g) m_{t-1})$ with
    $c_g = (1-\beta_1)/\mathrm{bc}_{1,t}$ and
    $c_m = \beta_1/\mathrm{bc}_{1,t} - 1/\mathrm{bc}_{1,t-1}$; the factor $c_g^2$ goes into
    the $b$ update.

    Complex parameters are updated as their ``view_as_real`` (as ``torch.optim.Adam`` does).

    Args:
        params: Parameters or param-group dicts.
        lr: The learning rate $\alpha \ge 0$.
        betas: $(\beta_1, \beta_2)$, each in [0, 1).
        delta: The switch threshold $\delta > 0$.
        weight_decay: $\lambda \ge 0$.
        weight_decouple: Decoupled decay (True) or L2 added to the gradient (False).
        fixed_decay: Decoupled decay not scaled by the lr.
        amsgrad: Use the running max $B_t$ of $b_t$.
        clip: Bound on $|m/D|$ (None: no clipping).
        foreach: The multi-tensor path; None: automatic (off the CPU).
        fused: Compile each tensor's update into one kernel (``torch.compile``; the eager path
            if that fails, with a warning); None (default) means False for now.

    Raises:
        ArgumentTypeError: an argument of the wrong kind.
        ValueError: an argument outside its range.
    """

    _state_keys = frozenset({"step", "exp_avg", "exp_avg_diff_sq", "max_exp_avg_diff_sq"})

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        delta: float = 1e-5,
        weight_decay: float = 0.0,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        amsgrad: bool = False,
        clip: float | None = None,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            delta=delta,
            weight_decay=weight_decay,
            weight_decouple=weight_decouple,
            fixed_decay=fixed_decay,
            amsgrad=amsgrad,
            clip=clip,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group, its hyperparameters checked.

        Args:
            param_group: As for ``torch.optim.Optimizer.add_param_group``.

        Raises:
            ArgumentTypeError: a hyperparameter of the wrong kind.
            ValueError: a hyperparameter outside its range.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_adam_group(group, "delta", check_positive)
        for key in ("lr", "delta", "weight_decay"):   # the state and update are in p's dtype
            check_in_dtype(key, group[key], group["params"], dtype_of=param_dtype)
        for flag in ("weight_decouple", "fixed_decay", "amsgrad"):
            group[flag] = check_bool(flag, group[flag])
        group["clip"] = check_optional_positive("clip", group["clip"])

    def _required_state(self, index: int, entry: dict, state_dict: dict) -> frozenset[str]:
        """A parameter that has stepped needs its step count and both moments."""
        return frozenset({"step", "exp_avg", "exp_avg_diff_sq"}) if entry else frozenset()

    def _init_group(self, group: dict) -> tuple[list[Tensor], list[dict]]:
        """Create state where missing and advance the step counters.

        Returns:
            The params of ``group`` that have a gradient, and their states.
        """
        params, states = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AGD does not support sparse gradients")
            check_grad("AGD", p)
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_diff_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # also when amsgrad is switched on later
            if group["amsgrad"] and "max_exp_avg_diff_sq" not in state:
                state["max_exp_avg_diff_sq"] = state["exp_avg_diff_sq"].clone()
            state["step"] += 1
            params.append(p)
            states.append(state)
        return params, states

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One AGD step with the gradients in ``p.grad``.

        Args:
            closure: Optional; clears the gradients, computes the loss, calls ``backward()`` and
                returns the loss (called once, under grad mode).

        Returns:
            The closure's loss, or None without a closure.

        Raises:
            RuntimeError: a gradient is sparse.
            ValueError: a DTensor parameter's gradient is placed otherwise than the parameter.
        """
        loss = closure_loss(closure)
        for group in self.param_groups:
            params, states = self._init_group(group)
            if (
                params and group["fused"]
            ):  # what the compiled kernel cannot take goes on to the eager path
                params, states = _fused_agd(group, params, states)
            if not params:
                continue
            foreach = use_foreach(group["foreach"], params)
            fn = _multi_tensor_agd if foreach else _single_tensor_agd
            fn(   # complex tensors as view_as_real
                [real(p) for p in params],
                [real(p.grad) for p in params],
                [real(s["exp_avg"]) for s in states],
                [real(s["exp_avg_diff_sq"]) for s in states],
                [
                    real(s["max_exp_avg_diff_sq"] if group["amsgrad"] else s["exp_avg_diff_sq"])
                    for s in states
                ],
                [s["step"] for s in states],
                work=scratch(self),
                **_options(group),
            )
        return loss

    def _second_moment(self, group: dict, p: Tensor) -> Tensor:
        """B: the amsgrad running max of b when amsgrad is on, else b."""
        state = self.state[p]
        return state["max_exp_avg_diff_sq"] if group["amsgrad"] else state["exp_avg_diff_sq"]

    @torch.no_grad()
    def sgd_fraction(self, per_param: bool = False) -> float | dict[int, float]:
        r"""Share of elements on the SGD branch in each parameter's last step.

        The elements where $\sqrt{B_t} < \delta \sqrt{1 - \beta_2^t}$, computed on request from
        the state the last step left ($B$ and $t$) and the group's delta, the same comparison the
        step made, so steps never count or synchronise with the device.

        Args:
            per_param: Return the fraction per parameter instead of the global one.

        Returns:
            One float over all stepped parameters (NaN before the first step); with
            ``per_param``, a dict from the parameter's index in ``param_groups`` order to its
            fraction (stepped parameters only).
        """
        keys, counts, sizes = [], [], []
        for index, group, p, state in stepped(self):
            threshold = group["delta"] * math.sqrt(1.0 - group["betas"][1] ** state["step"])
            below = local(self._second_moment(group, p)).sqrt() < threshold
            counts.append(sum_over(torch.count_nonzero(below), p))   # over a DTensor's pieces
            keys.append(index)
            sizes.append(p.numel())
        host = to_host(counts)
        if per_param:
            return {k: int(n) / size for k, n, size in zip(keys, host, sizes)}
        return int(sum(host)) / sum(sizes) if sizes else float("nan")

    @torch.no_grad()
    def preconditioner(self, sgd_mask: bool = False) -> dict[Tensor, Tensor]:
        r"""The diagonal preconditioner of the last step, per stepped parameter.

        $P = \max(\sqrt{\hat b_t}, \delta)$ of the textbook form
        $x_{t+1} = x_t - \alpha \hat m_t / P$ (eq. 4 divided by $\sqrt{1 - \beta_2^t}$).

        Args:
            sgd_mask: Instead, the boolean mask of the elements on the SGD branch
                ($P = \delta$ there), the comparison ``sgd_fraction`` counts.

        Returns:
            A dict keyed like ``state``.
        """
        out = {}
        for _, group, p, state in stepped(self):
            root_bc2 = math.sqrt(1.0 - group["betas"][1] ** state["step"])
            root = self._second_moment(group, p).sqrt()
            out[p] = (
                root < group["delta"] * root_bc2
                if sgd_mask
                else root.div_(root_bc2).clamp_min_(group["delta"])
            )
        return out


def _options(group: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the update functions, read from a param group."""
    wd = group["weight_decay"]
    return dict(
        lr=group["lr"],
        betas=group["betas"],
        delta=group["delta"],
        amsgrad=group["amsgrad"],
        clip=group["clip"],
        decay=1.0 - wd * (1.0 if group["fixed_decay"] else group["lr"])
        if wd != 0 and group["weight_decouple"]
        else None,
        l2=wd if wd != 0 and not group["weight_decouple"] else 0.0,
    )


def _single_tensor_agd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_diff_sqs: list[Tensor],
    second_moments: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    betas: tuple[float, float],
    delta: float,
    amsgrad: bool,
    clip: float | None,
    decay: float | None,
    l2: float,
    work: Scratch,
) -> None:
    """AGD's update one tensor at a time; temporaries in ``work``.

    ``second_moments`` is B (b, or its running max).
    """
    beta1, beta2 = betas
    for p, g, m, b, big_b, t in zip(
        params, grads, exp_avgs, exp_avg_diff_sqs, second_moments, steps
    ):
        c = _step_scalars(t, lr, beta1, beta2, delta)
        if decay is not None:
            p.mul_(decay)
        elif l2:
            g = torch.add(g, p, alpha=l2, out=work.like(p, 1))  # L2 on a copy of the grad
        s = (
            torch.add(g, m, alpha=c.diff_coef, out=work.like(p, 0)) if c.diff_coef else g
        )  # s_t / c_g
        m.lerp_(g, 1.0 - beta1)
        b.mul_(beta2).addcmul_(s, s, value=c.sq_coef)
        if amsgrad:
            torch.maximum(big_b, b, out=big_b)
        denom = torch.sqrt(big_b, out=work.like(p, 0)).clamp_min_(c.threshold)
        if clip is None:
            p.addcdiv_(m, denom, value=-c.step_size)
        else:
            p.add_(torch.div(m, denom, out=denom).clamp_(-clip, clip), alpha=-c.step_size)


def _multi_tensor_agd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_diff_sqs: list[Tensor],
    second_moments: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    betas: tuple[float, float],
    delta: float,
    amsgrad: bool,
    clip: float | None,
    decay: float | None,
    l2: float,
    work: Scratch,
) -> None:
    """The same update with ``torch._foreach_*``, per device, dtype and step count."""
    beta1, beta2 = betas
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (p, t) in enumerate(zip(params, steps)):
        buckets[(p.device, p.dtype, t)].append(i)
    for (_, _, t), rows in buckets.items():
        ps, gs, ms, bs, big_bs = (
            [xs[i] for i in rows]
            for xs in (params, grads, exp_avgs, exp_avg_diff_sqs, second_moments)
        )
        c = _step_scalars(t, lr, beta1, beta2, delta)
        if decay is not None:
            torch._foreach_mul_(ps, decay)
        elif l2:
            gs = torch._foreach_add(gs, ps, alpha=l2)
        diffs = torch._foreach_add(gs, ms, alpha=c.diff_coef) if c.diff_coef else gs
        torch._foreach_lerp_(ms, gs, 1.0 - beta1)
        torch._foreach_mul_(bs, beta2)
        torch._foreach_addcmul_(bs, diffs, diffs, value=c.sq_coef)
        if amsgrad:
            torch._foreach_maximum_(big_bs, bs)
        denoms = torch._foreach_sqrt(big_bs)
        torch._foreach_clamp_min_(denoms, c.threshold)
        if clip is None:
            torch._foreach_addcdiv_(ps, ms, denoms, value=-c.step_size)
        else:
            ratios = torch._foreach_div(ms, denoms)
            torch._foreach_clamp_min_(ratios, -clip)
            torch._foreach_clamp_max_(ratios, clip)
            torch._foreach_add_(ps, ratios, alpha=-c.step_size)


def _agd_kernel(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    b: Tensor,
    b_max: Tensor | None,
    c: Tensor,
    *,
    decoupled: bool,
    coupled: bool,
    clipped: bool,
) -> None:
    """The update of ``_single_tensor_agd`` for one tensor, written for ``torch.compile``."""
    diff_coef, sq_coef, threshold, step_size, beta1, beta2, decay, l2, clip = c.to(p.dtype).unbind()
    if decoupled:
        p.mul_(decay)
    if coupled:
        g = g + l2 * p
    s = g + diff_coef * m
    m.copy_(m + (1.0 - beta1) * (g - m))
    b.copy_(beta2 * b + sq_coef * s * s)
    if b_max is not None:
        b_max.copy_(torch.maximum(b_max, b))
    ratio = m / torch.maximum((b if b_max is None else b_max).sqrt(), threshold)
    if clipped:
        ratio = torch.minimum(torch.maximum(ratio, -clip), clip)
    p.copy_(p - step_size * ratio)


def _agd_group(tensors: list[tuple[Tensor | None, ...]], scalars: Tensor, **flags: bool) -> None:
    for i, ts in enumerate(tensors):
        _agd_kernel(*ts, scalars[i], **flags)


_AGD_KERNEL = FusedKernel(_agd_group, "AGD")


def _fused_agd(
    group: dict[str, Any], params: list[Tensor], states: list[dict]
) -> tuple[list[Tensor], list[dict]]:
    """Update the group's dense, contiguous tensors in one compiled call.

    Returns:
        The (params, states) left for the eager path (all of them when no kernel is available).
    """
    o = _options(group)
    beta1, beta2 = o["betas"]
    decay, l2, clip, amsgrad = o["decay"], o["l2"], o["clip"], o["amsgrad"]

    def tensors_of(p: Tensor, s: dict) -> tuple[Tensor | None, ...]:
        return (
            real(p),
            real(p.grad),
            real(s["exp_avg"]),
            real(s["exp_avg_diff_sq"]),
            real(s["max_exp_avg_diff_sq"]) if amsgrad else None,
        )

    def row_of(t: int) -> tuple[float, ...]:
        c = _step_scalars(t, o["lr"], beta1, beta2, o["delta"])
        return (
            c.diff_coef,
            c.sq_coef,
            c.threshold,
            c.step_size,
            beta1,
            beta2,
            1.0 if decay is None else decay,
            l2,
            0.0 if clip is None else clip,
        )

    return _AGD_KERNEL.update(
        params,
        states,
        tensors_of,
        row_of,
        decoupled=decay is not None,
        coupled=bool(l2),
        clipped=clip is not None,
    )
