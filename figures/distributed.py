"""Distributed example: train with WSAM under DistributedDataParallel, then analyse the solution.

Run with ``torchrun --nproc_per_node=2 -m figures.distributed`` (gloo on CPU, NCCL on GPU).
Each rank holds its shard of MNIST-1D; every analysis call all-reduces over ranks, so every rank
prints the numbers one process would get on all the data. Only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from analysis import (average_sharpness, hessian_trace, mnist1d, supervised, top_eigenvalues)
from analysis.core import write_json
from landscape import plane, random_direction
from optim import WSAM


def shard(batches: list, rank: int, world: int) -> list:
    """Round-robin split of a list of batches (uneven shards are fine)."""
    return batches[rank::world]


def main(argv: list[str] | None = None) -> dict:
    """Train with WSAM under DistributedDataParallel on every rank, then analyse the solution.

    Args:
        argv: The command-line arguments (``--steps``, ``--out``); None reads ``sys.argv``.

    Returns:
        The numbers (top eigenvalues, trace, average sharpness, plane values), the same on every
        rank; rank 0 also writes them to ``--out``.
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="figures/out/distributed.json")
    args = parser.parse_args(argv)

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if backend == "nccl"
                          else "cpu")
    try:
        data = mnist1d()
        train = shard(data.batches(128, shuffle_seed=0), rank, world)
        analysis_data = shard(data.batches(250, limit=1000), rank, world)
        torch.manual_seed(0)  # the same initial weights on every rank
        model = nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 10)).to(device)
        ddp = DistributedDataParallel(model)
        loss_fn = supervised(nn.CrossEntropyLoss())
        opt = WSAM(torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9), rho=0.05, gamma=0.9,
                   model=ddp)
        for step in range(args.steps):
            batch = train[step % len(train)]

            def closure():
                opt.zero_grad()
                loss = loss_fn(ddp, batch)
                loss.backward()
                return loss

            opt.step(closure)
        # Analysis runs on the plain module; data_mean all-reduces over the ranks' shards.
        eig = top_eigenvalues(model, loss_fn, analysis_data, k=3, progress=rank == 0)
        tr = hessian_trace(model, loss_fn, analysis_data, n_hvp=99, seed=0, progress=False)
        avg = average_sharpness(model, loss_fn, analysis_data, sigma=0.01, n_samples=16, seed=0,
                                progress=False)
        d1, d2 = (random_direction(model, seed=s) for s in (1, 2))
        grid = torch.linspace(-1, 1, 11)
        surf = plane(model, loss_fn, analysis_data, d1, d2, grid, grid, progress=False)
        result = {"world_size": world, "top_eigenvalues": eig.eigenvalues.tolist(),
                  "trace": tr.estimate, "trace_stderr": tr.stderr,
                  "average_sharpness": avg.value, "plane_min": float(surf.losses.min()),
                  "plane_center": float(surf.losses[5, 5])}
        if rank == 0:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            write_json(args.out, result, indent=2)
            print(json.dumps(result, indent=2))
        return result
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
