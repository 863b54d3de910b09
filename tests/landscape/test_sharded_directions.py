"""``random_direction`` on a model sharded with FSDP2's ``fully_shard`` draws and normalises each
parameter's direction on this rank's shard (issue 24): at 2 ranks, every normalisation gives the
one-process direction (float64, 1e-12) as DTensors placed like the parameters, no rank allocates
a whole parameter while drawing, and a direction holding a NaN on one rank's shard only is
refused on every rank."""
import pytest
import torch

import landscape
from analysis.core.sharding import is_dtensor
from landscape.directions import check_direction
from tests.analysis.sharded_problems import case, run_ranks, shard

OPTIONS = [(normalization, ignore) for normalization in ("filter", "layer", "none")
           for ignore in (True, False)]


def _directions(model):
    return [{n: t.full_tensor() if is_dtensor(t) else t for n, t in
             landscape.random_direction(model, normalization, ignore, seed=3).items()}
            for normalization, ignore in OPTIONS]


def _largest_allocation(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.nbytes() for e in prof.profiler.kineto_results.events()
                if e.name() == "[memory]"), default=0)


def _on_ranks(rank):
    import analysis.core.space as space_module

    space_module.CHUNK = 16  # the random stream is drawn in pieces of CHUNK elements
    build, _, units, _, _ = case("mlp")
    model = shard(build(), units, True)
    placed = all(t.placements == p.placements for p, t in zip(
        model.parameters(), landscape.random_direction(model, seed=1).values()))
    out = {"directions": _directions(model), "placed": placed,
           "largest": _largest_allocation(lambda: landscape.random_direction(model, "layer")),
           "parameter": max(p.numel() for p in model.parameters()) * 8}
    direction = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    if rank == 1:
        direction["0.weight"].to_local()[0, 0] = float("nan")
    try:
        check_direction(model, direction)
        out["refused"] = False
    except ValueError as err:
        out["refused"] = "finite" in str(err)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("directions"), _on_ranks)


@pytest.mark.parametrize("i", range(len(OPTIONS)), ids=[f"{n}-{i}" for n, i in OPTIONS])
def test_the_one_process_direction_on_every_rank(ranks, i):
    build = case("mlp")[0]
    want = _directions(build())[i]
    for got in ranks:
        assert got["placed"]
        assert got["directions"][i].keys() == want.keys()
        for name, t in want.items():
            torch.testing.assert_close(got["directions"][i][name], t, rtol=1e-12, atol=1e-12)


def test_no_rank_holds_a_whole_parameter_while_drawing(ranks):
    for got in ranks:
        assert 0 < got["largest"] < got["parameter"]


def test_a_nan_on_one_shard_is_refused_on_every_rank(ranks):
    assert [got["refused"] for got in ranks] == [True, True]
