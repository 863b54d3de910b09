"""``python -m figures`` at the tiny size: summary.json structure, saved data, skipping and
--force, --replot without training, the table, and every rule's three verdicts on constructed
inputs."""
from __future__ import annotations

import copy
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import figures.__main__ as cli
import figures.harness
from figures.__main__ import REPRODUCTIONS, main
from figures.harness import job
from figures.report import load
from figures.runner import search
from figures.verdict import VERDICTS, combine, every_seed, interval, mean_above, paired

ROOT = Path(__file__).resolve().parents[2]


def deterministic(obj):
    """``obj`` without wall-time entries (the only numbers allowed to vary) and the checksums
    of the files (the saved data records its wall time)."""
    if isinstance(obj, dict):
        return {k: deterministic(v) for k, v in obj.items() if k not in ("seconds", "files")}
    if isinstance(obj, list):
        return [deterministic(v) for v in obj]
    return obj


def no_training(*args, **kwargs):
    raise AssertionError("trained a model")


def test_summary_structure_and_files(tiny):
    out, summary = tiny
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert set(summary) == set(REPRODUCTIONS)
    for name in REPRODUCTIONS:
        e = summary[name]
        assert {"claim", "measured", "verdict", "checks", "figure"} <= set(e), name
        assert e["claim"].endswith(".") and e["verdict"] in VERDICTS, name
        assert e["checks"] and e["verdict"] == combine(e["checks"]), name
        for check in e["checks"].values():
            assert check["verdict"] in VERDICTS and check["n_seeds"] >= 1
            assert len(check["interval"]) == 2 and "margin" in check
        assert (out / e["figure"]).stat().st_size > 20_000, name
        meta = json.loads((out / f"{name}.json").read_text())
        assert {"seed", "config", "versions", "data"} <= set(meta), name
        with np.load(out / f"{name}.npz") as arrays:
            assert sorted(arrays.files) == sorted(meta["arrays"]), name


def test_required_measurements(tiny):
    _, summary = tiny
    passes = summary["sala_overhead"]["measured"]["passes_per_step"]
    assert passes["SGD"] == passes["Lookahead"] == 1.0 and passes["SAM"] == 2.0
    assert 1.0 < passes["SALA"] <= 1.5                 # k = 2: at most one SAM step in two
    fractions = summary["agd_switching"]["measured"]["mean_sgd_fraction"]
    assert len(fractions) == 6 and all(0.0 <= v <= 1.0 for v in fractions.values())
    assert {"SGD", "SAM", "WSAM"} == set(summary["wsam_sharpness"]["measured"]["lambda_max"])
    assert len(summary["adasam_convergence"]["measured"]["slope_per_seed"]) == 2


def test_adaptive_eos_ratios_use_each_optimizers_threshold(tiny):
    """GD's ratio is lambda_max / (2 / lr), Adam's the preconditioned sharpness over
    (2 + 2 beta1) / ((1 - beta1) lr) = 38 / lr with beta1 0.9, at every record; the statistic
    starts at the first record whose ratio reaches 0.9."""
    from figures.adaptive_eos import PRECONDITIONED, hover, ratio_key, sharpness_key
    out, summary = tiny
    data, _ = load(out, "adaptive_eos")
    for name, by_lr in data["runs"].items():
        for lr, runs in by_lr.items():
            threshold = 3.8 / (0.1 * float(lr)) if PRECONDITIONED[name] else 2 / float(lr)
            for run in runs:
                sharp, ratio = (np.asarray(run["history"][k][1]) for k in (sharpness_key(name),
                                                                           ratio_key(name)))
                assert sharp / ratio == pytest.approx(threshold, rel=1e-4), (name, lr)
                assert len(sharp) == run["steps"] // 5            # a record every 5 steps
                if PRECONDITIONED[name]:           # a different operator than plain lambda_max
                    assert not np.allclose(sharp, run["history"]["lambda_max"][1], rtol=0.01)
    run = {"history": {"r": [[1, 2, 3, 4, 5, 6], [0.5, 0.95, 2.0, 1.0, 0.7, 1.1]],
                       "lambda_max": [[1, 2, 3, 4, 5, 6], [1.0, 2.0, 2.0, 3.0, 3.0, 5.0]]}}
    stat = hover(run, "r")
    assert stat["reached_at"] == 2 and stat["median"] == 1.0 and stat["in_band"] == 0.6
    assert stat["raw_growth"] == 2.5 and stat["records"] == 5
    assert hover(run, "r", reach=3.0)["reached_at"] is None


def test_rerun_skips_unchanged_and_force_recomputes(tiny, tmp_path, capsys, monkeypatch):
    out, summary = tiny
    for f in out.iterdir():
        if f.is_file():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with monkeypatch.context() as m:
        m.setattr(figures.harness, "execute", no_training)
        m.setattr(cli, "execute", no_training)
        again = main(["--tiny", "--out", str(tmp_path), "--jobs", "1"])
    assert again == summary and "unchanged, skipped" in capsys.readouterr().out
    forced = main(["--tiny", "--out", str(tmp_path), "--jobs", "1", "--force", "sala_overhead"])
    assert deterministic(forced) == deterministic(summary)


def test_replot_needs_no_training(tiny, monkeypatch):
    out, summary = tiny
    monkeypatch.setattr(figures.harness, "execute", no_training)
    monkeypatch.setattr(cli, "execute", no_training)
    pngs = [out / summary[n]["figure"] for n in REPRODUCTIONS]
    for png in pngs:
        png.unlink()
    assert main(["--replot", "--out", str(out)]) == summary
    assert all(p.stat().st_size > 20_000 for p in pngs)


def test_table_is_generated_from_the_summary(tiny, capsys):
    out, summary = tiny
    main(["--table", "--markdown", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + len(REPRODUCTIONS)
    for name, line in zip(REPRODUCTIONS, lines[2:]):
        assert f"`{name}`" in line and summary[name]["claim"] in line
        assert line.rstrip(" |").endswith(summary[name]["verdict"])
        assert line.count("95% CI") == len(summary[name]["checks"])


def test_bad_arguments_fail_before_any_compute(tmp_path, monkeypatch):
    monkeypatch.setattr(figures.harness, "execute", no_training)
    monkeypatch.setattr(cli, "execute", no_training)
    (tmp_path / "file").write_text("")
    for argv in (["nope"], ["--jobs", "0"], ["--out", str(tmp_path / "file" / "sub")]):
        with pytest.raises(SystemExit):
            main(["--tiny", "--out", str(tmp_path), *argv])


def test_a_shadowing_package_is_an_error(tmp_path):
    (tmp_path / "optim").mkdir()
    (tmp_path / "optim" / "__init__.py").write_text("AGD = SAM = None\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "figures", "agd_switching", "--tiny", "--out",
                           str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "shadows it" in proc.stderr and str(tmp_path / "optim") in proc.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


# -- the statistics -------------------------------------------------------------------------
def test_interval_is_the_t_interval():
    lo, hi = interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)       # t_{0.975, 2} * sd / sqrt(n)
    assert lo == pytest.approx(2.0 - half) and hi == pytest.approx(2.0 + half)
    assert interval([5.0]) == (-math.inf, math.inf)


def test_checks_are_three_valued():
    assert paired("", [0.52, 0.53, 0.54], [0.50, 0.50, 0.50], 0.005)["verdict"] == "holds"
    assert paired("", [0.40, 0.41, 0.42], [0.50, 0.50, 0.50], 0.005)["verdict"] == "refuted"
    assert paired("", [0.55, 0.45, 0.50], [0.50, 0.50, 0.50], 0.005)["verdict"] == "undecided"
    assert paired("", [0.5], [0.4], 0.005)["verdict"] == "undecided"      # one seed
    assert mean_above("", [-0.6, -0.62, -0.61], -0.4, below=True)["verdict"] == "holds"
    assert mean_above("", [-0.1, -0.12, -0.11], -0.4, below=True)["verdict"] == "refuted"
    assert every_seed("", [1, 2], [True, True])["verdict"] == "holds"
    assert every_seed("", [1, 2], [False, True])["verdict"] == "undecided"
    assert every_seed("", [1, 2], [False, False])["verdict"] == "refuted"
    holds, refuted, undecided = ({"verdict": v} for v in VERDICTS)
    assert combine({"a": holds, "b": holds}) == "holds"
    assert combine({"a": holds, "b": undecided}) == "undecided"
    assert combine({"a": undecided, "b": refuted}) == "refuted"


# -- every rule on constructed inputs -------------------------------------------------------
def _set(runs, key, values):
    for run, value in zip(runs, values):
        run[key] = value


def _agd(data, mode):
    """Branch by branch: each AGD branch ahead of its baseline (a coin flip when undecided);
    refuted through the switching sanity checks (a fraction flat in delta)."""
    fractions = [0.0, 0.2, 0.4, 0.6, 0.8, 0.95] if mode != "refuted" else [0.5] * 6
    for f, runs in zip(fractions, data["sweep"].values()):
        for run in runs:
            run["history"]["sgd_fraction"] = [[1, 2], [f - 0.1, f + 0.1]]
    for branch, base in (("SGD branch", "SGD"), ("adaptive branch", "Adam")):
        _set(data["runs"][f"AGD ({branch})"], "final_test_acc", [0.70, 0.71])
        _set(data["runs"][base], "final_test_acc",
             [0.60, 0.61] if mode != "undecided" else [0.50, 0.90])
    return None, None


def _wsam(data, mode):
    """WSAM against the better of SGD and SAM (SGD, by validation), and WSAM at the other gammas
    against SAM (far below it when refuted); lambda_max is reported only."""
    _set(data["runs"]["SGD"], "final_val_acc", [0.9, 0.9])
    _set(data["runs"]["SAM"], "final_val_acc", [0.1, 0.1])
    _set(data["runs"]["SAM"], "final_test_acc", [0.65, 0.66])
    for runs in data["sweep"].values():
        _set(runs, "final_test_acc", [0.70, 0.71] if mode != "refuted" else [0.50, 0.51])
    return "WSAM", "SGD"


def _ndadam(data, mode):
    for label, runs in data["runs"].items():
        for run in runs:
            for key in run["history"]:
                if key.startswith("rownorm/"):
                    grow = [1.0, 1.5] if label.startswith("Adam") else [1.0, 1.0]
                    run["history"][key] = [[1, 2], grow if mode != "refuted" else [1.0, 0.5]]
            cos = 1.0 if label.startswith("ND-Adam") else 0.8
            for key in ("vector_cosine", "tangent_cosine"):
                run["history"][key] = [[1, 2], [cos, cos - 0.0001 * run["seed"]]]
    for label, runs in data["runs"].items():
        _set(runs, "final_test_acc", [0.7, 0.71] if label.startswith("ND-Adam") else [0.6, 0.61])
    return "ND-Adam", "Adam"


def _adasam(data, mode):
    for b, runs in zip(data["batches"], data["speed"].values()):
        for run in runs:
            rate = -0.5 if mode != "refuted" else 0.5
            norm = math.sqrt(b ** (2 * rate) * (1 + 0.01 * run["seed"]))
            late = data["iterations"]                 # records after the burn-in count
            run["history"]["grad_norm"] = [[1, late], [norm * 100, norm]]
    for runs in data["runs"].values():
        _set(runs, "final_test_acc", [0.5, 0.51])
    return "AdaSAM", "SAM"


def _sala(data, mode):
    _set(data["runs"]["SALA"], "passes_per_step", [1.1, 1.2] if mode != "refuted" else [1.5, 1.5])
    return "SALA", "SAM"


def _gallery(data, mode):
    for run in data["runs"]["SGD"]:
        run["extra"].update(lambda_max_lanczos=2.0, density_top_node=2.01,
                            line_min_at_centre=True, plane_min_at_centre=mode != "refuted")
    if mode == "undecided":
        data["runs"]["SGD"][0]["extra"]["density_top_node"] = 3.0
    return None, None


def _eos(data, mode):
    """Every ratio curve reaches 0.9 and sits at 1.05 after it, the raw sharpness of Adam
    rising (0.3 and falling when refuted); when undecided seed 0's runs never reach 0.9 (a
    run stopped before the sharpening refutes nothing)."""
    from figures.adaptive_eos import ratio_key
    for name, by_lr in data["runs"].items():
        data["initial_lambda_max"] = {k: [0.1] * len(v)
                                      for k, v in data["initial_lambda_max"].items()}
        for runs in by_lr.values():
            for run in runs:
                never = mode == "undecided" and run["seed"] == 0
                late = 0.3 if mode == "refuted" else 0.5 if never else 1.05
                reach = 0.5 if never else 0.95
                run["history"][ratio_key(name)] = [[1, 2, 3, 4], [0.1, reach, late, late]]
                raw = [1.0, 1.0, 0.5, 0.5] if mode == "refuted" else [1.0, 1.0, 2.0, 3.0]
                run["history"]["lambda_max"] = [[1, 2, 3, 4], raw]
    return None, None


CONSTRUCT = {"agd_switching": _agd, "wsam_sharpness": _wsam, "ndadam_direction": _ndadam,
             "adasam_convergence": _adasam, "sala_overhead": _sala,
             "landscape_gallery": _gallery, "adaptive_eos": _eos}


@pytest.mark.parametrize("name", REPRODUCTIONS)
def test_each_rule_returns_each_verdict(tiny, name):
    out, _ = tiny
    module = importlib.import_module(f"figures.{name}")
    saved, _ = load(out, name)
    for mode in VERDICTS:
        data = copy.deepcopy(saved)
        better, worse = CONSTRUCT[name](data, mode)
        if better is not None:          # an accuracy comparison: clearly ahead, or a coin flip
            _set(data["runs"][better], "final_test_acc", [0.70, 0.71])
            _set(data["runs"][worse], "final_test_acc",
                 [0.60, 0.61] if mode != "undecided" else [0.50, 0.90])
        _, checks = module.rule(data)
        assert combine(checks) == mode, (name, mode, {k: c["verdict"] for k, c in checks.items()})


def test_reproduction_pages_and_images_come_from_the_committed_run(capsys):
    """The docs' reproduction pages show the committed run: each page's verdicts, checks and
    figure are read from ``figures/results`` when the site is built (docs/hooks.py)."""
    results = ROOT / "figures" / "results"
    main(["--table", "--markdown", "--out", str(results)])
    table = capsys.readouterr().out
    summary = json.loads((results / "summary.json").read_text())
    for name in REPRODUCTIONS:
        page = (ROOT / "docs" / "reproductions" / f"{name}.md").read_text()
        assert f"<!-- sharpscape:reproduction {name} -->" in page
        assert f"`{name}`" in table and (results / summary[name]["figure"]).exists()


class FakeRunner:
    """Validation accuracy peaked at lr = ``peak`` (log scale), no training."""

    def __init__(self, peak: float):
        self.size = figures.harness.SIZES["quick"]
        self.peak, self.calls = peak, []

    def run(self, jobs):
        self.calls += jobs
        return [{"final_val_acc": -abs(math.log10(j.params["lr"] / self.peak))} for j in jobs]


@pytest.mark.parametrize("grid, peak, extended", [([0.01, 0.1], 1.0, [0.01, 0.1, 1.0, 10.0]),
                                                   ([0.01, 0.1], 1e-3, [1e-4, 1e-3, 0.01, 0.1]),
                                                   ([0.01, 0.1, 1.0], 0.1, [0.01, 0.1, 1.0])])
def test_search_extends_a_grid_past_an_edge_optimum(grid, peak, extended):
    runner = FakeRunner(peak)
    found = search(runner, {"lr": grid}, lambda p, s: job("test", "x", "SGD", s, p))
    assert found.axes["lr"] == pytest.approx(extended) and found.best["lr"] == pytest.approx(peak)
    assert found.interior == {"lr": True}
    assert len(set(runner.calls)) == runner.size.select_seeds * len(extended)   # each point once


def test_a_subset_job_trains_full_batch_on_the_first_samples():
    """``subset=n`` with ``batch_size=n``: one full-batch GD step on the first n training
    samples, and the Tracker's lambda_max is that of the loss on those n samples."""
    import torch
    from analysis import top_eigenvalues
    from figures.harness import CROSS_ENTROPY, SIZES, execute, mlp, split
    size, n, lr = SIZES["tiny"], 64, 0.5
    result = execute(job("test", "GD", "SGD", 0, {"lr": lr, "momentum": 0.0}, batch_size=n,
                         steps=1, schedule="constant", subset=n, track=("lambda_max",)), size)
    data = split(size)
    batch = [(data.x[:n], data.y[:n])]
    model = mlp(size, 0)
    loss = CROSS_ENTROPY(model, batch[0])
    assert result["curves"]["train_loss"] == [pytest.approx(float(loss.detach()), rel=1e-6)]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= lr * g
    eig = top_eigenvalues(model, CROSS_ENTROPY, batch, k=1, which="LA", tol=1e-3,
                          max_hvp=size.lanczos_max_hvp, seed=0, progress=False)
    assert result["history"]["lambda_max"][1] == [pytest.approx(float(eig.eigenvalues[0]),
                                                                rel=1e-5)]
