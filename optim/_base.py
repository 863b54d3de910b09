"""Base classes every optimizer of this package builds on, and the helpers they share.

:class:`CheckedState` tags ``state_dict()`` with the optimizer's class and refuses, before
anything is changed, a state dict made by another class or lacking what this one needs.
:class:`CountingOptimizer` adds ``n_steps`` (completed steps) and ``n_closure_calls``
(forward-backward passes run through ``step(closure)``), saved so that a resumed run continues
them. :class:`WrapperOptimizer` shares an already-built base optimizer's ``param_groups`` (so LR
schedulers attached to either act on both) and saves the base optimizer's state inside its own.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._sharded import check_sharding, local
from ._validation import ArgumentTypeError

Closure = Callable[[], torch.Tensor]


def use_foreach(foreach: bool | None, tensors: list[torch.Tensor]) -> bool:
    """Whether to take the multi-tensor path.

    Args:
        foreach: The user's choice; ``None`` for automatic.
        tensors: The tensors to update.

    Returns:
        ``foreach`` when given, else True when every tensor is on an accelerator (where the
        multi-tensor path is faster), as ``torch.optim`` decides.
    """
    if foreach is not None:
        return foreach
    return bool(tensors) and all(t.device.type != "cpu" for t in tensors)


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype of the state and arithmetic kept for ``p``.

    float32 for float16/bfloat16 parameters (moments, eps^2 and small norms underflow there),
    else ``p``'s dtype.
    """
    return torch.promote_types(p.dtype, torch.float32)


def closure_loss(closure: Closure | None) -> torch.Tensor | None:
    """The loss of ``closure`` run under grad mode (steps run under no_grad), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def real(t: Tensor) -> Tensor:
    """The plain tensor the updates compute on: ``t``'s local piece, as reals.

    A ``DTensor`` (an FSDP2 or tensor-parallel parameter, its gradient or state) gives its
    rank's piece (``to_local()``, a view that writes reach). Complex parameters are updated as
    pairs of reals, the convention of ``torch.optim``: a complex run equals the run on
    ``view_as_real`` of the same tensors.
    """
    t = local(t)
    return torch.view_as_real(t) if t.is_complex() else t


def grouped(*tensor_lists: list[Tensor]) -> Iterator[tuple[list[Tensor], ...]]:
    """Equal-length tensor lists split into runs on one device and dtype (for ``_foreach_*``)."""
    if not tensor_lists[0]:
        return
    for lists, _ in Optimizer._group_tensors_by_device_and_dtype(list(tensor_lists)).values():
        yield tuple(lists)


#: param-group keys that torch.optim fills in itself when an older state dict lacks them
_TORCH_FILLED = frozenset({"foreach", "maximize", "capturable", "differentiable", "fused",
                           "decoupled_weight_decay"})


def _check_layout(optimizer: Optimizer, state_dict: Any, extra: tuple[str, ...]) -> None:
    """The class tag, top-level keys, group sizes and group keys of ``state_dict``."""
    name = type(optimizer).__name__
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict made by {name}.state_dict(), "
                        f"got {type(state_dict).__name__}")
    made_by = state_dict.get("optimizer")
    if made_by is not None and made_by != name:
        raise ValueError(f"state_dict was made by {made_by}, not by {name}")
    missing = sorted({"state", "param_groups", *extra} - state_dict.keys())
    if missing:
        raise ValueError(f"state_dict lacks {missing}: it was not made by {name}.state_dict()")
    sizes = [len(g["params"]) for g in state_dict["param_groups"]]
    own = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != own:
        raise ValueError(f"state_dict has param groups of sizes {sizes}, {name} has {own}")
    needed = set(optimizer.defaults) - _TORCH_FILLED
    for i, group in enumerate(state_dict["param_groups"]):
        lacking = sorted(needed - group.keys())
        if lacking:
            raise ValueError(f"state_dict param group {i} lacks {lacking}: it was made by another "
                             f"optimizer class than {name}")


RequiredState = Callable[[int, dict[str, Any], dict[str, Any]], frozenset[str]]


def check_state_dict(optimizer: Optimizer, state_dict: Any, extra: tuple[str, ...] = (),
                     state_keys: frozenset[str] | None = None,
                     required: RequiredState | None = None) -> None:
    """Check that ``state_dict`` can be ``optimizer``'s before anything is loaded.

    Args:
        optimizer: The optimizer that would load it.
        state_dict: The candidate.
        extra: Top-level keys it must hold besides ``state`` and ``param_groups``.
        state_keys: The per-parameter state keys ``optimizer`` may hold (None: any).
        required: ``required(index, entry, state_dict)``, the keys the state entry of
            parameter ``index`` (``{}`` when it has none) must hold (None: no requirement).

    Raises:
        TypeError: ``state_dict`` is not a dict.
        ValueError: it was made by another class, lacks a top-level, group or per-parameter key,
            holds a per-parameter key ``optimizer`` does not use, or its group sizes differ.
    """
    _check_layout(optimizer, state_dict, extra)
    name = type(optimizer).__name__
    listed = saved_keys(state_dict)
    for index, entry in state_dict["state"].items():
        if index not in listed:
            raise ValueError(f"state_dict holds state of parameter {index!r}, which its "
                             f"param_groups do not list (they list {listed})")
        foreign = sorted(set(entry) - state_keys) if state_keys is not None else []
        if foreign:
            raise ValueError(f"state_dict holds per-parameter state {foreign} (parameter "
                             f"{index}) that {name} does not use: it was made by another "
                             "optimizer class")
    if required is None:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    keys = saved_keys(state_dict)
    for index, p in enumerate(params):
        entry = state_dict["state"].get(keys[index], {})
        lacking = sorted(required(index, entry, state_dict) - entry.keys())
        if lacking:
            raise ValueError(f"state_dict lacks the per-parameter state {lacking} of parameter "
                             f"{index} (shape {tuple(p.shape)}, in param_groups order): it was "
                             f"not made by {name}.state_dict() or was edited; nothing was loaded")


def saved_keys(state_dict: dict[str, Any]) -> list[Any]:
    """The keys of ``state_dict["state"]`` in ``param_groups`` order.

    ``torch.optim``'s own ``state_dict()`` numbers the parameters 0, 1, ...;
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` names them by their
    fully qualified names. Either way a parameter's key is its entry in the saved
    ``param_groups``, matched by position (as ``torch.optim.Optimizer.load_state_dict`` does).
    """
    return [key for group in state_dict["param_groups"] for key in group["params"]]


def _torch_required(base: Optimizer) -> RequiredState | None:
    """The per-parameter keys a state entry of torch's Adam/AdamW must hold, once it has any."""
    if not isinstance(base, torch.optim.Adam):
        return None
    amsgrad = [g.get("amsgrad", False) for g in base.param_groups for _ in g["params"]]

    def required(index: int, entry: dict[str, Any], state_dict: dict[str, Any]) -> frozenset:
        if not entry:
            return frozenset()
        keys = {"step", "exp_avg", "exp_avg_sq"}
        return frozenset(keys | {"max_exp_avg_sq"} if amsgrad[index] else keys)

    return required


def optimizer_params(optimizer: Any) -> list[Tensor]:
    """Every parameter of ``optimizer``'s param groups (none when it is not an optimizer)."""
    if not isinstance(optimizer, Optimizer):
        return []
    return [p for group in optimizer.param_groups for p in group["params"]]


def param_dtype(p: Tensor) -> torch.dtype:
    """The parameter's own dtype (for ``check_in_dtype``: arithmetic done in it)."""
    return p.dtype


def check_in_dtype(name: str, value: float, params: list[Tensor], *, power: int = 1,
                   nonzero: bool = False,
                   dtype_of: Callable[[Tensor], torch.dtype] | None = None) -> float:
    """Refuse a hyperparameter whose ``value**power`` overflows in the parameters' arithmetic.

    Args:
        name: The hyperparameter's name, for the message.
        value: Its (already checked, finite, nonnegative) value.
        params: The parameters it acts on.
        power: The power of ``value`` the update computes (2 for AdaSAM's eps**2).
        nonzero: Also refuse a ``value**power`` that rounds to 0 there.
        dtype_of: The dtype of the arithmetic for a parameter (default: ``state_dtype``).

    Returns:
        ``value``.

    Raises:
        ValueError: ``value**power`` is not finite (or, with ``nonzero``, is 0) in that dtype.
    """
    dtype_of = dtype_of or state_dtype
    for dtype in sorted({dtype_of(p) for p in params if p.is_floating_point()}, key=str):
        info = torch.finfo(dtype)
        high = info.max ** (1.0 / power)
        low = (info.tiny * info.eps) ** (1.0 / power) if nonzero else 0.0
        if value > high or value < low:
            expr = name if power == 1 else f"{name}**{power}"
            accepted = f"<= {high:.4g}" + (f" and >= {low:.4g}" if nonzero else "")
            nonzero_text = " and nonzero" if nonzero else ""
            raise ValueError(f"{name} must be {accepted} (so that {expr} is finite{nonzero_text} "
                             f"in {str(dtype).removeprefix('torch.')}), got {value!r}")
    return value


#: attributes of ``torch.optim.Optimizer`` that pickling leaves out (hooks may hold closures;
#: torch's ``__setstate__`` recreates them empty) and workspace rebuilt on demand
_NOT_PICKLED = frozenset({
    "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks", "_scratch",
})


def whole_step(index: int, value: Any) -> Any:
    """A saved ``step`` as the exact Python ``int`` this package counts in.

    ``torch.optim`` saves ``step`` as a float32 tensor; run with it, the bias corrections would
    be computed in float32. The integer it holds is converted exactly.

    Raises:
        ValueError: the tensor does not hold one whole number >= 0.
    """
    if not isinstance(value, Tensor):
        return value
    number = value.item() if value.numel() == 1 and value.device.type != "meta" else None
    if number is None or number != number or number < 0 or number != int(number):
        raise ValueError(f"state_dict step of parameter {index} must be a whole number >= 0 "
                         f"(a Python int, or torch.optim's one-element tensor), got {value!r}; "
                         "nothing was loaded")
    return int(number)


class CheckedState(Optimizer):
    """An ``Optimizer`` whose ``load_state_dict`` checks class and keys before changing anything.

    Subclasses name the per-parameter state keys they may hold in ``_state_keys``, any extra
    top-level entries of their state dict in ``_extra_keys``, and override
    ``_required_state`` for the keys a saved parameter entry must hold. ``_wide_keys`` are the
    per-parameter states kept in ``state_dtype(p)`` (float32 for float16/bfloat16 ``p``):
    loading keeps them there instead of casting them to the parameter's dtype as torch does.
    A ``step`` saved as a tensor (torch's format) is loaded as the exact int it holds.

    Pickling and ``copy.deepcopy`` keep every attribute (base optimizer, counters, model,
    phase), not only the state and param groups ``torch.optim.Optimizer`` pickles.
    """

    _state_keys: frozenset[str] | None = None
    _extra_keys: tuple[str, ...] = ()
    _wide_keys: frozenset[str] = frozenset()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group whose parameters' sharding the updates can reduce over.

        Args:
            param_group: As for ``torch.optim.Optimizer.add_param_group``.

        Raises:
            ValueError: a parameter of an FSDP1 model, or a DTensor placed otherwise than with
                ``Shard``/``Replicate`` (see ``_sharded.check_sharding``); nothing is added.
        """
        super().add_param_group(param_group)
        try:
            check_sharding(type(self).__name__, self.param_groups[-1]["params"])
        except ValueError:
            self.param_groups.pop()
            raise

    def __getstate__(self) -> dict[str, Any]:
        """Every attribute but the hooks and the workspace (see the class docstring).

        Returns:
            The attributes to pickle or deep-copy.
        """
        return {k: v for k, v in self.__dict__.items() if k not in _NOT_PICKLED}

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, tagged with its class name under ``"optimizer"``.

        A parameter's ``step`` (a Python ``int`` in ``state``) is saved as a 0-d int64 tensor,
        as ``torch.optim`` saves it: ``torch.distributed.checkpoint`` loads tensors into the
        state dict it is given, but writes other values of integer-keyed entries under
        string keys, so an ``int`` step would come back stale. ``load_state_dict`` turns it
        back into the exact ``int``.

        Returns:
            ``torch.optim.Optimizer.state_dict()`` plus the tag.
        """
        state = super().state_dict()
        state["state"] = {index: {**entry, "step": torch.tensor(entry["step"])}
                          if type(entry.get("step")) is int else entry
                          for index, entry in state["state"].items()}
        state["optimizer"] = type(self).__name__
        return state

    def _required_state(self, index: int, entry: dict[str, Any],
                        state_dict: dict[str, Any]) -> frozenset[str]:
        """The keys the saved state ``entry`` of parameter ``index`` must hold (none here)."""
        return frozenset()

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise unless ``state_dict`` can be loaded; see :func:`check_state_dict`."""
        check_state_dict(self, state_dict, self._extra_keys, self._state_keys,
                         self._required_state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ``state_dict`` after checking all of it.

        Args:
            state_dict: A dict made by this class's ``state_dict()``.

        Raises:
            TypeError: ``state_dict`` is not a dict.
            ValueError: it does not fit this optimizer; nothing is changed then.
        """
        self.check_state_dict(state_dict)
        position = {key: i for i, key in enumerate(saved_keys(state_dict))}
        saved = {index: {key: whole_step(position[index], v) if key == "step" else v
                         for key, v in entry.items()}
                 for index, entry in state_dict["state"].items()}
        super().load_state_dict({"state": saved, "param_groups": state_dict["param_groups"]})
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in saved.items():
            p = params[position[index]]
            for key in self._wide_keys & entry.keys():
                self.state[p][key] = entry[key].to(device=p.device, dtype=state_dtype(p))


class CountingOptimizer(CheckedState):
    """An optimizer that counts its steps and closure calls and resumes them.

    Args:
        params: Parameters or param-group dicts, as for ``torch.optim.Optimizer``.
        defaults: The default hyperparameters of every param group.
    """

    #: attributes saved under ``state_dict()["counters"]``; subclasses extend the tuple.
    _counter_names: tuple[str, ...] = ("n_steps", "n_closure_calls")
    _extra_keys = ("counters",)

    def __init__(self, params, defaults: dict[str, Any]):
        super().__init__(params, defaults)
        self.n_steps = 0
        self.n_closure_calls = 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore pickled attributes; a copy's gradients count as left by its last step."""
        super().__setstate__(state)
        guard = state.get("_guard")
        if guard is not None:
            guard.remember(self._params())

    def _counted(self, closure: Closure) -> Closure:
        """``closure`` run with gradients enabled, each call adding one to ``n_closure_calls``."""

        def counted():
            self.n_closure_calls += 1
            with torch.enable_grad():
                return closure()

        return counted

    def _params(self) -> list[torch.Tensor]:
        """Every parameter of every param group, in ``param_groups`` order."""
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state with its counters under ``"counters"``.

        Returns:
            The tagged state dict of :class:`CheckedState` plus the counters.
        """
        state = super().state_dict()
        state["counters"] = {name: getattr(self, name) for name in self._counter_names}
        return state

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise unless ``state_dict`` can be loaded, counters included."""
        super().check_state_dict(state_dict)
        missing = sorted(set(self._counter_names) - set(state_dict["counters"]))
        if missing:
            raise ValueError(f"state_dict counters lack {missing}: it was not made by "
                             f"{type(self).__name__}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ``state_dict`` (checked first) and the counters it holds."""
        super().load_state_dict(state_dict)
        for name in self._counter_names:
            setattr(self, name, state_dict["counters"][name])


class WrapperOptimizer(CountingOptimizer):
    """An optimizer on top of ``base_optimizer`` whose ``param_groups`` are the base's own list.

    The wrapper's hyperparameters (``defaults``) are added to every param group under keys that
    do not collide with torch's optimizers (``sam_rho``, ``wsam_alpha``, ...).

    Args:
        base_optimizer: An already-built ``torch.optim.Optimizer``.
        defaults: The wrapper's hyperparameters, under keys the base does not use.

    Raises:
        ArgumentTypeError: ``base_optimizer`` is not an optimizer.
        ValueError: the base already uses one of the keys of ``defaults``.
    """

    _extra_keys = ("counters", "base")

    def __init__(self, base_optimizer: Optimizer, defaults: dict[str, Any]):
        if not isinstance(base_optimizer, Optimizer):
            raise ArgumentTypeError("base_optimizer must be an already-built "
                                    f"torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        collide = sorted(k for k in defaults if k in base_optimizer.defaults)
        if collide:
            raise ValueError(f"base_optimizer must not use the param-group keys {collide} of "
                             f"{type(self).__name__}, got a {type(base_optimizer).__name__} "
                             "that does")
        # Optimizer.__init__ sets our defaults on the base's group dicts (the same dict objects).
        super().__init__(base_optimizer.param_groups, defaults)
        self._wrapper_defaults = dict(defaults)
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.defaults = {**base_optimizer.defaults, **defaults}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the base optimizer (and so to this one), with the wrapper's keys.

        Args:
            param_group: As for ``torch.optim.Optimizer.add_param_group``.
        """
        if "base_optimizer" not in self.__dict__:  # called from Optimizer.__init__
            super().add_param_group(param_group)
            return
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
        check_sharding(type(self).__name__, param_group["params"])
        self.base_optimizer.add_param_group(param_group)  # appends this very dict to the list
        for name, value in self._wrapper_defaults.items():
            param_group.setdefault(name, value)

    def state_dict(self) -> dict[str, Any]:
        """The wrapper's state with the base optimizer's under ``"base"``.

        Returns:
            The counted state dict plus ``base_optimizer.state_dict()``.
        """
        state = super().state_dict()
        state["base"] = self.base_optimizer.state_dict()
        return state

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise unless ``state_dict`` (the base optimizer's part included) can be loaded."""
        super().check_state_dict(state_dict)
        base = self.base_optimizer
        if isinstance(base, CheckedState):
            base.check_state_dict(state_dict["base"])
        else:
            check_state_dict(base, state_dict["base"], required=_torch_required(base))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the wrapper's and the base optimizer's state, all checked first.

        Args:
            state_dict: A dict made by this class's ``state_dict()``.

        Raises:
            TypeError: ``state_dict`` is not a dict.
            ValueError: it does not fit; nothing is changed then.
        """
        self.check_state_dict(state_dict)
        try:
            self.base_optimizer.load_state_dict(state_dict["base"])
            super().load_state_dict(state_dict)  # replaces self.param_groups by copies ...
        finally:
            self.param_groups = self.base_optimizer.param_groups  # ... so share the base's again

    @torch.no_grad()
    def preconditioner(self) -> dict[torch.Tensor, torch.Tensor] | None:
        r"""The base optimizer's diagonal preconditioner per stepped parameter.

        Returns:
            The base's own ``preconditioner()``; for torch's Adam/AdamW
            $\sqrt{\hat v} + \epsilon$ with $\hat v = v / (1 - \beta_2^t)$ (``max_exp_avg_sq``
            with amsgrad), the denominator of their step; None for other bases (SGD).
        """
        base = self.base_optimizer
        if callable(getattr(base, "preconditioner", None)):
            return base.preconditioner()
        if not isinstance(base, torch.optim.Adam):
            return None
        out = {}
        for group in base.param_groups:
            for p in group["params"]:
                state = base.state.get(p)
                if state:
                    v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
                    bc2 = 1.0 - group["betas"][1] ** float(state["step"])
                    out[p] = (v / bc2).sqrt_().add_(group["eps"])
        return out
