"""``python -m figures [NAME ...] [--out DIR] [--tiny | --full] [--jobs N] [--threads N]
[--force] [--replot] [--table [--markdown]]``: run the reproductions (all by default) and write
PNGs, saved data and summary.json to DIR; unchanged finished ones are skipped."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from .harness import SIZES, environment, execute, job
from .report import config_key, load, save, saved, table
from .runner import Runner
from .verdict import entry

REPRODUCTIONS = ["agd_switching", "wsam_sharpness", "ndadam_direction", "adasam_convergence",
                 "sala_overhead", "landscape_gallery", "adaptive_eos"]


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m figures", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"reproductions to run (default: all of {', '.join(REPRODUCTIONS)})")
    parser.add_argument("--out", type=Path, default=Path("figures/out"),
                        help="output folder for PNGs, summary.json and saved data")
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
    args = parse(argv)
    path = args.out / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    if args.table:
        print(table(summary, figure_dir=str(args.out), markdown=args.markdown))
        return summary
    names = args.names or REPRODUCTIONS
    if args.replot:
        return replot(summary, names, args.out)
    size = SIZES["full" if args.full else "tiny" if args.tiny else "quick"]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    runner = Runner(size, workers=args.jobs, threads=args.threads)
    try:
        modules = {n: importlib.import_module(f"figures.{n}") for n in names}
        todo = [n for n in names if args.force or not up_to_date(summary, n, modules[n], size,
                                                                   args.out)]
        if todo:
            print(f"{size.name} size: timing one training run for the estimate ...", flush=True)
            print(f"{size.name} size, {args.jobs} process(es) x {args.threads} thread(s): "
                  f"expected about {expected_seconds(modules, todo, size, args.jobs) / 60:.1f} "
                  f"min for {', '.join(todo)}", flush=True)
        for name in names:
            if name not in todo:
                print(f"{name}: unchanged, skipped (--force recomputes)", flush=True)
                continue
            began = time.perf_counter()
            summary[name] = run_one(modules[name], name, size, runner, args.out)
            summary[name]["seconds"] = round(time.perf_counter() - began, 1)
            summary[name]["environment"] = environment(args.jobs, args.threads)
            print(f"{name}: {summary[name]['verdict']} ({summary[name]['seconds']:.0f} s)",
                  flush=True)
            path.write_text(json.dumps(summary, indent=1))
    finally:
        runner.close()
        torch.set_num_threads(threads)
    return summary


def up_to_date(summary: dict, name: str, module, size, out: Path) -> bool:
    return (name in summary and summary[name].get("key") == config_key(module, size)
            and saved(out, name))


def expected_seconds(modules: dict, names: list[str], size, workers: int) -> float:
    """The run count of each reproduction (``module.cost``, in standard training runs) times
    the measured time of one standard run here, over the processes."""
    calibration = job("calibration", "SGD", "SGD", 0, {"lr": 0.05})
    execute(calibration, size)                      # the first run also makes the data
    began = time.perf_counter()
    execute(calibration, size)
    unit = time.perf_counter() - began
    return unit * sum(modules[n].cost(size) for n in names) / workers


def run_one(module, name: str, size, runner, out: Path) -> dict:
    """Experiment, then rule and figure on the saved files."""
    data, arrays = module.experiment(size, runner)
    save(out, name, data, arrays, module.CONFIG, size)
    return decide(module, name, out, {"key": config_key(module, size), "size": size.name})


def decide(module, name: str, out: Path, extra: dict) -> dict:
    """The rule applied to the saved data of ``name`` and its figure drawn: the summary entry."""
    data, arrays = load(out, name)
    measured, checks = module.rule(data)
    result = {**entry(module.CLAIM, measured, checks, f"{name}.png"), **extra}
    module.figure(data, arrays, result, out)
    return result


def replot(summary: dict, names: list[str], out: Path) -> dict:
    """Re-apply every rule to its saved data and redraw its figure (no training)."""
    for name in (n for n in names if n in summary):
        module = importlib.import_module(f"figures.{name}")
        kept = {k: summary[name][k] for k in ("key", "size", "seconds", "environment")
                if k in summary[name]}
        summary[name] = decide(module, name, out, kept)
        print(f"{name}: {summary[name]['verdict']}, redrawn {out / summary[name]['figure']}",
              flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
