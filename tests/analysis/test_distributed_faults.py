"""One rank's failure is raised on every rank with that rank's cause (two gloo ranks on CPU):
never a hang until the process group's timeout, never "connection reset by peer" or a
collective mismatch in the next routine, never a product summed from different vectors; a
rank that gets no answer raises within the library's timeout."""
import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn import functional as F

from analysis import hessian_trace, HessianOperator, mean_loss, top_eigenvalues
from analysis.core import set_collective_timeout
from tests.oracles import classification_data, mlp, uneven_batches
from tests.ranks import spawn

SHARDS = ([0, 1, 2], [3])


def all_data():
    return uneven_batches(*classification_data(n=23, d=6), (7, 3, 9, 4))


def failing(rank: int):
    """A cross-entropy loss that raises on rank 1 at its first call only.

    Products are vectorized: one call per batch and pass, so rank 1 (one batch) fails in its
    first pass, after the guard's all-reduce and before the pass's own.
    """
    count = [0]

    def loss(model, batch):
        count[0] += 1
        if rank == 1 and count[0] == 1:
            raise RuntimeError("boom on rank 1")
        return F.cross_entropy(model(batch[0]), batch[1])
    return loss


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def attempt(call) -> str:
    """``""`` on success, else the error's type and message."""
    try:
        call()
        return ""
    except Exception as err:  # noqa: BLE001 (the test records whatever is raised)
        return f"{type(err).__name__}: {err}"


def scenarios(rank: int, shard, out: dict) -> None:
    """Errors caught and carried on: each rank records what it got."""
    model = mlp()
    # a failure in the middle of a routine, then the next routine on every rank
    out["eig"] = attempt(lambda: top_eigenvalues(model, failing(rank), shard, max_hvp=4,
                                                 check_deterministic=False, progress=False))
    out["next"] = mean_loss(model, ce, shard, progress=False)
    # a loop over products that catches one rank's error: never a product of mixed vectors
    n = sum(p.numel() for p in model.parameters())
    vs = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    op, products = HessianOperator(model, failing(rank), shard, check_deterministic=False), []
    for v in vs:   # rank 1 fails in the first product only
        try:
            products.append(op.matvec(v).tolist())
        except Exception as err:  # noqa: BLE001
            products.append(f"{type(err).__name__}: {err}")
    out["products"] = products
    # different routines on the two ranks
    out["different"] = attempt(lambda: hessian_trace(model, ce, shard, n_hvp=4, progress=False)
                               if rank == 0 else mean_loss(model, ce, shard, progress=False))


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=40))
    set_collective_timeout(30.0)  # above any pass of a loaded CPU, below the group's timeout
    shard, got = [all_data()[i] for i in SHARDS[rank]], {}
    scenarios(rank, shard, got)
    # rank 1 fails in a routine and leaves: rank 0 gets its cause, not "connection reset"
    got["left"] = attempt(lambda: hessian_trace(mlp(), failing(rank), shard, n_hvp=4,
                                                check_deterministic=False, progress=False))
    if rank == 0:  # rank 1 is gone: no answer within the library's timeout
        set_collective_timeout(2.0)
        start = time.monotonic()
        got["alone"] = attempt(lambda: mean_loss(mlp(), ce, shard, progress=False))
        got["alone_s"] = time.monotonic() - start
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(got, fh)
    if rank == 1:
        time.sleep(4.0)   # stays in the group past rank 0's timeout, then exits without a word
    os._exit(0)   # the process group is unusable after a timeout


def test_one_ranks_failure_is_raised_on_every_rank_with_its_cause(tmp_path):
    spawn(_worker, (2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    model, data = mlp(), all_data()
    assert got[1]["eig"] == "RuntimeError: boom on rank 1"
    assert got[0]["eig"].startswith("RankError: rank 1 failed: RuntimeError: boom on rank 1")
    for r in range(2):
        assert abs(got[r]["next"] - mean_loss(model, ce, data, progress=False)) < 1e-12
    n = sum(p.numel() for p in model.parameters())
    vs = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    op = HessianOperator(model, ce, data)
    assert got[1]["products"][0] == "RuntimeError: boom on rank 1"
    assert got[0]["products"][0].startswith("RankError: rank 1 failed: RuntimeError: boom")
    for r in range(2):
        for i in (1, 2):
            product = torch.tensor(got[r]["products"][i], dtype=torch.float64)
            assert torch.allclose(product, op.matvec(vs[i]), rtol=1e-10, atol=1e-12), (r, i)
        assert got[r]["different"].startswith("RankError: the ranks reached different")
    assert got[1]["left"] == "RuntimeError: boom on rank 1"
    assert got[0]["left"].startswith("RankError: rank 1 failed: RuntimeError: boom on rank 1")
    assert got[0]["alone"].startswith("RankError: rank 0: the header collective did not "
                                      "complete: no answer from the other ranks within 2.0 s")
    assert got[0]["alone_s"] < 10
