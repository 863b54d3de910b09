"""Runs of ``python -m figures`` that several test modules read, made once per session.

``tiny``: every reproduction at the tiny size, in this process. ``float_paths``: the summaries of
:data:`FLOAT_PATHS` on ATen's scalar kernels (``ATEN_CPU_CAPABILITY=default``, one new process
for both) and on this machine's default kernels (the ``tiny`` run's, unless this process has
``ATEN_CPU_CAPABILITY`` set: then a new process without it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from figures.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
#: the reproductions whose verdicts are compared on both floating-point paths
FLOAT_PATHS = ("adaptive_eos", "sala_overhead")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``python -m figures --tiny --jobs 1`` in this process: its folder and its summary."""
    out = tmp_path_factory.mktemp("figures")
    return out, main(["--tiny", "--out", str(out), "--jobs", "1"])


def run_tiny(out: Path, names, capability: str | None) -> dict:
    """``python -m figures NAMES --tiny --jobs 1 --threads 1`` in a new process whose
    ``ATEN_CPU_CAPABILITY`` is ``capability`` (None: unset); its summary."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run([sys.executable, "-m", "figures", *names, "--tiny", "--out", str(out),
                    "--jobs", "1", "--threads", "1"], cwd=ROOT, env=env, check=True,
                   capture_output=True, text=True, timeout=900)
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="session")
def float_paths(tmp_path_factory, tiny) -> dict:
    """``{"scalar": summary, "vector": summary}`` of FLOAT_PATHS on the two kernel paths."""
    scalar = run_tiny(tmp_path_factory.mktemp("scalar"), FLOAT_PATHS, "default")
    if "ATEN_CPU_CAPABILITY" in os.environ:       # this process is not on the default path
        vector = run_tiny(tmp_path_factory.mktemp("vector"), FLOAT_PATHS, None)
    else:
        vector = tiny[1]
    return {"scalar": scalar, "vector": vector}
