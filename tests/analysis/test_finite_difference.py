"""Finite-difference Hessian-vector products (analysis.finite_difference) against the exact
Hessian: step rule, Richardson, error estimate, bit-exact restoration, eigenvalues."""
import math
import os
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from analysis import hessian_trace, HessianOperator, top_eigenvalues
from analysis.core import preserved
from analysis.finite_difference import fd_matmat, fd_step, FiniteDifference
from analysis.lanczos import lanczos
from tests.oracles import (assert_unchanged, classification_data, exact_hessian, mlp, snapshot,
                           uneven_batches)


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def setup(dtype=torch.float64):
    model = mlp(dtype=dtype)
    x, y = classification_data(n=23, d=6)
    return model, uneven_batches(x.to(dtype), y)


def products(model, data, vs, **options):
    params = list(model.parameters())
    fd = FiniteDifference(params, **options)
    with preserved(model, "eval", weights=False, trainable=params):
        out = fd_matmat(fd, model, ce, data, vs)
    return out, fd


def vectors(n, k=3, dtype=torch.float64):
    return torch.randn(k, n, generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.mark.parametrize("richardson", [True, False])
def test_float64_products_match_the_exact_hessian(richardson):
    model, data = setup()
    H = exact_hessian(model, ce, data)
    vs = vectors(H.shape[0])
    got, fd = products(model, data, vs, richardson=richardson)
    exact = vs @ H
    err = (got - exact).norm(dim=1) / exact.norm(dim=1)
    assert err.max() < (1e-9 if richardson else 1e-8)
    # the estimate is conservative: at least the true error of every product
    true = (got - exact).norm(dim=1)
    assert all(e >= t for e, t in zip(fd.errors, true.tolist()))
    meta = fd.metadata()
    assert meta["hvp_method"] == "finite_difference" and meta["n_products"] == 3
    assert meta["relative_error_estimate"] < 1e-5
    w = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in model.parameters()))
    assert meta["step"] == pytest.approx(fd_step(torch.float64, w, float(vs[-1].norm()),
                                                 richardson))


def test_the_step_rule():
    eps = torch.finfo(torch.float32).eps
    assert fd_step(torch.float32, 3.0, 2.0, richardson=False) == pytest.approx(eps ** (1 / 3) * 2)
    assert fd_step(torch.float32, 3.0, 2.0, richardson=True) == pytest.approx(eps ** 0.2 * 2)
    assert fd_step(torch.float32, 3.0, 2.0) == fd_step(torch.float32, 3.0, 2.0, False)
    with pytest.raises(ValueError, match="vector_norm"):
        fd_step(torch.float32, 3.0, 0.0)


def test_float32_products_and_the_estimate():
    model, data = setup(torch.float32)
    H = exact_hessian(setup()[0], ce, setup()[1])
    vs = vectors(H.shape[0])
    exact = vs @ H
    for richardson, bound in ((True, 1e-3), (False, 1e-2)):
        got, fd = products(model, data, vs.float(), richardson=richardson)
        err = ((got.double() - exact).norm(dim=1) / exact.norm(dim=1)).max()
        assert err < bound, (richardson, float(err))
        assert max(fd.relative_errors) >= err


def test_a_fixed_step_and_no_estimate():
    model, data = setup()
    H = exact_hessian(model, ce, data)
    vs = vectors(H.shape[0], k=1)
    got, fd = products(model, data, vs, richardson=False, estimate_error=False, step=1e-5)
    assert torch.allclose(got, vs @ H, rtol=1e-7, atol=1e-9)
    assert fd.steps == [1e-5] and fd.metadata()["error_estimate"] is None
    # a large fixed step gives a visibly biased product, and the estimate says so
    got, fd = products(model, data, vs, richardson=False, step=0.03)
    err = float((got - vs @ H).norm())
    assert err > 1e-2 and fd.errors[0] >= err


def test_weights_are_restored_bit_exactly():
    model, data = setup()
    model.train()
    next(model.parameters()).grad = torch.ones_like(next(model.parameters()))
    before = snapshot(model)
    n = sum(p.numel() for p in model.parameters())
    products(model, data, vectors(n, k=2) * 1e3)
    assert_unchanged(model, before)

    def broken(model, batch):
        if model[0].weight.detach().sub(before["params"]["0.weight"]).abs().max() > 0:
            raise RuntimeError("boom")
        return ce(model, batch)

    fd = FiniteDifference(list(model.parameters()))
    with pytest.raises(RuntimeError, match="boom"):
        with preserved(model, "eval", weights=False):
            fd_matmat(fd, model, broken, data, vectors(n, k=1))
    assert_unchanged(model, before)


def test_zero_vector_is_refused():
    model, data = setup()
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="nonzero"):
        products(model, data, torch.zeros(1, n, dtype=torch.float64))


def test_top_eigenvalue_within_1e5_of_the_exact_one():
    model, data = setup()
    H = exact_hessian(model, ce, data)
    exact = torch.linalg.eigvalsh(H).flip(0)[:2]
    params = list(model.parameters())
    fd = FiniteDifference(params)
    with preserved(model, "eval", weights=False, trainable=params):
        theta = lanczos(lambda vs: fd_matmat(fd, model, ce, data, vs), H.shape[0], 2, tol=1e-8,
                        like=H)[0]
    assert torch.allclose(theta, exact, rtol=1e-5, atol=0)
    assert fd.metadata()["relative_error_estimate"] < 1e-4


def test_the_routines_take_hvp_method_finite_difference():
    model, data = setup()
    before = snapshot(model)
    H = exact_hessian(model, ce, data)
    exact = torch.linalg.eigvalsh(H).flip(0)[:2].numpy()
    got = top_eigenvalues(model, ce, data, k=2, tol=1e-8, hvp_method="finite_difference",
                          progress=False)
    np.testing.assert_allclose(got.eigenvalues, exact, rtol=1e-5, atol=0)
    record = got.metadata["hvp"]
    assert record["hvp_method"] == "finite_difference" and record["step"] > 0
    assert 0 < record["relative_error_estimate"] < 1e-4
    assert got.metadata["config"]["hvp_method"] == "finite_difference"
    assert "versions" in got.metadata
    assert "hvp" not in top_eigenvalues(model, ce, data, progress=False).metadata  # the default
    trace = hessian_trace(model, ce, data, n_hvp=12, seed=2, hvp_method="finite_difference",
                          progress=False)
    reference = hessian_trace(model, ce, data, n_hvp=12, seed=2, progress=False)
    assert trace.estimate == pytest.approx(reference.estimate, rel=1e-6)
    assert trace.metadata["hvp"]["n_products"] > 0
    assert_unchanged(model, before)


def test_the_operator_with_richardson_and_its_batch_product():
    model, data = setup()
    H = exact_hessian(model, ce, data)
    vs = vectors(H.shape[0], k=2)
    op = HessianOperator(model, ce, data, hvp_method="finite_difference", fd_richardson=True)
    torch.testing.assert_close(op.matmat(vs), vs @ H, rtol=1e-8, atol=1e-10)
    assert op.product_metadata()["hvp"]["richardson"] is True
    Hb = exact_hessian(model, ce, data[:1])
    with op:
        torch.testing.assert_close(op.batch_product(data[0], vs.T).T, vs @ Hb, rtol=1e-8,
                                   atol=1e-10)
    assert op.product_metadata()["hvp"]["n_products"] == 2  # a batch's part is not recorded
    with pytest.raises(ValueError, match="hvp_method"):
        HessianOperator(model, ce, data, hvp_method="finite_differences")


def _ddp_worker(rank, world, init, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        model, data = setup()
        shard = data[:3] if rank == 0 else data[3:]  # 19 and 4 samples
        vs = vectors(sum(p.numel() for p in model.parameters()))
        out = {}
        for name, m in (("plain", model), ("ddp", DistributedDataParallel(mlp()))):
            op = HessianOperator(m, ce, shard, hvp_method="finite_difference")
            out[name] = op.matmat(vs).numpy()
            out[name + "_error"] = np.array(op.fd.errors)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **out)
    finally:
        dist.destroy_process_group()


def test_ranks_with_data_shards_and_ddp_give_the_one_process_product(tmp_path):
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)),
             nprocs=2, join=True)
    model, data = setup()
    H = exact_hessian(model, ce, data)
    exact = (vectors(H.shape[0]) @ H).numpy()
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for name in ("plain", "ddp"):
            err = np.linalg.norm(got[name] - exact, axis=1)
            assert (err <= got[name + "_error"]).all()
            assert (err / np.linalg.norm(exact, axis=1) < 1e-8).all()
