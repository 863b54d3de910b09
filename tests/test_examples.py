"""The runnable examples under docs/examples: each runs as documented and prints the numbers one
process gets on the unsharded model with all the data."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from analysis import average_sharpness, hessian_trace, supervised, top_eigenvalues
from landscape import plane, random_direction

ROOT = Path(__file__).resolve().parent.parent
FSDP_EXAMPLE = ROOT / "docs" / "examples" / "fsdp_sharpness.py"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numbers(lines: list, prefix: str) -> list:
    (line,) = [line for line in lines if line.startswith(prefix)]
    return [float(v) for v in line[len(prefix):].replace("+-", " ").split()]


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_fsdp_example_under_torchrun_prints_the_one_process_numbers():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--standalone", str(FSDP_EXAMPLE)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert "world size 2, parameters: DTensor shards" in lines, run.stdout

    example = _load(FSDP_EXAMPLE)             # the same model and data, unsharded, one process
    data, model = example.all_batches(2), example.make_model()
    loss_fn = supervised(nn.CrossEntropyLoss())
    eig = top_eigenvalues(model, loss_fn, data, k=2, tol=1e-4, progress=False)
    trace = hessian_trace(model, loss_fn, data, n_hvp=16, seed=0, progress=False)
    avg = average_sharpness(model, loss_fn, data, sigma=0.1, n_samples=8, seed=0, progress=False)
    d1, d2 = random_direction(model, seed=1), random_direction(model, seed=2)
    grid = torch.linspace(-0.5, 0.5, 3)
    surface = plane(model, loss_fn, data, d1, d2, grid, grid, progress=False)

    def close(got, want, rtol=1e-4, atol=0.0):
        return torch.allclose(torch.tensor(got, dtype=torch.float64),
                              torch.as_tensor(want, dtype=torch.float64).ravel(),
                              rtol=rtol, atol=atol)

    assert close(_numbers(lines, "top eigenvalues:"), eig.eigenvalues), run.stdout
    assert close(_numbers(lines, "hessian trace:"), [trace.estimate, trace.stderr]), run.stdout
    assert close(_numbers(lines, "average sharpness:"), [avg.value, avg.stderr],
                 atol=2e-6), run.stdout
    assert close(_numbers(lines, "plane losses:"), surface.losses, rtol=1e-5), run.stdout
