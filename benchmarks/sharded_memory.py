"""Peak memory per rank of the curvature routines on an FSDP2 (``fully_shard``) model, 1-4 ranks.

A stack of ``--units`` residual MLP blocks (``Linear(d, d)`` + tanh, ``d = --width``) and a
linear head, float32, each block and the root wrapped by ``fully_shard`` (``reshard_after_forward``
on) over 1, 2 and 4 gloo ranks on the CPU (``torch.multiprocessing``, one torch thread per rank);
the ``--samples`` samples of a random classification problem are split evenly between the ranks
(one batch each). On every rank, for each of

* one Hessian-vector product (``ShardedOperator.matmat`` of one row, after a first product that
  builds the operator's caches),
* ``top_eigenvalues(k=1)`` and ``top_eigenvalues(k=10)`` (Lanczos, the default ``max_basis``,
  ``max_hvp=--max-hvp``: enough for the basis to fill and restart once),

the peak of live torch CPU allocations during the call beyond those at its start
(``harness.live_peak``: the profiler's allocation events, each free paired with its allocation by
address, since gloo's worker threads release collective buffers unrecorded; blind to the C
allocator's slack and to memory outside torch, e.g. gloo's own buffers), in multiples of the
full parameter vector's bytes ``P`` (``n x 4``), the largest over the ranks. Beside it, the
target of issue 24: the parameter-sized vectors the routine keeps, divided by the world size,
plus one unit's gathered weights ``U / P``:

* HVP: the vector, the gradient (kept for the second backward) and the product: ``3 / W + U/P``;
* Lanczos: the basis (``max_basis`` rows) plus the pending block, the product and the gradient:
  ``(max_basis + 3) / W + U/P``.

    python benchmarks/sharded_memory.py [--out FILE.json]

``--quick``: a small model and budget: a smoke test, not figures.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import live_peak, Recorder, parse, parser  # noqa: E402

K_VALUES = (1, 10)


class Block(nn.Module):
    """``x + tanh(W x + b)``: one FSDP unit."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


def build(args) -> nn.Module:
    """The model, the same on every rank (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(*[Block(args.width) for _ in range(args.units)],
                         nn.Linear(args.width, 10))


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def measure(rank: int, world: int, args) -> dict:
    """This rank's peaks, in bytes, and the sizes they are measured in."""
    import analysis
    from analysis.lanczos import default_max_basis
    from analysis.sharded import ShardedOperator
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build(args)
    n = sum(p.numel() for p in model.parameters())
    unit = max(sum(p.numel() for p in b.parameters()) for b in model)
    mesh = init_device_mesh("cpu", (world,))
    for block in list(model)[:-1]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.samples, args.width, generator=gen)
    y = torch.randint(0, 10, (args.samples,), generator=gen)
    per = args.samples // world
    data = [(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])]
    op = ShardedOperator(model, loss_fn, data, progress=False)
    v = op.space.randn(1, torch.Generator().manual_seed(2), like=op.like)
    op.matmat(v)  # first product: caches (sample counts) built outside the measurement
    out = {"n": n, "unit": unit, "n_local": op.space.n_local,
           "hvp": live_peak(lambda: op.matmat(v))}
    q = dict(progress=False, max_hvp=args.max_hvp, check_deterministic=False)
    for k in K_VALUES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the budget is cut on purpose
            out[f"k{k}"] = live_peak(lambda: analysis.top_eigenvalues(model, loss_fn, data, k=k,
                                                                      **q))
        out[f"basis{k}"] = default_max_basis(n, k, 1, torch.float32)
    return out


def _rank(rank: int, world: int, init: str, out_dir: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    try:
        result = measure(rank, world, args)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # leave together
    finally:
        dist.destroy_process_group()


def run_world(world: int, args) -> list[dict]:
    """``measure`` on ``world`` gloo ranks; the ranks' results."""
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        mp.spawn(_rank, args=(world, init, tmp, args), nprocs=world, join=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def summarise(world: int, ranks: list[dict]) -> dict:
    """Peaks in parameter vectors (the largest over the ranks) and the targets."""
    first = ranks[0]
    P, u = 4 * first["n"], first["unit"] / first["n"]
    row = {"world": world, "n": first["n"], "unit_fraction": u,
           "n_local": [r["n_local"] for r in ranks]}
    row["hvp"] = max(r["hvp"] for r in ranks) / P
    row["hvp_target"] = 3 / world + u
    for k in K_VALUES:
        row[f"k{k}"] = max(r[f"k{k}"] for r in ranks) / P
        row[f"k{k}_target"] = (first[f"basis{k}"] + 3) / world + u
        row[f"k{k}_basis"] = first[f"basis{k}"]
    row["per_rank_bytes"] = ranks
    return row


def main() -> None:
    """Each world size in its own set of processes; print the table."""
    p = parser(__doc__)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--units", type=int, default=3)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--max-hvp", type=int, default=40)
    args = parse(p, quick={"width": 128, "max_hvp": 12})
    run = Recorder("sharded_memory", args)
    rows = []
    print("ranks | HVP (target) | k=1 (target) | k=10 (target), in parameter vectors",
          flush=True)
    for world in args.worlds:
        row = summarise(world, run_world(world, args))
        rows.append(row)
        print(f"{world} | {row['hvp']:.2f} ({row['hvp_target']:.2f}) | {row['k1']:.2f} "
              f"({row['k1_target']:.2f}) | {row['k10']:.2f} ({row['k10_target']:.2f})  "
              f"n={row['n']}, U/P={row['unit_fraction']:.3f}", flush=True)
    run.write(rows)


if __name__ == "__main__":
    main()
