"""Runs ``python -m figures`` commands in forked processes that a test may SIGKILL.

Started as ``python -m tests.figures.forked NAME ...``: imports ``figures`` and the reproductions
``NAME``, makes the tiny data and runs one training job (so that the forks skip the seconds of
start-up; the estimate's calibration is cut to one timed run), prints ``{"ready": true}``, then
serves one JSON command per line of stdin::

    {"argv": [...], "log": "PATH", "kill_after": SECONDS or null, "kill_at_fsync": N or null}

Each command runs ``figures.__main__.main(argv)`` in a fresh ``os.fork()`` child, with its stdout
and stderr in ``PATH``, exactly as ``python -m figures`` would end (exit status 0; a SystemExit's
message on stderr and status 1; an uncaught exception's traceback and status 70). The server
SIGKILLs the child once ``kill_after`` seconds have passed (if it is still running) and answers
``{"killed": bool, "status": int, "seconds": float}`` (status -9 when killed). With
``kill_at_fsync`` the child SIGKILLs itself at its N-th ``os.fsync`` instead: the atomic writer
fsyncs each file just before its rename and the folder just after, so N = 1, 2, ... stops a run
before and after each rename in turn.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback


def _child(argv: list[str], log: str, kill_at_fsync: int | None) -> None:
    from figures.__main__ import main
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if kill_at_fsync is not None:      # SIGKILL at the n-th fsync (of a file, or of its folder)
        calls, fsync = [0], os.fsync

        def counted(descriptor: int) -> None:
            calls[0] += 1
            if calls[0] == kill_at_fsync:
                os.kill(os.getpid(), signal.SIGKILL)
            fsync(descriptor)

        os.fsync = counted
    code = 0
    try:
        main(argv)
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            code = 1
        else:
            code = stop.code or 0
    except BaseException:          # as python -m would: the traceback, a nonzero status
        traceback.print_exc()
        code = 70
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(command: dict) -> dict:
    began = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(command["argv"], command["log"], command.get("kill_at_fsync"))
    limit = command.get("kill_after")
    killed = False
    if command.get("kill_at_fsync") is not None:
        _, status = os.waitpid(pid, 0)
        return {"killed": os.WIFSIGNALED(status), "status": os.waitstatus_to_exitcode(status),
                "seconds": time.monotonic() - began}
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if limit is not None and time.monotonic() - began >= limit:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            killed = True
            break
        time.sleep(0.002)
    return {"killed": killed, "status": os.waitstatus_to_exitcode(status),
            "seconds": time.monotonic() - began}


def serve(names: list[str]) -> None:
    """Warm up for the reproductions ``names``, then answer commands until stdin ends."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import importlib

    import torch
    torch.set_num_threads(1)
    import figures.__main__ as cli
    from figures.harness import SIZES, execute, job
    # The estimate's calibration: one timed run instead of runs spanning TRUSTED_WALL (1 s)
    # of wall time; it writes no file, and the runs here are killed for their files.
    cli.TRUSTED_WALL = 0.0
    for name in names:
        importlib.import_module(f"figures.{name}")
    execute(job("warm-up", "SGD", "SGD", 0, {"lr": 0.05}), SIZES["tiny"])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(_serve(json.loads(line))), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1:])
