"""``tests.ranks.spawn``, the ranks of the distributed tests: each rank gets its rank, the
caller's environment, working directory and output; ranks have their own string-hash seeds; a
rank that raises, dies or outlives the timeout fails the call with its cause, and the next call
works."""
import json
import os
import signal
import time

import pytest

from tests.ranks import RanksFailed, spawn


def _report(rank, out):
    print(f"rank {rank} speaking", flush=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "cwd": os.getcwd(), "hash": hash("sharpscape"),
                   "env": os.environ.get("RANKS_TEST")}, f)


def _fail(rank, out):
    with open(os.path.join(out, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    if rank == 1:
        time.sleep(0.5)
        raise ValueError("rank 1 fails on purpose")
    time.sleep(600)


def _die(rank):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)


def _sleep(rank):
    time.sleep(600)


def test_each_rank_gets_the_callers_settings_and_its_own_hash_seed(tmp_path, monkeypatch,
                                                                    capfd):
    monkeypatch.setenv("RANKS_TEST", "yes")
    monkeypatch.chdir(tmp_path)
    spawn(_report, (str(tmp_path),))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(g["env"] == "yes" and g["cwd"] == str(tmp_path) for g in got)
    assert len({g["pid"] for g in got} | {os.getpid()}) == 3
    if os.environ.get("PYTHONHASHSEED", "random") == "random":
        assert len({g["hash"] for g in got}) == 2
    assert capfd.readouterr().out.count("speaking") == 2


def test_a_failure_fails_the_call_with_its_cause_and_kills_the_other_ranks(tmp_path):
    began = time.monotonic()
    with pytest.raises(RanksFailed, match="(?s)rank 1 exited with status 1.*on purpose"):
        spawn(_fail, (str(tmp_path),))
    with pytest.raises(RanksFailed, match="rank 1 was killed by signal 9"):
        spawn(_die)
    with pytest.raises(RanksFailed, match="did not finish within 0.5 s"):
        spawn(_sleep, timeout=0.5)
    assert time.monotonic() - began < 60
    with pytest.raises(ProcessLookupError):        # the sleeping rank 0 was killed
        os.kill(int((tmp_path / "pid0").read_text()), 0)
    spawn(_report, (str(tmp_path),))               # and the next call works
    assert (tmp_path / "rank1.json").is_file()
