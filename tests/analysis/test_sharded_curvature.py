"""The curvatures beyond the Hessian, and preconditioned spectra, on a model sharded with FSDP2's
``fully_shard`` over two gloo ranks (uneven data shards, float64): the products of the GGN, the
exact and Monte-Carlo Fisher, the empirical Fisher (with a likelihood, and by per-datum gradients
without one), the preconditioned Hessian and GGN (a dict of DTensors, a torch Adam's sharded
state), and the routines on them (top eigenvalues, trace, density, layerwise blocks), equal the
one-process results of the unsharded model on all the data (1e-9, relative); the model is left
exactly as found. What still cannot run on shards is refused with the cause and the way out."""
import warnings

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import analysis
from analysis.curvature import curvature_operator
from analysis.core.sharding import shard_like
from tests.analysis.sharded_problems import assert_same_state, case, ce, run_ranks, shard, state

SUPERVISED = analysis.supervised(F.cross_entropy)
Q = dict(progress=False)
MC = dict(kind="mc", mc_samples=2, seed=4)


def _p(model, sharded):
    """A positive diagonal preconditioner per parameter (DTensors on the sharded model)."""
    out = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        full = torch.linspace(0.5, 2.0 + i, p.numel(), dtype=torch.float64).reshape(p.shape)
        out[name] = shard_like(full, p) if sharded else full
    return out


def _adam(model, sharded):
    """A torch Adam whose state (sharded like the parameters) is that of a few steps."""
    opt = torch.optim.Adam(model.parameters(), eps=1e-3)
    for i, p in enumerate(model.parameters()):
        full = torch.linspace(1e-4, 1e-2 * (i + 1), p.numel(), dtype=torch.float64)
        full = full.reshape(p.shape)
        v = shard_like(full, p) if sharded else full
        opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(v),
                        "exp_avg_sq": v}
    return opt


# name -> (curvature, loss_fn, preconditioner builder, the class's own keywords)
CASES = {
    "ggn": ("ggn", SUPERVISED, None, {}),
    "fisher": ("fisher", SUPERVISED, None, {}),
    "fisher_mc": ("fisher", SUPERVISED, None, MC),
    "ef": ("empirical_fisher", SUPERVISED, None, {}),
    "ef_per_sample": ("empirical_fisher", ce, None, {}),
    "hessian_p": ("hessian", ce, _p, {}),
    "ggn_adam": ("ggn", SUPERVISED, _adam, {}),
}


def _vectors(n):
    return torch.randn(3, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


# the routines on some of the cases (each product is a pass over the data with collectives)
ROUTINES = {
    "top": ("ggn_adam", lambda m, f, d, **c: analysis.top_eigenvalues(
        m, f, d, k=2, max_hvp=8, **c).eigenvalues),
    "trace": ("ef_per_sample", lambda m, f, d, **c: analysis.hessian_trace(
        m, f, d, n_hvp=4, seed=3, **c).estimate),
    "density": ("hessian_p", lambda m, f, d, **c: analysis.spectral_density(
        m, f, d, n_lanczos=4, n_vectors=1, **c).nodes),
    "layerwise": ("fisher", lambda m, f, d, **c: analysis.layerwise(
        m, f, d, {"last": ["4.bias"], "two": ["2.bias", "4.bias"]}, n_hvp_trace=6,
        **c).as_dict()),
}


def _compute(model, data, sharded):
    """Every case's products, and the routines, with the state check on the sharded model."""
    out = {}
    for name, (curvature, loss_fn, make_p, options) in CASES.items():
        before = state(model) if sharded else None
        pre = make_p(model, sharded) if make_p else None
        op = curvature_operator(curvature, model, loss_fn, data, preconditioner=pre,
                                options=options, **Q)
        out[name] = {"products": (op.full_matmat if sharded else op.matmat)(
            _vectors(op.shape[0])).numpy(),
                     "kind": (op.curvature, op.preconditioned)}
        for routine, (case_name, call) in ROUTINES.items():
            if case_name == name:
                out[routine] = call(model, loss_fn, data, curvature=curvature,
                                    preconditioner=_p(model, sharded) if routine == "layerwise"
                                    else pre, **Q)
        if sharded:
            assert_same_state(before, state(model))
    return out


def _ranked(rank):
    torch.manual_seed(0)
    build, _, units, _, shards = case("mlp")
    model = shard(build(), units, True)
    for p in model.parameters():  # a user's gradient, which must survive
        p.grad = torch.ones_like(p)
    model.train()
    before = state(model)
    out = _compute(model, shards[rank], True)
    assert_same_state(before, state(model))
    return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    ranks = run_ranks(tmp_path_factory.mktemp("curvature"), _ranked)
    build, _, _, data, _ = case("mlp")
    with warnings.catch_warnings():  # the budget of "top" is spent on purpose
        warnings.filterwarnings("ignore", "Lanczos did not converge")
        return ranks, _compute(build(), data, False)


def close(a, b, path):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, tuple):
        assert a == b, path
    else:
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=path)


@pytest.mark.parametrize("name", sorted(CASES) + sorted(ROUTINES))
def test_sharded_equals_one_process(outcomes, name):
    ranks, single = outcomes
    for rank, got in enumerate(ranks):
        close(got[name], single[name], f"rank {rank}: {name}")


class Identity(analysis.CurvatureOperator):
    """A registered curvature whose batch_product takes the full parameters."""

    def batch_product(self, batch, V):
        return V


def test_what_cannot_run_on_shards_is_refused_with_the_cause(one_rank):
    from analysis import operator

    build, _, units, data, _ = case("mlp")
    model = shard(build(), units, True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = state(model)
    analysis.register_curvature("identity_sharded_test", Identity)
    try:
        with pytest.raises(NotImplementedError, match="fully_shard") as info:
            analysis.top_eigenvalues(model, SUPERVISED, data, curvature="identity_sharded_test",
                                     **Q)
        assert "Identity" in str(info.value) and "batch_product" in str(info.value)
    finally:
        operator._REGISTRY.pop("identity_sharded_test")
    calls = {
        'applies to curvature="hessian" only': lambda: analysis.top_eigenvalues(
            model, SUPERVISED, data, curvature="ggn", hvp_method="finite_difference", **Q),
        "declare its split": lambda: analysis.hessian_trace(model, ce, data, curvature="ggn",
                                                            **Q),
        "no entry for the parameters": lambda: analysis.top_eigenvalues(
            model, SUPERVISED, data, curvature="ggn", preconditioner={"0.weight": torch.ones(
                7, 5, dtype=torch.float64)}, **Q),
        "finite and positive": lambda: analysis.top_eigenvalues(
            model, ce, data, preconditioner=-torch.ones(111, dtype=torch.float64), **Q),
        "likelihood": lambda: analysis.top_eigenvalues(
            model, analysis.split_loss(lambda m, b: m(b[0]), lambda o, b: (o ** 2).mean()),
            data, curvature="fisher", **Q),
    }
    for match, call in calls.items():
        with pytest.raises(ValueError, match=match):
            call()
        assert_same_state(before, state(model))
