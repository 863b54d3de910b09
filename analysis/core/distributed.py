"""The one place where analysis talks to ``torch.distributed``.

When a process group is initialized, each rank holds a shard of the data; sums and sample
counts are all-reduced together so every rank gets the single-process result on the union of
the shards.

Every collective of the library goes through this module and is preceded by a small header
all-reduce ``[status, kind, size]`` (its maximum and that of its negation), so that:

* a rank that fails inside the library announces it (:func:`failures_shared`, used by
  :func:`analysis.core.guarded` and :func:`analysis.core.data_mean`): its header meets the
  other ranks' next header, the failing rank's message is exchanged, and every other rank
  raises :class:`RankError` with that cause, at its next collective, never waiting for the
  process group's timeout nor summing products of different vectors;
* ranks at different points (different routines, or a rank that skipped a collective) get the
  same :class:`RankError` on every rank instead of gloo's or NCCL's "collective mismatch";
* every wait is bounded by :func:`set_collective_timeout` (default None: the process group's
  own timeout, 30 min by default); a rank that gets no answer in time, or whose peer left
  the group ("connection reset by peer"), raises :class:`RankError` saying so.
"""
from __future__ import annotations

import contextlib
import hashlib
import numbers
import pickle
import struct
from datetime import timedelta
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

MESSAGE_BYTES = 4096   # a failing rank's message is cut to this many UTF-8 bytes
ALL_REDUCE, BROADCAST, DONE, FAILED = 1, 2, 3, 4   # header kinds
_settings = {"timeout": None}
_unmarkable: list[BaseException] = []   # agreed errors that take no attribute


class RankError(RuntimeError):
    """A collective of the library could not proceed: the same error on every rank.

    Raised on the ranks that did not fail when another rank failed inside the library (its
    cause is in the message), when the ranks reached different collectives, and on a rank
    that got no answer within :func:`collective_timeout` or whose peer left the group.

    Attributes:
        rank: The rank that failed (None when no rank reported a failure).
        cause: That rank's ``"ExceptionType: message"``, or what went wrong.
    """

    def __init__(self, message: str, rank: int | None = None, cause: str = ""):
        super().__init__(message)
        self.rank, self.cause = rank, cause
        self.agreed = True


def set_collective_timeout(seconds: float | None) -> float | None:
    """Bound every wait of a library collective to ``seconds`` (None: no library bound).

    Without a bound a collective waits up to the process group's own timeout
    (``init_process_group(timeout=...)``, 30 min by default). With one, a rank that gets no
    answer in time raises :class:`RankError` (the process group is then unusable: destroy
    it). Choose it above the longest local computation between two collectives (one pass
    over a shard).

    Args:
        seconds: A positive number of seconds, or None.

    Returns:
        The previous setting.

    Raises:
        ValueError: ``seconds`` is not None nor a positive finite number.
    """
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, numbers.Real)
                                or not 0 < float(seconds) < float("inf")):
        raise ValueError(f"seconds must be None or a positive finite number, got {seconds!r}")
    previous = _settings["timeout"]
    _settings["timeout"] = None if seconds is None else float(seconds)
    return previous


def collective_timeout() -> float | None:
    """The bound on every wait of a library collective, in seconds (None: none).

    Returns:
        The value set by :func:`set_collective_timeout`.
    """
    return _settings["timeout"]


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def _device() -> torch.device:
    """Where the library's collective buffers live (CUDA for NCCL, else the CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _wait(work, what: str) -> None:
    """Wait for ``work`` at most :func:`collective_timeout` seconds.

    Raises:
        RankError: No answer in time, or the collective failed (a peer left the group).
    """
    seconds = _settings["timeout"]
    try:
        work.wait() if seconds is None else work.wait(timeout=timedelta(seconds=seconds))
    except RuntimeError as err:
        if "timed out" in str(err).lower() or "timeout" in str(err).lower():
            limit = f"{seconds} s" if seconds else "the process group's timeout"
            why = (f"no answer from the other ranks within {limit}: another rank stopped, "
                   "failed outside sharpscape, or computes longer than "
                   "analysis.core.set_collective_timeout allows")
        else:
            why = ("another rank left the process group (it exited, or failed outside "
                   f"sharpscape) [{type(err).__name__}: {err}]")
        raise RankError(f"rank {rank()}: the {what} collective did not complete: {why}; the "
                        "process group is unusable now", cause=why) from err


def _raw_all_reduce(buf: Tensor, op, what: str) -> None:
    _wait(dist.all_reduce(buf, op=op, async_op=True), what)


def _exchange_message(src: int, message: str) -> str:
    """Rank ``src``'s ``message`` on every rank (one all-reduce of ``MESSAGE_BYTES`` bytes)."""
    buf = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
    if rank() == src:
        data = message.encode()[:MESSAGE_BYTES]
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(_device())
    _raw_all_reduce(buf, dist.ReduceOp.SUM, "error message")
    return bytes(buf.cpu().numpy()).rstrip(b"\0").decode(errors="replace")


def _header(kind: int, size: int, failure: str | None = None) -> None:
    """The header all-reduce that precedes every collective (module docstring).

    Args:
        kind: ``ALL_REDUCE``, ``BROADCAST``, ``DONE`` (end of a guarded routine) or
            ``FAILED`` (this rank announces ``failure``).
        size: The payload's element count (0 when unknown to this rank).
        failure: This rank's ``"ExceptionType: message"`` when it announces a failure.

    Raises:
        RankError: Another rank announced a failure (on the ranks that did not), or the ranks
            reached different collectives (on every rank).
    """
    status = rank() + 1 if failure is not None else 0
    h = torch.tensor([status, kind, -kind, size, -size], dtype=torch.float64, device=_device())
    _raw_all_reduce(h, dist.ReduceOp.MAX, "header")
    top, kinds, sizes = int(h[0]), (int(h[1]), -int(h[2])), (int(h[3]), -int(h[4]))
    if top:
        src = top - 1
        cause = _exchange_message(src, failure or "")
        if failure is None:
            raise RankError(f"rank {src} failed: {cause} (this rank {rank()} stopped at its "
                            "next collective so that no rank waits or mixes results)", src, cause)
        return
    if kinds[0] != kinds[1] or sizes[0] != sizes[1]:
        raise RankError("the ranks reached different collectives (kinds "
                        f"{sorted(set(kinds))}, sizes {sorted(set(sizes))}): they call different "
                        "routines, or one rank skipped or repeated a call (e.g. it caught an "
                        "error outside sharpscape and carried on)")


def mark_agreed(error: BaseException) -> BaseException:
    """Mark ``error`` as known to every rank, so that it is never announced (again).

    Args:
        error: An exception that every rank raises, or that was announced.

    Returns:
        ``error``.
    """
    try:
        error.agreed = True
    except AttributeError:  # an exception without a __dict__: remember the last few
        _unmarkable[:] = [*_unmarkable[-7:], error]
    return error


def is_agreed(error: BaseException) -> bool:
    """Whether ``error`` was marked by :func:`mark_agreed` (or is a :class:`RankError`).

    Args:
        error: An exception.

    Returns:
        True when no announcement is needed.
    """
    return bool(getattr(error, "agreed", False)) or any(e is error for e in _unmarkable)


def announce_failure(error: BaseException) -> None:
    """Tell every rank that this rank failed with ``error`` (once per error).

    A no-op without a process group, for an error every rank already raises (one marked
    ``agreed``, e.g. a :class:`RankError`), and for ``BaseException`` s that are not
    ``Exception`` s (Ctrl-C). The other ranks raise :class:`RankError` with this cause at
    their next library collective; this rank's caller then raises ``error`` itself.

    Args:
        error: The exception this rank is about to raise.
    """
    if not is_distributed() or not isinstance(error, Exception) or is_agreed(error):
        return
    mark_agreed(error)
    with contextlib.suppress(RankError):   # undeliverable (timeout): raise our own error
        _header(FAILED, 0, f"{type(error).__name__}: {error}")


@contextlib.contextmanager
def failures_shared(done: bool = False) -> Iterator[None]:
    """Announce an exception raised in the block to every rank (:func:`announce_failure`).

    Args:
        done: On success, end with a ``DONE`` header, so that a failure of another rank in the
            same block is raised here (the end of a guarded routine).

    Yields:
        Nothing.
    """
    try:
        yield
    except Exception as err:
        announce_failure(err)
        raise
    if done and is_distributed():
        _header(DONE, 0)


def _all_reduce_(tensors: Sequence[Tensor], op) -> None:
    if not is_distributed() or not tensors:
        return
    buf = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    _header(ALL_REDUCE, buf.numel())
    buf = buf.to(_device())
    _raw_all_reduce(buf, op, "all-reduce")
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(buf[offset:offset + n].view_as(t))
        offset += n


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """Sum ``tensors`` over all ranks, in place, with one collective call.

    A no-op without a process group. The tensors are packed into one float64 buffer so that
    sums of many small tensors cost one message (after the header, module docstring).

    Args:
        tensors: The tensors, overwritten with the sums.

    Raises:
        RankError: Another rank failed, the ranks are at different collectives, or no answer
            came within :func:`collective_timeout`.
    """
    _all_reduce_(tensors, dist.ReduceOp.SUM)


def all_reduce_max_(tensors: Sequence[Tensor]) -> None:
    """The elementwise maximum of ``tensors`` over all ranks, in place, in one collective call.

    ``-max(-x)`` is the minimum. A no-op without a process group.

    Args:
        tensors: The tensors, overwritten with the maxima.

    Raises:
        RankError: As :func:`all_reduce_sum_`.
    """
    _all_reduce_(tensors, dist.ReduceOp.MAX)


def _tensor_bytes(t: Tensor) -> bytes:
    """The dtype, shape and exact bytes of ``t`` (shape only for meta tensors)."""
    t = t.detach()
    head = f"t{t.dtype}{tuple(t.shape)}".encode()
    if t.device.type == "meta" or t.numel() == 0:
        return head
    if t.is_sparse:
        t = t.to_dense()
    return head + t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _const_repr(const: Any) -> str:
    """``repr`` of a code constant, frozensets sorted.

    A frozenset's order follows the string hash seed, which differs between processes.
    """
    if isinstance(const, frozenset):
        return "frozenset" + repr(sorted(_const_repr(c) for c in const))
    if isinstance(const, tuple):
        return "(" + ",".join(_const_repr(c) for c in const) + ")"
    return repr(const)


def _code_digest(code, h) -> None:
    """Feed a code object's bytecode, names and constants (recursively) to ``h``."""
    h.update(code.co_code + repr(code.co_names).encode())
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _code_digest(const, h)
        else:
            h.update(_const_repr(const).encode())


def module_structure(module: nn.Module) -> list[str]:
    """What a module computes besides its tensors' values, as comparable strings.

    Its ``repr`` (layers, their classes and options, activations that are modules), the
    ``forward`` code of each class (activations called as functions) and the qualified names
    of the functions held as attributes (``self.act = torch.tanh``).

    Args:
        module: The module.

    Returns:
        One string per item, the same on every rank for the same model.
    """
    h = hashlib.blake2b(digest_size=16)
    for cls in sorted({type(m) for m in module.modules()}, key=lambda c: c.__qualname__):
        code = getattr(getattr(cls, "forward", None), "__code__", None)
        h.update(cls.__module__.encode() + b"." + cls.__qualname__.encode())
        if code is not None:
            _code_digest(code, h)
    functions = sorted(f"{name}.{key}={getattr(v, '__module__', '')}."
                       f"{getattr(v, '__qualname__', type(v).__name__)}"
                       for name, m in module.named_modules() for key, v in vars(m).items()
                       if not key.startswith("_") and callable(v))
    return [repr(module), h.hexdigest(), *functions]


def _digest(value: Any, h) -> None:
    """Feed a canonical encoding of ``value`` to the hash ``h``.

    Numbers, strings, None, tensors and arrays (dtype, shape and exact bytes), modules (their
    structure, parameters and buffers) and containers of these; other objects (callables)
    are not compared. A DTensor (an FSDP2 shard) is compared by its global shape, dtype and
    placements only: its local values differ between ranks by design.
    """
    if value is None or isinstance(value, (bool, np.bool_)):
        h.update(repr(value if value is None else bool(value)).encode())
    elif isinstance(value, numbers.Real):
        h.update(b"n" + struct.pack("<d", float(value)))
    elif isinstance(value, str):
        h.update(b"s" + value.encode() + b"\0")
    elif hasattr(value, "device_mesh") and hasattr(value, "placements"):  # a DTensor
        h.update(b"D" + repr((tuple(value.shape), str(value.dtype),
                              [str(p) for p in value.placements])).encode())
    elif isinstance(value, np.ndarray) and value.dtype.kind not in "biufc":
        _digest(value.tolist(), h)
    elif isinstance(value, (Tensor, np.ndarray)):
        h.update(_tensor_bytes(torch.as_tensor(value)))
    elif isinstance(value, nn.Module):
        _digest(list(module_parts(value).values()), h)
    elif isinstance(value, Mapping):
        h.update(b"d%d" % len(value))
        for key in sorted(value, key=str):  # the same entries built in another order agree
            _digest(key, h)
            _digest(value[key], h)
    elif isinstance(value, (list, tuple)):
        h.update(b"l%d" % len(value))
        for v in value:
            _digest(v, h)
    else:
        h.update(b"?")


def module_parts(module: nn.Module) -> dict[str, Any]:
    """The parts of a module that are compared between ranks, by what they are.

    Args:
        module: The module.

    Returns:
        ``{"structure (...)": ..., "parameter values": ..., "buffers (...)": ...}`` (see
        :func:`module_structure`; the parameters and buffers by name).
    """
    return {"structure (layers, activations, forward code)": module_structure(module),
            "parameter values": dict(module.named_parameters()),
            "buffers (e.g. BatchNorm statistics)": dict(module.named_buffers())}


def fingerprint(value: Any) -> float:
    """A 48-bit hash of ``value`` as an exact float64.

    Equal values give equal fingerprints on every rank (see ``_digest`` for what is compared:
    tensors by their exact bytes, so a permutation of their entries changes the fingerprint).
    Cost: one pass over the bytes of the tensors (copied to the CPU).

    Args:
        value: Numbers, strings, None, tensors, arrays, modules, or containers of these.

    Returns:
        The fingerprint, an integer-valued float below $2^{48}$.
    """
    h = hashlib.blake2b(digest_size=6)
    _digest(value, h)
    return float(int.from_bytes(h.digest(), "little"))


def _named_parts(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with each module split into :func:`module_parts` (``"model's buffers ..."``)."""
    parts = {}
    for name, value in values.items():
        if isinstance(value, nn.Module):
            parts.update({f"{name}'s {part}": v for part, v in module_parts(value).items()})
        else:
            parts[name] = value
    return parts


def check_same_on_ranks(values: Mapping[str, Any], failure: int = 0,
                        explain=lambda code: "") -> None:
    """Raise the same error on every rank if ``values`` differ between ranks or a rank failed.

    One all-reduce (``max`` of each fingerprint and of its negation, and of the code), so no
    rank is left waiting in a collective that others skip. A module is compared in three parts
    (structure, parameter values, buffers), each named in the error. A no-op without a process
    group.

    Args:
        values: The arguments that must agree, by name.
        failure: This rank's failure code (0: none).
        explain: ``code -> str``, the message of the largest failure code.

    Raises:
        ValueError: Some values differ between ranks, or some rank reported a failure (marked
            ``agreed``: every rank raises it).
    """
    if not is_distributed():
        return
    parts = _named_parts(values)
    names = list(parts)
    prints = torch.tensor([fingerprint(parts[n]) for n in names], dtype=torch.float64)
    buf = torch.cat([prints, -prints, torch.tensor([float(failure)], dtype=torch.float64)])
    all_reduce_max_([buf])
    k = len(names)
    differ = [n for i, n in enumerate(names) if buf[i] != -buf[k + i]]
    error = None
    if differ:
        error = ValueError(f"{', '.join(differ)} must be the same on every rank "
                           "(torch.distributed runs one computation on the union of the "
                           "shards), got values that differ between ranks")
    elif int(buf[2 * k]):
        error = ValueError(explain(int(buf[2 * k])) + " (on at least one rank)")
    if error is not None:
        raise mark_agreed(error)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (identity without a process group).

    Pickled on rank ``src``; its length is all-reduced, then its bytes broadcast, each wait
    bounded by :func:`collective_timeout`.

    Args:
        obj: A picklable object (only rank ``src``'s is used).
        src: The rank whose object is sent.

    Returns:
        Rank ``src``'s object.

    Raises:
        RankError: As :func:`all_reduce_sum_`.
    """
    if not is_distributed():
        return obj
    data = pickle.dumps(obj) if rank() == src else b""
    _header(BROADCAST, 0)
    size = torch.tensor([float(len(data))], dtype=torch.float64, device=_device())
    _raw_all_reduce(size, dist.ReduceOp.MAX, "broadcast size")
    buf = torch.zeros(int(size.item()), dtype=torch.uint8)
    if data:
        buf[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(_device())
    _wait(dist.broadcast(buf, src=src, async_op=True), "broadcast")
    return pickle.loads(bytes(buf.cpu().numpy()))  # noqa: S301 (the library's own bytes)
