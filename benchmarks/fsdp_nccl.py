"""FSDP2 on GPUs with NCCL: the optimizers and the Hessian of a sharded model against one process.

The gloo tests (``tests/optim/test_fsdp.py``, ``tests/analysis/test_sharded.py``) on CUDA ranks:

* every optimizer of ``tests/optim/test_fsdp.py`` (fused and eager), 3 steps of a float64 MLP
  sharded by ``fully_shard`` on the GPUs, each rank passing its half of every batch, against one
  process on the CPU on the whole batch (1e-9);
* SAM with a ``torch.amp.GradScaler("cuda")`` whose second step overflows on the last rank only:
  every rank skips that step (the overflow flag all-reduced on the GPU: NCCL refuses CPU tensors);
* ``top_eigenvalues`` of the float64 MLP of ``tests/analysis/sharded_problems.py``, exact and by
  finite differences (``hvp_method="finite_difference"``), against the one-process eigenvalue on
  all the data (1e-8 and 1e-5 relative).

Each check prints ``ok`` or ``FAIL`` on rank 0; the exit status is 1 when any failed. Without a
GPU the same checks run with gloo on the CPU (a dry run of the script).

    python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/fsdp_nccl.py \
        [--optimizers SAM NDAdam ...]

(``benchmarks/cuda_checks.sh nccl`` runs it, on 2 GPUs when there are, else on 1.)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
from analysis import top_eigenvalues  # noqa: E402
from tests.analysis.sharded_problems import case  # noqa: E402
from tests.optim.test_fsdp import (batch, build, CASES, full, overflow_on_last_rank,  # noqa: E402
                                   reference, TOL)


def shard(model, units, mesh):
    """``fully_shard`` each unit, then the root."""
    for unit in units:
        fully_shard(unit, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def optimizers(rank, world, device, mesh, names) -> dict[str, bool]:
    """Each optimizer's 3 sharded steps equal one process's (the full parameters, 1e-9)."""
    out = {}
    for name in names:
        make = CASES[name]
        model = build().to(device)
        model = shard(model, [model[0], model[2]], mesh)
        opt = make(model.parameters(), model)
        want, ok = reference(name)[0], True
        for i, ref in enumerate(want):
            x, y = (t.to(device) for t in batch(i, rank, world))

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            ok &= all(torch.allclose(full(p).cpu(), r, rtol=0, atol=TOL)
                      for p, r in zip(model.parameters(), ref))
        out[f"optimizer {name}"] = ok
    return out


def grad_scaler(rank, world, device, mesh, names) -> dict[str, bool]:
    """SAM + GradScaler: an overflow on the last rank skips step 2 on every rank."""
    model = build().to(device)
    model = shard(model, [model[0], model[2]], mesh)
    opt = CASES["SAM"](model.parameters(), model)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10)
    after, _ = overflow_on_last_rank(model, opt, scaler, rank, world, device)
    skipped = all(torch.equal(a, b) for a, b in zip(*after))
    return {"GradScaler overflow on one rank skips the step everywhere":
            skipped and scaler.get_scale() == 2.0 ** 9 and opt.n_steps == 1}


def hessian(rank, world, device, mesh, names) -> dict[str, bool]:
    """Exact and finite-difference top eigenvalue of the sharded MLP against one process."""
    build_mlp, loss_fn, units, data, _ = case("mlp")
    plain = top_eigenvalues(build_mlp(), loss_fn, data, k=1, tol=1e-10, progress=False)
    top = float(plain.eigenvalues[0])
    mine = [(x.to(device), y.to(device)) for x, y in data][rank::world]
    if len(data) % world:
        raise SystemExit(f"{len(data)} batches do not divide over {world} ranks")
    model = build_mlp().to(device)
    model = shard(model, units(model), mesh)
    exact = top_eigenvalues(model, loss_fn, mine, k=1, tol=1e-10, progress=False)
    fd = top_eigenvalues(model, loss_fn, mine, k=1, tol=1e-8, progress=False,
                         hvp_method="finite_difference")
    record = fd.metadata["hvp"]
    return {"exact top eigenvalue (1e-8)": abs(exact.eigenvalues[0] - top) <= 1e-8 * abs(top),
            "finite-difference top eigenvalue (1e-5)":
            abs(fd.eigenvalues[0] - top) <= 1e-5 * abs(top)
            and record["hvp_method"] == "finite_difference"
            and record["relative_error_estimate"] < 1e-4}


def main() -> None:
    """Run the checks on every rank; rank 0 prints them."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", nargs="+", default=list(CASES), choices=list(CASES),
                   metavar="NAME", help="the cases of tests/optim/test_fsdp.py (default all)")
    names = p.parse_args().optimizers
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()   # without a GPU: gloo on the CPU (a dry run of the script)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    try:
        results = {}
        for check in (optimizers, grad_scaler, hessian):
            results.update(check(rank, world, device, mesh, names))
        flags = torch.tensor([float(v) for v in results.values()], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)   # a check fails if it fails on any rank
        if rank == 0:
            where = torch.cuda.get_device_name(device) if cuda else "CPU"
            print(f"{dist.get_backend()}, {world} rank(s), {where}")
            for (name, _), flag in zip(results.items(), flags.tolist()):
                print(f"{'ok  ' if flag else 'FAIL'} {name}")
        failed = not bool(flags.min())
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
