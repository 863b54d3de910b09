"""BatchNorm recalibration under torch.distributed (two gloo ranks on CPU): the statistics are
all-reduced, so two ranks with their shards give one process on all the data, and an empty
shard (``bn_data=[]``) joins in on every rank."""
import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F

from analysis.core import set_collective_timeout
from landscape import interpolate, recalibrate_bn
from tests.oracles import classification_data, cnn_bn, uneven_batches
from tests.ranks import spawn

SHARDS = ([0, 1, 2], [3])  # 3 batches and 1 (7, 3, 9 samples and 4)


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def all_data():
    return uneven_batches(*classification_data(n=23, d=12), (7, 3, 9, 4))


def recalibrated(data, bn_data) -> dict:
    """Interpolation losses with recalibration, and the statistics ``recalibrate_bn`` gives."""
    a, b = cnn_bn(12, seed=0), cnn_bn(12, seed=1)
    res = interpolate(a, b, ce, data, [0.25, 0.5, 0.75], bn_data=bn_data, progress=False)
    n = recalibrate_bn(a, ce, bn_data)
    stats = {f"{name}.{key}": buf.numpy() for name, m in a.named_modules()
             if isinstance(m, torch.nn.BatchNorm1d) for key, buf in m.named_buffers()}
    return {"losses": res.losses, "barrier": np.array(res.barrier), **stats,
            "n": np.array(n)}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=20))
    set_collective_timeout(10)
    try:
        shard = [all_data()[i] for i in SHARDS[rank]]
        np.savez(os.path.join(out, f"sharded{rank}.npz"), **recalibrated(shard, shard))
        # rank 1's shard is empty, for the losses and for the statistics
        mine = all_data() if rank == 0 else []
        np.savez(os.path.join(out, f"empty{rank}.npz"), **recalibrated(mine, mine))
    finally:
        dist.destroy_process_group()


def test_recalibration_on_two_ranks_is_one_process_on_all_data(tmp_path):
    spawn(_worker, (2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)))
    single = recalibrated(all_data(), all_data())
    assert single["n"] == 4
    for rank in range(2):
        for case in ("sharded", "empty"):
            got = np.load(tmp_path / f"{case}{rank}.npz")
            for key, value in single.items():
                if key != "n":  # the forward passes of this rank
                    np.testing.assert_allclose(got[key], value, rtol=1e-10, atol=1e-12,
                                               err_msg=f"{case} {key} rank {rank}")
