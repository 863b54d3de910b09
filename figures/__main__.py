"""Run the reproductions (all by default) and write PNGs, saved data and summary.json to DIR.

``python -m figures [NAME ...] [--out DIR] [--tiny | --full] [--jobs N] [--threads N] [--force]
[--replot] [--table [--markdown]]``; finished ones that are unchanged are skipped.

Every file is written atomically (a unique temporary in DIR, fsync, ``os.replace``), so a run
killed at any moment leaves each file complete, old or new. summary.json records the SHA-256 of
each reproduction's files: an entry whose files are missing, unreadable or not the recorded ones is
redone (from its saved data when that is intact and current, else recomputed), never skipped; an
unreadable summary.json is rebuilt from the intact saved data. A symbolic link inside DIR is
replaced by the file, never written through; DIR itself may be a symbolic link to a folder (the
files go into that folder). Where a command cannot go on it says so in one line, naming the file
and the command that fixes it, and exits with status 1.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from analysis.core import file_sha256, remove_temporaries

from .harness import SIZES, environment, execute, job
from .report import (SUMMARY, Damaged, check_entry, config_key, files_of, read_saved,
                     read_summary, save, table, write_summary)
from .runner import (TRUSTED_WALL, Progress, Runner, Units, autogrouped, full_batch_samples,
                     other_load, parallel_share, plan, session_share, time_full_batch)
from .verdict import entry

OVERHEAD_RUNS, OVERHEAD_SECONDS = 1.0, 2.0   # a reproduction's work besides its runs (estimate)
REPRODUCTIONS = ["agd_switching", "wsam_sharpness", "ndadam_direction", "adasam_convergence",
                 "sala_overhead", "landscape_gallery", "adaptive_eos"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line's arguments, checked (an error exits with argparse's message).

    Args:
        argv: The arguments after ``python -m figures`` (None: ``sys.argv[1:]``).

    Returns:
        The parsed arguments; ``--out`` exists and is writable unless only ``--table`` is asked.
    """
    parser = argparse.ArgumentParser(prog="python -m figures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"reproductions to run (default: all of {', '.join(REPRODUCTIONS)})")
    parser.add_argument("--out", type=Path, default=Path("figures/out"),
                        help="output folder for PNGs, summary.json and saved data (a symbolic "
                             "link to a folder is followed; links inside it are replaced)")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--full", action="store_true",
                       help="enough seeds to decide every rule at its margin (long)")
    sizes.add_argument("--tiny", action="store_true", help="smoke size (CI)")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                        help="training runs in parallel processes (default: the CPU count)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per process (default 1: these models are too "
                             "small to gain from more)")
    parser.add_argument("--force", action="store_true",
                        help="recompute reproductions whose saved results are up to date")
    parser.add_argument("--replot", action="store_true",
                        help="re-apply the rules to the saved .json/.npz of OUT and redraw every "
                             "PNG (no training)")
    parser.add_argument("--table", action="store_true",
                        help="print the claim-versus-measured table of OUT/summary.json")
    parser.add_argument("--markdown", action="store_true", help="the table as Markdown")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in REPRODUCTIONS]
    if unknown:
        parser.error(f"unknown reproduction(s) {unknown}; choose from {REPRODUCTIONS}")
    for flag in ("jobs", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not (args.table and not args.replot):
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=args.out):
                pass
        except OSError as err:
            parser.error(f"--out {args.out} is not writable: {err}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run ``python -m figures`` with the arguments ``argv`` (default: the command line).

    Args:
        argv: The arguments after ``python -m figures``.

    Returns:
        The summary (reproduction name -> entry) as written to summary.json (or printed).

    Raises:
        SystemExit: The arguments are invalid, or a file in the way of the command is damaged
            (one line naming it and the command that fixes it), or a file cannot be written.
    """
    args = parse(argv)
    names = args.names or REPRODUCTIONS
    if args.table and not args.replot:
        return show_table(args.out, args.markdown)
    try:
        with exclusive(args.out):
            summary, redone = open_summary(args.out, None if args.replot else size_name(args))
            if args.replot:
                summary = replot(summary, [n for n in names if n not in redone], args.out)
            else:
                summary = run(args, names, summary)
    except OSError as err:
        if err.filename is None or Path(err.filename).parent.resolve() != args.out.resolve():
            raise
        raise SystemExit(f"figures: cannot write in {args.out}: {err}") from None
    if args.table:
        return show_table(args.out, args.markdown)
    return summary


def run(args, names: list[str], summary: dict) -> dict:
    """Compute or redo every reproduction of ``names`` that is not up to date in ``summary``.

    Args:
        args: The parsed command line.
        names: The reproductions asked for.
        summary: The current summary (updated, and written after each reproduction).

    Returns:
        The summary.
    """
    size = SIZES[size_name(args)]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    runner = Runner(size, workers=args.jobs, threads=args.threads)
    began, cpu_began, expected = time.perf_counter(), cpu_seconds(), None
    try:
        modules = {n: importlib.import_module(f"figures.{n}") for n in names}
        action = {n: status(summary, n, config_key(modules[n], size), args.out, args.force)
                  for n in names}
        todo = [n for n in names if action[n] is None]
        if todo:
            print(f"{size.name} size: timing the calibration units for the estimate ...",
                  flush=True)
            runner.progress = estimate(modules, todo, size, args.jobs)
            expected = runner.progress.seconds_left()
            print(announce(runner.progress, size.name, args.jobs, args.threads), flush=True)
        for name in names:
            if action[name] == "unchanged":
                print(f"{name}: unchanged, skipped (--force recomputes)", flush=True)
                continue
            if action[name] is None:
                summary[name] = run_one(modules[name], name, size, runner, args.out,
                                        environment(args.jobs, args.threads))
                runner.progress.reproduction_done()
                how = f"{summary[name]['seconds']:.0f} s | {runner.progress.line()}"
            else:
                summary[name] = redo(name, args.out, action[name], summary.get(name, {}))
                how = "redone from its saved data"
            print(f"{name}: {summary[name]['verdict']} ({how})", flush=True)
            write_summary(args.out, summary)
    finally:
        runner.close()
        torch.set_num_threads(threads)
    if expected is not None:
        now = time.perf_counter()
        print(f"took {(now - runner.progress.began) / 60:.1f} min after the calibration, "
              f"expected {expected / 60:.1f} min ({(now - began) / 60:.1f} min in all, "
              f"{(cpu_seconds() - cpu_began) / 60:.1f} min of CPU time in all processes"
              f"{load_text()})", flush=True)
    print(outputs(args.out, names, summary), flush=True)
    return summary


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (the workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def load_text() -> str:
    """``"; load average L on C cores"`` (empty where there is no load average)."""
    try:
        return f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    except OSError:
        return ""


def announce(progress: Progress, size: str, jobs: int, threads: int) -> str:
    """The estimate at the start: runs, minutes, each reproduction's share, the load.

    Args:
        progress: The job's progress, just calibrated.
        size: The size name.
        jobs: Worker processes.
        threads: torch threads per process.

    Returns:
        The line to print.
    """
    each = ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in progress.breakdown())
    return (f"{size} size, {jobs} process(es) x {threads} thread(s): {progress.total:.0f} runs, "
            f"expected about {progress.seconds_left() / 60:.1f} min (min each: {each}; CPU "
            f"share {progress.share:.2f} of {os.cpu_count()} cores{load_text()})")


def outputs(out: Path, names: list[str], summary: dict) -> str:
    """Where each output of ``names`` is: the summary, and each reproduction's files.

    Args:
        out: The output folder.
        names: The reproductions asked for.
        summary: The summary as written.

    Returns:
        The lines to print.
    """
    lines = [f"outputs in {out.resolve()}:", f"  summary (every verdict): {out / SUMMARY}",
             f"  table: python -m figures --table --out {shlex.quote(str(out))}"]
    for name in names:
        if name in summary:
            figure, *data = [out / f for f in reversed(files_of(name))]
            lines.append(f"  {name}: figure {figure}; data {', '.join(map(str, data))}")
    return "\n".join(lines)


def size_name(args: argparse.Namespace) -> str:
    """The size the command line asks for: "tiny", "quick" or "full"."""
    return "full" if args.full else "tiny" if args.tiny else "quick"


def status(summary: dict, name: str, key: str, out: Path, force: bool):
    """What a run does with ``name``.

    Args:
        summary: The current summary.
        name: The reproduction.
        key: Its configuration's key at this size.
        out: The output folder.
        force: Recompute whatever is there.

    Returns:
        "unchanged" (its entry has this key and its files are the recorded ones: skip), its
        ``Saved`` data (intact and of this key: only the verdict and figure are redone), or
        None (compute).
    """
    if force:
        return None
    problem = None
    old = summary.get(name)
    if old is not None and old.get("key") == key:
        try:
            check_entry(out, name, old)
            return "unchanged"
        except Damaged as err:
            problem = err
    try:
        saved = read_saved(out, name)
    except Damaged:
        saved = None
    if saved is not None and saved.meta.get("key") == key:
        if problem is not None:
            print(f"{name}: {problem}; its saved data is intact, redoing its verdict and figure",
                  flush=True)
        return saved
    if problem is not None:
        print(f"{name}: {problem}; recomputing", flush=True)
    return None


def estimate(modules: dict, names: list[str], size, workers: int) -> Progress:
    """The work of ``names`` and its time, calibrated on CPU time here.

    Calibration units are timed in CPU seconds (not wall seconds, which the machine's load at
    that moment inflates or not): one plain training run of ``size`` and, for the reproductions
    planned run by run (:data:`figures.runner.JOB_LISTS`: adaptive_eos's full-batch runs to 99%
    training accuracy), one full-batch step and one Hessian-vector product on their samples.
    Each reproduction's work is then predicted in CPU seconds (:func:`figures.runner.plan`)
    plus, besides its runs, about ``OVERHEAD_RUNS`` plain runs and ``OVERHEAD_SECONDS`` CPU
    seconds (rule, figure, files). The wall time is that over the CPU share our processes get,
    from the cores and the load of other programs at the start: the share of a core the
    calibration runs got, repeated until they span ``TRUSTED_WALL`` (1 s) of wall time (a few
    runs at the tiny size, one at the others), which counts competitors by their priority; the
    1-minute load average only where that share was measured over less
    (:func:`figures.runner.other_load`); several workers of a session the scheduler groups
    (``sched_autogroup``) get no more than that share when it is below a core
    (:func:`figures.runner.session_share`). Worker processes
    (``workers`` > 1) each start as this process did: its CPU seconds so far (imports) and the
    data the first run made.

    Args:
        modules: The reproductions' modules by name.
        names: The reproductions to run.
        size: The ``Size``.
        workers: The processes.

    Returns:
        The job's :class:`figures.runner.Progress` (its clock starts now).
    """
    calibration = job("calibration", "SGD", "SGD", 0, {"lr": 0.05})
    started = time.process_time()                   # this process's start: imports
    execute(calibration, size)                      # the first run also makes the data
    first = time.process_time() - started
    wall, cpu, runs = time.perf_counter(), time.process_time(), 0
    while not runs or time.perf_counter() - wall < TRUSTED_WALL:   # a share to trust
        execute(calibration, size)
        runs += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    cores = os.cpu_count() or 1
    try:
        average = os.getloadavg()[0]
    except OSError:
        average = 0.0
    others = other_load(cpu, wall, cores, average)
    share = session_share(workers, cores, others, cpu / wall, autogrouped(), average - 1.0)
    share1 = parallel_share(1, cores, others)
    cpu /= runs
    timed = {n: time_full_batch(size, n)
             for n in sorted(full_batch_samples({n: modules[n] for n in names}, size))}
    units = Units(cpu, {n: t[0] for n, t in timed.items()}, {n: t[1] for n, t in timed.items()},
                  OVERHEAD_RUNS * cpu + OVERHEAD_SECONDS)
    startup = (started + max(first - cpu, 0.0)) * workers / share if workers > 1 else 0.0
    return Progress([plan(n, modules[n], size, units) for n in names], share, share1, startup)


def run_one(module, name: str, size, runner, out: Path, env: dict) -> dict:
    """Experiment, then rule and figure on the saved files.

    Args:
        module: The reproduction's module.
        name: The reproduction.
        size: The ``Size``.
        runner: The ``Runner`` of the training runs.
        out: The output folder.
        env: The environment that computes it (``harness.environment``), recorded.

    Returns:
        The summary entry.
    """
    began = time.perf_counter()
    data, arrays = module.experiment(size, runner)
    key, seconds = config_key(module, size), round(time.perf_counter() - began, 1)
    save(out, name, data, arrays, module.CONFIG, size, key=key, seconds=seconds, environment=env)
    return redo(name, out, read_saved(out, name), {})


def redo(name: str, out: Path, saved, old: dict) -> dict:
    """The summary entry of ``name`` from its ``saved`` data.

    The rule applied, the figure drawn, and the SHA-256 of its three files recorded; key, size
    and seconds come from the saved data (from ``old``, its previous entry, for data saved
    without them).

    Args:
        name: The reproduction.
        out: The output folder.
        saved: Its ``Saved`` data (from ``read_saved``).
        old: Its previous summary entry, or {}.

    Returns:
        The summary entry.
    """
    module = importlib.import_module(f"figures.{name}")
    data, meta = saved.meta["data"], saved.meta
    measured, checks = module.rule(data)
    extra = {"key": meta.get("key") or old.get("key"),
             "size": (meta.get("size") or {}).get("name") or old.get("size"),
             "seconds": meta.get("seconds", old.get("seconds")),
             "environment": meta.get("environment", old.get("environment"))}
    result = {**entry(module.CLAIM, measured, checks, f"{name}.png"),
              **{k: v for k, v in extra.items() if v is not None}}
    module.figure(data, saved.arrays, result, out)
    png = files_of(name)[2]
    result["files"] = {**saved.digests, png: file_sha256(out / png)}
    return result


def open_summary(out: Path, size: str | None) -> tuple[dict, set[str]]:
    """The summary.json of ``out``, rebuilt if it cannot be read.

    An unreadable one is rebuilt from the intact saved data of every reproduction and written;
    each reproduction left out says so in one line.

    Args:
        out: The output folder.
        size: The size name the command runs at (for the commands it suggests), or None.

    Returns:
        The summary, and the names whose entries were redone to rebuild it.
    """
    try:
        return read_summary(out), set()
    except Damaged as err:
        print(f"figures: {err}; rebuilding it from the saved per-reproduction files", flush=True)
    summary = {}
    for name in REPRODUCTIONS:
        try:
            saved = read_saved(out, name)
        except Damaged as err:
            if any(os.path.lexists(out / f) for f in files_of(name)):
                print(f"{name}: not in the rebuilt summary: {err}; `{fix(out, [name], size)}` "
                      "recomputes it", flush=True)
            continue
        summary[name] = redo(name, out, saved, {})
        print(f"{name}: {summary[name]['verdict']} (rebuilt from its saved data)", flush=True)
    write_summary(out, summary)
    return summary, set(summary)


def replot(summary: dict, names: list[str], out: Path) -> dict:
    """Re-apply every rule to its saved data and redraw its figure (no training).

    Reproductions of ``names`` with intact saved data are redone; if the saved data of one
    in ``summary`` is damaged, nothing is written and the command refuses in one line.

    Args:
        summary: The current summary.
        names: The reproductions asked for.
        out: The output folder.

    Returns:
        The summary as written.

    Raises:
        SystemExit: The saved data of an entry of ``summary`` is damaged.
    """
    todo, damaged = {}, {}
    for name in names:
        try:
            todo[name] = read_saved(out, name)
        except Damaged as err:
            if name in summary:
                damaged[name] = err
    if damaged:
        refuse_damaged("cannot replot: ", damaged, summary, out, "recomputes")
    if not todo:
        if not summary:
            raise SystemExit(f"figures: nothing to replot in {out} (no saved reproduction); "
                             f"`{fix(out, [], None)}` computes them")
        return summary
    for name, saved in todo.items():
        summary[name] = redo(name, out, saved, summary.get(name, {}))
        print(f"{name}: {summary[name]['verdict']}, redrawn {out / summary[name]['figure']}",
              flush=True)
    write_summary(out, summary)
    return summary


def show_table(out: Path, markdown: bool) -> dict:
    """Print the table of ``out/summary.json`` after checking every entry's files.

    Args:
        out: The output folder.
        markdown: The table as Markdown.

    Returns:
        The summary.

    Raises:
        SystemExit: One line when there is no summary, or it or a file it names is damaged.
    """
    try:
        summary = read_summary(out)
    except Damaged as err:
        raise SystemExit(f"figures: {err}; `python -m figures --replot --out "
                         f"{shlex.quote(str(out))}` rebuilds it from the saved data") from None
    if not summary:
        raise SystemExit(f"figures: {out / SUMMARY} is missing or lists no reproduction; "
                         f"`{fix(out, [], None)}` writes it")
    damaged = {}
    for name, e in summary.items():
        if not name.startswith("_"):
            try:
                check_entry(out, name, e)
            except Damaged as err:
                damaged[name] = err
    if damaged:
        refuse_damaged("", damaged, summary, out, "redoes")
    try:
        text = table(summary, figure_dir=str(out), markdown=markdown)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise SystemExit(f"figures: {out / SUMMARY} has a malformed entry ({err!r}); "
                         f"`python -m figures --replot --out {shlex.quote(str(out))}` rewrites "
                         "it") from None
    print(text)
    return summary


def refuse_damaged(what: str, damaged: dict, summary: dict, out: Path, verb: str) -> None:
    """Refuse in one line: the first damaged entry and the command that ``verb`` them all.

    Args:
        what: The words before the first entry's error (e.g. "cannot replot: ").
        damaged: Damaged reproduction names -> their ``Damaged`` errors (not empty).
        summary: The current summary (for the entries' size).
        out: The output folder.
        verb: What the suggested command does to them ("recomputes", "redoes").

    Raises:
        SystemExit: Always.
    """
    first = next(iter(damaged))
    raise SystemExit(f"figures: {what}{damaged[first]}; "
                     f"`{fix(out, list(damaged), summary[first].get('size'))}` {verb} "
                     f"{'it' if len(damaged) == 1 else 'them'}")


def fix(out: Path, names: list[str], size: str | None) -> str:
    """The command that recomputes ``names`` (all, if empty) at ``size`` in ``out``.

    Args:
        out: The output folder.
        names: The reproductions.
        size: Their size name ("tiny", "quick", "full"), or None.

    Returns:
        The shell command.
    """
    flags = {"tiny": ["--tiny"], "full": ["--full"]}.get(size, [])
    return " ".join(["python -m figures", *names, *flags, "--out", shlex.quote(str(out))])


@contextlib.contextmanager
def exclusive(out: Path):
    """Hold an exclusive lock on the folder ``out`` while writing in it.

    A second run writing in the same folder refuses in one line. Under the lock, the temporary
    files a killed run left there are removed (without locks, e.g. on a file system that has
    none, they are left; nothing reads them).

    Args:
        out: The output folder (it exists).

    Yields:
        None.

    Raises:
        SystemExit: Another run holds the lock.
    """
    try:
        import fcntl
    except ImportError:                 # no locks here: leave temporaries (they are ignored)
        yield
        return
    fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise SystemExit(f"figures: another `python -m figures` is writing in {out}; wait "
                             "for it to finish") from None
        except OSError:                 # a file system without locks
            locked = False
        if locked:
            remove_temporaries(out, [SUMMARY, *(f for n in REPRODUCTIONS for f in files_of(n))])
        yield
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
    sys.exit(0)
