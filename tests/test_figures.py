"""``python -m figures`` at the tiny size: summary.json structure, PNGs, saved data, determinism."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from figures.__main__ import REPRODUCTIONS, main

REQUIRED_MEASURED = {"agd_switching": "mean_sgd_fraction", "wsam_sharpness": "lambda_max",
                     "sala_overhead": "passes_per_step"}


def deterministic(entry):
    """The entry without wall-time measurements (the only numbers allowed to vary)."""
    if isinstance(entry, dict):
        return {k: deterministic(v) for k, v in entry.items() if k != "timing"}
    return entry


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    threads = torch.get_num_threads()
    summary = main(["--tiny", "--out", str(out), "--threads", "1"])
    assert torch.get_num_threads() == threads          # the caller's setting is restored
    return out, summary


def test_summary_structure_and_files(tiny):
    out, summary = tiny
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert set(REPRODUCTIONS) <= set(summary)
    for name in REPRODUCTIONS:
        entry = summary[name]
        assert set(entry) >= {"claim", "measured", "holds", "figure"}, name
        assert isinstance(entry["claim"], str) and entry["claim"].endswith("."), name
        assert entry["holds"] in (True, False), (name, entry.get("reason"))
        checks = entry["measured"]["checks"]
        assert checks and entry["holds"] == all(checks.values()), name
        png = out / entry["figure"]
        assert png.suffix == ".png" and png.stat().st_size > 20_000, name
        meta = json.loads((out / f"{name}.json").read_text())
        assert {"seed", "config", "versions"} <= set(meta), name
        with np.load(out / f"{name}.npz") as arrays:
            assert sorted(arrays.files) == sorted(meta["arrays"]), name
        assert list((out / "logs").glob(f"{name}_*.csv")), name


def test_required_measurements(tiny):
    _, summary = tiny
    for name, key in REQUIRED_MEASURED.items():
        assert summary[name]["measured"][key], name
    fractions = summary["agd_switching"]["measured"]["mean_sgd_fraction"]
    assert len(fractions) >= 3 and all(0.0 <= v <= 1.0 for v in fractions.values())
    assert {"SGD", "SAM", "WSAM"} <= set(summary["wsam_sharpness"]["measured"]["lambda_max"])
    passes = summary["sala_overhead"]["measured"]["passes_per_step"]
    assert passes["SGD"] == 1.0 and passes["SAM"] == 2.0 and 1.0 < passes["SALA"] < 2.0


def test_rerun_gives_identical_numbers(tiny, tmp_path):
    out, summary = tiny
    names = ["agd_switching", "sala_overhead"]
    again = main(["--tiny", "--out", str(tmp_path), "--threads", "1", *names])
    for name in names:
        assert deterministic(again[name]) == deterministic(summary[name]), name


def test_one_name_updates_an_existing_summary(tiny, tmp_path):
    out, summary = tiny
    (tmp_path / "summary.json").write_text((out / "summary.json").read_text())
    again = main(["--tiny", "--out", str(tmp_path), "--threads", "1", "adasam_convergence"])
    assert set(REPRODUCTIONS) <= set(again)
    assert deterministic(again["adasam_convergence"]) == deterministic(summary["adasam_convergence"])


def test_table_lists_every_reproduction(tiny, capsys):
    out, summary = tiny
    assert main(["--table", "--out", str(out)]) == json.loads((out / "summary.json").read_text())
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + len(REPRODUCTIONS)
    for name, line in zip(REPRODUCTIONS, lines[2:]):
        assert f"`{name}`" in line and summary[name]["claim"] in line
        assert line.rstrip(" |").endswith("yes" if summary[name]["holds"] else "**no**")


def test_unknown_name_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        main(["nope", "--out", str(tmp_path)])
