"""The whole repository passes ruff as configured in pyproject.toml (pycodestyle, pyflakes and
pydocstyle's google convention at one line length)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

def _ruff():
    try:
        import ruff  # noqa: F401
    except ImportError:
        exe = shutil.which("ruff")
        if exe is None:
            pytest.skip("ruff is not installed (it is in the test extra)")
        return [exe]
    return [sys.executable, "-m", "ruff"]


def test_ruff_passes_on_the_repository():
    run = subprocess.run(_ruff() + ["check", "--no-cache", "."], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
