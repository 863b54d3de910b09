"""Finite-difference Hessian-vector products (analysis.finite_difference) against the exact
Hessian: step rule, Richardson, error estimate, bit-exact restoration, eigenvalues."""
import copy
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from analysis import hessian_trace, HessianOperator, top_eigenvalues
from analysis.core import preserved
from analysis.finite_difference import fd_matmat, fd_step, FiniteDifference, refined_step
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
    # the step is the pilot rule's times a power of two (the refinement of the module docstring)
    pilot = fd_step(torch.float64, w, float(vs[-1].norm()))
    shift = math.log2(pilot / meta["step"])
    assert shift == pytest.approx(round(shift), abs=1e-9) and -3 <= round(shift) <= 12
    assert meta["gradients"] >= 4 * 3 + 4 and meta["noise_level"] > 0


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


def _ddp_products(rank):
    model, data = setup()
    shard = data[:3] if rank == 0 else data[3:]  # 19 and 4 samples
    vs = vectors(sum(p.numel() for p in model.parameters()))
    out = {}
    for name, m in (("plain", model), ("ddp", DistributedDataParallel(mlp()))):
        op = HessianOperator(m, ce, shard, hvp_method="finite_difference")
        out[name] = op.matmat(vs).numpy()
        out[name + "_error"] = np.array(op.fd.errors)
    return out


def test_ranks_with_data_shards_and_ddp_give_the_one_process_product(tmp_path):
    from tests.analysis.sharded_problems import run_ranks

    ranks = run_ranks(tmp_path, _ddp_products)
    model, data = setup()
    H = exact_hessian(model, ce, data)
    exact = (vectors(H.shape[0]) @ H).numpy()
    for got in ranks:
        for name in ("plain", "ddp"):
            err = np.linalg.norm(got[name] - exact, axis=1)
            assert (err <= got[name + "_error"]).all()
            assert (err / np.linalg.norm(exact, axis=1) < 1e-8).all()


def _routines(rank):
    """DDP and FSDP2 models on 2 gloo ranks, each with its data shard: the routines with
    finite differences, from a random start (the trace with Richardson), and the Richardson
    operator on shards."""
    from analysis.sharded import ShardedOperator
    from tests.analysis.sharded_problems import case, shard

    model, data = setup()
    ddp = top_eigenvalues(DistributedDataParallel(model), ce, data[:3] if rank == 0 else
                          data[3:], k=1, tol=1e-8, hvp_method="finite_difference",
                          progress=False)
    build, loss_fn, units, _, shards = case("mlp")
    sharded = shard(build(), units, True)
    fsdp = top_eigenvalues(sharded, loss_fn, shards[rank], k=1, tol=1e-8,
                           hvp_method="finite_difference", progress=False)
    trace = hessian_trace(sharded, loss_fn, shards[rank], n_hvp=4, seed=3, progress=False,
                          hvp_method="finite_difference", fd_richardson=True)
    op = ShardedOperator(sharded, loss_fn, shards[rank], hvp_method="finite_difference",
                         fd_richardson=True)
    vs = vectors(op.shape[0], k=2)
    return {"ddp": ddp.eigenvalues, "ddp_meta": ddp.metadata, "fsdp": fsdp.eigenvalues,
            "fsdp_meta": fsdp.metadata, "trace": trace.estimate,
            "trace_meta": trace.metadata, "richardson": op.full_matmat(vs).numpy(),
            "richardson_meta": op.product_metadata()}


def test_ddp_and_fsdp2_top_eigenvalue_within_1e5_and_the_record(tmp_path):
    from tests.analysis.sharded_problems import case, run_ranks

    ranks = run_ranks(tmp_path, _routines)
    model, data = setup()
    top = float(torch.linalg.eigvalsh(exact_hessian(model, ce, data))[-1])
    build, loss_fn, _, all_data, _ = case("mlp")
    H = exact_hessian(build(), loss_fn, all_data)
    sharded_top = float(torch.linalg.eigvalsh(H)[-1])
    exact_trace = hessian_trace(build(), loss_fn, all_data, n_hvp=4, seed=3, progress=False)
    vs = vectors(H.shape[0], k=2)
    for got in ranks:
        assert got["ddp"][0] == pytest.approx(top, rel=1e-5, abs=0)
        assert got["fsdp"][0] == pytest.approx(sharded_top, rel=1e-5, abs=0)
        for key in ("ddp_meta", "fsdp_meta", "trace_meta"):
            record = got[key]["hvp"]
            assert got[key]["config"]["hvp_method"] == "finite_difference", key
            assert record["hvp_method"] == "finite_difference"
            assert record["richardson"] is (key == "trace_meta")  # fd_richardson on shards
            assert 0 < record["relative_error_estimate"] < 1e-4 and record["n_products"] > 0
        assert got["fsdp_meta"]["sharded"] == "fully_shard"
        assert got["trace"] == pytest.approx(exact_trace.estimate, rel=1e-6)
        record = got["richardson_meta"]["hvp"]
        assert record["richardson"] and record["n_products"] == 2
        exact = (vs @ H).numpy()
        err = np.linalg.norm(got["richardson"] - exact, axis=1)
        assert (err / np.linalg.norm(exact, axis=1) < 1e-8).all()
        assert record["error_estimate"] >= err.max()


@pytest.mark.usefixtures("one_rank")
def test_a_mixed_precision_policy_refuses_finite_differences():
    """Under ``MixedPrecisionPolicy(param_dtype=bfloat16)`` finite differences would difference
    bfloat16-rounded gradients (the symmetry screen then fails, or the answer is a few percent
    off): refused, naming the policy and the exact way out. The exact product ignores the policy
    (the Hessian of the float32 model, from the master shards); a policy that does not round
    below the parameters' dtype is accepted."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy

    from tests.analysis.sharded_problems import assert_same_state, case, state

    build, loss_fn, units, data, _ = case("mlp")

    def wrapped(dtype, policy):
        model, mesh = build().to(dtype), init_device_mesh("cpu", (1,))
        for unit in units(model):
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        return fully_shard(model, mesh=mesh, mp_policy=policy)

    data32 = [(x.float(), y) for x, y in data]
    model = wrapped(torch.float32, MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    before = state(model)
    for call in (top_eigenvalues, hessian_trace):
        with pytest.raises(ValueError, match=r"MixedPrecisionPolicy \(param_dtype=torch.bfloat16"
                                             r".*hvp_method=\"reverse\""):
            call(model, loss_fn, data32, hvp_method="finite_difference", progress=False)
        assert_same_state(before, state(model))
    exact = top_eigenvalues(model, loss_fn, data32, k=1, tol=1e-6, progress=False)
    plain = top_eigenvalues(build().float(), loss_fn, data32, k=1, tol=1e-6, progress=False)
    np.testing.assert_allclose(exact.eigenvalues, plain.eigenvalues, rtol=1e-6)
    assert_same_state(before, state(model))
    # a policy in the parameters' own precision changes nothing: accepted, within 1e-5
    model = wrapped(torch.float64, MixedPrecisionPolicy(param_dtype=torch.float64,
                                                        reduce_dtype=torch.float64))
    fd = top_eigenvalues(model, loss_fn, data, k=1, tol=1e-8, hvp_method="finite_difference",
                         progress=False)
    top = float(torch.linalg.eigvalsh(exact_hessian(build(), loss_fn, data))[-1])
    assert fd.eigenvalues[0] == pytest.approx(top, rel=1e-5, abs=0)


def _float32_case(sizes=(6, 32, 32, 3)):
    """A float32 MLP, its data, and the float64 Hessian at its (rounded) weights and inputs."""
    model = mlp(sizes=sizes, dtype=torch.float32)
    x, y = classification_data(n=23, d=6)
    data = uneven_batches(x.float(), y)
    H = exact_hessian(copy.deepcopy(model).double(), ce, uneven_batches(x.float().double(), y))
    return model, data, H


@pytest.mark.parametrize("direction", ["random", "top"])
def test_the_chosen_step_is_within_a_factor_of_the_best_fixed_step(direction):
    # float32, against the exact product at the same rounded weights: the adaptive step's error
    # is within 3x of the best of a half-decade grid of fixed steps, in a random direction and
    # along the top eigenvector (where the best step is far smaller: the former rule, the pilot
    # alone, is 10-40x off there)
    model, data, H = _float32_case()
    evals, evecs = torch.linalg.eigh(H)
    v = evecs[:, -1] if direction == "top" else vectors(H.shape[0], k=1)[0]
    v = (v / v.norm())[None]
    exact = (v @ H)[0]

    def error(**options):
        got, fd = products(model, data, v.float(), **options)
        return float((got[0].double() - exact).norm() / exact.norm()), fd

    w = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))
    grid = [error(step=r * (1 + w))[0] for r in 10.0 ** np.arange(-6, -0.9, 0.5)]
    chosen, fd = error()
    assert chosen <= 3 * min(grid), (chosen, min(grid))
    assert fd.relative_errors[0] >= chosen  # the estimate still bounds the error
    pilot, _ = error(adaptive=False)  # the former rule: fails the same bound along the top
    assert chosen <= pilot and (direction == "random" or pilot > 10 * min(grid))


def test_refined_step():
    # the balance of a h^2 against rho / h, rounded to a power-of-two multiple of the pilot
    h0, a, rho = 1e-2, 50.0, 1e-9
    best = (rho / (math.sqrt(2) * a)) ** (1 / 3)
    got = refined_step(h0, 3 * a * h0 ** 2, rho, 1.0)
    assert got == pytest.approx(h0 * 2.0 ** -round(math.log2(h0 / best)))
    assert refined_step(h0, 0.0, rho, 1.0) == h0 and refined_step(h0, 1.0, 0.0, 1.0) == h0
    assert refined_step(h0, 1e-30, 1.0, 1.0) == h0 * 8  # at most 2^3 larger
    assert refined_step(h0, 1e30, 1e-30, 1.0) == h0 * 2.0 ** -12  # at most 2^12 smaller
    # Richardson: a larger step than the central difference's, at most RICHARDSON_CAP times it
    central = refined_step(h0, 3 * a * h0 ** 2, rho, 1.0)
    rich = refined_step(h0, 3 * a * h0 ** 2, rho, 1.0, richardson=True)
    assert central < rich <= 4 * central


def test_richardson_reaches_the_routines():
    from analysis import hvp, layerwise, spectral_density
    model, data = setup()
    before = snapshot(model)
    fd = dict(hvp_method="finite_difference", fd_richardson=True, progress=False)
    results = {"top_eigenvalues": top_eigenvalues(model, ce, data, max_hvp=4, **fd),
               "hessian_trace": hessian_trace(model, ce, data, n_hvp=4, **fd),
               "spectral_density": spectral_density(model, ce, data, n_lanczos=3, n_vectors=1,
                                                    **fd),
               "layerwise": layerwise(model, ce, data, n_hvp_trace=4, **fd)}
    for name, result in results.items():
        record = result.metadata["hvp"]
        assert record["richardson"] is True and record["n_products"] > 0, name
        assert result.metadata["config"]["fd_richardson"] is True, name
    assert_unchanged(model, before)
    # it reaches the product: on a float32 model Richardson's error is below the central one's
    model, data, H = _float32_case()
    v = vectors(H.shape[0], k=1)[0]
    exact = H @ v
    errors = {rich: float((hvp(model, ce, data, v.float(), hvp_method="finite_difference",
                               fd_richardson=rich, progress=False).double() - exact).norm())
              for rich in (False, True)}
    assert errors[True] < errors[False] / 2, errors
    # refused with the exact methods, whatever the routine
    for routine in (top_eigenvalues, hessian_trace, spectral_density, layerwise):
        with pytest.raises(ValueError, match="fd_richardson=True applies to hvp_method"):
            routine(model, ce, data, fd_richardson=True, progress=False)
    with pytest.raises(ValueError, match="fd_richardson"):
        hvp(model, ce, data, v.float(), hvp_method="forward", fd_richardson=True)
    with pytest.raises(ValueError, match="fd_step"):
        HessianOperator(model, ce, data, fd_step=1e-3)


def test_layerwise_records_the_products():
    from analysis import layerwise
    model, data = setup()
    got = layerwise(model, ce, data, n_hvp_trace=6, hvp_method="finite_difference",
                    progress=False)
    record = got.metadata["hvp"]
    assert record["hvp_method"] == "finite_difference" and record["richardson"] is False
    assert record["step_rule"].startswith("adaptive")
    assert record["n_products"] == got.n_hvp  # every block's eigenvalue and trace products
    assert 0 < record["relative_error_estimate"] < 1e-4
    assert set(record["per_block"]) == set(got.blocks)
    assert record["relative_error_estimate"] == max(record["per_block"].values())
    assert "versions" in got.metadata and got.metadata["config"]["hvp_method"] == \
        "finite_difference"
    assert "hvp" not in layerwise(model, ce, data, n_hvp_trace=6, progress=False).metadata
