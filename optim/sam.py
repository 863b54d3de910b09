"""SAM (Foret et al., ICLR 2021), its adaptive form (ASAM, Kwon et al., ICML 2021), and the
machinery the SAM family shares (WSAM, AdaSAM, SALA).

Shared pieces, one helper each:

* ``perturbation_norm``: the global L2 norm of the (optionally |w|-weighted) gradient, accumulated
  in float32 or better whatever the parameter dtype;
* ``BatchNormFreeze``: keeps every ``_BatchNorm`` layer's running statistics out of the perturbed
  pass (momentum 0, which also covers cumulative averaging with ``momentum=None``, and
  ``num_batches_tracked`` restored);
* ``first_pass``: ``model.no_sync()`` under DistributedDataParallel, so that each rank perturbs with
  its own local gradient (m-sharpness); ``all_reduce_mean_`` averages gradients over ranks;
* ``SharpnessAware``: the two-pass ``step(closure)`` and the ascent / restore steps.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from ._checks import check_nonnegative
from .wrapper import Closure, WrapperOptimizer

SAM_EPS = 1e-12  # added to the norm in e = rho * g / (||g|| + eps), as in the authors' code


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def check_rho(rho: float) -> float:
    """rho >= 0 (rho = 0 makes the SAM family its base optimizer, a useful limit)."""
    check_nonnegative("rho", rho)
    return float(rho)


def check_model(model: nn.Module | None) -> nn.Module | None:
    if model is not None and not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    return model


def grouped(*tensor_lists: list[Tensor]) -> Iterator[tuple[list[Tensor], ...]]:
    """Equal-length tensor lists split into runs on one device and dtype (for ``torch._foreach_*``)."""
    if not tensor_lists[0]:
        return
    groups = Optimizer._group_tensors_by_device_and_dtype(list(tensor_lists))
    for lists, _ in groups.values():
        yield tuple(lists)


def perturbation_norm(params: Sequence[Tensor], adaptive: Sequence[bool] | None = None) -> Tensor:
    """|| concat_p (|w_p| if adaptive_p else 1) * grad_p ||_2 over all ``params`` (all have a grad).

    Each tensor's norm is accumulated in float32 or better (float64 stays float64); the result is
    on the first parameter's device.
    """
    adaptive = adaptive or [False] * len(params)
    norms = []
    for p, ada in zip(params, adaptive):
        acc = torch.promote_types(p.dtype, torch.float32)
        g = p.grad.to(acc)
        if ada:
            g = g * p.detach().abs().to(acc)
        norms.append(torch.linalg.vector_norm(g))
    acc = max((n.dtype for n in norms), key=lambda dt: torch.finfo(dt).bits)
    return torch.linalg.vector_norm(torch.stack([n.to(params[0].device, acc) for n in norms]))


class BatchNormFreeze:
    """Keeps the running statistics of every ``_BatchNorm`` layer of ``model`` unchanged.

    ``freeze()`` sets momentum to 0 (running mean/var then stay bitwise equal, also for
    ``momentum=None``, whose cumulative average is replaced by the factor 0) and remembers
    ``num_batches_tracked``; ``restore()`` puts both back. Without a model both are no-ops.
    """

    def __init__(self, model: nn.Module | None):
        self.model = model
        self._saved: list[tuple[_BatchNorm, float | None, Tensor | None]] = []

    def freeze(self) -> None:
        if self.model is None or self._saved:
            return
        for m in self.model.modules():
            if isinstance(m, _BatchNorm):
                tracked = m.num_batches_tracked
                self._saved.append((m, m.momentum, None if tracked is None else tracked.clone()))
                m.momentum = 0.0

    def restore(self) -> None:
        for m, momentum, tracked in self._saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
        self._saved = []


def is_ddp(model: nn.Module | None) -> bool:
    return isinstance(model, DistributedDataParallel)


def first_pass(model: nn.Module | None) -> contextlib.AbstractContextManager:
    """``model.no_sync()`` under DDP (gradients stay local: m-sharpness), else a null context."""
    return model.no_sync() if is_ddp(model) else contextlib.nullcontext()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean_(tensors: list[Tensor]) -> None:
    """Average ``tensors`` over ranks in place (one collective per tensor); no-op without a group."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world)


# ---------------------------------------------------------------------------------------------
# the two-pass step shared by SAM, WSAM and AdaSAM
# ---------------------------------------------------------------------------------------------

class SharpnessAware:
    """Mixin for optimizers that take an ascent step and re-evaluate the gradient there.

    The class using it calls ``_set_model(model)`` and
    names its group keys for the radius and the adaptive flag (``_rho_key``, ``_adaptive_key``;
    ``None`` for "never adaptive"). Per-parameter buffer ``state[p]["origin"]`` holds the weights
    the step started from, which are restored exactly (copied back, not ``w - e``).

    Two-step API: ``first_step()`` after the plain backward (it freezes BatchNorm statistics when
    ``model`` is given), then the perturbed forward-backward, then ``second_step()`` (which
    unfreezes them). Under DDP, run the plain backward inside ``model.no_sync()`` yourself for
    m-sharpness; ``step(closure)`` does it for you.
    """

    model: nn.Module | None
    _bn: BatchNormFreeze
    _rho_key: str = "sam_rho"
    _adaptive_key: str | None = "sam_adaptive"
    state: Any
    param_groups: list[dict[str, Any]]

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:
        """One SAM-type step. ``closure`` clears the grads, computes the loss, calls backward and
        returns the loss; it is called twice. Returns the loss at the weights the step started from.
        Do not call ``backward()`` before ``step(closure)``."""
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step() needs a closure (it runs two forward-backward "
                             "passes); or call first_step() and second_step() yourself")
        closure = self._counted(closure)
        with first_pass(self.model):
            loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Moves to ``w + e`` using the current gradients (the plain gradient at ``w``)."""
        self._ascend()
        if zero_grad:
            self.zero_grad()

    def _set_model(self, model: nn.Module | None) -> None:
        self.model = check_model(model)
        self._bn = BatchNormFreeze(self.model)

    def _finish_step(self, zero_grad: bool) -> None:
        self.n_steps += 1
        if zero_grad:
            self.zero_grad()

    def _ascend(self) -> None:
        """w <- w + e with e = rho * (w^2 if adaptive) * g / (||(|w| if adaptive) * g|| + eps); then
        freezes BatchNorm statistics for the perturbed pass."""
        if hasattr(self, "_perturbed"):
            raise RuntimeError("first_step() called twice without second_step() in between")
        self._perturbed = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        params = [p for _, ps in self._perturbed for p in ps]
        if not params:
            return
        adaptive = [self._is_adaptive(g) for g, ps in self._perturbed for _ in ps]
        scale = 1.0 / (perturbation_norm(params, adaptive) + SAM_EPS)
        for group, ps in self._perturbed:
            ada = self._is_adaptive(group)
            factor = scale * group[self._rho_key]
            origins = [self._buffer(p, "origin") for p in ps]
            steps = [p.grad * p * p if ada else p.grad for p in ps]
            for ps_, os_, ss in grouped(ps, origins, steps):
                torch._foreach_copy_(os_, ps_)
                torch._foreach_add_(ps_, torch._foreach_mul(ss, factor.to(ps_[0])))
        self._bn.freeze()

    def _is_adaptive(self, group: dict[str, Any]) -> bool:
        return bool(self._adaptive_key and group[self._adaptive_key])

    def _buffer(self, p: Tensor, name: str) -> Tensor:
        """``state[p][name]``, allocated like ``p`` on first use."""
        state = self.state[p]
        if name not in state:
            state[name] = torch.empty_like(p, memory_format=torch.preserve_format)
        return state[name]

    def _return_to_origin(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """Restores BatchNorm momentum and the weights; averages the perturbed gradient over ranks
        unless DDP already did. Returns, per param group, the parameters perturbed that still have
        a gradient."""
        self._bn.restore()
        perturbed = getattr(self, "_perturbed", None)
        if perturbed is None:
            raise RuntimeError("second_step() called without a preceding first_step()")
        del self._perturbed
        for _, ps in perturbed:
            for ps_, os_ in grouped(ps, [self.state[p]["origin"] for p in ps]):
                torch._foreach_copy_(ps_, os_)
        out = [(g, [p for p in ps if p.grad is not None]) for g, ps in perturbed]
        if not is_ddp(self.model):
            all_reduce_mean_([p.grad for _, ps in out for p in ps])
        return out


class SAM(SharpnessAware, WrapperOptimizer):
    """Sharpness-Aware Minimization over an already-built base optimizer (Foret et al., eq. 2).

    ``e = rho * g / (||g||_2 + 1e-12)`` (global norm over all groups); with ``adaptive=True``
    (ASAM) ``e = rho * w^2 * g / (|| |w| * g || + 1e-12)``. The base optimizer then steps from
    ``w`` with the gradient at ``w + e``. Hyperparameters live in the param groups as ``sam_rho``
    and ``sam_adaptive``. With ``model=``, BatchNorm statistics are frozen during the perturbed
    pass and the first pass runs under ``no_sync()`` when ``model`` is DistributedDataParallel.

    Counters: ``n_steps`` and ``n_closure_calls`` (forward-backward passes, 2 per step).
    """

    def __init__(self, base_optimizer: Optimizer, rho: float = 0.05, adaptive: bool = False,
                 model: nn.Module | None = None):
        defaults = dict(sam_rho=check_rho(rho), sam_adaptive=bool(adaptive))
        super().__init__(base_optimizer, defaults)
        self._set_model(model)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Moves back to ``w`` and lets the base optimizer step with the gradient at ``w + e``."""
        self._return_to_origin()
        self.base_optimizer.step()
        self._finish_step(zero_grad)
