"""Two gloo processes on CPU, each with its own (uneven) shard, give the one-process result;
an empty shard joins in; arguments that differ between ranks raise on every rank."""
import json
import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from analysis import (average_sharpness, evaluate, FisherOperator, full_grad_norm, GGNOperator,
                      HessianOperator, hessian_trace, mean_loss, spectral_density, supervised,
                      top_eigenvalues, worst_case_sharpness)
from landscape import line, plane, random_direction
from landscape.points import _activation_bytes
from tests.oracles import classification_data, cnn_bn, uneven_batches
from tests.ranks import spawn

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
    spawn(_worker, (2, init, str(tmp_path)))
    single = analyse(all_data())
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for key, value in single.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-8, atol=1e-12, err_msg=key)


def analyse_more(data) -> dict:
    """One call of every reduction of the package: the operator, a solver, loss evaluations."""
    model = cnn_bn(12)
    d = random_direction(model, seed=2)
    v = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(5))
    worst = worst_case_sharpness(model, ce, data, rho=0.1, steps=2, progress=False)
    # memory for 2 points at the smallest first batch (4 samples, rank 1's) but 1 at 7 samples:
    # every rank must size its chunks for the largest batch, or they make different passes
    weights = 3 * sum(t.numel() * t.element_size() for t in d.values())
    memory = 2 * (weights + _activation_bytes(model, ce, all_data()[3])[0])
    return {"hvp": HessianOperator(model, ce, data).matmat(v).numpy(),
            "ggn": GGNOperator(model, supervised(F.cross_entropy), data).matmat(v).numpy(),
            "eig": top_eigenvalues(model, ce, data, tol=1e-8, progress=False).eigenvalues,
            "trace": np.array(hessian_trace(model, ce, data, n_hvp=8, progress=False).estimate),
            "mean_loss": np.array(mean_loss(model, ce, data, progress=False)),
            "evaluate": np.array(evaluate(model, ce, data, progress=False)),
            "grad_norm": np.array(full_grad_norm(model, ce, data, progress=False)),
            "line": line(model, ce, data, d, [-0.5, 0.5], progress=False).losses,
            "chunks": line(model, ce, data, d, [-0.5, 0.0, 0.5], max_memory=memory,
                           progress=False).losses,
            "plane": plane(model, ce, data, d, d, [0.5], [0.0, 1.0], progress=False).losses,
            "average": np.array(average_sharpness(model, ce, data, n_samples=2,
                                                  progress=False).value),
            "worst": np.array([worst.value, worst.loss]),
            "m_sharpness": np.array(worst_case_sharpness(model, ce, data, rho=0.1, steps=2, m=5,
                                                         progress=False).value)}


def _guard_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        model, shard = cnn_bn(12), [all_data()[i] for i in SHARDS[rank]]
        errors = {}
        calls = {
            "seed": lambda: hessian_trace(model, ce, shard, n_hvp=4, seed=rank, progress=False),
            "direction": lambda: line(model, ce, shard, random_direction(model, seed=rank),
                                      [0.5], progress=False),
            # rank 1 alone passes a shuffled drop_last loader (4 samples, batches of 3)
            "determinism": lambda: top_eigenvalues(
                model, ce, shard if rank == 0 else DataLoader(
                    TensorDataset(*shard[0]), batch_size=3, shuffle=True, drop_last=True,
                    generator=torch.Generator().manual_seed(0)),
                max_hvp=3, progress=False),
            # rank 1 alone passes one batch where the iterable of batches belongs
            "one_batch": lambda: hessian_trace(model, ce, shard if rank == 0 else shard[0],
                                               n_hvp=4, progress=False),
        }
        for key, call in calls.items():
            try:
                call()
                errors[key] = ""
            except ValueError as err:
                errors[key] = str(err)
        with open(os.path.join(out, f"errors{rank}.json"), "w") as fh:
            json.dump(errors, fh)
        # rank 1's shard is empty: the result is that of rank 0's shard, all the data
        np.savez(os.path.join(out, f"empty{rank}.npz"),
                 **analyse_more(all_data() if rank == 0 else []))
    finally:
        dist.destroy_process_group()


def test_mismatched_arguments_raise_on_every_rank_and_an_empty_shard_joins(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    spawn(_guard_worker, (2, init, str(tmp_path)))
    errors = [json.loads((tmp_path / f"errors{r}.json").read_text()) for r in range(2)]
    # the refusing rank says why, the other that it was refused; no rank is left waiting
    assert errors[1].pop("one_batch").startswith("data must be an iterable of batches, got a "
                                                 "tuple of tensors")
    assert errors[0].pop("one_batch").startswith("another rank's arguments or data were refused")
    assert errors[0] == errors[1]  # the same error on every rank
    assert errors[0]["seed"].startswith("seed must be the same on every rank")
    assert errors[0]["direction"].startswith("direction must be the same on every rank")
    assert errors[0]["determinism"].startswith("data must give the same batches on every pass")
    assert "shuffled DataLoader" in errors[0]["determinism"]
    single = analyse_more(all_data())
    for rank in range(2):
        got = np.load(tmp_path / f"empty{rank}.npz")
        for key, value in single.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-8, atol=1e-12, err_msg=key)
