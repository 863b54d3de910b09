"""The sharpness measures on a model sharded with FSDP2's ``fully_shard`` run on this rank's shards
(issue 24): every rank passes its (uneven) data shard and gets the one-process answer on all the
data (float64, 1e-9), at 2 ranks and, for the worst case, at 4 (a rank holding no row of a
parameter; in the same spawn L-BFGS-B alone with a rank holding no element,
``test_lbfgsb.py``); the same ``seed`` gives the same random restarts and draws as one process;
perturbations and subspaces come back as DTensors placed like the parameters; the model is left
exactly as found. No rank allocates a parameter-sized vector (the largest single torch
allocation during a measure stays below the full parameter bytes, on a stack of equal units),
and an ascent whose norm misses the all-reduce (a mutant) is caught."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import analysis
from analysis.core.sharding import is_dtensor
from tests.analysis.sharded_problems import case, ce, run_ranks, shard, state

TOL = 1e-9
Q = dict(progress=False)


def _ramp(shape, scale=0.02):
    n = int(np.prod(shape)) if shape else 1
    return scale * torch.linspace(-1, 1, n, dtype=torch.float64).reshape(shape)


def _start(model):
    """A per-name start (full tensors, the same on every rank) for two of the parameters."""
    named = dict(model.named_parameters())
    return {n: _ramp(tuple(named[n].shape)) for n in ("0.weight", "4.bias")}


# name -> call(model, loss_fn, data); small budgets: a pass on shards costs seconds when loaded
CALLS = {
    "worst_l2": lambda m, f, d: analysis.worst_case_sharpness(
        m, f, d, 0.05, "l2", False, 3, seed=4, restarts=2, **Q),
    "worst_linf_elementwise": lambda m, f, d: analysis.worst_case_sharpness(
        m, f, d, 0.05, "linf", True, 3, seed=1, restarts=2, **Q),
    "worst_filter_start": lambda m, f, d: analysis.worst_case_sharpness(
        m, f, d, 0.1, "l2", "filter", 2, start=_start(m), **Q),
    "worst_selection": lambda m, f, d: analysis.worst_case_sharpness(
        m, f, d, 0.05, "linf", "filter", 2, seed=2, restarts=2, params=["2.weight", "4.bias"],
        **Q),
    "average_l2_elementwise": lambda m, f, d: analysis.average_sharpness(
        m, f, d, 0.05, True, 4, seed=2, **Q),
    "average_linf_antithetic": lambda m, f, d: analysis.average_sharpness(
        m, f, d, 0.05, "filter", 4, seed=3, norm="linf", antithetic=True, **Q),
    "pac_bayes_magnitude": lambda m, f, d: analysis.pac_bayes_sigma(
        m, f, d, 0.05, magnitude_aware=True, n_samples=2, max_iter=2, seed=5, **Q),
    "keskar_subspace": lambda m, f, d: analysis.keskar_sharpness(
        m, f, d, 1e-2, 3, seed=6, max_iter=2, **Q),
    "keskar_full": lambda m, f, d: analysis.keskar_sharpness(m, f, d, 1e-2, max_iter=2, **Q),
    "vs_curvature": lambda m, f, d: analysis.sharpness_vs_curvature(
        m, f, d, (0.01, 0.1), steps=2, max_hvp=6, **Q),
}


def summary(result, params):
    """A result as numbers; DTensors gathered after checking they are placed like ``params``."""
    placements = {tuple(p.placements) for p in params if is_dtensor(p)}
    out = {}
    for key in result.__dataclass_fields__:
        value = getattr(result, key)
        if key in ("metadata", "n_forward", "n_backward", "n_hvp"):
            continue
        if key == "delta":
            for t in value.values():
                assert not placements or (is_dtensor(t) and tuple(t.placements) in placements)
            value = {n: t.full_tensor() if is_dtensor(t) else t for n, t in value.items()}
            value = {n: t.numpy().copy() for n, t in value.items()}
        elif key == "subspace" and isinstance(value, list):  # sharded: p columns of DTensors
            assert all(tuple(t.placements) in placements for col in value for t in col)
            value = torch.stack([torch.cat([t.full_tensor().reshape(-1) for t in col])
                                 for col in value], dim=1)
        if isinstance(value, torch.Tensor):
            value = value.numpy().copy()
        out[key] = value
    return out


def _mutant_norm(self, x, dim=None):
    """ShardedSpace.norm without the all-reduce: this rank's shard only (wrong)."""
    return torch.linalg.vector_norm(x, dim=dim)


def _on_ranks(rank, names, world, mutant):
    warnings.filterwarnings("ignore", "Lanczos did not converge")
    build, loss_fn, units, data, shards = case("mlp")
    mine = shards[rank] if world == 2 else [data[rank]]
    model = shard(build(), units, True)
    for p in model.parameters():  # a user's gradient, which must survive
        p.grad = torch.full_like(p, 0.5)
    params = list(model.parameters())
    out = {}
    for name in names:
        before = state(model)
        out[name] = summary(CALLS[name](model, loss_fn, mine), params)
        after = state(model)
        out[name + "_same"] = before.keys() == after.keys() and all(
            torch.equal(before[k], after[k]) if isinstance(before[k], torch.Tensor)
            else before[k] == after[k] for k in before)
    if mutant:
        from analysis.core.space import ShardedSpace

        right, ShardedSpace.norm = ShardedSpace.norm, _mutant_norm
        try:
            out["mutant"] = summary(CALLS["worst_l2"](model, loss_fn, mine), params)
        finally:
            ShardedSpace.norm = right
    return out


def single(names):
    warnings.filterwarnings("ignore", "Lanczos did not converge")
    build, loss_fn, _, data, _ = case("mlp")
    out = {}
    for name in names:
        model = build()
        out[name] = summary(CALLS[name](model, loss_fn, data), list(model.parameters()))
    return out


def close(got, want, path):
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for k in want:
            close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, (np.ndarray, float, np.floating)) and not isinstance(want, bool):
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL, err_msg=path)
    else:
        assert got == want, path


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("sharpness"), _on_ranks, list(CALLS), 2, True)


@pytest.fixture(scope="module")
def one_process():
    return single(list(CALLS))


@pytest.mark.parametrize("name", list(CALLS))
def test_every_rank_gets_the_one_process_answer_and_the_model_as_found(two_ranks, one_process,
                                                                       name):
    for rank, got in enumerate(two_ranks):
        assert got[name + "_same"], f"{name} changed the model on rank {rank}"
        close(got[name], one_process[name], f"rank {rank}: {name}")


def test_the_perturbation_covers_every_parameter_and_raises_the_loss(two_ranks):
    for got in two_ranks:  # (placed like the parameters: checked by summary on the ranks)
        assert got["worst_l2"]["value"] > 0 and 0 < got["worst_l2"]["delta_norm"] <= 0.05
        assert set(got["worst_l2"]["delta"]) == {n for n, _ in case("mlp")[0]().named_parameters()}
        assert set(got["worst_selection"]["delta"]) == {"2.weight", "4.bias"}


def test_a_norm_without_the_all_reduce_is_caught(two_ranks, one_process):
    """The mutant (each rank normalises by its own shard's norm) must not pass the comparison."""
    want = one_process["worst_l2"]
    for got in two_ranks:
        with pytest.raises(AssertionError):
            close(got["mutant"], want, "mutant")


def _four_ranks(rank, names):
    """The measures, and L-BFGS-B alone on a space where rank 1 holds no element (one spawn)."""
    from tests.analysis.test_lbfgsb import sharded_run

    return _on_ranks(rank, names, 4, False), sharded_run(rank, ["many_breakpoints"])


def test_four_ranks(tmp_path):
    from tests.analysis.test_lbfgsb import check_sharded

    names = ["worst_l2", "worst_linf_elementwise", "worst_filter_start"]
    ranks = run_ranks(tmp_path, _four_ranks, names, world=4)
    want = single(names)
    for rank, (got, _) in enumerate(ranks):
        for name in names:
            assert got[name + "_same"], (rank, name)
            close(got[name], want[name], f"rank {rank}: {name}")
    check_sharded([solver for _, solver in ranks], ["many_breakpoints"])


# -- no parameter-sized vector on any rank ------------------------------------------------------
WIDTH, UNITS = 16, 4


def _stack():
    """``UNITS`` equal Linear(WIDTH, WIDTH) units (tanh between), float64."""
    torch.manual_seed(0)
    layers = []
    for i in range(UNITS):
        layers += [nn.Linear(WIDTH, WIDTH)] + ([nn.Tanh()] if i < UNITS - 1 else [])
    return nn.Sequential(*layers).to(torch.float64)


def _largest_allocation(fn):
    """The largest single torch CPU allocation (bytes) while ``fn`` runs (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return max(sizes, default=0)


MEASURES = {
    "worst_case": lambda m, d: analysis.worst_case_sharpness(
        m, ce, d, 0.05, "l2", "filter", 2, restarts=2, **Q),
    "worst_case_linf": lambda m, d: analysis.worst_case_sharpness(
        m, ce, d, 0.05, "linf", True, 2, **Q),
    "average": lambda m, d: analysis.average_sharpness(m, ce, d, 0.05, True, 2, **Q),
    "pac_bayes": lambda m, d: analysis.pac_bayes_sigma(
        m, ce, d, 0.05, magnitude_aware=True, n_samples=1, max_iter=1, **Q),
    # p = 1: the basis of a p-dimensional subspace holds n p / W elements per rank
    "keskar_subspace": lambda m, d: analysis.keskar_sharpness(m, ce, d, 1e-2, 1, max_iter=1, **Q),
    # the full space: the solver's y, box, gradient and 2m pairs are shards (3 iterations: the
    # subspace minimisation over the stored pairs runs too)
    "keskar_full": lambda m, d: analysis.keskar_sharpness(m, ce, d, 1e-2, max_iter=3, **Q),
}


def _allocations(rank):
    import analysis.core.space as space_module
    from analysis.core import flatten
    from analysis.core.sharding import full_values

    space_module.CHUNK = 64  # random streams are drawn in pieces of CHUNK (2^20) elements
    model = shard(_stack(), lambda m: [m[2 * i] for i in range(UNITS)], True)
    gen = torch.Generator().manual_seed(rank)
    data = [(torch.randn(4, WIDTH, generator=gen, dtype=torch.float64),
             torch.randint(0, WIDTH, (4,), generator=gen))]
    out = {name: _largest_allocation(lambda: call(model, data)) for name, call in MEASURES.items()}
    params = list(model.parameters())  # the control: a gathered flat vector is seen
    out["control"] = _largest_allocation(lambda: flatten(full_values(params)))
    out["bytes"] = sum(p.numel() for p in params) * 8
    return out


def test_no_rank_allocates_a_parameter_sized_vector(tmp_path):
    for got in run_ranks(tmp_path, _allocations):
        assert got["control"] >= got["bytes"]  # the measurement sees a full flat vector
        for name in MEASURES:
            assert 0 < got[name] < got["bytes"], (name, got[name], got["bytes"])
