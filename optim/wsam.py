"""WSAM: Weighted Sharpness-Aware Minimization (Yue et al., KDD 2023, arXiv 2305.15817).

Minimises L(w) + a * (max_{||e||<=rho} L(w + e) - L(w)) with a = gamma / (1 - gamma) (eq. 3).
With g the plain gradient at w and g~ the gradient at w + e (e as in SAM):

* coupled (``decouple=False``): the base optimizer steps with ``g + a (g~ - g)``;
* decoupled (default, as in the paper): the base optimizer steps with ``g`` and then
  ``w <- w - lr * a * (g~ - g)`` (a plain SGD step on the sharpness term at the group's current lr).

gamma = 0 is the base optimizer; gamma = 0.5 coupled is SAM. ``max_norm`` clips the plain gradient
(after it is averaged over ranks) in the first step and the perturbed gradient in the second step,
as the authors' atorch code does since Dec 2023. Under DistributedDataParallel (``model=``), the
first pass runs under ``no_sync()``, so each rank perturbs with its own gradient (m-sharpness), and
the plain gradient is then averaged over ranks explicitly.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .sam import SharpnessAware, all_reduce_mean_, check_rho, grouped
from ._checks import check_positive
from .wrapper import WrapperOptimizer


class WSAM(SharpnessAware, WrapperOptimizer):
    """Weighted SAM over an already-built base optimizer (SGD, Adam, AGD, ...).

    Param-group keys: ``sam_rho``, ``sam_adaptive``, ``wsam_alpha`` (= gamma / (1 - gamma)).
    Per-parameter state: ``origin`` (the weights w during the perturbed pass, then the sharpness
    gradient g~ - g) and ``grad`` (the plain gradient g). Counters: ``n_steps``,
    ``n_closure_calls`` (2 per step).
    """

    def __init__(self, base_optimizer: Optimizer, rho: float = 0.05, gamma: float = 0.9,
                 adaptive: bool = False, decouple: bool = True, max_norm: float | None = None,
                 model: nn.Module | None = None):
        if not (isinstance(gamma, (int, float)) and 0.0 <= gamma < 1.0):
            raise ValueError(f"gamma must be in [0, 1), got {gamma!r}")
        if max_norm is not None:
            check_positive("max_norm", max_norm)
        defaults = dict(sam_rho=check_rho(rho), sam_adaptive=bool(adaptive),
                        wsam_alpha=gamma / (1.0 - gamma))
        super().__init__(base_optimizer, defaults)
        self.decouple = bool(decouple)
        self.max_norm = max_norm
        self._set_model(model)

    def _clip(self) -> None:
        """``clip_grad_norm_`` over all parameters with a gradient (no-op without ``max_norm``)."""
        if self.max_norm is not None:
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_norm)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Moves to ``w + e`` (e from this rank's gradient), then averages the plain gradient g over
        ranks, clips it (``max_norm``) and stores it in ``state[p]["grad"]``."""
        self._ascend()
        params = [p for _, ps in self._perturbed for p in ps]
        all_reduce_mean_([p.grad for p in params])
        self._clip()
        for ps, gs in grouped(params, [self._buffer(p, "grad") for p in params]):
            torch._foreach_copy_(gs, [p.grad for p in ps])
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Back to ``w``; base step with ``g + a (g~ - g)`` (coupled) or with ``g`` followed by
        ``w -= lr * a * (g~ - g)`` (decoupled, lr read after the base step)."""
        perturbed = self._return_to_origin()
        self._clip()
        for group, params in perturbed:
            sharp = [self.state[p]["origin"] for p in params]  # free once w is restored
            plain = [self.state[p]["grad"] for p in params]
            for ps, ss, gs in grouped(params, sharp, plain):
                grads = [p.grad for p in ps]
                torch._foreach_copy_(ss, grads)
                torch._foreach_sub_(ss, gs)  # g~ - g
                torch._foreach_copy_(grads, gs)
                if not self.decouple:
                    torch._foreach_add_(grads, ss, alpha=group["wsam_alpha"])
        self.base_optimizer.step()
        if self.decouple:
            for group, params in perturbed:
                sharp = [self.state[p]["origin"] for p in params]
                for ps, ss in grouped(params, sharp):
                    torch._foreach_add_(ps, ss, alpha=-group["lr"] * group["wsam_alpha"])
        self._finish_step(zero_grad)

    @torch.no_grad()
    def gradient_norms(self) -> dict[str, float]:
        """Diagnostics of the last step (spec section 7): ``grad`` = ||g||, ``sharpness`` = ||g~ - g||
        and their ``ratio``, over all parameters (g after averaging and clipping). Empty before
        the first completed step. Synchronises with the device only when called."""
        if self.n_steps == 0 or hasattr(self, "_perturbed"):
            return {}
        states = [self.state[p] for g in self.param_groups for p in g["params"]
                  if "grad" in self.state[p]]
        plain = _norm([s["grad"] for s in states])
        sharp = _norm([s["origin"] for s in states])
        return {"grad": plain, "sharpness": sharp, "ratio": sharp / plain if plain > 0 else float("inf")}


def _norm(tensors: list[Tensor]) -> float:
    """Global L2 norm of ``tensors`` in float64, as a Python float."""
    return float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(t.double()).cpu() for t in tensors])))
