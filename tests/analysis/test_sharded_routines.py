"""The routines that take a model and only read or evaluate it, on a model sharded with FSDP2's
``fully_shard``: ``mean_loss``, ``evaluate``, the ``Tracker``, ``landscape.recalibrate_bn``,
``interpolate`` with BatchNorm buffers or ``bn_data``, ``pca_directions`` and
``project_trajectory``. Each rank passes its (uneven) shard of the data; every rank must return
the one-process answer on all the data (float64, 1e-9), directions as DTensors placed like the
parameters, and leave the model exactly as found (a training step after tracking equals one
without it). Also at 4 ranks (a shard holding no row of a parameter) and under a
mixed-precision policy (the routines compute at the stored precision: the policy's casts are
not applied, whereas the model's own forward applies them)."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

import analysis
import landscape
from analysis.core.sharding import is_dtensor
from tests.analysis.sharded_problems import case, ce, run_ranks, shard, state

RTOL = 1e-9
Q = dict(progress=False)
pytestmark = pytest.mark.filterwarnings("ignore:Lanczos did not converge")


def bn_model(seed=0):
    """Linear, BatchNorm1d, Tanh, Linear in float64 (units: both Linear layers)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))
    model = model.to(torch.float64)
    with torch.no_grad():  # statistics of another training run, to interpolate towards
        model[1].running_mean.copy_(torch.linspace(-1, 1, 7) * (seed + 1))
        model[1].running_var.copy_(torch.linspace(0.5, 2, 7) * (seed + 1))
    return model


def bn_units(model):
    return [model[0], model[3]]


def full(x):
    """Results as plain numbers: DTensors gathered (their placements checked), in containers."""
    if isinstance(x, torch.Tensor):
        if is_dtensor(x):
            assert list(x.placements) == [Shard(0)], x.placements
            x = x.full_tensor()
        return x.detach().numpy().copy()
    if isinstance(x, dict):
        return {k: full(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [full(v) for v in x]
    return x


def trajectory(model):
    """Three checkpoints of ``model`` (sharded state_dicts for a sharded model)."""
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return [start, {k: 1.5 * v for k, v in start.items()},
            {k: v.sin() if v.is_floating_point() else v for k, v in start.items()}]


def loss_routines(model, data):
    """mean_loss, evaluate, PCA and projections on the MLP."""
    traj = trajectory(model)
    pca = landscape.pca_directions(traj, model, n=2)
    dirs = [landscape.random_direction(model, seed=s, ignore_bias_bn=False) for s in (1, 2)]
    out = {"mean_loss": analysis.mean_loss(model, ce, data, **Q),
           "evaluate": analysis.evaluate(model, ce, data, **Q),
           "pca": [dict(d) for d in pca.directions], "variance": pca.explained_variance,
           "ratio": pca.explained_variance_ratio, "pca_coords": pca.coords,
           "projection": landscape.project_trajectory(traj, model, dirs)}
    whole = [{k: v.full_tensor() if is_dtensor(v) else v for k, v in c.items()} for c in traj]
    out["projection_full"] = landscape.project_trajectory(whole, model, dirs)  # full tensors
    return full(out)


def bn_routines(model, other, data):
    """interpolate with buffers and with bn_data, then recalibrate_bn (which changes buffers)."""
    alphas = [0.0, 0.3, 1.0, 1.4]
    out = {"buffers": landscape.interpolate(model, other, ce, data, alphas, **Q),
           "bn_data": landscape.interpolate(model, other, ce, data, alphas, bn_data=data, **Q),
           "params_only": landscape.interpolate(model, other, ce, data, alphas, buffers=False,
                                                **Q)}
    out = {k: (r.losses, r.barrier, r.loss_a, r.loss_b) for k, r in out.items()}
    out["recalibrated"] = landscape.recalibrate_bn(model, ce, data)
    out["statistics"] = {k: v.clone() for k, v in model[1].state_dict().items()}
    return full(out)


def train(model, batches, track, rank_data=None):
    """Two Adam steps on ``batches`` (this rank's), recorded every step when ``track`` (Adam:
    the Tracker also records the preconditioned lambda_max, with the sharded state as P)."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = None
    if track:
        data = rank_data
        tracker = analysis.Tracker(model, ce, every=1, eval_data=data, test_data=data,
                                   curvature_data=data, lambda_max=True, trace=True,
                                   grad_norm=True, lanczos_max_hvp=8, trace_n_hvp=4)
    weights = []
    for batch in batches:
        opt.zero_grad()
        loss = ce(model, batch)
        loss.backward()
        opt.step()
        if tracker is not None:
            tracker.step(opt, loss)
        weights.append([p.detach().clone() for p in model.parameters()])
    return tracker, weights


def records(tracker):
    """The records, without what each rank measures of itself (its step loss, times)."""
    skip = ("loss", "time", "overhead")
    return [{k: v for k, v in r.items() if k not in skip} for r in tracker.records]


def training_batches(rank, world):
    """Two steps of 8 samples: rank r's equal part of each (the gradient of the global mean)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 8), generator=gen)
    part = 8 // world
    return [(x[s, rank * part:(rank + 1) * part], y[s, rank * part:(rank + 1) * part])
            for s in range(2)]


def _two_ranks(rank):
    warnings.filterwarnings("ignore", "Lanczos did not converge")
    torch.manual_seed(0)
    build, _, units, _, shards = case("mlp")
    out, same = {}, {}
    model = shard(build(), units, True)
    for p in model.parameters():  # a user's gradient, which must survive
        p.grad = torch.full_like(p, 0.5)
    before = state(model)
    out["loss"] = loss_routines(model, shards[rank])
    same["loss"] = _same(before, state(model))

    bn, other = shard(bn_model(), bn_units, True), shard(bn_model(1), bn_units, False)
    before = state(bn)
    kept = {k: v.clone() for k, v in bn[1].named_buffers()}
    out["bn"] = bn_routines(bn, other, shards[rank])
    with torch.no_grad():  # recalibrate_bn changed the statistics, on purpose
        for k, v in kept.items():
            bn[1].get_buffer(k).copy_(v)
    same["bn"] = _same(before, state(bn))

    tracked, plain = (shard(build(), units, True) for _ in range(2))
    batches = training_batches(rank, 2)
    tracker, with_tracker = train(tracked, batches, True, shards[rank])
    _, without = train(plain, batches, False)
    out["tracker"] = records(tracker)
    same["training"] = all(torch.equal(a.to_local(), b.to_local())
                           for step_a, step_b in zip(with_tracker, without)
                           for a, b in zip(step_a, step_b))
    out["mixed"], same["mixed"] = _mixed_precision(rank, shards[rank])
    return out, same


def _same(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def _mixed_precision(rank, data):
    """The routines on a model sharded with a float32 policy, and the model's own forward."""
    build, _, units, _, _ = case("mlp")
    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    model = build()
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,))
    for unit in [*units(model), model]:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    before = state(model)
    got = {"mean_loss": analysis.mean_loss(model, ce, data, **Q),
           "evaluate": analysis.evaluate(model, ce, data, **Q),
           "top": analysis.top_eigenvalues(model, ce, data, k=1, max_hvp=6, **Q).eigenvalues}
    same = _same(before, state(model))
    with torch.no_grad():  # the model as it computes: float32 weights (last, it changes state)
        own = [ce(model, batch) for batch in data]
    got["own_dtype"] = str(own[0].dtype)
    return full(got), same


def single():
    """The one-process answers on all the data."""
    build, _, _, data, _ = case("mlp")
    out = {"loss": loss_routines(build(), data),
           "bn": bn_routines(bn_model(), bn_model(1), data)}
    torch.manual_seed(0)
    model = build()
    full_batches = [(torch.cat([a[0] for a in pair]), torch.cat([a[1] for a in pair]))
                    for pair in zip(training_batches(0, 2), training_batches(1, 2))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker, _ = train(model, full_batches, True, data)
    out["tracker"] = records(tracker)
    model = build()
    out["mixed"] = full({"mean_loss": analysis.mean_loss(model, ce, data, **Q),
                         "evaluate": analysis.evaluate(model, ce, data, **Q),
                         "top": analysis.top_eigenvalues(model, ce, data, k=1, max_hvp=6,
                                                         **Q).eigenvalues})
    return out


def close(a, b, path="result"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (path, sorted(set(a) ^ set(b)))
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, (np.ndarray, float)) and not isinstance(a, bool):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-12, err_msg=path)
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("routines"), _two_ranks), single()


@pytest.mark.parametrize("part", ["loss", "bn", "tracker"])
def test_one_process_answer_on_every_rank_and_the_model_as_found(outcomes, part):
    ranks, one = outcomes
    if part == "bn":  # the forward passes of recalibrate_bn: this rank's batches
        assert one["bn"].pop("recalibrated", 4) == 4
        assert all(got["bn"].pop("recalibrated", 2) == 2 for got, _ in ranks)
    for rank, (got, same) in enumerate(ranks):
        close(got[part], one[part], f"rank {rank}: {part}")
        assert same["training" if part == "tracker" else part], (rank, part)


def test_tracking_leaves_training_unchanged_and_records_every_quantity(outcomes):
    ranks, one = outcomes
    keys = set().union(*one["tracker"])
    assert {"lambda_max", "trace", "grad_norm", "train_loss", "test_acc", "angle/0.weight",
            "cos/4.bias", "rownorm/2.weight"} <= keys
    for got, same in ranks:
        assert same["training"]  # bit for bit, every step


def test_mixed_precision_policy_is_not_applied(outcomes):
    """The routines give the float64 answer of the stored weights; the model's own forward
    runs in the policy's float32."""
    ranks, one = outcomes
    for got, same in ranks:
        assert same["mixed"]
        assert got["mixed"].pop("own_dtype") == "torch.float32"
        close(got["mixed"], one["mixed"], "mixed")


def _four_ranks(rank):
    warnings.filterwarnings("ignore", "Lanczos did not converge")
    build, _, units, data, _ = case("mlp")  # Linear(6, 3): rank 3 holds no row of it
    model = shard(build(), units, True)
    before = state(model)
    got = loss_routines(model, [data[rank]])
    bn = shard(bn_model(), bn_units, True)
    got["recalibrated"] = landscape.recalibrate_bn(bn, ce, [data[rank]])
    got["statistics"] = full({k: v.clone() for k, v in bn[1].state_dict().items()})
    return got, _same(before, state(model))


def test_four_ranks(tmp_path):
    ranks = run_ranks(tmp_path, _four_ranks, world=4)
    build, _, _, data, _ = case("mlp")
    want = loss_routines(build(), data)
    bn = bn_model()
    landscape.recalibrate_bn(bn, ce, data)
    want["statistics"] = full({k: v.clone() for k, v in bn[1].state_dict().items()})
    for rank, (got, same) in enumerate(ranks):
        assert same, rank
        assert got.pop("recalibrated") == 1
        close(got, want, f"rank {rank}")
