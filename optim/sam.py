"""SAM: Sharpness-Aware Minimization (Foret, Kleiner, Mobahi, Neyshabur; ICLR 2021), with the adaptive
ascent of ASAM (Kwon, Kim, Park, Choi; ICML 2021)."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from ._two_pass import TwoPassOptimizer
from ._validation import check_bool, check_nonnegative
from .wrapper import WrapperOptimizer


class SAM(TwoPassOptimizer, WrapperOptimizer):
    """Sharpness-Aware Minimization over an already-built base optimizer.

    Foret et al., eq. (2) with the p = 2 solution of the inner maximisation; ASAM's scaled ascent::

        g   = grad L_B(w)
        e   = rho * g / (||g||_2 + 1e-12)             ASAM: rho * w^2 g / (|| |w| g ||_2 + 1e-12)
        g~  = grad L_B(w + e)                          same minibatch B
        w   <- base_optimizer.step(w, g~)

    The norm is global over all param groups. Hyperparameters live in the param groups as ``sam_rho``
    and ``sam_adaptive``. With ``model=``, BatchNorm statistics are frozen during the perturbed pass and
    the first pass runs under ``no_sync()`` when ``model`` is DistributedDataParallel (m-sharpness).
    ``rho = 0`` is the base optimizer. Counters: ``n_steps``, ``n_closure_calls`` (2 per step).
    """

    _state_keys = frozenset({"origin"})

    def __init__(self, base_optimizer: Optimizer, rho: float = 0.05, adaptive: bool = False,
                 model: nn.Module | None = None):
        defaults = dict(sam_rho=check_nonnegative("rho", rho), sam_adaptive=check_bool("adaptive", adaptive))
        super().__init__(base_optimizer, defaults)
        self._set_model(model)

    def _update(self, perturbed: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
        self.base_optimizer.step()
