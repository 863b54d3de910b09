"""Two gloo processes on CPU, each with its own (uneven) shard, give the one-process result."""
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from analysis import (FisherOperator, GGNOperator, HessianOperator, hessian_trace,
                      spectral_density, supervised, top_eigenvalues)
from oracles import classification_data, cnn_bn, uneven_batches

SIZES = (7, 3, 9, 4)
SHARDS = ([0, 1, 2], [3])  # 19 and 4 samples, 3 and 1 batches


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def analyse(data) -> dict:
    model = cnn_bn(12)
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(2, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eig = top_eigenvalues(model, ce, data, k=3, tol=1e-10, progress=False)
    bottom = top_eigenvalues(model, ce, data, k=1, which="SA", tol=1e-10, progress=False)
    trace = hessian_trace(model, ce, data, n_hvp=30, seed=3, progress=False)
    slq = spectral_density(model, ce, data, n_lanczos=8, n_vectors=2, seed=1, progress=False)
    return {"hvp": HessianOperator(model, ce, data).matmat(v).numpy(),
            "eig": eig.eigenvalues, "n_hvp": np.array([eig.n_hvp, bottom.n_hvp]),
            "bottom": bottom.eigenvalues, "trace": np.array([trace.estimate, trace.stderr]),
            "nodes": slq.nodes, "weights": slq.weights, **curvatures(model, data, v)}


def curvatures(model, data, v) -> dict:
    """GGN, exact / Monte-Carlo / empirical Fisher products and a preconditioned eigenvalue."""
    loss = supervised(F.cross_entropy)
    P = torch.linspace(0.5, 2.0, v.shape[1], dtype=torch.float64)
    pre = top_eigenvalues(model, loss, data, k=2, tol=1e-10, curvature="ggn", preconditioner=P,
                          progress=False)
    return {"ggn": GGNOperator(model, loss, data).matmat(v).numpy(),
            **{f"fisher_{kind}": FisherOperator(model, loss, data, kind=kind, mc_samples=2,
                                                seed=4).matmat(v).numpy()
               for kind in ("exact", "mc", "empirical")},
            "preconditioned_ggn_eig": pre.eigenvalues}


def all_data():
    x, y = classification_data(n=23, d=12)
    return uneven_batches(x, y, SIZES)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        shard = [all_data()[i] for i in SHARDS[rank]]
        np.savez(os.path.join(out, f"rank{rank}.npz"), **analyse(shard))
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_on_all_data(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    single = analyse(all_data())
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for key, value in single.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-8, atol=1e-12, err_msg=key)
