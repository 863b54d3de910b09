"""The reproductions' protocol pieces: the square loss, stopping at a training accuracy, training
beyond the training split, torch threads in the workers and the environment record."""
from __future__ import annotations

import pytest
import torch

from figures.harness import (SIZES, environment, execute, job, mlp, split, square_criterion,
                             subset_split)
from figures.runner import Runner

TINY = SIZES["tiny"]


def test_square_loss_is_half_the_squared_distance_to_the_onehot_target():
    outputs = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([2, 0])
    expected = (0.5 * (0.25 + 1.0 + 1.0) + 0.5 * 1.0) / 2
    assert float(square_criterion(outputs, targets)) == pytest.approx(expected)
    hessian = torch.autograd.functional.hessian(lambda o: square_criterion(o, targets), outputs)
    assert torch.allclose(hessian.reshape(6, 6), torch.eye(6, dtype=torch.float64) / 2)


def _gd(**options):
    return job("test", "GD", "SGD", 0, {"lr": 0.1, "momentum": 0.0}, batch_size=64, subset=64,
               schedule="constant", loss="square", **options)


def test_stop_acc_ends_the_run_after_the_step_whose_weights_reached_it():
    """stop_acc 0 is reached by the initial weights: one step is taken, then the run ends;
    an unreachable accuracy runs to the cap."""
    once = execute(_gd(steps=6, stop_acc=0.0), TINY)
    assert once["steps"] == 1 and once["stop_train_acc"] >= 0.0
    data = split(TINY)
    model = mlp(TINY, 0)
    with torch.no_grad():
        start = float((model(data.x[:64]).argmax(-1) == data.y[:64]).double().mean())
    assert once["stop_train_acc"] == pytest.approx(start)
    capped = execute(_gd(steps=6, stop_acc=1.01), TINY)
    assert capped["steps"] == 6 and len(capped["curves"]["test_acc"]) == 1


def test_a_subset_beyond_the_training_split_draws_on_validation_and_test_samples():
    data = split(TINY)
    fit = len(data.y)
    pooled = subset_split(TINY, fit + 100)
    every_x = torch.cat([data.x, data.x_val, data.x_test])
    assert torch.equal(pooled.x, every_x[:fit + 100])
    assert torch.equal(pooled.x_val, every_x[fit + 100:fit + 100 + TINY.n_val])
    assert torch.equal(pooled.x_test, every_x[fit + 100 + TINY.n_val:])
    assert torch.equal(subset_split(TINY, 50).x, data.x[:50])
    with pytest.raises(ValueError, match="subset"):
        subset_split(TINY, len(every_x))


def test_threads_reach_the_worker_processes():
    runner = Runner(TINY, workers=2, threads=2)
    try:
        result, = runner.run([_gd(steps=1)])
    finally:
        runner.close()
    assert result["threads"] == 2


def test_the_environment_names_the_float_path():
    env = environment(3, 2)
    assert env["jobs"] == 3 and env["threads_per_worker"] == 2
    assert env["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["torch"] == torch.__version__ and env["cpu"]


class _Momentum:
    """An optimizer stand-in holding a given momentum for the one weight of a model."""

    def __init__(self, p, m):
        self.state = {p: {"exp_avg": m}}


def test_tangent_cosine_projects_out_the_radial_parts():
    from figures.measure import vector_cosine
    model = torch.nn.Linear(2, 1, bias=False)
    before = [torch.tensor([[2.0, 0.0]])]
    with torch.no_grad():
        model.weight.copy_(before[0] + torch.tensor([[0.3, 1.0]]))
    opt = _Momentum(model.weight, torch.tensor([[0.5, -1.0]]))
    full = -(0.3 * 0.5 - 1.0) / (torch.tensor([0.3, 1.0]).norm() * torch.tensor([0.5, -1.0]).norm())
    assert vector_cosine(model, opt, before) == pytest.approx(float(full))
    assert vector_cosine(model, opt, before, tangent=True) == pytest.approx(1.0)


def test_ndadam_moves_each_vector_along_its_tangent_momentum_and_adam_does_not():
    """ND-Adam's tangent cosine is 1 to rounding (its definition); Adam's per-coordinate
    scaling makes its own smaller."""
    from figures.harness import OPTIMIZERS
    from figures.measure import vector_cosine
    data = split(TINY)
    found = {}
    for name, hp in (("NDAdam", {"lr": 0.05, "scalar_lr": 0.001}), ("Adam", {"lr": 0.01})):
        model = mlp(TINY, 0, batchnorm=True)
        opt = OPTIMIZERS[name](model, hp)
        for _ in range(3):
            before = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(data.x[:64]), data.y[:64]).backward()
            opt.step()
        found[name] = vector_cosine(model, opt, before, tangent=True)
    assert found["NDAdam"] == pytest.approx(1.0, abs=1e-5)
    assert found["Adam"] < 0.99


def test_a_small_configuration_gives_the_same_verdicts_on_both_float_paths(float_paths):
    """adaptive_eos at the tiny size under ATEN_CPU_CAPABILITY=default (scalar kernels) and the
    machine's default kernels: every check's verdict agrees, and each summary names its path
    (the runs are ``tests/figures/conftest.py``'s, shared with test_selection)."""
    scalar, vector = (float_paths[p]["adaptive_eos"] for p in ("scalar", "vector"))
    assert scalar["environment"]["aten_cpu_capability"] == "DEFAULT"
    assert vector["environment"]["ATEN_CPU_CAPABILITY"] is None
    assert ({k: c["verdict"] for k, c in scalar["checks"].items()}
            == {k: c["verdict"] for k, c in vector["checks"].items()})
