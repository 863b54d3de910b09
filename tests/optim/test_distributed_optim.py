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
from torch.nn.parallel import DistributedDataParallel as DDP

import optim
from tests.optim.reference import (GROUP, RefSGD, Softmax, assert_trajectories_close, batch, grad,
                                   initial, norm, param_groups, run_model)
from tests.ranks import spawn

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
    """SAM or decoupled WSAM over SGD(momentum 0.9), each rank perturbing with its local
    gradient."""
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


def m_sharpness_gradient(theta, i: int, per_tensor_norm: bool = False):
    """Mean over ranks of the gradient at theta + rho g_r / ||g_r||, g_r the rank's own gradient
    (the norm over all parameters, or per tensor: SALA's per-group norm with one tensor per
    group)."""
    tilde = []
    for r in range(WORLD):
        g_r = grad(theta, shard(i, r))
        n = {k: float(g_r[k].norm()) if per_tensor_norm else norm(g_r) for k in g_r}
        tilde.append(grad({k: theta[k] + RHO * g_r[k] / (n[k] + 1e-12) for k in theta},
                          shard(i, r)))
    return mean(tilde)


def reference_adasam(steps: int, betas=(0.9, 0.999), eps=1e-8) -> list:
    """AdaSAM's Algorithm 1 run in one process on both shards (defaults of optim.AdaSAM)."""
    theta, out = initial(), []
    m = {k: torch.zeros_like(v) for k, v in theta.items()}
    v = {k: torch.zeros_like(t) for k, t in theta.items()}
    v_hat = {k: torch.full_like(t, eps ** 2) for k, t in theta.items()}
    for i in range(steps):
        s = m_sharpness_gradient(theta, i)
        for k in theta:
            m[k] = betas[0] * m[k] + (1 - betas[0]) * s[k]
            v[k] = betas[1] * v[k] + (1 - betas[1]) * s[k] ** 2
            v_hat[k] = torch.maximum(v_hat[k], v[k])
        theta = {k: theta[k] - LRS[GROUP[k]] * m[k] / v_hat[k].sqrt() for k in theta}
        out.append(theta)
    return out


def reference_sala(steps: int, k: int = 2, alpha: float = 0.8) -> list:
    """SALA (the authors' algorithm) over SGD(momentum 0.9) in one process: plain gradients on the
    union of the shards, SAM gradients with each rank's own perturbation."""
    theta, base, phi, dist_, out = initial(), RefSGD(LRS, momentum=0.9), None, 0.0, []
    for s in range(1, steps + 1):
        g = grad(theta, batch(s - 1))
        if s % k == 0:
            if dist_ < RHO:
                g = m_sharpness_gradient(theta, s - 1, per_tensor_norm=True)
            theta = dict(phi)
        theta = base.step(theta, g)
        if s % k == k - 1:
            phi = phi or dict(theta)
            dist_ = (1 - alpha) * norm({n: theta[n] - phi[n] for n in theta})
            phi = {n: phi[n] + alpha * (theta[n] - phi[n]) for n in phi}
            theta = dict(phi) if dist_ < RHO else theta
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
        return model, optim.WSAM(torch.optim.SGD(groups, momentum=0.9), rho=RHO,
                                 gamma=GAMMA, model=model)
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
        for kind, want in (("AdaSAM", reference_adasam(5)), ("SALA", reference_sala(7))):
            model, opt = build(kind)
            got = run_model(opt, model, len(want), data=lambda i: shard(i, rank))
            assert_same_on_all_ranks(model)
            assert_trajectories_close(got, want)
        del model, opt  # release the DDP reducers before the group goes away
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_sam_family_m_sharpness(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    spawn(_worker, (str(tmp_path / "rendezvous"),), nprocs=WORLD)
