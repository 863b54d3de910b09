"""Every public routine of ``analysis`` and ``landscape`` that takes a model, on a model sharded
with FSDP2's ``fully_shard`` over two gloo ranks (each rank its half of the data): it either
gives the one-process answer on all the data (float64, 1e-10), vectors handed back as DTensors
placed like the parameters, or refuses with a ``NotImplementedError`` naming ``fully_shard``,
the routine and the routines that work; the model is left exactly as found either way."""
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch

import analysis
import landscape
from analysis.core.sharding import is_dtensor
from tests.analysis.sharded_problems import case, run_ranks, shard, state
from tests.oracles import mlp


@dataclass
class Env:
    """What a call gets: the model (sharded or not), its loss and this process's data."""

    model: Any
    loss_fn: Callable
    data: list
    sharded: bool

    def other(self, seed=1):
        """A second model of the same architecture (sharded like the first)."""
        build, _, units, _, _ = case("mlp")
        model = mlp((5, 7, 6, 3), seed=seed)
        return shard(model, units, True) if self.sharded else model


Q = dict(progress=False)


def _state_dicts(e):
    """Two checkpoints of the model's architecture (DTensors for a sharded model)."""
    start = {k: v.detach().clone() for k, v in e.model.state_dict().items()}
    return start, {k: 1.5 * v for k, v in start.items()}


def _direction(e, seed=1):
    return landscape.random_direction(e.model, seed=seed, ignore_bias_bn=False)


def _plane(e):
    return landscape.plane(e.model, e.loss_fn, e.data, _direction(e, 1), _direction(e, 2),
                           [-0.5, 0.5], [0.0, 1.0], **Q)


class Identity(analysis.CurvatureOperator):
    """The smallest curvature: a subclass of the public base."""

    def batch_product(self, batch, V):
        return V


def _preserved(e):
    with analysis.preserved(e.model, "train") as model:
        return model.training


def _n(model):
    return sum(p.numel() for p in model.parameters())


def _ramp(model):
    return torch.linspace(-1, 1, _n(model), dtype=torch.float64)


def _trajectory(e):
    start, end = _state_dicts(e)
    return [start, end, {k: v.sin() for k, v in start.items()}]


def _tracked(e):
    """One record of a Tracker (the per-layer statistics, the data metrics, lambda_max)."""
    tracker = analysis.Tracker(e.model, e.loss_fn, eval_data=e.data, curvature_data=e.data,
                               lambda_max=True, lanczos_max_hvp=6)
    record = tracker.log()
    return {k: v for k, v in record.items() if k not in ("time", "overhead")}


# name -> (what it must do on a fully_shard model, the call); "works" calls return a result
WORKS, REFUSED = "works", "refused"
CALLS = {
    # analysis
    "preserved": (WORKS, _preserved),
    "select_params": (WORKS, lambda e: analysis.select_params(e.model)[0]),
    "top_eigenvalues": (WORKS, lambda e: analysis.top_eigenvalues(
        e.model, e.loss_fn, e.data, k=1, max_hvp=6, **Q)),
    "hessian_trace": (WORKS, lambda e: analysis.hessian_trace(
        e.model, e.loss_fn, e.data, n_hvp=4, seed=3, **Q)),
    "spectral_density": (WORKS, lambda e: analysis.spectral_density(
        e.model, e.loss_fn, e.data, n_lanczos=3, n_vectors=1, **Q)),
    "average_sharpness": (WORKS, lambda e: analysis.average_sharpness(
        e.model, e.loss_fn, e.data, 0.05, True, 4, seed=2, **Q)),
    "worst_case_sharpness": (WORKS, lambda e: analysis.worst_case_sharpness(
        e.model, e.loss_fn, e.data, 0.05, "l2", "filter", 3, **Q)),
    "keskar_sharpness": (WORKS, lambda e: analysis.keskar_sharpness(
        e.model, e.loss_fn, e.data, 1e-2, max_iter=2, **Q)),
    "pac_bayes_sigma": (WORKS, lambda e: analysis.pac_bayes_sigma(
        e.model, e.loss_fn, e.data, 0.05, n_samples=2, max_iter=3, **Q)),
    "sharpness_vs_curvature": (WORKS, lambda e: analysis.sharpness_vs_curvature(
        e.model, e.loss_fn, e.data, (0.01,), steps=2, max_hvp=6, **Q)),
    "CurvatureOperator": (REFUSED, lambda e: Identity(e.model, e.loss_fn, e.data)),
    "HessianOperator": (REFUSED, lambda e: analysis.HessianOperator(e.model, e.loss_fn, e.data)),
    "GGNOperator": (REFUSED, lambda e: analysis.GGNOperator(e.model, e.loss_fn, e.data)),
    "FisherOperator": (REFUSED, lambda e: analysis.FisherOperator(e.model, e.loss_fn, e.data)),
    "EmpiricalFisherOperator": (REFUSED, lambda e: analysis.EmpiricalFisherOperator(
        e.model, e.loss_fn, e.data)),
    "hvp": (WORKS, lambda e: analysis.hvp(e.model, e.loss_fn, e.data, _ramp(e.model), **Q)),
    "layerwise": (WORKS, lambda e: analysis.layerwise(
        e.model, e.loss_fn, e.data, {"last": ["4.bias"]}, n_hvp_trace=6, **Q)),
    "mean_loss": (WORKS, lambda e: analysis.mean_loss(e.model, e.loss_fn, e.data, **Q)),
    "evaluate": (WORKS, lambda e: analysis.evaluate(e.model, e.loss_fn, e.data, **Q)),
    "full_grad_norm": (WORKS, lambda e: analysis.full_grad_norm(
        e.model, e.loss_fn, e.data, **Q)),
    "Tracker": (WORKS, lambda e: _tracked(e)),
    # landscape
    "random_direction": (WORKS, lambda e: _direction(e)),
    "update_direction": (WORKS, lambda e: landscape.update_direction(
        *_state_dicts(e), e.model)),
    "eigenvector_directions": (WORKS, lambda e: landscape.eigenvector_directions(
        e.model, e.loss_fn, e.data, 1, max_hvp=6, **Q)),
    "line": (WORKS, lambda e: landscape.line(e.model, e.loss_fn, e.data, _direction(e),
                                             [-1.0, 0.0, 0.5], **Q)),
    "plane": (WORKS, _plane),
    "interpolate": (WORKS, lambda e: landscape.interpolate(
        e.model, e.other(), e.loss_fn, e.data, [0.0, 0.25, 1.0], **Q)),
    "recalibrate_bn": (WORKS, lambda e: landscape.recalibrate_bn(e.model, e.loss_fn, e.data)),
    "pca_directions": (WORKS, lambda e: landscape.pca_directions(_trajectory(e), e.model)),
    "project_trajectory": (WORKS, lambda e: landscape.project_trajectory(
        _trajectory(e), e.model, [_direction(e)])),
}


KEPT = ("line", "worst_case_sharpness", "hvp", "Tracker")  # also with reshard_after_forward=False


def takes_a_model(obj):
    """Whether a public name is a routine with a ``model`` (or ``model_a``) argument."""
    if not callable(obj):
        return False
    try:
        names = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    return "model" in names or "model_a" in names


def test_the_table_covers_every_public_routine_that_takes_a_model():
    public = {n for pkg in (analysis, landscape) for n in pkg.__all__
              if takes_a_model(getattr(pkg, n))}
    assert public == set(CALLS)


def numbers(result, placements):
    """A result as comparable numbers; DTensors gathered after checking their placements."""
    if isinstance(result, torch.Tensor):
        if is_dtensor(result):
            assert result.placements in placements, result.placements
            result = result.full_tensor()
        return result.detach().numpy().copy()
    if isinstance(result, dict):
        return {k: numbers(v, placements) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        if result and all(isinstance(v, list) and v and isinstance(v[0], torch.Tensor)
                          for v in result):  # sharded vectors (eigenvectors): as rows
            return np.stack([np.concatenate([numbers(t, placements).reshape(-1) for t in v])
                             for v in result])
        return [numbers(v, placements) for v in result]
    if hasattr(result, "__dataclass_fields__"):
        return {k: numbers(getattr(result, k), placements) for k in result.__dataclass_fields__
                if k not in ("metadata", "n_forward", "n_backward", "n_hvp")}
    return result


def run_all(model, loss_fn, data, sharded, record_state, names=tuple(CALLS)):
    out = {}
    placements = {tuple(p.placements) if is_dtensor(p) else None for p in model.parameters()}
    for name in names:
        expected, call = CALLS[name]
        if expected == REFUSED and not sharded:
            continue
        before = record_state(model)
        try:
            got = ("ok", numbers(call(Env(model, loss_fn, data, sharded)), placements))
        except NotImplementedError as err:
            got = ("refused", str(err))
        except Exception as err:  # noqa: BLE001 - recorded, then reported by the test
            got = ("error", f"{type(err).__name__}: {err}")
        after = record_state(model)
        same = before.keys() == after.keys() and all(
            torch.equal(before[k], after[k]) if isinstance(before[k], torch.Tensor)
            else before[k] == after[k] for k in before)
        out[name] = got + (same,)
    return out


def _ranked(rank):
    torch.manual_seed(0)
    build, loss_fn, units, _, shards = case("mlp")
    model = shard(build(), units, True)
    for p in model.parameters():  # a user's gradient, which must survive
        p.grad = torch.ones_like(p)
    out = run_all(model, loss_fn, shards[rank], True, state)
    kept = shard(build(), units, False)  # reshard_after_forward=False: units stay gathered
    out["kept"] = run_all(kept, loss_fn, shards[rank], True, state, KEPT)
    return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    ranks = run_ranks(tmp_path_factory.mktemp("public"), _ranked)
    build, loss_fn, _, data, _ = case("mlp")
    single = run_all(build(), loss_fn, data, False, lambda m: {})
    return ranks, single


def close(a, b, path="result"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, (np.ndarray, float)) and not isinstance(a, bool):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=path)
    else:
        assert a == b, path


@pytest.mark.parametrize("name", sorted(CALLS) + [f"kept:{n}" for n in KEPT])
def test_works_or_refuses_and_leaves_the_model_as_found(outcomes, name):
    ranks, single = outcomes
    kept, name = name.startswith("kept:"), name.removeprefix("kept:")
    expected = CALLS[name][0]
    for rank, got in enumerate(ranks):
        kind, value, same = (got["kept"] if kept else got)[name]
        assert same, f"{name} changed the model on rank {rank}"
        if expected == REFUSED:
            assert kind == "refused", (rank, value)
            named = "Identity" if name == "CurvatureOperator" else name  # the subclass's
            assert "fully_shard" in value and named in value and "top_eigenvalues" in value
        else:
            assert kind == "ok", (rank, value)
            assert single[name][0] == "ok", single[name]
            close(value, single[name][1], name)
