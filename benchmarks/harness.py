"""What every benchmark script shares: its arguments, timers, memory probes and results file.

* :func:`parser` / :func:`parse`: the common options (``--out FILE.json``, ``--quick``, and, where a
  script asks for them, ``--device`` and ``--threads``); ``--quick`` swaps in the script's smallest
  setting (tiny sizes, one repeat: a smoke test of the script, never figures to record).
* Timers: :func:`timed` (one call), :class:`Clock` (wall and process CPU seconds of a block,
  synchronised with the GPU where the work is on one) and :func:`interleaved` (candidates timed in
  rounds that alternate between them, so that load changes on the machine hit all alike).
* Memory probes: :func:`rss_peak` (the process's resident high-water mark, reset just before),
  :func:`torch_peak` (the peak of live torch CPU allocations, from the profiler's events) and
  :func:`fresh_process` (a probe run in a new interpreter, whose freed memory has not stayed
  resident).
* :func:`environment` and :class:`Recorder`: the machine, versions and load, written with the
  results to ``--out``.
"""
from __future__ import annotations

import argparse
import bisect
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "out"  # reference spectra reused between runs (git-ignored)
PEERS = ("pyhessian", "loss-landscapes", "curvlinops-for-pytorch", "hessian-eigenthings",
         "transformers", "scipy", "mnist1d")


# -- arguments --------------------------------------------------------------------------------
def parser(doc: str, *, device: bool = False, threads: bool = False) -> argparse.ArgumentParser:
    """An argument parser with ``--out`` and ``--quick`` (and ``--device``, ``--threads``)."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                   help="write the results, the configuration and the environment to this file")
    p.add_argument("--quick", action="store_true",
                   help="the smallest setting (tiny sizes, one repeat): a smoke test, not figures")
    if device:
        p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    if threads:
        p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None,
          quick: dict[str, Any] | None = None) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick``, ``quick``'s values replace the defaults (flags given
    explicitly still win). Checks that ``--device cuda`` is usable and applies ``--threads``."""
    args = p.parse_args(argv)
    if args.quick and quick:
        p.set_defaults(**quick)
        args = p.parse_args(argv)
    if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    if isinstance(getattr(args, "threads", None), int):
        torch.set_num_threads(args.threads)
    return args


# -- timers -----------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """What ``fn()`` returns and its wall seconds."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def cuda_sync() -> None:
    torch.cuda.synchronize()


def no_sync() -> None:
    pass


class Clock:
    """Wall and process CPU seconds of a block (the CPU time is steadier on a shared machine);
    ``sync`` runs at both ends (``torch.cuda.synchronize`` when the work is on a GPU)."""

    def __init__(self, sync: Callable[[], None] = no_sync):
        self.sync = sync
        self.wall = self.cpu = 0.0

    @classmethod
    def for_device(cls, device: torch.device | str) -> "Clock":
        return cls(cuda_sync if torch.device(device).type == "cuda" else no_sync)

    def __enter__(self) -> "Clock":
        self.sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sync()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def interleaved(candidates: dict[str, Callable[[], Any]], rounds: int, per_round: int = 1,
                clock: Callable[[], Clock] = Clock) -> dict[str, list[list[Clock]]]:
    """Each candidate called ``per_round`` times per round, the candidates in turn, for
    ``rounds`` rounds: ``{name: [[clock of each call] per round]}``."""
    out: dict[str, list[list[Clock]]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            calls = []
            for _ in range(per_round):
                with clock() as c:
                    fn()
                calls.append(c)
            out[name].append(calls)
    return out


def best_wall(times: dict[str, list[list[Clock]]]) -> dict[str, float]:
    """The shortest wall time of each candidate over all its calls."""
    return {name: min(c.wall for calls in rounds for c in calls) for name, rounds in times.items()}


def median_of_medians(times: dict[str, list[list[Clock]]], what: str = "wall") -> dict[str, float]:
    """The median over rounds of each round's median ``what`` (``"wall"`` or ``"cpu"``)."""
    return {name: statistics.median(statistics.median(getattr(c, what) for c in calls)
                                    for calls in rounds) for name, rounds in times.items()}


# -- memory -----------------------------------------------------------------------------------
def proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found")


def rss_peak(fn: Callable[[], object]) -> int:
    """Peak resident bytes of the process while ``fn`` runs (``VmHWM`` after minus ``VmRSS``
    before, the high-water mark reset through ``/proc/self/clear_refs``); what ``fn`` returns
    is kept until the figure is read."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    base = proc_status("VmRSS")
    result = fn()
    peak = proc_status("VmHWM") - base
    del result
    return peak


def torch_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of live torch CPU allocations while ``fn`` runs, beyond those at its start (the
    profiler's allocation events, summed in order): exact, and blind to the C allocator's slack."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    del result
    return int(max(0, np.cumsum([e.nbytes() for e in events]).max(initial=0)))


def live_peak(fn: Callable[[], object]) -> int:
    """Like :func:`torch_peak`, each recorded free paired with its allocation by address.

    The profiler records allocations and frees on the threads that run torch ops only; gloo's
    worker threads release collective buffers unrecorded (the full-size copy a gloo
    reduce-scatter makes of its input), so :func:`torch_peak`'s running sum grows with every
    collective. Here a buffer allocated inside a process-group call (``c10d::...``) whose free
    is not recorded counts until the end of the next ``wait_tensor`` (its collective is then
    complete), and any other allocation at an address still counted live retires the old
    block first (the allocator reused it, so it was freed). Equal to :func:`torch_peak` when
    every free is recorded."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events, waits, stack = [], [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size,
                           id(e), _in_process_group(e)))
        elif e.name == "_c10d_functional::wait_tensor":
            waits.append(e.end_time_ns)
    del result
    waits.sort()
    for t, ptr, size, key, backend in list(events):
        i = bisect.bisect_right(waits, t)
        if backend and size > 0 and i < len(waits):
            events.append((waits[i], ptr, 0, key, True))  # the implied free
    live: dict[int, tuple[int, int]] = {}
    implied: set[int] = set()  # addresses freed by an implied free, not allocated since
    level = peak = 0
    for _, ptr, size, key, _ in sorted(events):
        if size > 0:
            level += size - live.pop(ptr, (0, 0))[0]
            live[ptr] = (size, key)
            implied.discard(ptr)
        elif size == 0:  # implied: only if this very block is still counted
            if live.get(ptr, (0, None))[1] == key:
                level -= live.pop(ptr)[0]
                implied.add(ptr)
        elif ptr in live:
            level -= live.pop(ptr)[0]
        elif ptr in implied:  # recorded after all, after the wait
            implied.discard(ptr)
        else:  # a free of a block from before the call counts as torch_peak counts it
            level += size
        peak = max(peak, level)
    return int(peak)


def _in_process_group(event) -> bool:
    """Whether a profiler event runs inside a process-group call (``c10d::...``)."""
    while event is not None:
        if event.name.startswith("c10d::"):
            return True
        event = event.parent
    return False


def fresh_process(script: str, argv: Sequence[str], env: dict | None = None) -> Any:
    """Run ``script`` with ``argv`` in a new interpreter (``env`` added to the environment) and
    return the JSON of its last line of output: in a long-lived process, memory freed by earlier
    work stays resident and would hide a peak."""
    done = subprocess.run([sys.executable, script, *argv], check=True, capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- environment and results ------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peer_versions() -> dict[str, str]:
    """Versions of the installed peers and libraries the benchmarks import."""
    out = {}
    for name in PEERS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """The machine and software a run measures: date (UTC), CPU model and count, ATen's CPU
    capability, torch threads, load average, versions, and the GPU's name where ``device`` is
    CUDA."""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "cpu": cpu_model(), "cpu_count": os.cpu_count(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
           "load_average": list(os.getloadavg()), "python": platform.python_version(),
           "torch": torch.__version__, "numpy": np.__version__, "peers": peer_versions()}
    if device is not None and torch.device(device).type == "cuda":
        env["device"] = torch.cuda.get_device_name(torch.device(device))
    return env


def describe(env: dict[str, Any]) -> str:
    """One line for a run's header: torch, the device (or CPU and threads) and the load."""
    where = env.get("device") or f"{env['cpu']} ({env['cpu_capability']}), {env['threads']} threads"
    load = " ".join(f"{x:.2f}" for x in env["load_average"])
    return f"torch {env['torch']}, {where}, load average {load}"


class Recorder:
    """A run's environment at its start and, with ``--out``, the file its results go to."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args = name, args
        self.env = environment(getattr(args, "device", None))
        self.start = time.perf_counter()

    def write(self, results: Any, out: Path | None = None) -> Path | None:
        """Write ``{benchmark, command, config, environment, results}`` to ``out`` (default: the
        ``--out`` option; nothing when neither is given); the load at the end is added."""
        out = out or self.args.out
        if out is None:
            return None
        env = {**self.env, "load_average_end": list(os.getloadavg()),
               "seconds": time.perf_counter() - self.start}
        record = {"benchmark": self.name, "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
                  "config": {k: v for k, v in vars(self.args).items()},
                  "environment": env, "results": results}
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1, default=_jsonable))
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)
