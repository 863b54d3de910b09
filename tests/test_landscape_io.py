"""Saving, loading and resuming surfaces; the distributed grid (two gloo processes)."""
import os
import socket

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from landscape import interpolate, line, load_result, plane, random_direction, save_result
from oracles import classification_data, mlp, uneven_batches
from test_surface import quad_loss, quadratic_problem
from test_surface import ce as CE

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
    with pytest.raises(Interrupt):  # 3 batches per chunk: dies in the third chunk
        plane(model, counting(limit=7), data, d1, d2, XS, YS, chunk_size=2, progress=False,
              path=path, check_deterministic=False)
    partial = load_result(path)
    assert np.isfinite(partial.losses).sum() == 4 and not partial.metadata["complete"]
    np.testing.assert_array_equal(partial.losses.reshape(-1)[:4], full.losses.reshape(-1)[:4])
    resumed_fn = counting()
    resumed = plane(model, resumed_fn, data, d1, d2, XS, YS, chunk_size=2, progress=False,
                    path=path, check_deterministic=False)
    assert resumed_fn.calls == 4 * 3  # the 8 unfinished points in 4 chunks, 3 batches each
    np.testing.assert_array_equal(resumed.losses, full.losses)
    again = counting()
    plane(model, again, data, d1, d2, XS, YS, chunk_size=2, progress=False, path=path,
          check_deterministic=False)
    assert again.calls == 0
    done = load_result(path)
    assert done.metadata["complete"] and done.n_forward == 12 * 3
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
    inter = interpolate(model, other, CE, data, [0.25, 0.75], path=tmp_path / "i.npz", progress=False)
    back = load_result(tmp_path / "i.npz")
    np.testing.assert_array_equal(back.alphas, [0.25, 0.75])
    np.testing.assert_array_equal(back.losses, inter.losses)
    assert back.barrier == inter.barrier and back.loss_b == inter.loss_b


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
    mp.spawn(_worker, args=(port, str(tmp_path), x, y, dict(d1), dict(d2)), nprocs=2)
    for rank in (0, 1):
        got = np.load(tmp_path / f"r{rank}.npy")
        np.testing.assert_allclose(got[0], want, rtol=1e-12)
        np.testing.assert_allclose(got[1], want, rtol=1e-12)
    assert (tmp_path / "data0.npz").exists() and not (tmp_path / "data1.npz").exists()
    assert not (tmp_path / "grid1.npz").exists()
