r"""Base class of the SAM family (SAM, WSAM, AdaSAM) and the building blocks SALA shares with it.

:class:`TwoPassOptimizer` runs the two passes of Foret et al. (2021), eq. (2), and its variants:

$$
\begin{aligned}
&\text{READY:} && g = \nabla L_B(w) \quad\text{(pass 1; under DDP inside model.no\_sync())}\\
&\text{first\_step():} && e = \rho\, g / (\lVert g \rVert_2 + 10^{-12}),\quad w \leftarrow w + e
  \quad\text{(running statistics frozen; PERTURBED)}\\
&\text{pass 2:} && \tilde g = \nabla L_B(w + e)\\
&\text{second\_step():} && w \leftarrow w \text{ (copied back exactly)};
  \text{ the subclass's update with } \tilde g \text{ (and } g\text{); READY}
\end{aligned}
$$

(ASAM: $e = \rho\, w^2 g / (\lVert |w| g \rVert_2 + 10^{-12})$.) The phase is a named attribute
(:class:`Phase`) saved in ``state_dict()``. With a ``torch.amp.GradScaler``
(``scaler.step(opt, closure)`` or ``opt.step(closure, grad_scaler=scaler)``, the closure calling
``scaler.scale(loss).backward()``), each pass's gradients are unscaled before use and the step is
skipped when either pass has inf/NaN, which ``scaler.update()`` then sees.
"""
from __future__ import annotations

import contextlib
import enum
import warnings
import weakref
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel

from ._base import Closure, CountingOptimizer, grouped, real, state_dtype
from ._sharded import check_grad, global_norm, is_dtensor, local
from ._validation import check_model

SAM_EPS = 1e-12  # added to the norm in e = rho * g / (||g|| + eps), as in the authors' code


def perturbation_norm(params: Sequence[Tensor],
                      adaptive: Sequence[bool] | None = None) -> Tensor:
    r"""The norm of SAM's ascent, $\lVert \mathrm{concat}_p\, a_p \odot g_p \rVert_2$.

    Args:
        params: Parameters that all have a gradient $g_p$.
        adaptive: Per parameter, whether $a_p = |w_p|$ (ASAM) instead of 1.

    Returns:
        The norm as a 0-d tensor on the first parameter's device, each tensor's norm
        accumulated in float32 or better; for sharded (``DTensor``) parameters the norm over
        all their pieces, summed over the ranks (the same on every rank).
    """
    adaptive = adaptive or [False] * len(params)
    norms = []
    for p, ada in zip(params, adaptive):   # complex: as its real view (torch's convention)
        w = real(p.detach())
        acc = state_dtype(w)
        g = real(p.grad).to(acc)
        norms.append(torch.linalg.vector_norm(g * w.abs().to(acc) if ada else g))
    acc = max((n.dtype for n in norms), key=lambda dt: torch.finfo(dt).bits)
    device = norms[0].device
    return global_norm([n.to(device, acc) for n in norms], list(params))


def has_running_stats(module: nn.Module) -> bool:
    """Whether ``module`` keeps running statistics that a forward in train mode updates.

    The rule (duck-typed, so that user modules are covered): a ``_NormBase`` (BatchNorm*,
    SyncBatchNorm, InstanceNorm*, their lazy variants) with ``track_running_stats=True``, or any
    module with a (non-None) buffer of its own whose name starts with ``running_``
    (``running_mean``, ``running_var``, a user's ``running_max``, ...).
    """
    if isinstance(module, _NormBase):
        return bool(module.track_running_stats)
    return any(name.startswith("running_") and buf is not None
               for name, buf in module._buffers.items())


def running_stats_buffers(model: nn.Module | None) -> list[tuple[Tensor, Tensor]]:
    """A copy of every buffer of ``model``'s modules with running statistics.

    See :func:`has_running_stats` for which modules; all their own buffers are copied
    (``num_batches_tracked`` too).

    Returns:
        (buffer, copy) pairs; empty without a model.
    """
    if model is None:
        return []
    return [(b, b.clone()) for m in model.modules() if has_running_stats(m)
            for b in m.buffers(recurse=False)]


#: The name this helper had while only BatchNorm was frozen.
batchnorm_buffers = running_stats_buffers


class RunningStatsFreeze:
    """Keeps the running statistics of ``model`` unchanged through the perturbed pass.

    Every module with running statistics (:func:`has_running_stats`: BatchNorm, InstanceNorm
    with ``track_running_stats=True``, any ``_NormBase``, user modules with ``running_*``
    buffers) is covered. ``freeze()`` copies their buffers and sets the momentum of the
    ``_NormBase`` ones to 0 (their statistics then stay bitwise equal during the pass, also
    for ``momentum=None``); ``restore()`` copies every buffer back and puts the momenta back.
    Without a model both are no-ops.

    Args:
        model: The model, or None.
    """

    def __init__(self, model: nn.Module | None):
        self.model = model
        self._saved: list[tuple[Tensor, Tensor]] = []
        self._momenta: list[tuple[_NormBase, float | None]] = []
        self._frozen = False

    def freeze(self) -> None:
        """Remember every running-statistics buffer and zero the ``_NormBase`` momenta."""
        if self.model is None or self._frozen:
            return
        self._saved = running_stats_buffers(self.model)
        self._momenta = [(m, m.momentum) for m in self.model.modules()
                         if isinstance(m, _NormBase) and has_running_stats(m)]
        for m, _ in self._momenta:
            m.momentum = 0.0
        self._frozen = True

    def restore(self) -> None:
        """Put back the buffers and momenta that ``freeze`` found."""
        for m, momentum in self._momenta:
            m.momentum = momentum
        restore_buffers(self._saved)
        self._saved, self._momenta, self._frozen = [], [], False


#: The name this class had while only BatchNorm was frozen.
BatchNormFreeze = RunningStatsFreeze


def is_ddp(model: nn.Module | None) -> bool:
    """Whether ``model`` is wrapped in ``DistributedDataParallel``."""
    return isinstance(model, DistributedDataParallel)


def first_pass(model: nn.Module | None) -> contextlib.AbstractContextManager:
    """``model.no_sync()`` under DDP (gradients stay local: m-sharpness), else a null context."""
    return model.no_sync() if is_ddp(model) else contextlib.nullcontext()


def is_distributed() -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean_(tensors: list[Tensor]) -> None:
    """Average ``tensors`` over ranks in place (one collective per tensor); no-op alone.

    ``DTensor`` gradients (FSDP2, tensor parallel) are left alone: they are the gradient of the
    global batch already, and each rank holds another piece of it.
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    for t in (t for t in tensors if not is_dtensor(t)):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world)


def ascend_(params: list[Tensor], steps: list[Tensor], factor: Tensor) -> None:
    """Add ``factor * step`` to each parameter (multi-tensor per device and dtype)."""
    for ps, ss in grouped([real(p) for p in params], [real(s) for s in steps]):
        torch._foreach_add_(ps, torch._foreach_mul(ss, factor.to(ps[0])))


def restore_buffers(saved: list[tuple[Tensor, Tensor]]) -> None:
    """Copy each saved buffer back (see :func:`running_stats_buffers`)."""
    with torch.no_grad():
        for buffer, copy in saved:
            local(buffer).copy_(local(copy))


GradMark = tuple[weakref.ref, int] | None


def grad_marks(params: list[Tensor]) -> list[GradMark]:
    """What each parameter's gradient is now (a weak reference and its version), or None."""
    return [None if p.grad is None else (weakref.ref(p.grad), p.grad._version) for p in params]


def grad_changed(p: Tensor, mark: GradMark) -> bool:
    """Whether ``p`` holds a gradient other than, or changed in place since, ``mark``."""
    if p.grad is None:
        return False
    return mark is None or mark[0]() is not p.grad or p.grad._version != mark[1]


def require_gradients(owner: str, produced: bool, which: str) -> None:
    """Raise ``RuntimeError`` unless a pass ``produced`` gradients.

    Args:
        owner: The optimizer's class name.
        produced: Whether any parameter's gradient was set or changed by the pass.
        which: "first" or "second", for the message.
    """
    if not produced:
        raise RuntimeError(f"{owner}.step(closure): the {which} call of the closure produced no "
                           "gradients (no parameter's .grad was set or changed); the closure "
                           "must clear the gradients, compute the loss, call loss.backward() "
                           "and return the loss")


class GradGuard:
    """Detects gradients that were already accumulated when ``step(closure)`` was entered.

    ``remember(params)`` notes the gradients a step leaves; ``check(params)`` raises when a
    parameter holds another gradient, or one changed in place since, that is not all zeros (a
    ``backward()`` before ``step(closure)`` would otherwise be added to the first pass's).
    """

    def __init__(self) -> None:
        self._left: dict[int, tuple[weakref.ref, int]] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Nothing remembered (weak references do not pickle; the owner remembers anew)."""
        return {"_left": {}}

    def remember(self, params: list[Tensor]) -> None:
        """Note the gradients ``params`` hold now."""
        self._left = {id(p): mark for p, mark in zip(params, grad_marks(params))
                      if mark is not None}

    def check(self, owner: str, params: list[Tensor]) -> None:
        """Raise ``RuntimeError`` if a nonzero gradient appeared since ``remember``.

        Args:
            owner: The optimizer's class name, for the message.
            params: The parameters to check.
        """
        foreign = [p.grad for p in params if grad_changed(p, self._left.get(id(p)))]
        found = any(bool(local(g).any()) for g in foreign)
        sharded = [p for p in params if is_dtensor(p)]
        if sharded and is_distributed():   # a nonzero piece on any rank: all ranks raise
            flag = torch.tensor(float(found), device=collective_device([local(sharded[0])]))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            found = bool(flag)
        if found:
            raise RuntimeError(
                f"{owner}.step(closure) found gradients already accumulated: the closure "
                "computes them itself. Do not call backward() before step(closure) (with a "
                "torch.amp.GradScaler: opt.step(closure, grad_scaler=scaler), then "
                "scaler.update()), and clear the gradients (opt.zero_grad()) at the start of "
                "the closure")


def unscale_(params: list[Tensor], inv_scale: float) -> bool:
    """Multiply every gradient by ``inv_scale`` in place.

    Returns:
        True when every gradient is finite (agreed over ranks).
    """
    found = []
    grads = [local(p.grad) for p in params]
    device = collective_device(grads) if is_distributed() else None
    for (gs,) in grouped(grads):
        found_inf = torch.zeros((), dtype=torch.float32, device=gs[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(
            gs, found_inf, torch.full_like(found_inf, inv_scale))
        found.append(found_inf if device is None else found_inf.to(device))
    total = torch.stack(found).sum() if found else torch.zeros((), device=device)
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return not bool(total)


def collective_device(tensors: Sequence[Tensor]) -> torch.device:
    """The device of a small tensor that a collective on the default group reduces.

    The CPU where the backend takes CPU tensors (gloo, MPI, and a ``"cpu:gloo,cuda:nccl"``
    pair); otherwise (NCCL takes CUDA tensors only) the first accelerator device among
    ``tensors`` (the gradients), else the current CUDA device. Many small values on several
    devices are gathered there before one collective.

    Args:
        tensors: The tensors the values come from (e.g. the gradients).

    Returns:
        The device.
    """
    backend = str(dist.get_backend()).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    accelerated = [t.device for t in tensors if t.device.type != "cpu"]
    if accelerated:
        return accelerated[0]
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Phase(str, enum.Enum):
    """Where a two-pass step stands: READY for the plain gradient, PERTURBED at w + e."""

    READY = "ready"
    PERTURBED = "perturbed"


class TwoPassOptimizer(CountingOptimizer):
    """Base class of the SAM family: the two-pass ``step(closure)``, the ascent and the restore.

    Subclasses call ``_set_model(model)``, name their group keys for the radius and the adaptive
    flag (``_rho_key``, ``_adaptive_key``; ``None`` for "never adaptive"), and implement
    ``_update(perturbed)`` (the step from w with the gradient at w + e); ``_store_plain(params)``
    may keep the plain gradient. ``state[p]["origin"]`` holds the weights a step started from,
    copied back exactly.

    Two-step API: ``first_step()`` after the plain backward (it freezes the running statistics
    of every module that has them, :func:`has_running_stats`, when ``model`` is given), the
    perturbed forward-backward, then ``second_step()``. Under DDP run the plain backward inside
    ``model.no_sync()`` yourself for m-sharpness; ``step(closure)`` does it for you.

    Complex parameters are perturbed and updated as their ``view_as_real`` (torch.optim's
    convention; ASAM's $|w|$ is then taken per real component).

    ``torch.compile(opt.step)`` runs ``step`` (and ``first_step``/``second_step``) eagerly: they
    are marked ``torch.compiler.disable``. They run the closure's two forward-backward passes
    and keep the phase in Python attributes; dynamo traced ``first_step`` up to its
    ``zero_grad()`` (which torch marks untraceable), fell back to eager for that frame and
    dropped the ``phase`` assignment it had traced, so ``second_step()`` then found no
    ``first_step()``. Compile the model (the closure's forward) instead.
    """

    _rho_key: str = "sam_rho"
    _adaptive_key: str | None = "sam_adaptive"
    _step_supports_amp_scaling = True   # GradScaler.step hands itself over: see step()
    model: nn.Module | None

    def _set_model(self, model: nn.Module | None) -> None:
        self.model = check_model("model", model)
        self._bn = RunningStatsFreeze(self.model)
        self._guard = GradGuard()
        self.phase = Phase.READY
        self._perturbed: list[tuple[dict[str, Any], list[Tensor]]] = []

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, grad_scaler: Any = None) -> Tensor:
        """One two-pass step.

        Exception safe: on any exception in either pass (a KeyboardInterrupt, an out-of-memory
        error in the second forward), the weights, running statistics and momenta are put
        back as the step found them, the gradients are cleared, and the exception propagates;
        the next step starts afresh.

        Args:
            closure: Clears the gradients, computes the loss, calls ``backward()`` (with a
                ``grad_scaler``: ``grad_scaler.scale(loss).backward()``) and returns the loss;
                called twice. Do not call ``backward()`` before ``step``.
            grad_scaler: A ``torch.amp.GradScaler`` whose scaled gradients the closure makes;
                call ``grad_scaler.update()`` after the step.

        Returns:
            The loss at the weights the step started from.

        Raises:
            ValueError: ``closure`` is None.
            RuntimeError: gradients were already accumulated before the step, a call of the
                closure produced no gradients, or a GradScaler did not hand itself over.
        """
        name = type(self).__name__
        if closure is None:
            raise ValueError(f"{name}.step() needs a closure (it runs two forward-backward "
                             "passes); or call first_step() and second_step() yourself")
        if getattr(self, "grad_scale", None) is not None:
            raise RuntimeError(f"{name}: this GradScaler did not hand itself over; call "
                               f"{name.lower()}.step(closure, grad_scaler=scaler) and then "
                               "scaler.update()")
        if self.phase is Phase.PERTURBED:
            warnings.warn(f"{name}.step(closure) found the weights perturbed (first_step() "
                          "without second_step(), or a state saved in between); it returned to "
                          "the unperturbed weights first", RuntimeWarning, stacklevel=2)
            self.cancel_step()
            self.zero_grad()
        self._guard.check(name, self._params())
        saved = running_stats_buffers(self.model)
        try:
            loss = self._two_passes(self._counted(closure), grad_scaler)
        except BaseException:
            self.cancel_step()
            restore_buffers(saved)
            self.zero_grad()
            raise
        finally:
            self._guard.remember(self._params())
        return loss

    def _two_passes(self, closure: Closure, grad_scaler: Any) -> Tensor:
        """The passes of ``step``: gradient at w, ascent, gradient at w + e, update."""
        name, params = type(self).__name__, self._params()
        marks = grad_marks(params)
        with first_pass(self.model):
            loss = closure()
        require_gradients(name, any(grad_changed(p, m) for p, m in zip(params, marks)), "first")
        if grad_scaler is None or self._unscaled(grad_scaler, final=False):
            self.first_step(zero_grad=True)
            closure()
            require_gradients(name, any(p.grad is not None for p in params), "second")
            if grad_scaler is None or self._unscaled(grad_scaler, final=True):
                self.second_step()
            else:
                self._return_to_origin()
        return loss

    def _unscaled(self, grad_scaler: Any, final: bool) -> bool:
        """Unscale the gradients for ``grad_scaler``.

        The last pass is unscaled by ``grad_scaler.unscale_`` itself, and an overflow is reported
        to it the same way, so that ``scaler.update()`` backs off on every rank alike.

        Returns:
            False (and cleared gradients) when any is inf/NaN on any rank.
        """
        params = [p for p in self._params() if p.grad is not None]
        if final:
            grad_scaler.unscale_(self)
        finite = unscale_(params, 1.0 if final else 1.0 / grad_scaler.get_scale())
        if not finite:
            for p in params:
                p.grad.fill_(float("nan"))
            if not final:
                grad_scaler.unscale_(self)
            self.zero_grad()
        return finite

    @torch.compiler.disable
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``w + e`` using the current gradients (the plain gradient at ``w``).

        Args:
            zero_grad: Clear the gradients afterwards.

        Raises:
            RuntimeError: the optimizer is already at a perturbed point, or no parameter has
                a gradient (nothing is changed then).
            ValueError: a DTensor parameter's gradient is placed otherwise than the parameter.
        """
        if self.phase is Phase.PERTURBED:
            raise RuntimeError("first_step() called twice without second_step() in between")
        perturbed = [(g, [p for p in g["params"] if p.grad is not None])
                     for g in self.param_groups]
        params = [p for _, ps in perturbed for p in ps]
        if not params:
            raise RuntimeError(f"{type(self).__name__}.first_step() found no gradients: call "
                               "loss.backward() before first_step()")
        for p in params:
            check_grad(type(self).__name__, p)
        adaptive = [self._is_adaptive(g) for g, ps in perturbed for _ in ps]
        scale = 1.0 / (perturbation_norm(params, adaptive) + SAM_EPS)
        origins = [self._buffer(p, "origin") for p in params]
        for ps_, os_ in grouped([local(p) for p in params], [local(o) for o in origins]):
            # every origin first: see cancel_step()
            torch._foreach_copy_(os_, ps_)
        self._perturbed, self.phase = perturbed, Phase.PERTURBED
        self._bn.freeze()
        for group, ps in perturbed:
            ws = [real(p) for p in ps]
            steps = [real(p.grad) * w * w if self._is_adaptive(group) else real(p.grad)
                     for p, w in zip(ps, ws)]
            ascend_(ws, steps, scale * group[self._rho_key])
        self._store_plain(params)
        if zero_grad:
            self.zero_grad()

    @torch.compiler.disable
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Move back to ``w`` and step with the gradient at ``w + e``.

        Args:
            zero_grad: Clear the gradients afterwards.

        Raises:
            RuntimeError: no ``first_step()`` preceded it, or no parameter has a gradient (the
                weights are then put back to ``w`` without a step).
        """
        if self.phase is Phase.PERTURBED and \
                not any(p.grad is not None for _, ps in self._perturbed for p in ps):
            self.cancel_step()
            raise RuntimeError(f"{type(self).__name__}.second_step() found no gradients: call "
                               "loss.backward() at the perturbed weights before second_step(); "
                               "the weights were put back without a step")
        self._update(self._return_to_origin())
        self.n_steps += 1
        if zero_grad:
            self.zero_grad()

    @torch.compiler.disable
    @torch.no_grad()
    def cancel_step(self) -> None:
        """Return to the unperturbed weights ``w`` without a step (no-op unless perturbed).

        For the two-step API when the perturbed pass fails: running statistics and the weights
        are put back exactly, and ``first_step()`` may be called again.
        """
        if self.phase is not Phase.PERTURBED:
            return
        self._bn.restore()
        perturbed, self._perturbed, self.phase = self._perturbed, [], Phase.READY
        params = [p for _, ps in perturbed for p in ps]
        for ps_, os_ in grouped([local(p) for p in params],
                                [local(self.state[p]["origin"]) for p in params]):
            torch._foreach_copy_(ps_, os_)

    def _store_plain(self, params: list[Tensor]) -> None:
        """Keep what the update needs from the plain gradient (hook; nothing by default)."""

    def _update(self, perturbed: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
        raise NotImplementedError

    def _is_adaptive(self, group: dict[str, Any]) -> bool:
        return bool(self._adaptive_key and group[self._adaptive_key])

    def _buffer(self, p: Tensor, name: str) -> Tensor:
        """``state[p][name]``, allocated like ``p`` on first use."""
        state = self.state[p]
        if name not in state:
            state[name] = torch.empty_like(p, memory_format=torch.preserve_format)
        return state[name]

    def _return_to_origin(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """Restore the running statistics and the weights.

        Averages the perturbed gradient over ranks unless DDP already did.

        Returns:
            Per param group, the perturbed parameters that still have a gradient.
        """
        if self.phase is not Phase.PERTURBED:
            raise RuntimeError("second_step() called without a preceding first_step()")
        perturbed = self._perturbed
        self.cancel_step()
        out = [(g, [p for p in ps if p.grad is not None]) for g, ps in perturbed]
        if not is_ddp(self.model):
            all_reduce_mean_([p.grad for _, ps in out for p in ps])
        return out

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state with its phase and the perturbed parameters.

        Returns:
            The counted state dict plus ``"phase"`` and ``"perturbed"`` (parameter indices).
        """
        state = super().state_dict()
        state["phase"] = self.phase.value
        index = {id(p): i for i, p in enumerate(self._params())}
        state["perturbed"] = [index[id(p)] for _, ps in self._perturbed for p in ps]
        return state

    def _required_state(self, index: int, entry: dict[str, Any],
                        state_dict: dict[str, Any]) -> frozenset[str]:
        """A parameter perturbed when the state was saved needs its ``origin``."""
        required = super()._required_state(index, entry, state_dict)
        perturbed = state_dict.get("phase") == Phase.PERTURBED.value \
            and index in state_dict.get("perturbed", ())
        return required | {"origin"} if perturbed else required

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ``state_dict`` (checked first), its phase included.

        Args:
            state_dict: A dict made by this class's ``state_dict()``.
        """
        phase = Phase(state_dict.get("phase", Phase.READY.value))
        super().load_state_dict(state_dict)
        chosen, index, self._perturbed = set(state_dict.get("perturbed", ())), 0, []
        for group in self.param_groups if phase is Phase.PERTURBED else ():
            params = group["params"]
            self._perturbed.append((group, [p for i, p in enumerate(params, index)
                                            if i in chosen]))
            index += len(params)
        self.phase = phase
