"""SAM: Sharpness-Aware Minimization (Foret, Kleiner, Mobahi, Neyshabur; ICLR 2021).

With the adaptive ascent of ASAM (Kwon, Kim, Park, Choi; ICML 2021).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from ._base import WrapperOptimizer, check_in_dtype, optimizer_params, param_dtype
from ._sam_base import TwoPassOptimizer
from ._validation import check_bool, check_model, check_nonnegative, keyword_only


class SAM(TwoPassOptimizer, WrapperOptimizer):
    r"""Sharpness-Aware Minimization over an already-built base optimizer.

    Foret et al. (2021), eq. (2) with the $p = 2$ solution of the inner maximisation (their
    Algorithm 1), and ASAM's scaled ascent (Kwon et al. 2021):

    $$
    \begin{aligned}
    g_t &= \nabla L_B(w_t)\\
    e_t &= \rho\, \frac{g_t}{\lVert g_t \rVert_2 + 10^{-12}}
      \qquad\text{(ASAM: } \rho\, \frac{w_t^2 \odot g_t}
      {\lVert |w_t| \odot g_t \rVert_2 + 10^{-12}}\text{)}\\
    \tilde g_t &= \nabla L_B(w_t + e_t) \qquad\text{(the same minibatch } B\text{)}\\
    w_{t+1} &= \mathrm{base\_step}(w_t, \tilde g_t)
    \end{aligned}
    $$

    The norm is global over all param groups. Hyperparameters live in the param groups as
    ``sam_rho`` and ``sam_adaptive``. With ``model=``, the running statistics of every module
    that keeps them (BatchNorm, InstanceNorm with ``track_running_stats=True``, user modules
    with ``running_*`` buffers) are frozen during the perturbed pass, and the first pass runs
    under ``no_sync()`` when ``model`` is DistributedDataParallel (m-sharpness). ``rho = 0`` is
    the base optimizer. Counters: ``n_steps``, ``n_closure_calls`` (2 per step).

    Args:
        base_optimizer: An already-built ``torch.optim.Optimizer`` (SGD, Adam, AGD, ...); its
            ``param_groups`` are shared.
        rho: The radius $\rho \ge 0$ of the ascent.
        adaptive: ASAM's scale-invariant ascent.
        model: Keyword-only (positional is deprecated). The model, for freezing running
            statistics and DDP ``no_sync()``; None for neither.

    Raises:
        ArgumentTypeError: an argument of the wrong kind.
        ValueError: ``rho`` < 0 or not finite.
    """

    _state_keys = frozenset({"origin"})

    @keyword_only("model")
    def __init__(self, base_optimizer: Optimizer, rho: float = 0.05, adaptive: bool = False, *,
                 model: nn.Module | None = None):
        defaults = dict(sam_rho=check_nonnegative("rho", rho),
                        sam_adaptive=check_bool("adaptive", adaptive))
        check_in_dtype("rho", defaults["sam_rho"], optimizer_params(base_optimizer),
                       dtype_of=param_dtype)
        check_model("model", model)   # everything checked before the base's groups are touched
        super().__init__(base_optimizer, defaults)
        self._set_model(model)

    def _update(self, perturbed: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
        self.base_optimizer.step()
