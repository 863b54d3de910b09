"""Curvature and sharpness of a model sharded with FSDP2 ``fully_shard``, on every rank.

Run from the repository root with

    torchrun --nproc-per-node 2 docs/examples/fsdp_sharpness.py

(gloo on CPU; NCCL when every local rank has its own GPU). Each rank holds its shard of the
parameters and its shard of MNIST-1D, with the same number of batches on every rank; every rank
gets the numbers one process would get with the unsharded model on all the data, and rank 0
prints them.
"""
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from analysis import average_sharpness, hessian_trace, mnist1d, supervised, top_eigenvalues
from landscape import plane, random_direction


def all_batches(world: int) -> list:
    """MNIST-1D in batches of 128, one batch per rank (each rank takes ``[rank::world]``).

    Args:
        world: The number of ranks.

    Returns:
        ``world`` batches ``(x, y)``.
    """
    return mnist1d().batches(128, limit=128 * world)


def make_model() -> nn.Sequential:
    """The MLP, with the same random weights on every rank (seed 0).

    Returns:
        A 40-32-32-10 ReLU MLP (2,698 parameters).
    """
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def main() -> None:
    """Shard the MLP over the ranks; print its top eigenvalues, trace, sharpness and a plane."""
    cuda = (torch.cuda.is_available() and "LOCAL_RANK" in os.environ
            and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        shard = [(x.to(device), y.to(device)) for x, y in all_batches(world)[rank::world]]
        model = make_model().to(device)
        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)            # one FSDP unit per layer
        fully_shard(model, mesh=mesh)                    # and the root
        loss_fn = supervised(nn.CrossEntropyLoss())

        eig = top_eigenvalues(model, loss_fn, shard, k=2, tol=1e-4, progress=False)
        trace = hessian_trace(model, loss_fn, shard, n_hvp=16, seed=0, progress=False)
        avg = average_sharpness(model, loss_fn, shard, sigma=0.1, n_samples=8, seed=0,
                                progress=False)
        d1, d2 = random_direction(model, seed=1), random_direction(model, seed=2)
        grid = torch.linspace(-0.5, 0.5, 3)
        surface = plane(model, loss_fn, shard, d1, d2, grid, grid, progress=False)
        if rank == 0:                                    # every rank has the same numbers
            print(f"world size {world}, parameters: {type(model[0].weight).__name__} shards")
            print("top eigenvalues:", " ".join(f"{v:.6g}" for v in eig.eigenvalues))
            print(f"hessian trace: {trace.estimate:.6g} +- {trace.stderr:.6g}")
            print(f"average sharpness: {avg.value:.6g} +- {avg.stderr:.6g}")
            print("plane losses:", " ".join(f"{v:.6g}" for v in surface.losses.ravel()))
        dist.barrier()  # leave together: tearing gloo down while a peer still uses it can abort
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
