"""Saving, loading and resuming surfaces; the distributed grid (two gloo processes)."""
import hashlib
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist

from landscape import (interpolate, line, LineResult, load_result, plane, random_direction,
                       save_result)
from landscape.results import tensors_hash
from tests.oracles import classification_data, mlp, uneven_batches
from tests.landscape.problems import ce as CE
from tests.landscape.problems import quad_loss, quadratic_problem
from tests.ranks import spawn

XS, YS = np.linspace(-1.0, 1.0, 4), np.array([-0.5, 0.0, 0.5])


class Interrupt(RuntimeError):
    pass


def counting(limit=None):
    def loss_fn(model, batch):
        loss_fn.calls += 1
        if limit is not None and loss_fn.calls > limit:
            raise Interrupt("simulated interruption")
        return quad_loss(model, batch)
    loss_fn.calls = 0
    return loss_fn


def test_interrupted_plane_resumes_without_recomputing(tmp_path):
    model, data, _, d1, d2 = quadratic_problem()
    path = tmp_path / "plane.npz"
    full = plane(model, quad_loss, data, d1, d2, XS, YS, chunk_size=2, progress=False)
    with pytest.raises(Interrupt):  # the probe, then 3 batches per chunk: dies in the third chunk
        plane(model, counting(limit=7), data, d1, d2, XS, YS, chunk_size=2, progress=False,
              path=path, check_deterministic=False)
    partial = load_result(path)
    assert np.isfinite(partial.losses).sum() == 4 and not partial.metadata["complete"]
    np.testing.assert_array_equal(partial.losses.reshape(-1)[:4], full.losses.reshape(-1)[:4])
    resumed_fn = counting()
    resumed = plane(model, resumed_fn, data, d1, d2, XS, YS, chunk_size=2, progress=False,
                    path=path, check_deterministic=False)
    assert resumed_fn.calls == 1 + 4 * 3  # the probe; the 8 unfinished points in 4 chunks
    np.testing.assert_array_equal(resumed.losses, full.losses)
    again = counting()
    plane(model, again, data, d1, d2, XS, YS, chunk_size=2, progress=False, path=path,
          check_deterministic=False)
    assert again.calls == 1  # only the probe
    done = load_result(path)
    assert done.metadata["complete"] and done.n_forward == 12 * 3 + 2  # and the 2 probes
    np.testing.assert_array_equal(done.losses, full.losses)
    with pytest.raises(ValueError, match="cannot resume"):  # other directions
        plane(model, quad_loss, data, d2, d1, XS, YS, progress=False, path=path)
    with pytest.raises(ValueError, match="cannot resume"):  # other coordinates
        plane(model, quad_loss, data, d1, d2, XS, YS + 1, progress=False, path=path)


def test_results_roundtrip_with_provenance(tmp_path):
    model = mlp()
    x, y = classification_data(n=23)
    data = uneven_batches(x, y)
    d = random_direction(model, seed=7)
    res = line(model, CE, data, d, [-1.0, 0.0, 1.0], progress=False)
    save_result(res, tmp_path / "line.npz")
    back = load_result(tmp_path / "line.npz")
    np.testing.assert_array_equal(back.losses, res.losses)
    meta = back.metadata
    assert meta["seed"] == 7 and meta["directions"][0]["normalization"] == "filter"
    assert len(meta["directions_hash"]) == 64 and meta["config"]["model_mode"] == "eval"
    assert set(meta["versions"]) == {"torch", "numpy", "sharpscape"}
    other = mlp(seed=3)
    inter = interpolate(model, other, CE, data, [0.25, 0.75], path=tmp_path / "i.npz",
                        progress=False)
    back = load_result(tmp_path / "i.npz")
    np.testing.assert_array_equal(back.alphas, [0.25, 0.75])
    np.testing.assert_array_equal(back.losses, inter.losses)
    assert back.barrier == inter.barrier and back.loss_b == inter.loss_b
    assert back.metadata["complete"] and inter.metadata["complete"]


def _worker(rank, port, out, x, y, d1, d2):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = mlp()
        shard = uneven_batches(x[:13], y[:13], (6, 7)) if rank == 0 else [(x[13:], y[13:])]
        by_data = plane(model, CE, shard, d1, d2, XS, YS, progress=False, chunk_size=3,
                        path=os.path.join(out, f"data{rank}.npz"))
        by_grid = plane(model, CE, uneven_batches(x, y), d1, d2, XS, YS, progress=False,
                        chunk_size=2, distribute="grid", path=os.path.join(out, f"grid{rank}.npz"))
        np.save(os.path.join(out, f"r{rank}.npy"), np.stack([by_data.losses, by_grid.losses]))
    finally:
        dist.destroy_process_group()


def test_distributed_plane_equals_one_process(tmp_path):
    x, y = classification_data(n=23)
    model = mlp()
    d1, d2 = random_direction(model, seed=1), random_direction(model, seed=2)
    want = plane(model, CE, [(x, y)], d1, d2, XS, YS, progress=False).losses
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(_worker, (port, str(tmp_path), x, y, dict(d1), dict(d2)))
    for rank in (0, 1):
        got = np.load(tmp_path / f"r{rank}.npy")
        np.testing.assert_allclose(got[0], want, rtol=1e-12)
        np.testing.assert_allclose(got[1], want, rtol=1e-12)
    assert (tmp_path / "data0.npz").exists() and not (tmp_path / "data1.npz").exists()
    assert not (tmp_path / "grid1.npz").exists()


def scaled(factor):
    def loss_fn(model, batch):
        return factor * quad_loss(model, batch)
    return loss_fn


def test_resume_refuses_other_data_or_loss_fn(tmp_path):
    model, data, _, d1, d2 = quadratic_problem()
    path = tmp_path / "plane.npz"
    with pytest.raises(Interrupt):  # a partial file: the probe and one chunk
        plane(model, counting(limit=4), data, d1, d2, XS, YS, chunk_size=2, progress=False,
              path=path, check_deterministic=False)
    (c0,), *rest = data
    others = {"other data": [(c0 + 0.5,), *rest], "fewer samples": data[:-1],
              "another last batch": [*data[:-1], (data[-1][0] * 2,)]}
    for other in others.values():
        with pytest.raises(ValueError, match=r"\(data \(sample count or first/last batch.*"
                                             r"differ\); remove the file or choose another path"):
            plane(model, quad_loss, other, d1, d2, XS, YS, chunk_size=2, progress=False, path=path)
    with pytest.raises(ValueError, match="loss at the origin"):
        plane(model, scaled(2.0), data, d1, d2, XS, YS, chunk_size=2, progress=False, path=path)
    with pytest.raises(ValueError, match="configuration"):
        plane(model, quad_loss, data, d1, d2, XS, YS, chunk_size=2, progress=False, path=path,
              model_mode="train")
    full = plane(model, quad_loss, data, d1, d2, XS, YS, chunk_size=2, progress=False)
    same = [(c.clone(),) for c, in data]  # equal batches in new tensors resume
    resumed = plane(model, quad_loss, same, d1, d2, XS, YS, chunk_size=2, progress=False, path=path)
    np.testing.assert_array_equal(resumed.losses, full.losses)


def test_interpolate_and_line_resumes_check_the_loss_fn(tmp_path):
    model, data, _, d1, _ = quadratic_problem()
    line(model, quad_loss, data, d1, [0.0, 1.0], progress=False, path=tmp_path / "l.npz")
    with pytest.raises(ValueError, match="loss at the origin"):
        line(model, scaled(3.0), data, d1, [0.0, 1.0], progress=False, path=tmp_path / "l.npz")
    other = {n: p.detach() + 0.1 for n, p in model.state_dict().items()}
    interpolate(model, other, quad_loss, data, [0.5], progress=False, path=tmp_path / "i.npz")
    with pytest.raises(ValueError, match="loss at the origin"):
        interpolate(model, other, scaled(3.0), data, [0.5], progress=False,
                    path=tmp_path / "i.npz")


def test_bad_paths_fail_before_any_computation(tmp_path):
    model, data, _, d1, d2 = quadratic_problem()
    fn = counting()
    quiet = dict(progress=False, check_deterministic=False)  # count the routine's own forwards
    with pytest.raises(ValueError, match="does not exist"):
        plane(model, fn, data, d1, d2, XS, YS, **quiet, path=tmp_path / "no" / "p.npz")
    with pytest.raises(ValueError, match="is a directory"):
        line(model, fn, data, d1, XS, **quiet, path=tmp_path)
    assert fn.calls == 0
    for name, content in {"corrupt.npz": b"PK\x03\x04 not a zip", "empty.npz": b"",
                          "text.npz": b"hello"}.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match="not a sharpscape result file.*remove the file"):
            plane(model, fn, data, d1, d2, XS, YS, **quiet, path=tmp_path / name)
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(ValueError, match="not a sharpscape result file"):
        line(model, fn, data, d1, XS, **quiet, path=tmp_path / "array.npy")
    foreign = tmp_path / "foreign.npz"
    line(model, quad_loss, data, d1, XS, **quiet, path=foreign)
    with pytest.raises(ValueError, match="different computation \\(kind 'line', not 'plane'"):
        plane(model, fn, data, d1, d2, XS, YS, **quiet, path=foreign)
    assert fn.calls == 0  # every path was refused before anything was computed


def test_concurrent_writers_never_share_a_temporary_file(tmp_path, monkeypatch):
    """A second writer of the same path runs while the first one is writing its temporary
    file (the interleaving of two processes, made deterministic): both must succeed."""
    path = tmp_path / "shared.npz"
    savez = np.savez

    def interleaved(file, *args, **kwargs):
        savez(file, *args, **kwargs)
        if not interleaved.done:
            interleaved.done = True
            save_result(LineResult(np.arange(3.0), np.full(3, 2.0)), path)  # the other writer

    interleaved.done = False
    monkeypatch.setattr(np, "savez", interleaved)
    save_result(LineResult(np.arange(3.0), np.full(3, 1.0)), path)
    assert interleaved.done and load_result(path).losses[0] == 1.0  # the last replace wins
    assert os.listdir(tmp_path) == ["shared.npz"]  # no temporary file left behind


def test_direction_hashes_keep_their_byte_layout():
    """Result files are matched by these digests: SHA-256 of '|' per vector, then per name (in
    order) 'name:shape;' and the float64 values in C order, on any device or dtype."""
    vectors = [{"w": torch.arange(6.0).view(2, 3).T, "b": torch.tensor([1.5], dtype=torch.float16)},
               {"s": torch.tensor(2.0, dtype=torch.float64)}]
    layout = (b"|b:(1,);" + np.array([1.5]).tobytes() + b"w:(3, 2);"
              + np.arange(6.0).reshape(2, 3).T.copy().tobytes() + b"|s:();"
              + np.array(2.0).tobytes())
    assert tensors_hash(vectors) == hashlib.sha256(layout).hexdigest()
