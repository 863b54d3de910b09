"""``python -m figures [NAME ...] [--out DIR] [--tiny | --full] [--threads N] [--table]``:
run the reproductions (all by default) and write PNGs, saved data and summary.json to DIR."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

from .common import SIZES
from .report import table

REPRODUCTIONS = ["agd_switching", "wsam_sharpness", "ndadam_direction", "adasam_convergence",
                 "sala_overhead", "landscape_gallery"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m figures", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"reproductions to run (default: all of {', '.join(REPRODUCTIONS)})")
    parser.add_argument("--out", type=Path, default=Path("figures/out"),
                        help="output folder for PNGs, summary.json and saved data")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--full", action="store_true", help="longer runs, closer to the papers")
    sizes.add_argument("--tiny", action="store_true", help="seconds-long smoke size (CI)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these models are too small to gain "
                             "from more, and on a busy machine 2 threads ran 15x slower)")
    parser.add_argument("--table", action="store_true",
                        help="print the claim-versus-measured table of OUT/summary.json and exit")
    args = parser.parse_args(argv)
    if args.table:
        summary = json.loads((args.out / "summary.json").read_text())
        print(table(summary, figure_dir=str(args.out)))
        return summary
    unknown = [n for n in args.names if n not in REPRODUCTIONS]
    if unknown:
        parser.error(f"unknown reproduction(s) {unknown}; choose from {REPRODUCTIONS}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    size = SIZES["full" if args.full else "tiny" if args.tiny else "quick"]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run_all(args.names or REPRODUCTIONS, size, args.out)
    finally:
        torch.set_num_threads(threads)


def run_all(names: list[str], size, out: Path) -> dict:
    """Run ``names`` at ``size``; merge their entries into ``out/summary.json``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    timings = summary.pop("_timing_s", {})
    summary.pop("_size", None)
    for name in names:
        began = time.perf_counter()
        module = importlib.import_module(f"figures.{name}")
        summary[name] = module.run(size, out)
        timings[name] = round(time.perf_counter() - began, 2)
        print(f"{name}: holds={summary[name]['holds']} ({timings[name]:.1f} s)", flush=True)
        path.write_text(json.dumps({**summary, "_timing_s": timings}, indent=1))
    summary["_timing_s"] = timings
    summary["_size"] = size.name
    path.write_text(json.dumps(summary, indent=1))
    return summary

if __name__ == "__main__":
    main()
    sys.exit(0)
