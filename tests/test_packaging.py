"""The wheel holds every package: built from a copy of the sources and imported with no checkout
on the path (an editable install would hide a missing subpackage)."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("optim", "analysis", "landscape", "figures")


def _subpackages():
    return sorted(str(p.parent.relative_to(ROOT)).replace(os.sep, ".")
                  for name in PACKAGES for p in (ROOT / name).rglob("__init__.py"))


@pytest.mark.slow
def test_the_wheel_holds_every_package_and_imports_without_the_checkout(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "out", "results"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True)
    (wheel,) = wheels.glob("sharpscape-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    missing = [pkg for pkg in _subpackages() if pkg.replace(".", "/") + "/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel: {missing}"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True)
    run = tmp_path / "elsewhere"
    run.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    code = ("import analysis, landscape, optim, figures, torch\n"
            "assert all(m.__file__.startswith(%r) for m in (analysis, landscape, optim, figures))\n"
            "from analysis import top_eigenvalues, supervised\n"
            "model = torch.nn.Linear(3, 1).double()\n"
            "data = [(torch.randn(8, 3, dtype=torch.float64),"
            " torch.randn(8, 1, dtype=torch.float64))]\n"
            "res = top_eigenvalues(model, supervised(torch.nn.MSELoss()), data, progress=False)\n"
            "assert res.eigenvalues[0] > 0\n") % str(site)
    out = subprocess.run([sys.executable, "-c", code], cwd=run, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
