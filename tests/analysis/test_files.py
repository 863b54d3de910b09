"""The one atomic writer (``analysis.core.files``): a unique temporary in the target's folder,
fsync, ``os.replace``; a killed writer leaves the old complete file; a symbolic link at the
target is replaced, never written through; ``save_result`` goes through it."""
import json
import os
import signal
import stat

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import analysis
from analysis.core import files as core_files
from analysis.core import (atomic_write, file_sha256, read_regular, remove_temporaries,
                           temporaries, write_bytes, write_figure, write_json, write_npz,
                           write_text)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def killed_while_writing(path, write) -> int:
    """Fork a child that calls ``write(path)`` and is SIGKILLed at the fsync of the temporary
    (everything written, nothing renamed yet); its exit status."""
    pid = os.fork()
    if pid == 0:                                    # the child: never returns
        try:
            core_files.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
            write(path)
        finally:
            os._exit(3)                             # the write survived the kill: a failure
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_writes_a_complete_file_with_the_usual_permissions_and_no_leftover(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write(path, lambda fh: fh.write(b"one"))
    write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and os.listdir(tmp_path) == ["a.bin"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask()
    write_text(tmp_path / "t.txt", "é")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "é"
    write_json(tmp_path / "j.json", {"x": [1, 2]}, indent=1)
    assert json.loads((tmp_path / "j.json").read_text()) == {"x": [1, 2]}
    write_npz(tmp_path / "n.npz", {"a": [1.0, 2.0]})
    with np.load(tmp_path / "n.npz") as f:
        np.testing.assert_array_equal(f["a"], [1.0, 2.0])
    fig = Figure()
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1])
    write_figure(fig, tmp_path / "f.png", dpi=20)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert temporaries(tmp_path) == []


def test_the_temporary_is_fsynced_in_the_target_folder_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(core_files.os, "fsync",
                        lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(core_files.os, "replace",
                        lambda a, b: events.append(("replace", a, b)) or real_replace(a, b))
    write_bytes(tmp_path / "x", b"data")
    (_, synced), (_, src, dst) = events[:2]
    assert synced == src and os.path.dirname(src) == str(tmp_path) and dst == str(tmp_path / "x")
    assert os.path.basename(src).startswith(".x.") and src.endswith(".tmp")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"old": 1})

    def half(fh):
        fh.write(b'{"new": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half)
    with pytest.raises(TypeError):
        write_json(path, {"x": object()})
    assert json.loads(path.read_text()) == {"old": 1} and os.listdir(tmp_path) == ["a.json"]
    with pytest.raises(FileNotFoundError):
        write_bytes(tmp_path / "missing" / "a", b"")
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        write_bytes(tmp_path / "d", b"")
    assert sorted(os.listdir(tmp_path)) == ["a.json", "d"]


def test_a_kill_leaves_the_old_complete_file_and_a_temporary_that_can_be_removed(tmp_path):
    path = tmp_path / "a.npz"
    write_npz(path, {"x": np.arange(3)})
    old = path.read_bytes()
    assert killed_while_writing(path, lambda p: write_npz(p, {"x": np.arange(10 ** 5)})) == -9
    assert path.read_bytes() == old
    left = temporaries(tmp_path)
    assert len(left) == 1 and os.path.basename(left[0]).startswith(".a.npz.")
    assert temporaries(tmp_path, ["other.npz"]) == []
    assert remove_temporaries(tmp_path, ["a.npz"]) == left and os.listdir(tmp_path) == ["a.npz"]


def test_save_result_is_atomic(tmp_path):
    path = tmp_path / "r.npz"
    analysis.save_result(analysis.TraceResult(1.0, 0.1, 4, "hutch++", np.zeros(2)), path)
    new = analysis.TraceResult(2.0, 0.2, 8, "hutch++", np.ones(10 ** 5))
    assert killed_while_writing(path, lambda p: analysis.save_result(new, p)) == -9
    assert analysis.load_result(path).estimate == 1.0
    remove_temporaries(tmp_path)
    assert os.listdir(tmp_path) == ["r.npz"]


@pytest.mark.parametrize("kind", ["bytes", "json", "npz", "png", "result"])
def test_a_symlink_at_the_target_is_replaced_and_its_target_untouched(tmp_path, kind):
    outside, out = tmp_path / "outside", tmp_path / "out"
    outside.mkdir()
    out.mkdir()
    target = outside / "precious"
    target.write_bytes(b"precious content")
    link = out / f"file.{ 'png' if kind == 'png' else 'npz' }"
    link.symlink_to(target)
    fig = Figure()
    FigureCanvasAgg(fig)
    write = {"bytes": lambda: write_bytes(link, b"new"),
             "json": lambda: write_json(link, [1]),
             "npz": lambda: write_npz(link, {"a": [1]}),
             "png": lambda: write_figure(fig, link, dpi=10),
             "result": lambda: analysis.save_result(
                 analysis.TraceResult(1.0, 0.1, 4, "hutch++", np.zeros(2)), link)}[kind]
    write()
    assert not link.is_symlink() and link.is_file()
    assert target.read_bytes() == b"precious content" and os.listdir(outside) == ["precious"]


def test_a_symlinked_folder_is_followed(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "real")
    write_bytes(tmp_path / "via" / "a", b"x")
    assert (tmp_path / "real" / "a").read_bytes() == b"x" and (tmp_path / "via").is_symlink()


def test_read_regular_never_reads_through_a_link_or_a_non_file(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert read_regular(tmp_path / "f") == b"abc"
    assert file_sha256(tmp_path / "f") == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    (tmp_path / "link").symlink_to(tmp_path / "f")
    with pytest.raises(OSError, match="symbolic link"):
        read_regular(tmp_path / "link")
    with pytest.raises(OSError, match="not a regular file"):
        read_regular(tmp_path)
    os.mkfifo(tmp_path / "fifo")                    # opening it must not block
    with pytest.raises(OSError, match="not a regular file"):
        read_regular(tmp_path / "fifo")
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "absent")
