"""FSDP2 (fully_shard) models on two gloo ranks, each with half of the data: the exact sharded
Hessian-vector product and the finite-difference one equal the unsharded one-process product on
all the data, and the model (shards, grads, modes, FSDP state) is left as found."""
import os
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F

from analysis import hessian_trace, HessianOperator, spectral_density, top_eigenvalues
from analysis.finite_difference import FiniteDifference
from analysis.sharded import is_sharded, sharded_fd_matmat, ShardedHessian
from tests.analysis.sharded_problems import assert_same_state, case, ce, shard, state
from tests import ranks

K = 2  # vectors per product


def train_step(model, loss_fn, data):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    for batch in data:
        loss_fn(model, batch).backward()
    opt.step()
    return [p.to_local().clone() for p in model.parameters()]


def vectors(n):
    return torch.randn(K, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _check_one(name, reshard, rank, out):
    build, loss_fn, units, _, shards = case(name)
    data = shards[rank]
    model, twin = shard(build(), units, reshard), shard(build(), units, reshard)
    assert is_sharded(model)
    for p in model.parameters():  # a user's gradient, which must survive
        p.grad = torch.ones_like(p)
    model.train()
    before = state(model)
    op = ShardedHessian(model, loss_fn, data)
    full = vectors(op.shape[0])
    vs = [op.distribute(v) for v in full]
    exact = op.matmat(vs)
    local = op.matmat_local(torch.stack([op.local(v) for v in vs]))
    assert torch.equal(local, torch.stack([op.local(p) for p in exact]))
    assert_same_state(before, state(model))
    fd = FiniteDifference(op.params)
    approx = sharded_fd_matmat(fd, model, loss_fn, data, vs)
    assert_same_state(before, state(model))
    for p in model.parameters():
        p.grad = None
    # a training step after the products equals one without them
    assert all(torch.equal(a, b) for a, b in zip(train_step(model, loss_fn, data),
                                                 train_step(twin, loss_fn, data)))
    key = f"{name}_{reshard}"
    out[key + "_exact"] = np.stack([torch.cat([h.full_tensor().reshape(-1) for h in p]).numpy()
                                    for p in exact])
    out[key + "_fd"] = np.stack([torch.cat([h.full_tensor().reshape(-1) for h in p]).numpy()
                                 for p in approx])
    out[key + "_fd_error"] = np.array(fd.errors)


def _worker(rank, world, init, out_dir, names):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        out = {}
        for name, reshard in names:
            _check_one(name, reshard, rank, out)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **out)
        dist.barrier()  # leave together: gloo torn down under a live peer can abort
    finally:
        dist.destroy_process_group()


def spawn(tmp_path, names):
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks.spawn(_worker, (2, init, str(tmp_path), names))
    return [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]


def reference(name):
    build, loss_fn, _, data, _ = case(name)
    model = build()
    op = HessianOperator(model, loss_fn, data)
    return op.matmat(vectors(op.shape[0])).numpy()


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_sharded_products_equal_the_unsharded_product(tmp_path, name):
    modes = (True, False) if name == "mlp" else (True,)
    results = spawn(tmp_path, [(name, r) for r in modes])
    single = reference(name)
    for got in results:
        for reshard in modes:
            key = f"{name}_{reshard}"
            np.testing.assert_allclose(got[key + "_exact"], single, rtol=0, atol=1e-12)
            err = np.linalg.norm(got[key + "_fd"] - single, axis=1)
            assert (err <= got[key + "_fd_error"]).all()
            assert (err / np.linalg.norm(single, axis=1) < 1e-6).all()


def analyse(model, loss_fn, data):
    """The routines that take a fully_shard model, as numbers comparable between processes."""
    eig = top_eigenvalues(model, loss_fn, data, k=1, tol=1e-9, progress=False)
    fd = top_eigenvalues(model, loss_fn, data, k=1, tol=1e-6, hvp_method="finite_difference",
                         v0=eig.eigenvectors, progress=False)
    trace = hessian_trace(model, loss_fn, data, n_hvp=4, seed=3, progress=False)
    slq = spectral_density(model, loss_fn, data, n_lanczos=4, n_vectors=1, seed=1,
                           progress=False)
    vectors = eig.eigenvectors
    if isinstance(vectors, list):  # sharded: DTensors placed like the parameters
        assert all(v.placements == p.placements for u in vectors
                   for v, p in zip(u, model.parameters()))
        vectors = torch.stack([torch.cat([v.full_tensor().reshape(-1) for v in u])
                               for u in vectors])
    vectors = vectors * torch.sign(vectors[:, :1])
    return {"eig": eig.eigenvalues, "vectors": vectors.numpy(), "fd_eig": fd.eigenvalues,
            "fd_error": np.array(fd.metadata["hvp"]["relative_error_estimate"]),
            "trace": np.array([trace.estimate, trace.stderr]), "nodes": slq.nodes,
            "weights": slq.weights}


def _routines_worker(rank, world, init, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        build, loss_fn, units, _, shards = case("mlp")
        out = {}
        for reshard in (False,):  # the routines' guard runs no_grad forward passes
            model = shard(build(), units, reshard)
            before = state(model)
            got = analyse(model, loss_fn, shards[rank])
            assert_same_state(before, state(model))
            out.update({f"{k}_{reshard}": v for k, v in got.items()})
            for call in (lambda: HessianOperator(model, loss_fn, shards[rank]),
                         lambda: top_eigenvalues(model, loss_fn, shards[rank],
                                                 hvp_method="forward", progress=False)):
                with pytest.raises(NotImplementedError, match="fully_shard"):
                    call()
                assert_same_state(before, state(model))
            with pytest.raises(ValueError, match="same number of batches"):  # 1 and 2 batches
                top_eigenvalues(model, loss_fn, shards[rank][:rank + 1], progress=False)
            assert_same_state(before, state(model))
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **out)
        dist.barrier()  # leave together: gloo torn down under a live peer can abort
    finally:
        dist.destroy_process_group()


def test_routines_on_a_sharded_model_give_the_one_process_answer(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks.spawn(_routines_worker, (2, init, str(tmp_path)))
    build, loss_fn, _, data, _ = case("mlp")
    single = analyse(build(), loss_fn, data)
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for reshard in (False,):
            for key in ("eig", "vectors", "trace", "nodes", "weights"):
                np.testing.assert_allclose(got[f"{key}_{reshard}"], single[key], rtol=1e-8,
                                           atol=1e-10, err_msg=key)
            np.testing.assert_allclose(got[f"fd_eig_{reshard}"], single["eig"][:1], rtol=1e-5)
            assert got[f"fd_error_{reshard}"] < 1e-4


def test_one_rank_matches_the_plain_model(one_rank):
    """On one rank FSDP2 used to give H v = 0 silently (the forward swaps in unsharded tensors)."""
    build, loss_fn, units, data, _ = case("mlp")
    model = shard(build(), units, True)
    op = ShardedHessian(model, loss_fn, data[:1])
    v = vectors(op.shape[0])[:1]
    hv = op.matmat([op.distribute(v[0])])[0]
    single = HessianOperator(build(), loss_fn, data[:1]).matmat(v)[0]
    torch.testing.assert_close(torch.cat([h.full_tensor().reshape(-1) for h in hv]), single,
                               rtol=0, atol=1e-12)
    eig = top_eigenvalues(model, loss_fn, data, k=1, tol=1e-8, progress=False)
    plain = top_eigenvalues(build(), loss_fn, data, k=1, tol=1e-8, progress=False)
    np.testing.assert_allclose(eig.eigenvalues, plain.eigenvalues, rtol=1e-10)
    assert eig.metadata["sharded"] == "fully_shard"


def refused_calls(model, loss_fn, data):
    """Routines without FSDP2 support, called on a fully_shard model (every public routine:
    test_sharded_public)."""
    import analysis

    quiet = dict(progress=False)
    return {
        "HessianOperator": lambda: analysis.HessianOperator(model, loss_fn, data),
        "GGNOperator": lambda: analysis.GGNOperator(model, loss_fn, data),
        "forward_mode": lambda: top_eigenvalues(model, loss_fn, data, hvp_method="forward",
                                                **quiet),
    }


def test_routines_without_support_refuse_a_sharded_model_untouched(one_rank):
    build, loss_fn, units, data, _ = case("mlp")
    for reshard in (True, False):
        model = shard(build(), units, reshard)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        before = state(model)
        for name, call in refused_calls(model, loss_fn, data).items():
            with pytest.raises(NotImplementedError, match="fully_shard") as info:
                call()
            assert "top_eigenvalues" in str(info.value), name  # says what does work
            assert_same_state(before, state(model))


class _Aliased(torch.nn.Module):
    """A module registered under two names (``self.alias = self.block``, as T5's ``shared``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = torch.nn.Linear(5, 5).double()
        self.alias = self.block
        self.head = torch.nn.Linear(5, 3).double()

    def forward(self, x):
        return self.head(torch.tanh(self.alias(torch.tanh(self.block(x)))))


def test_aliased_module_keeps_its_own_parameters_in_the_sharded_product(one_rank):
    """Issue 31: the unit's forward swapped the gathered weights in with
    ``_reparametrize_module(tie_weights=True)``, which restored the aliased slot to the
    gathered tensor: after the forward the copy's ``block.weight`` was a plain tensor (the full
    weight kept alive). Through ``own_call`` the loss_fn sees the parameter again."""
    build = _Aliased
    mesh = init_device_mesh("cpu", (1,))
    model = fully_shard(build(), mesh=mesh)  # one unit holding both names of block
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    seen = []

    def loss_fn(m, batch):
        out = F.cross_entropy(m(batch[0]), batch[1])
        seen.append(type(m.block.weight).__name__ + "/" + type(m.alias.weight).__name__)
        return out

    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    before = state(model)
    op = ShardedHessian(model, loss_fn, data)
    v = vectors(op.shape[0])
    hv = op.matmat([op.distribute(u) for u in v])
    assert_same_state(before, state(model))
    assert set(seen) == {"DTensor/DTensor"}, seen
    single = HessianOperator(build(), ce, data).matmat(v)
    got = torch.stack([torch.cat([h.full_tensor().reshape(-1) for h in p]) for p in hv])
    torch.testing.assert_close(got, single, rtol=0, atol=1e-12)
