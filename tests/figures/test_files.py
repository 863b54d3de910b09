"""The files of ``python -m figures``: a broken file is never presented as a result.

Damaged files (truncated, missing, replaced) are recomputed or redone, an unreadable summary.json
is rebuilt from the intact saved data or refused in one line by ``--table``; symbolic links in
``--out`` are replaced, never written through; and a run SIGKILLed at random moments, then rerun,
leaves every file readable and every verdict that of a complete computation.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

import figures.__main__ as cli
import figures.harness
from analysis.core import temporaries
from figures.__main__ import main
from figures.report import files_of

ROOT = Path(__file__).resolve().parents[2]
NAME = "sala_overhead"               # among the fastest reproductions at the tiny size
RUN = [NAME, "--tiny", "--jobs", "1", "--out"]


def deterministic(summary: dict) -> dict:
    """``summary`` without wall times and checksums (the saved data records its wall time)."""
    return {n: {k: v for k, v in e.items() if k not in ("seconds", "files")}
            for n, e in summary.items()}


def no_training(*args, **kwargs):
    raise AssertionError("trained a model")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("done")
    return out, main([*RUN, str(out)])


@pytest.fixture
def out(done, tmp_path):
    """A copy of a finished tiny run of NAME."""
    copy = tmp_path / "out"
    shutil.copytree(done[0], copy)
    return copy


@pytest.fixture
def frozen(monkeypatch):
    """Training fails the test."""
    monkeypatch.setattr(figures.harness, "execute", no_training)
    monkeypatch.setattr(cli, "execute", no_training)


def refusal(argv) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = stop.value.code
    assert isinstance(message, str) and "\n" not in message and message.startswith("figures: ")
    return message


def readable(out: Path) -> None:
    """Every file the job writes that is in ``out`` reads completely."""
    for path in out.iterdir():
        if path.name.endswith(".json"):
            json.loads(path.read_text())
        elif path.suffix == ".npz":
            with np.load(path) as npz:
                [npz[k] for k in npz.files]
        elif path.suffix == ".png":
            assert imread(path).size > 0


def test_a_truncated_summary_is_rebuilt_from_the_saved_data(done, out, frozen, capsys):
    summary = out / "summary.json"
    summary.write_bytes(summary.read_bytes()[:300])
    message = refusal(["--table", "--out", str(out)])
    assert str(summary) in message and f"python -m figures --replot --out {out}" in message
    rebuilt = main([*RUN, str(out)])
    assert deterministic(rebuilt) == deterministic(done[1])
    printed = capsys.readouterr().out
    assert "rebuilding it from the saved" in printed and "unchanged, skipped" in printed
    summary.write_text("[1, 2]")
    assert deterministic(main(["--replot", "--out", str(out)])) == deterministic(done[1])
    main(["--table", "--out", str(out)])


@pytest.mark.parametrize("damage", ["truncate", "remove", "replace"])
def test_damaged_saved_data_is_recomputed_never_skipped(done, out, capsys, damage):
    npz = out / f"{NAME}.npz"
    if damage == "truncate":
        npz.write_bytes(npz.read_bytes()[:15])
    elif damage == "remove":
        npz.unlink()
    else:
        np.savez(npz, other=np.zeros(2))
    table = refusal(["--table", "--out", str(out)])
    replot = refusal(["--replot", "--out", str(out)])
    for message in (table, replot):
        assert str(npz) in message and f"python -m figures {NAME} --tiny --out {out}" in message
    capsys.readouterr()
    again = main([*RUN, str(out)])
    printed = capsys.readouterr().out
    assert "unchanged" not in printed and f"{npz}" in printed and "recomputing" in printed
    assert deterministic(again) == deterministic(done[1])
    readable(out)
    main(["--table", "--out", str(out)])


def test_a_damaged_figure_is_redrawn_from_the_intact_saved_data(done, out, frozen, capsys):
    png = out / f"{NAME}.png"
    png.write_bytes(png.read_bytes()[:1000])
    assert str(png) in refusal(["--table", "--out", str(out)])
    again = main([*RUN, str(out)])
    assert "redoing its verdict and figure" in capsys.readouterr().out
    assert deterministic(again) == deterministic(done[1]) and imread(png).size > 0
    main(["--table", "--out", str(out)])


def test_symlinks_in_out_are_replaced_never_written_through(done, out, tmp_path):
    outside = tmp_path / "published"
    outside.mkdir()
    for name in ("summary.json", *files_of(NAME)):      # links to valid files of each kind
        shutil.copy(out / name, outside / name)
        (out / name).unlink()
        (out / name).symlink_to(outside / name)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    assert "symbolic link" in refusal(["--table", "--out", str(out)])
    assert deterministic(main([*RUN, str(out)])) == deterministic(done[1])
    assert deterministic(main([*RUN, str(out), "--force"])) == deterministic(done[1])
    for name in before:
        assert not (out / name).is_symlink() and (out / name).is_file()
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before
    (out / "summary.json").unlink()
    (out / "summary.json").symlink_to(outside / "summary.json")
    main(["--replot", "--out", str(out)])
    assert not (out / "summary.json").is_symlink()
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


def test_out_may_be_a_symlink_to_a_folder(done, out, tmp_path, frozen):
    link = tmp_path / "link"
    link.symlink_to(out)
    assert main([*RUN, str(link)]) == done[1]
    main(["--replot", "--out", str(link)])
    assert link.is_symlink() and (out / "summary.json").is_file()


def test_leftover_temporaries_are_ignored_and_removed(done, out, frozen):
    left = [out / ".summary.json.abcd1234.tmp", out / f".{NAME}.npz.k9x_2zzq.tmp"]
    for path in left:
        path.write_bytes(b"garbage")
    main(["--table", "--out", str(out)])
    assert main([*RUN, str(out)]) == done[1]
    assert temporaries(out) == [] and not any(p.exists() for p in left)


def test_a_second_writer_in_the_same_folder_is_refused(out, frozen):
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert "another" in refusal([*RUN, str(out)])
        assert "another" in refusal(["--replot", "--out", str(out)])
    finally:
        os.close(fd)


def test_the_command_line_refuses_in_one_line_without_a_traceback(out):
    summary = out / "summary.json"
    summary.write_bytes(summary.read_bytes()[:100])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "figures", "--table", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert str(summary) in proc.stderr and "--replot" in proc.stderr


# -- killed at random moments ---------------------------------------------------------------
class Forked:
    """``tests.figures.forked``: ``python -m figures`` commands in forked processes."""

    def __init__(self, tmp_path: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = tmp_path / "log"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.figures.forked", NAME],
                                     cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def __call__(self, argv: list[str], kill_after: float | None = None,
                 kill_at_fsync: int | None = None) -> dict:
        command = {"argv": argv, "log": str(self.log), "kill_after": kill_after,
                   "kill_at_fsync": kill_at_fsync}
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        answer["output"] = self.log.read_text()
        if not answer["killed"]:
            assert "Traceback" not in answer["output"], answer["output"]
        return answer

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def forked(tmp_path_factory):
    """One server of forked runs for the kill tests (it starts in seconds, a fork in none)."""
    server = Forked(tmp_path_factory.mktemp("forked"))
    yield server
    server.close()


def recovers(run: Forked, out: Path, expected: dict, replot: bool = True) -> None:
    """A rerun, ``--replot`` and ``--table`` in ``out`` succeed, and every verdict is that of
    ``expected`` (an uninterrupted run's summary)."""
    for argv in ([*RUN, str(out)], ["--replot", "--out", str(out)])[:1 + replot]:
        assert run(argv)["status"] == 0
        summary = json.loads((out / "summary.json").read_text())
        assert deterministic(summary) == deterministic(expected)
    table = run(["--table", "--out", str(out)])
    assert table["status"] == 0 and f"`{NAME}`" in table["output"]
    assert expected[NAME]["verdict"] in table["output"]
    readable(out)
    assert temporaries(out) == []


@pytest.mark.slow
def test_runs_killed_at_random_moments_leave_complete_files(forked, tmp_path):
    """At least 12 SIGKILLs at seeded random moments of reruns, forced reruns and --replot,
    each followed by a check that every file reads; then a rerun, --replot and --table all
    succeed, and every verdict is that of an uninterrupted run."""
    rng = random.Random(27)
    reference, out = tmp_path / "reference", tmp_path / "out"
    first = forked([*RUN, str(reference)])
    assert first["status"] == 0
    commands = [[*RUN, str(out)], [*RUN, str(out), "--force"], ["--replot", "--out", str(out)]]
    kills = 0
    for _ in range(60):
        out.mkdir(exist_ok=True)
        answer = forked(rng.choice(commands), kill_after=rng.uniform(0.0, first["seconds"]))
        kills += answer["killed"]
        assert answer["killed"] or answer["status"] in (0, 1), answer
        if answer["status"] == 1:                 # a refusal: one line, naming the fix
            last = answer["output"].strip().splitlines()[-1]
            assert last.startswith("figures: ") and "python -m figures" in last, last
        readable(out)
        if kills >= 12:
            break
    assert kills >= 12
    recovers(forked, out, json.loads((reference / "summary.json").read_text()))


@pytest.mark.slow
def test_a_run_killed_before_and_after_each_rename_recovers(forked, tmp_path):
    """A forced rerun SIGKILLed at its n-th fsync for n = 1, 2, ... (before and after the
    rename of each of the four files it writes), each time followed by a rerun and --table
    that succeed with the verdicts of an uninterrupted run (then --replot too)."""
    out = tmp_path / "out"
    assert forked([*RUN, str(out)])["status"] == 0
    expected = json.loads((out / "summary.json").read_text())
    n = 0
    while True:
        n += 1
        answer = forked([*RUN, str(out), "--force"], kill_at_fsync=n)
        readable(out)
        if not answer["killed"]:
            break
        recovers(forked, out, expected, replot=False)
    assert answer["status"] == 0 and n == 2 * 4 + 1       # npz, json, png, summary.json
    recovers(forked, out, expected)
