"""AdaSAM: SAM with adaptive learning rate and momentum (Sun et al., arXiv 2303.00565, 2023).

Sun, Shen, Zhong, Ding, Chen, Sun, Li, Sun, Tao.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._base import check_in_dtype, grouped, param_dtype, real, state_dtype, use_foreach
from ._diagnostics import stepped
from ._fused import FusedKernel
from ._sam_base import TwoPassOptimizer
from ._validation import check_betas, check_bool, check_nonnegative, check_positive, keyword_only


class AdaSAM(TwoPassOptimizer):
    r"""AdaSAM, the paper's Algorithm 1 (Sun et al. 2023). Its own optimizer, not a wrapper.

    $$
    \begin{aligned}
    g_t &= \nabla f_B(x_t)\\
    s_t &= \nabla f_B\bigl(x_t + \rho\, g_t / \lVert g_t \rVert_2\bigr)
      \qquad\text{(SAM gradient, same minibatch, global norm)}\\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) s_t\\
    v_t &= \beta_2 v_{t-1} + (1 - \beta_2) s_t^2\\
    \hat v_t &= \max(\hat v_{t-1}, v_t), \qquad \hat v_{-1} = \epsilon^2
      \qquad\text{(}\epsilon\text{ enters only here)}\\
    x_{t+1} &= x_t - \gamma\, m_t / \sqrt{\hat v_t}
      \qquad\text{(no bias correction, no additive } \epsilon\text{)}
    \end{aligned}
    $$

    ``bias_correction=True`` divides $m$ by $1 - \beta_1^t$ and $\hat v$ by $1 - \beta_2^t$,
    as Adam does. Per-parameter state: ``step``, ``exp_avg`` ($m$), ``exp_avg_sq`` ($v$),
    ``max_exp_avg_sq`` ($\hat v$), ``origin`` ($x_t$ during the perturbed pass); the moments
    are float32 for float16/bfloat16 parameters (and stay float32 through ``load_state_dict``);
    complex parameters are updated as their ``view_as_real``. Counters: ``n_steps``,
    ``n_closure_calls`` (2 per step).

    Args:
        params: Parameters or param-group dicts.
        lr: The learning rate $\gamma \ge 0$.
        betas: $(\beta_1, \beta_2)$, each in [0, 1).
        rho: The SAM radius $\rho \ge 0$.
        eps: $\epsilon > 0$, the floor $\sqrt{\hat v_{-1}}$ of the denominator.
        model: Keyword-only (positional is deprecated). The model, for freezing running
            statistics and DDP ``no_sync()``; None for neither.
        bias_correction: Adam's bias corrections (off in the paper).
        foreach: The multi-tensor path; None: automatic (off the CPU).
        fused: Compile each tensor's update into one kernel (``torch.compile``; the eager path
            if that fails, with a warning); None (default) means False for now.

    Raises:
        ArgumentTypeError: an argument of the wrong kind.
        ValueError: an argument outside its range.
    """

    _rho_key = "rho"
    _adaptive_key = None
    _state_keys = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "origin"})
    _wide_keys = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq"})

    @keyword_only("model")
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        rho: float = 0.05,
        eps: float = 1e-8,
        *,
        model: nn.Module | None = None,
        bias_correction: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        defaults = dict(
            lr=check_nonnegative("lr", lr),
            betas=check_betas("betas", betas),
            rho=check_nonnegative("rho", rho),
            eps=check_positive("eps", eps),
            bias_correction=check_bool("bias_correction", bias_correction),
        )
        super().__init__(params, defaults)
        self.foreach = None if foreach is None else check_bool("foreach", foreach)
        self.fused = None if fused is None else check_bool("fused", fused)
        self._set_model(model)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        r"""Add a param group, its hyperparameters checked.

        Besides the ranges of ``__init__``, ``eps**2`` (the initial $\hat v$) must be finite
        and nonzero, and ``lr`` and ``rho`` finite, in the dtype of the group's state.

        Args:
            param_group: As for ``torch.optim.Optimizer.add_param_group``.

        Raises:
            ArgumentTypeError: a hyperparameter of the wrong kind.
            ValueError: a hyperparameter outside its range.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        params = group["params"]
        group["lr"] = check_in_dtype("lr", check_nonnegative("lr", group["lr"]), params,
                                     dtype_of=param_dtype)
        group["betas"] = check_betas("betas", group["betas"])
        group["rho"] = check_in_dtype("rho", check_nonnegative("rho", group["rho"]), params,
                                      dtype_of=param_dtype)
        group["eps"] = check_in_dtype("eps", check_positive("eps", group["eps"]), params,
                                      power=2, nonzero=True)
        group["bias_correction"] = check_bool("bias_correction", group["bias_correction"])

    def _required_state(self, index: int, entry: dict[str, Any],
                        state_dict: dict[str, Any]) -> frozenset[str]:
        """A parameter that has stepped needs its step count and all three moments."""
        required = super()._required_state(index, entry, state_dict)
        moments = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        return required | moments if moments & entry.keys() else required

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> list[dict[str, Any]]:
        """Create state where missing, advance the steps; the states of ``params``."""
        states = []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                dtype = state_dtype(p)
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(
                    p, dtype=dtype, memory_format=torch.preserve_format
                )
                state["exp_avg_sq"] = torch.zeros_like(
                    p, dtype=dtype, memory_format=torch.preserve_format
                )
                state["max_exp_avg_sq"] = torch.empty_like(
                    p, dtype=dtype, memory_format=torch.preserve_format
                )
                real(state["max_exp_avg_sq"]).fill_(group["eps"] ** 2)   # both parts if complex
            state["step"] += 1
            states.append(state)
        return states

    def _update(self, perturbed: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
        """The AMSGrad-type update with the gradient s at the SAM point."""
        for group, params in perturbed:
            states = self._init_group(group, params)
            if (
                params and self.fused
            ):  # what the compiled kernel cannot take goes on to the eager path
                params, states = _fused_adasam(group, params, states)
            if not params:
                continue
            exp_avgs = [s["exp_avg"] for s in states]
            steps = [s["step"] for s in states]
            multi = (
                use_foreach(self.foreach, params)
                and len(set(steps)) == 1
                and all(m.dtype == p.dtype for m, p in zip(exp_avgs, params))
            )
            fn = _multi_tensor_adasam if multi else _single_tensor_adasam
            fn(   # complex tensors as view_as_real
                [real(p) for p in params],
                [real(p.grad) for p in params],
                [real(m) for m in exp_avgs],
                [real(s["exp_avg_sq"]) for s in states],
                [real(s["max_exp_avg_sq"]) for s in states],
                steps=steps,
                lr=group["lr"],
                betas=group["betas"],
                bias_correction=group["bias_correction"],
            )

    @torch.no_grad()
    def preconditioner(self) -> dict[Tensor, Tensor]:
        r"""The diagonal preconditioner $P = \sqrt{\hat v_t}$ of the last step.

        With ``bias_correction``, $\sqrt{\hat v_t / (1 - \beta_2^t)}$ against the bias-corrected
        $m$.

        Returns:
            Per stepped parameter (keyed like ``state``), $P$.
        """
        out = {}
        for _, group, p, state in stepped(self):
            _, v_scale = _step_size(
                group["lr"], group["betas"], state["step"], group["bias_correction"]
            )
            out[p] = (state["max_exp_avg_sq"] * v_scale).sqrt_()
        return out


def _step_size(
    lr: float, betas: tuple[float, float], step: int, bias_correction: bool
) -> tuple[float, float]:
    """(lr / (1 - beta1^t), 1 / (1 - beta2^t)) with bias correction, else (lr, 1)."""
    if not bias_correction:
        return lr, 1.0
    return lr / (1.0 - betas[0] ** step), 1.0 / (1.0 - betas[1] ** step)


def _single_tensor_adasam(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, steps, lr, betas, bias_correction
) -> None:
    beta1, beta2 = betas
    for p, s, m, v, v_max, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps
    ):
        step_size, v_scale = _step_size(lr, betas, step, bias_correction)
        m.mul_(beta1).add_(s, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(s, s, value=1.0 - beta2)
        torch.maximum(v_max, v, out=v_max)
        denom = (v_max * v_scale).sqrt_() if bias_correction else v_max.sqrt()
        if m.dtype == p.dtype:
            p.addcdiv_(m, denom, value=-step_size)
        else:  # float32 moments of a low-precision parameter: one rounding, at the end
            p.copy_(p.to(m.dtype).addcdiv_(m, denom, value=-step_size))


def _multi_tensor_adasam(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, steps, lr, betas, bias_correction
) -> None:
    """The same update with ``torch._foreach_*``.

    All ``steps`` equal, moments in the parameters' dtype.
    """
    beta1, beta2 = betas
    step_size, v_scale = _step_size(lr, betas, steps[0], bias_correction)
    for ps, ss, ms, vs, v_maxs in grouped(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs):
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, ss, alpha=1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, ss, ss, value=1.0 - beta2)
        torch._foreach_maximum_(v_maxs, vs)
        denom = torch._foreach_sqrt(
            torch._foreach_mul(v_maxs, v_scale) if bias_correction else v_maxs
        )
        torch._foreach_addcdiv_(ps, ms, denom, value=-step_size)


def _adasam_kernel(
    p: Tensor, s: Tensor, m: Tensor, v: Tensor, v_max: Tensor, c: Tensor, *, bias_correction: bool
) -> None:
    """The update of ``_single_tensor_adasam`` for one tensor, written for ``torch.compile``."""
    beta1, beta2, step_size, v_scale = c.to(m.dtype).unbind()
    s = s.to(m.dtype)
    m.copy_(beta1 * m + (1.0 - beta1) * s)
    v.copy_(beta2 * v + (1.0 - beta2) * s * s)
    v_max.copy_(torch.maximum(v_max, v))
    denom = (v_max * v_scale).sqrt() if bias_correction else v_max.sqrt()
    p.copy_(p.to(m.dtype) - step_size * m / denom)


def _adasam_group(tensors: list[tuple[Tensor, ...]], scalars: Tensor, **flags: bool) -> None:
    for i, ts in enumerate(tensors):
        _adasam_kernel(*ts, scalars[i], **flags)


_ADASAM_KERNEL = FusedKernel(_adasam_group, "AdaSAM")


def _fused_adasam(
    group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]]
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Update the group's dense, contiguous tensors in one compiled call.

    Returns:
        The (params, states) left for the eager path (all of them when no kernel is available).
    """
    lr, betas, bias_correction = group["lr"], group["betas"], group["bias_correction"]
    return _ADASAM_KERNEL.update(
        params,
        states,
        lambda p, s: tuple(real(t) for t in (p, p.grad, s["exp_avg"], s["exp_avg_sq"],
                                             s["max_exp_avg_sq"])),
        lambda t: (betas[0], betas[1], *_step_size(lr, betas, t, bias_correction)),
        bias_correction=bias_correction,
    )
