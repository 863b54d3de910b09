"""The SAM family under DistributedDataParallel: two gloo processes on CPU (loopback only).

Each rank holds half of every batch. The first pass runs under ``no_sync()`` so each rank perturbs
with its own gradient (m-sharpness); the plain gradient is averaged; the second pass is averaged
by DDP. The expected step is computed here by hand from both shards.
"""
from __future__ import annotations

import datetime
import gc

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import optim
from optim_reference import (GROUP, RefSGD, Softmax, assert_trajectories_close, batch, grad, initial, norm,
                             param_groups, run_model)

WORLD = 2
LRS = (0.3, 0.1)
RHO, GAMMA, STEPS = 0.1, 0.8, 4


def shard(i: int, rank: int):
    x, y = batch(i)
    half = len(y) // WORLD
    return x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]


def mean(dicts):
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in dicts[0]}


def reference(kind: str, m_sharpness: bool = True) -> list:
    """SAM or decoupled WSAM over SGD(momentum 0.9), each rank perturbing with its local gradient."""
    theta, base, out = initial(), RefSGD(LRS, momentum=0.9), []
    a = GAMMA / (1 - GAMMA)
    for i in range(STEPS):
        shards = [shard(i, r) for r in range(WORLD)]
        local = [grad(theta, s) for s in shards]
        g = mean(local)
        tilde = []
        for g_r, s in zip(local, shards):
            direction = g_r if m_sharpness else g
            n = norm(direction)
            tilde.append(grad({k: theta[k] + RHO * direction[k] / (n + 1e-12) for k in theta}, s))
        g_tilde = mean(tilde)
        if kind == "SAM":
            theta = base.step(theta, g_tilde)
        else:
            stepped = base.step(theta, g)
            theta = {k: stepped[k] - LRS[GROUP[k]] * a * (g_tilde[k] - g[k]) for k in theta}
        out.append(theta)
    return out


def assert_same_on_all_ranks(model) -> None:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], t) for t in gathered[1:])


def build(kind: str):
    model = DDP(Softmax())
    groups = param_groups(model.module, *LRS)
    if kind == "SAM":
        return model, optim.SAM(torch.optim.SGD(groups, momentum=0.9), rho=RHO, model=model)
    if kind == "WSAM":
        return model, optim.WSAM(torch.optim.SGD(groups, momentum=0.9), rho=RHO, gamma=GAMMA, model=model)
    if kind == "AdaSAM":
        return model, optim.AdaSAM(groups, rho=RHO, model=model)
    return model, optim.SALA(torch.optim.SGD(groups, momentum=0.9), k=2, rho=RHO, model=model)


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for kind in ("SAM", "WSAM"):
            model, opt = build(kind)
            got = run_model(opt, model, STEPS, data=lambda i: shard(i, rank))
            assert_same_on_all_ranks(model)
            assert_trajectories_close(got, reference(kind))
            global_perturbation = reference(kind, m_sharpness=False)
            assert not torch.allclose(got[-1]["W"], global_perturbation[-1]["W"], rtol=1e-6, atol=0)
        for kind in ("AdaSAM", "SALA"):
            model, opt = build(kind)
            run_model(opt, model, 5, data=lambda i: shard(i, rank))
            assert_same_on_all_ranks(model)
        del model, opt  # release the DDP reducers before the group goes away
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_sam_family_m_sharpness(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
