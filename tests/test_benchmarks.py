"""The benchmarks' shared harness, and one script run end to end on its smallest setting."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]


def _parser():
    p = harness.parser("doc", threads=True)
    p.add_argument("--n", type=int, default=5)
    return p


def test_quick_replaces_defaults_and_explicit_flags_win():
    assert harness.parse(_parser(), [], quick={"n": 1}).n == 5
    assert harness.parse(_parser(), ["--quick"], quick={"n": 1}).n == 1
    assert harness.parse(_parser(), ["--quick", "--n", "3"], quick={"n": 1}).n == 3
    assert harness.parse(_parser(), ["--out", "r.json"]).out == Path("r.json")


def test_interleaved_alternates_candidates_and_medians_are_per_round():
    calls = []
    times = harness.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                rounds=2, per_round=2)
    assert calls == ["a", "a", "b", "b", "a", "a", "b", "b"]
    assert [len(r) for r in times["a"]] == [2, 2]

    def clock(wall):
        c = harness.Clock()
        c.wall = wall
        return c

    fake = {"x": [[clock(1.0), clock(9.0), clock(2.0)], [clock(5.0), clock(4.0), clock(6.0)],
                  [clock(3.0), clock(3.0), clock(0.5)]]}
    assert harness.median_of_medians(fake) == {"x": 3.0}  # medians 2, 5, 3
    assert harness.best_wall(fake) == {"x": 0.5}


def test_recorder_writes_only_when_asked(tmp_path):
    args = harness.parse(_parser(), [])
    assert harness.Recorder("b", args).write({"v": 1}) is None
    out = tmp_path / "sub" / "r.json"
    args = harness.parse(_parser(), ["--out", str(out)])
    harness.Recorder("b", args).write({"v": torch.tensor([1.0, 2.0])})
    record = json.loads(out.read_text())
    assert record["results"] == {"v": [1.0, 2.0]} and record["config"]["n"] == 5


@pytest.mark.slow
def test_landscape_quick_run_writes_results_and_environment(tmp_path):
    pytest.importorskip("loss_landscapes")
    out = tmp_path / "landscape.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "landscape.py"), "--quick",
                           "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 40-100-100-10 | 32 | 1 |" in done.stdout
    record = json.loads(out.read_text())
    assert record["benchmark"] == "landscape"
    assert record["command"][0] == "landscape.py" and "--quick" in record["command"]
    assert record["config"]["quick"] and record["config"]["samples"] == 32
    assert record["config"]["repeats"] == 1 and record["config"]["train_steps"] == 30
    env = record["environment"]
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["threads"] == 1 and env["torch"] == torch.__version__
    assert len(env["load_average"]) == 3 and len(env["load_average_end"]) == 3
    assert env["cpu"] and env["date"] and env["numpy"] and "loss-landscapes" in env["peers"]
    assert "device" not in env  # CPU run
    (row,) = record["results"]["rows"]
    assert (row["mlp"], row["samples"], row["batches"]) == ("40-100-100-10", 32, 1)
    assert row["max_rel_diff"] < 1e-4  # ours and the peer at the same points
    assert len(row["ours"]) == 2 and len(row["peer"]) == 2 and len(row["bare"]) == 2
    assert row["targets"][0].startswith("faster than peer")


@pytest.mark.slow
def test_scaling_quick_run_spends_equal_products_and_fits_exponents(tmp_path):
    out = tmp_path / "scaling.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--quick",
                           "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| top_eigenvalues | 0.00206M | 1 |" in done.stdout
    record = json.loads(out.read_text())
    assert record["benchmark"] == "scaling" and record["config"]["quick"]
    rows = record["results"]["rows"]
    assert [(r["parameters"], r["batches"]) for r in rows] == [
        (2058, 1), (2058, 2), (10099, 1), (10099, 2)]  # widths 15 and 52 of 100-w-w-10
    for row in rows:
        routines = row["routines"]
        assert set(routines) == {"top_eigenvalues", "hutch++", "xtrace", "spectral_density",
                                 "plane"}
        assert routines["top_eigenvalues"]["ours"]["products"] == ["4"]
        assert routines["spectral_density"]["ours"]["products"] == ["4"]
        assert routines["plane"]["ours"]["products"] == ["9 points"]
        assert routines["hutch++"]["ours"]["products"] == ["6 + 4 + 4 float64"]
        for entry in routines.values():
            assert entry["ours"]["seconds"] > 0 and entry["ours"]["peak_bytes"] > 0
            if "peer" in entry:  # the peer at the same budget
                assert entry["peer"]["products"][0].split(" + ")[0] == \
                    entry["ours"]["products"][0].split(" + ")[0]
    for fits in record["results"]["fits"].values():
        assert set(fits["ours"]) == {"params", "batches", "const", "rms_log_residual"}
