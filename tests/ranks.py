"""Processes for the tests' gloo ranks, started in milliseconds instead of seconds.

``torch.multiprocessing.spawn`` starts every rank as a new interpreter that imports torch,
``torch.distributed`` and the test's modules (seconds of CPU per rank), then tears them down,
in every test that runs ranks. :func:`spawn` forks rank ``r`` from the session's zygote ``r``
instead: a process started once like a spawned rank (its own interpreter, so its own string-hash
seed: two ranks still order a set of strings differently, as ranks that ``torchrun`` starts do)
that has imported :data:`PRELOAD` and run nothing else, none of the tests' state. Each rank
takes the caller's environment variables, working directory, ``sys.path``, standard output and
error at the call, as a spawned rank would, runs ``fn(rank, *args)`` and ends with
``os._exit``; a rank that raises or dies fails the call with its traceback, and the other ranks
are killed.
"""
from __future__ import annotations

import atexit
import importlib
import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait
from multiprocessing.reduction import recv_handle, send_handle

#: what every zygote imports once (the ranks' common imports; the rest is imported per rank)
PRELOAD = ("numpy", "pytest", "torch", "torch.distributed", "torch.distributed.fsdp",
           "torch.distributed.tensor", "torch.distributed.checkpoint", "torch.nn.parallel",
           "analysis", "landscape", "optim", "tests.oracles", "tests.analysis.sharded_problems")

_zygotes: list = []     # (process, connection) of zygote 0, 1, ...


class RanksFailed(RuntimeError):
    """A rank raised, died or outlived the timeout (the message holds its traceback)."""


def spawn(fn, args: tuple = (), nprocs: int = 2, timeout: float | None = None) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` processes, ranks ``0 .. nprocs - 1``; wait for all.

    Args:
        fn: A module-level function (pickled by name, like ``torch.multiprocessing.spawn``'s).
        args: Its arguments after the rank (pickled).
        nprocs: The number of ranks.
        timeout: Seconds after which the ranks still running are killed and the call fails
            (None: no limit).

    Raises:
        RanksFailed: A rank raised (its traceback), was killed or exited nonzero, or the timeout
            passed; the other ranks are killed first.
    """
    _start(nprocs)
    settings = (dict(os.environ), os.getcwd(), list(sys.path))
    task = pickle.dumps((fn, args))
    with tempfile.TemporaryDirectory(prefix="ranks") as tmp:
        errors = [os.path.join(tmp, f"error{r}") for r in range(nprocs)]
        conns = [conn for _, conn in _zygotes[:nprocs]]
        for rank, conn in enumerate(conns):
            conn.send_bytes(pickle.dumps((rank, errors[rank], settings, task)))
            for fd in (1, 2):              # this test's stdout and stderr (pytest's capture)
                send_handle(conn, fd, _zygotes[rank][0].pid)
        pids = [conn.recv() for conn in conns]
        status: list[int | None] = [None] * nprocs
        try:
            _wait(conns, status, timeout)
        finally:                           # a failure, the timeout or an interrupt
            for rank in range(nprocs):
                if status[rank] is None:
                    os.kill(pids[rank], signal.SIGKILL)
            for rank in range(nprocs):
                if status[rank] is None:
                    conns[rank].recv()
        failed = [r for r in range(nprocs) if status[r] not in (0, None)]
        if failed:
            raise RanksFailed(_report(failed, status, errors))
        if None in status:
            raise RanksFailed(f"the ranks did not finish within {timeout} s (killed)")


def _wait(conns, status: list, timeout: float | None) -> None:
    """Fill in each rank's exit status until all are in, one is nonzero, or the timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while None in status and all(s in (0, None) for s in status):
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        ready = wait([c for c, s in zip(conns, status) if s is None], left)
        if not ready:
            return
        for conn in ready:
            status[conns.index(conn)] = conn.recv()


def _report(failed: list[int], status: list, errors: list[str]) -> str:
    lines = []
    for rank in failed:
        try:
            with open(errors[rank]) as f:
                cause = f.read()
        except OSError:
            cause = ""
        how = (f"was killed by signal {-status[rank]}" if status[rank] < 0
               else f"exited with status {status[rank]}")
        lines.append(f"rank {rank} {how}" + (f":\n{cause}" if cause else ""))
    return "\n".join(lines)


def _start(nprocs: int) -> None:
    """Start the zygotes ``0 .. nprocs - 1`` that are missing or have died (their imports in
    parallel) and wait until they are ready."""
    ctx = multiprocessing.get_context("spawn")
    if not _zygotes:
        atexit.register(_stop)   # runs before multiprocessing's handler (registered earlier)
    new = {}
    for index in range(nprocs):
        if index < len(_zygotes) and _zygotes[index][0].is_alive():
            continue
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=_zygote, args=(theirs, PRELOAD), name=f"zygote{index}")
        process.start()
        theirs.close()
        new[index] = (process, ours)
    for index, (process, conn) in sorted(new.items()):
        try:
            ready = conn.recv() == "ready"
        except EOFError:
            ready = False
        if not ready:
            raise RanksFailed(f"{process.name} did not start (exit code {process.exitcode})")
        if index < len(_zygotes):
            _zygotes[index][1].close()
            _zygotes[index] = (process, conn)
        else:
            _zygotes.append((process, conn))


def _stop() -> None:
    """End the zygotes (they leave at the end of their input)."""
    for process, conn in _zygotes:
        conn.close()
    for process, _ in _zygotes:
        process.join(10)
        if process.is_alive():
            process.kill()


def _zygote(conn, preload) -> None:
    """Import ``preload``, then fork one rank per request until the input ends."""
    for name in preload:
        importlib.import_module(name)
    conn.send("ready")
    while True:
        try:
            request = conn.recv_bytes()
            out, err = recv_handle(conn), recv_handle(conn)
        except EOFError:
            return
        rank, error, settings, task = pickle.loads(request)
        pid = os.fork()
        if pid == 0:
            conn.close()
            _rank(rank, error, settings, task, out, err)
        os.close(out)
        os.close(err)
        conn.send(pid)
        _, code = os.waitpid(pid, 0)
        conn.send(os.waitstatus_to_exitcode(code))


def _rank(rank: int, error: str, settings: tuple, task: bytes, out: int, err: int) -> None:
    """The forked rank: the caller's settings and output, ``fn(rank, *args)``, ``os._exit``."""
    code = 1
    try:
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        environ, cwd, path = settings
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        sys.path[:] = path
        fn, args = pickle.loads(task)      # imports fn's module with the caller's settings
        fn(rank, *args)
        code = 0
    except BaseException:
        text = traceback.format_exc()
        try:
            with open(error, "w") as f:
                f.write(text)
            print(f"rank {rank}:\n{text}", file=sys.stderr)
        except BaseException:
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code)
