"""Guards run before a public routine passes over ``data``.

The data must be deterministic, and under ``torch.distributed`` the arguments must agree
between ranks.

* Deterministic data (curvlinops' check): routines that pass over ``data`` more than once
  (``check_deterministic=True`` by default) first make two forward-only passes and compare the
  per-batch sample counts and the total loss (to ``64 eps`` of the loss dtype, relative). A
  shuffled ``DataLoader(drop_last=True)``, random augmentation, or Dropout with
  ``model_mode="train"`` would otherwise change the operator between products and give
  confident wrong answers. Cost: two forward passes, paid once per model, loss and data
  object: a later call on the same objects (the same model, ``loss_fn``, ``data``,
  ``batch_size_fn`` and ``model_mode``) whose data has the same cheap fingerprint (length,
  first and, for a list, last batch's contents) reuses the agreeing verdict, so a loop or a
  Tracker calling a routine many times pays it once, and a changed loader is still caught. A
  result's ``metadata["determinism"]`` records ``check`` ("passes", "reused", "known" or
  "off") and ``guard_seconds``, the time the guards took before the routine ran. The batches
  themselves are compared
  too (order-sensitive sums of their tensors), so that a loss differing over the same batches
  is blamed on the model (stochastic layers in train mode: Dropout, drop path), not the data.
* Agreement between ranks: every argument but the shard itself (``data``, ``bn_data``) and
  the progress/path options is fingerprinted (numbers, strings, tensors, the model's
  parameters) and compared in one all-reduce, which also carries the determinism verdict of
  every rank; a mismatch raises the same ``ValueError`` on every rank. A rank whose data is
  refused while checked (``data=(X, Y)`` on one rank) raises its own error after that
  all-reduce, and the others say so, so no rank is left waiting. In one process, a loss that
  fails in the check's forward pass lets the routine run first, so that its own argument
  checks name the problem.
* One rank's failure on every rank: the outermost guarded call runs inside
  :func:`analysis.core.distributed.failures_shared` (``done=True``): an exception on one rank
  is announced to the others, which raise :class:`~analysis.core.distributed.RankError` with
  its cause at their next collective, and a call that succeeds ends with a small
  all-reduce so that it never returns while another rank failed in it (no rank waits until
  the process group's timeout, and the next routine starts on every rank together).
* Models sharded with FSDP2 (``fully_shard``, DTensor parameters) are refused, before anything
  touches them, by every routine but those that declare support (``guarded(sharded=True)``);
  for those, every rank must hold the same number of batches (checked first, in one
  all-reduce), since each forward pass of such a model gathers weights from all ranks.
* A routine may know the check's verdict by construction (``guarded(known_deterministic=...)``:
  e.g. fixed tensors through layers without randomness); the two passes are then skipped, their
  answer known, and every other guard runs as before.

The guard runs once per outermost call: routines called by a guarded routine (the operator
inside ``top_eigenvalues``, the solvers inside ``layerwise``) are not checked again.
"""
from __future__ import annotations

import functools
import inspect
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .compiled import is_compiled
from .distributed import check_same_on_ranks, failures_shared, is_distributed, mark_agreed
from .protocol import (check_data, check_loss, check_loss_fn, default_batch_size,
                       loss_reduction)
from .restore import preserved
from .sharding import is_sharded, refuse_sharded, sample_counts
from .validation import check_bool, check_model_mode

# arguments that may differ between ranks: each rank's shard, and rank-local options
LOCAL = ("self", "data", "bn_data", "progress", "path", "check_deterministic")
COUNTS, RANDOM_LAYERS, LOSS, RAISED = 1, 2, 3, 4   # why two passes differed, or an error
STOCHASTIC = ("droppath", "drop_path", "stochasticdepth", "dropblock")  # names, lower case
_state = threading.local()
VERDICTS = 64  # agreeing verdicts kept for reuse (model, loss_fn, data, ...: _cached_passes)
_VERDICTS: dict[tuple, tuple] = {}


def _batch_digest(batch: Any) -> list[Tensor]:
    """Order-sensitive sums of the batch's tensors, on their devices (no sync).

    Equal batches give equal digests; a shuffled or augmented batch almost surely does not.
    """
    digest = []
    for t in tree_flatten(batch)[0]:
        if isinstance(t, Tensor):
            x = torch.view_as_real(t) if t.is_complex() else t
            x = torch.nan_to_num(x.detach().reshape(-1).to(torch.float64))
            weights = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.float64)
            digest += [x.sum(), (x * weights.sqrt()).sum()]
    return digest


def _one_pass(model: nn.Module, loss_fn, data: Iterable, batch_size_fn
              ) -> tuple[list[int], float, torch.dtype, list[Tensor]]:
    """Per-batch sample counts, the (weighted) total loss, the loss dtype, batch digests."""
    check_data(data)
    size, weighted = batch_size_fn or default_batch_size, loss_reduction(loss_fn) == "mean"
    counts, terms, dtype, digests = [], [], torch.float64, []
    for batch in data:
        n = size(batch)
        counts.append(n)
        digests += _batch_digest(batch)
        if n > 0:
            loss = check_loss(loss_fn(model, batch), " in the determinism check").detach()
            terms.append(loss.to(torch.float64) * (n if weighted else 1))  # no sync per batch
            dtype = loss.dtype
    return counts, float(sum(t.cpu() for t in terms)), dtype, digests


def _same_batches(first: list[Tensor], second: list[Tensor]) -> bool:
    """Whether two passes' digests are equal (the data gave the same batches)."""
    return len(first) == len(second) and all(bool((a.cpu() == b.cpu()).all())
                                             for a, b in zip(first, second))


def _random_layers(model: nn.Module) -> list[str]:
    """Names of the model's layer types that draw random numbers in train mode."""
    return sorted({type(m).__name__ for m in model.modules()
                   if isinstance(m, nn.modules.dropout._DropoutNd)
                   or any(k in type(m).__name__.lower() for k in STOCHASTIC)})


def _random_forward(model_mode: str, layers: list[str]) -> str:
    """The stochastic layers to blame for a random forward, and the fix."""
    if model_mode == "train":
        found = f" ({', '.join(layers)})" if layers else \
            " (Dropout, drop path / stochastic depth, or another layer drawing random numbers)"
        return (f"stochastic layers in train mode{found}, which model_mode='train' switches "
                "on; use model_mode='eval' (or switch those layers off)")
    return ("a layer draws random numbers even in eval mode (or runs a nondeterministic "
            "kernel); make it deterministic in eval mode")


def _explain(code: int, model_mode: str, layers: list[str], detail: str = "") -> str:
    if code == RAISED:
        return "another rank's arguments or data were refused (that rank raised why)"
    head = "data must give the same batches on every pass (analysis passes over it repeatedly)"
    cause = {
        COUNTS: "the batches' sample counts differ between two passes: a DataLoader with "
                "shuffle=True and drop_last=True, or a sampler that changes between passes; pass "
                "the batches in a fixed order (shuffle=False, or a list of batches)",
        RANDOM_LAYERS: "the batches are the same in both passes but the loss differs, so the "
                       "model's forward (or loss_fn) is random: "
                       + _random_forward(model_mode, layers),
        LOSS: "the loss differs between two passes: a shuffled DataLoader (with drop_last=True "
              "it drops other samples each pass; with train-mode BatchNorm any shuffling changes "
              "the loss) or random augmentation; pass the batches in a fixed order "
              "(shuffle=False, or a list of batches)",
    }[code]
    return f"{head}, but {cause}{detail}; check_deterministic=False skips this check"


def repeated_passes(model: nn.Module, loss_fn, data: Iterable, batch_size_fn=None,
                    model_mode: str = "eval") -> tuple[int, str]:
    """Two forward-only passes over ``data`` in ``model_mode`` (the model restored).

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: The batches.
        batch_size_fn: ``batch -> int`` sample count (default: the leading dimension).
        model_mode: "eval" or "train".

    Returns:
        ``(0, "")`` if the passes agree (sample counts, and the total loss to ``64 eps``),
        else a cause code and the numbers that differed.
    """
    with preserved(model, check_model_mode(model_mode), weights=False), torch.no_grad():
        (c1, t1, dtype, d1), (c2, t2, _, d2) = (_one_pass(model, loss_fn, data, batch_size_fn)
                                                for _ in range(2))
    if c1 != c2:
        first = next((i for i, (a, b) in enumerate(zip(c1, c2)) if a != b), min(len(c1), len(c2)))
        return COUNTS, (f" ({len(c1)} batches of {sum(c1)} samples, then {len(c2)} of "
                        f"{sum(c2)}; they first differ at batch {first})")
    if abs(t1 - t2) > 64 * torch.finfo(dtype).eps * max(abs(t1), abs(t2)):
        code = RANDOM_LAYERS if _same_batches(d1, d2) else LOSS
        return code, f" (total loss {t1!r} then {t2!r})"
    return 0, ""


@dataclass
class _Verdict:
    """What the determinism check found on this rank.

    Attributes:
        code: 0 when the two passes agree, else why they differ (``COUNTS``, ``RANDOM_LAYERS``,
            ``LOSS``), or ``RAISED`` when the check itself raised.
        detail: The numbers that differed, appended to the explanation.
        error: The exception the check raised (``code == RAISED``), else None.
        how: ``"passes"`` (two passes made), ``"reused"`` (an earlier call's verdict on the
            same objects and unchanged data), ``"known"`` (by construction) or ``"off"``
            (``check_deterministic=False``).
    """

    code: int = 0
    detail: str = ""
    error: Exception | None = None
    how: str = "off"


def _bound_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name, defaults included."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _analysed_model(arguments: dict[str, Any]) -> nn.Module:
    """The call's model (``model``, or ``model_a`` of a two-model routine), uncompiled."""
    model = arguments.get("model", arguments.get("model_a"))
    return model._orig_mod if is_compiled(model) else model  # the routine warns


def _fingerprint(data: Iterable) -> tuple:
    """A cheap fingerprint of ``data``, without a pass over it.

    Its length, and its first (and, for a sequence, last) batch's tensors (shapes, dtypes and
    order-sensitive sums): a loader that changed (other batches, another order, a batch edited
    in place) almost surely changes it.
    """
    def batch(b: Any) -> tuple:
        leaves = [t for t in tree_flatten(b)[0] if isinstance(t, Tensor)]
        sums = [float(x) for x in _batch_digest(b)]
        return tuple((tuple(t.shape), str(t.dtype)) for t in leaves), tuple(sums)

    length = len(data) if hasattr(data, "__len__") else None
    if isinstance(data, (list, tuple)):
        return length, batch(data[0]) if data else None, batch(data[-1]) if data else None
    return length, batch(next(iter(data), None)), None


def _verdict_key(model: nn.Module, over: tuple) -> tuple:
    """What the verdict depends on, besides the data's contents.

    The model (and its layer types), ``loss_fn``, ``data``, ``batch_size_fn`` (identities)
    and ``model_mode``.
    """
    _, loss_fn, data, batch_size_fn, mode = over
    layers = tuple(type(m).__name__ for m in model.modules())
    return id(model), id(loss_fn), id(data), id(batch_size_fn), mode, hash(layers)


def _refs(over: tuple) -> tuple:
    """Weak references to the keyed objects that take them (an id may be reused once freed)."""
    out = []
    for obj in over[:4]:
        try:
            out.append(weakref.ref(obj))
        except TypeError:  # lists, tuples, functions without __weakref__: the fingerprint decides
            out.append(None)
    return tuple(out)


def _alive(refs: tuple, over: tuple) -> bool:
    """Whether every weakly referenced object of a cached verdict is the call's own."""
    return all(r is None or r() is obj for r, obj in zip(refs, over[:4]))


def _cached_passes(model: nn.Module, over: tuple) -> tuple[int, str, str]:
    """:func:`repeated_passes`, or an earlier call's verdict on the same objects and data.

    Reused when the data's fingerprint (:func:`_fingerprint`) is unchanged. Only agreeing
    passes are kept (:data:`VERDICTS` of them, the oldest dropped first).

    Returns:
        ``(code, detail, "passes" or "reused")``.
    """
    check_data(over[2])  # (before the fingerprint reads a batch of a one-shot iterator)
    key = _verdict_key(model, over)
    print_ = _fingerprint(over[2])
    kept = _VERDICTS.get(key)
    if kept is not None and kept[0] == print_ and _alive(kept[1], over):
        return 0, "", "reused"
    code, detail = repeated_passes(*over)
    if code == 0:
        _VERDICTS.pop(key, None)
        _VERDICTS[key] = (print_, _refs(over))
        while len(_VERDICTS) > VERDICTS:
            _VERDICTS.pop(next(iter(_VERDICTS)))
    return code, detail, "passes"


def _check_determinism(model: nn.Module, arguments: dict[str, Any],
                       known_deterministic: Callable[..., bool] | None) -> _Verdict:
    """Two passes over the call's data when its ``check_deterministic`` is on.

    The verdict of an earlier call on the same model, loss and data object is reused when the
    data's fingerprint is unchanged (:func:`_cached_passes`). An error of the check is
    returned, not raised, so that this rank still joins the all-reduce of
    :func:`_agree_between_ranks` (no other rank is left waiting).
    """
    check = check_bool("check_deterministic", arguments.get("check_deterministic", False))
    try:
        over = (model, arguments["loss_fn"], arguments["data"], arguments.get("batch_size_fn"),
                arguments.get("model_mode", "eval"))
        if not check:
            return _Verdict(how="off")
        if known_deterministic is not None and known_deterministic(*over):
            return _Verdict(how="known")
        code, detail, how = _cached_passes(model, over)
        return _Verdict(code, detail, how=how)
    except Exception as err:  # raised after the all-reduce, so no other rank waits for us
        return _Verdict(RAISED, error=err)


def _agree_between_ranks(model: nn.Module, arguments: dict[str, Any], verdict: _Verdict) -> None:
    """One all-reduce: the arguments agree between ranks and no rank's check failed.

    Raises:
        ValueError: The arguments differ between ranks, or some rank's passes differed
            (the same error on every rank).
    """
    mode = arguments.get("model_mode", "eval")
    try:
        check_same_on_ranks({k: v for k, v in arguments.items() if k not in LOCAL},
                            verdict.code, lambda c: _explain(c, mode, _random_layers(model)))
    except ValueError:
        if verdict.error is None:
            raise


def _raise_verdict(model: nn.Module, arguments: dict[str, Any], verdict: _Verdict) -> None:
    """Raise this rank's own failure of the check, before the routine runs.

    In one process an error of the check is raised only after the routine ran (its own
    argument checks speak first); under ``torch.distributed`` it is raised at once.
    """
    if verdict.error is not None and is_distributed():
        raise mark_agreed(verdict.error)  # the others raise "another rank's ... were refused"
    if verdict.code and verdict.error is None:
        mode = arguments.get("model_mode", "eval")
        raise ValueError(_explain(verdict.code, mode, _random_layers(model), verdict.detail))


def _check_sharded(fn: Callable, arguments: dict[str, Any], supported: bool) -> None:
    """Refuse a ``fully_shard`` model unless the routine supports it; then equal batch counts.

    Raises:
        NotImplementedError: A sharded model passed to a routine without support.
        ValueError: The ranks hold different numbers of batches (the same error on every rank).
    """
    models = [arguments.get(k) for k in ("model", "model_a", "model_b")]
    sharded = [m for m in models if isinstance(m, nn.Module) and is_sharded(m)]
    if not sharded:
        return
    if not supported:
        name = type(arguments["self"]).__name__ if fn.__name__ == "__init__" else fn.__name__
        refuse_sharded(sharded[0], name)
    sample_counts(arguments["data"], arguments.get("batch_size_fn"))


def _run_inside(fn: Callable, args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)`` with the guards of the routines it calls switched off."""
    _state.inside = True
    try:
        return fn(*args, **kwargs)
    finally:
        _state.inside = False


def _raise_check_error(error: Exception) -> None:
    """Raise the error of the check's forward pass, noting where it came from."""
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note("raised by loss_fn in the determinism check's forward pass without "
                       "gradients; check_deterministic=False skips the check")
    raise error


def _guarded_call(fn: Callable, signature: inspect.Signature,
                  known_deterministic: Callable[..., bool] | None, sharded: bool, args: tuple,
                  kwargs: dict) -> Any:
    """The outermost call of a guarded routine: the checks, then the routine."""
    start = time.perf_counter()
    arguments = _bound_arguments(signature, args, kwargs)
    if "loss_fn" in arguments:
        check_loss_fn(arguments["loss_fn"])
    _check_sharded(fn, arguments, sharded)
    model = _analysed_model(arguments)
    verdict = _check_determinism(model, arguments, known_deterministic)
    _agree_between_ranks(model, arguments, verdict)
    _raise_verdict(model, arguments, verdict)
    seconds = time.perf_counter() - start
    result = _run_inside(fn, args, kwargs)
    if verdict.error is not None:  # the routine ran, the check could not: never skip it
        _raise_check_error(verdict.error)
    if isinstance(getattr(result, "metadata", None), dict):
        result.metadata["determinism"] = {"check": verdict.how, "guard_seconds": seconds}
    return result


def guarded(fn: Callable | None = None, *,
            known_deterministic: Callable[..., bool] | None = None,
            sharded: bool = False) -> Callable:
    """Decorate a public routine ``f(model, loss_fn, data, ...)`` (or a class's ``__init__``).

    The wrapper runs the determinism check when the call's ``check_deterministic`` is True,
    then the agreement of its arguments between ranks (module docstring), then the routine.
    Used as ``@guarded`` or ``@guarded(known_deterministic=f)``.

    Args:
        fn: The routine (None when called with keywords only, as a decorator factory).
        known_deterministic: ``(model, loss_fn, data, batch_size_fn, model_mode) -> bool``,
            True only where two passes over ``data`` necessarily agree (the routine knows it
            by construction); the check is then skipped.
        sharded: The routine supports models sharded with FSDP2's ``fully_shard``; others
            refuse them (``NotImplementedError`` naming ``fully_shard``) before touching them.

    Returns:
        The wrapped routine (``.guarded`` is True), or the decorator when ``fn`` is None.
    """
    if fn is None:
        return functools.partial(guarded, known_deterministic=known_deterministic,
                                 sharded=sharded)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if getattr(_state, "inside", False):
            return fn(*args, **kwargs)
        with failures_shared(done=True):  # one rank's error is raised on every rank
            return _guarded_call(fn, signature, known_deterministic, sharded, args, kwargs)

    wrapper.guarded = True
    return wrapper


def is_guarded(fn: Callable) -> bool:
    """Whether ``fn`` (or a class's ``__init__``) runs the guards.

    Args:
        fn: A function or a class.

    Returns:
        True when it is wrapped by :func:`guarded`.
    """
    target = fn.__init__ if inspect.isclass(fn) else fn
    return getattr(target, "guarded", False)


__all__ = ["guarded", "is_guarded", "repeated_passes"]
