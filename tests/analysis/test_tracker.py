"""Each Tracker quantity against a direct computation (exact Hessians, direct counts, norms)."""
from __future__ import annotations

import csv
import json
import os
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from analysis.metrics import evaluate, full_grad_norm
from analysis.tracker import Tracker
from optim import AGD, SALA, SAM, NDAdam, normalize_vectors_
from tests.oracles import (assert_unchanged, classification_data, cnn_bn, exact_grad, exact_hessian,
                           mlp, snapshot, uneven_batches)
from tests.analysis.problems import LOSS, closure_for


def PLAIN(model, batch):  # the same loss for the functional oracles (no parameters to look up)
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture
def setup():
    model = mlp((6, 8, 5, 3))
    x, y = classification_data(n=23)
    data = uneven_batches(x, y)
    return model, data


def train(model, opt, data, tracker, steps):
    for t in range(steps):
        batch = data[t % len(data)]
        loss = opt.step(tracker.count(closure_for(model, opt, batch)))
        tracker.step(opt, loss)


def test_loss_accuracy_and_grad_norm_against_direct(setup):
    model, data = setup
    tracker = Tracker(model, LOSS, every=1, eval_data=data, test_data=data[:2],
                      curvature_data=data, grad_norm=True, layers=False)
    snap = snapshot(model)
    rec = tracker.log()
    assert_unchanged(model, snap)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    with torch.no_grad():
        out = model(x)
    assert rec["train_loss"] == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-12)
    assert rec["train_acc"] == pytest.approx(float((out.argmax(1) == y).double().mean()))
    x2, y2 = torch.cat([b[0] for b in data[:2]]), torch.cat([b[1] for b in data[:2]])
    with torch.no_grad():
        acc2 = float((model(x2).argmax(1) == y2).double().mean())
    assert rec["test_acc"] == pytest.approx(acc2)
    exact = float(exact_grad(model, PLAIN, data).norm())
    assert rec["grad_norm"] == pytest.approx(exact, rel=1e-10)
    assert full_grad_norm(model, LOSS, data) == pytest.approx(exact, rel=1e-10)


def test_evaluate_without_criterion_matches_supervised(setup):
    model, data = setup
    assert evaluate(model, PLAIN, data) == pytest.approx(evaluate(model, LOSS, data), rel=1e-12)


def test_lambda_max_and_eos_ratio_against_eigvalsh():
    model = mlp((4, 5, 3))
    x, y = classification_data(n=13, d=4)
    data = uneven_batches(x, y, sizes=(5, 8))
    lr = 0.3
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = Tracker(model, LOSS, every=3, curvature_data=data, lambda_max=True,
                      lanczos_tol=1e-10, lanczos_max_hvp=200, layers=False)
    for _ in range(2):
        train(model, opt, data, tracker, 3)
        rec = tracker.records[-1]
        exact = float(torch.linalg.eigvalsh(exact_hessian(model, PLAIN, data))[-1])
        assert rec["lambda_max"] == pytest.approx(exact, rel=1e-8)
        assert rec["eos_ratio"] == pytest.approx(exact / (2.0 / lr), rel=1e-8)
    # the second run was warm-started from the first eigenvector
    assert tracker._v0 is not None and tracker.n_hvp == sum(
        r["lanczos_hvp"] for r in tracker.records)


def test_trace_against_exact_hessian():
    model = mlp((3, 4, 2))               # 26 parameters: Hutch++ with 3 * 26 probes is exact
    x, y = classification_data(n=11, d=3, classes=2)
    data = uneven_batches(x, y, sizes=(4, 7))
    tracker = Tracker(model, LOSS, curvature_data=data, trace=True, trace_n_hvp=81, layers=False)
    rec = tracker.log()
    exact = float(torch.trace(exact_hessian(model, PLAIN, data)))
    assert rec["trace"] == pytest.approx(exact, rel=1e-8, abs=1e-10)


def test_weight_norms_angles_and_cosines_against_direct(setup):
    model, data = setup
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    tracker = Tracker(model, LOSS, every=4)
    train(model, opt, data, tracker, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, data, tracker, 1)
    rec = tracker.records[-1]
    for name, p in model.named_parameters():
        w, w0, g = p.detach(), before[name], p.grad
        assert rec[f"wnorm/{name}"] == pytest.approx(float(torch.linalg.vector_norm(w)), rel=1e-12)
        d, ng = (w - w0).reshape(-1), -g.reshape(-1)
        assert rec[f"cos/{name}"] == pytest.approx(float(d @ ng / (d.norm() * ng.norm())), rel=1e-9)
        if w.dim() == 2:
            rows = [float(torch.linalg.vector_norm(r)) for r in w]
            assert rec[f"rownorm/{name}"] == pytest.approx(np.mean(rows), rel=1e-12)
            angles = [math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm())))))
                      for a, b in zip(w, w0)]
            assert rec[f"angle/{name}"] == pytest.approx(np.mean(angles), rel=1e-7, abs=1e-12)
        else:
            assert f"angle/{name}" not in rec


def test_sgd_momentum_update_cosine_is_one_on_first_step(setup):
    model, data = setup
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = Tracker(model, LOSS, every=1)
    tracker.start()                        # keeps the initial weights: step 1 is recorded
    train(model, opt, data, tracker, 1)
    for name, _ in model.named_parameters():
        assert tracker.records[0][f"cos/{name}"] == pytest.approx(1.0, abs=1e-12)


def test_sgd_fraction_against_direct_count(setup):
    model, data = setup
    params = list(model.named_parameters())
    groups = [{"params": [p for _, p in params[:2]], "delta": 1e-2},
              {"params": [p for _, p in params[2:]], "delta": 1e-3}]
    opt = AGD(groups, lr=1e-2)
    tracker = Tracker(model, LOSS, every=5)
    train(model, opt, data, tracker, 5)
    rec = tracker.records[-1]
    beta2, t = 0.999, 5
    masks = {}
    for group in opt.param_groups:
        for p in group["params"]:
            b = opt.state[p]["exp_avg_diff_sq"]
            masks[id(p)] = b.sqrt() < group["delta"] * math.sqrt(1 - beta2 ** t)
    total = sum(int(m.sum()) for m in masks.values())
    assert rec["sgd_fraction"] == pytest.approx(total / sum(p.numel() for _, p in params))
    assert 0.0 < rec["sgd_fraction"] < 1.0
    for name, p in params:
        assert rec[f"sgd_fraction/{name}"] == pytest.approx(float(masks[id(p)].double().mean()))


def test_pass_counts(setup):
    for make, per_step in [(lambda ps: torch.optim.SGD(ps, lr=0.1), 1),
                           (lambda ps: SAM(torch.optim.SGD(ps, lr=0.1)), 2)]:
        model, data = mlp((6, 8, 5, 3)), setup[1]
        opt = make(model.parameters())
        tracker = Tracker(model, LOSS, every=3, curvature_data=data, grad_norm=True)
        train(model, opt, data, tracker, 6)
        assert tracker.passes == 6 * per_step
        assert [r["passes"] for r in tracker.records] == [3.0 * per_step, 6.0 * per_step]
        if per_step == 2:
            assert tracker.records[-1]["opt_closure_calls"] == 12.0


class FakeSALA(torch.optim.SGD):
    """Duck-typed stand-in: a SALA-like optimizer exposing ``stage`` and ``distance``."""

    def step(self, closure=None):
        loss = super().step(closure)
        self.distance = self.distance / 2
        self.stage = 1 if self.distance > 0.5 else 2
        return loss


def test_stage_and_distance_read_by_duck_typing(setup):
    model, data = setup
    opt = FakeSALA(model.parameters(), lr=0.01)
    opt.distance, opt.stage = 4.0, 1
    tracker = Tracker(model, LOSS, every=1, layers=False)
    train(model, opt, data, tracker, 4)
    assert [r["distance"] for r in tracker.records] == [2.0, 1.0, 0.5, 0.25]
    assert [r["stage"] for r in tracker.records] == [1.0, 1.0, 2.0, 2.0]


def test_sala_stage_and_distance(setup):
    model, data = setup
    opt = SALA(torch.optim.SGD(model.parameters(), lr=0.5), k=2, alpha=0.5, rho=0.05)
    tracker = Tracker(model, LOSS, every=1, layers=False)
    seen = []
    for t in range(8):
        opt.step(tracker.count(closure_for(model, opt, data[t % len(data)])))
        tracker.step(opt)
        seen.append((float(opt.stage), opt.distance))
    assert [(r["stage"], r["distance"]) for r in tracker.records] == seen
    assert {s for s, _ in seen} == {1.0, 2.0} and len({d for _, d in seen}) > 2
    assert tracker.passes == opt.n_closure_calls == 9              # one SAM step in stage 2


def test_ndadam_diagnostics_read_and_match_the_trackers_angles(setup):
    model, data = setup
    normalize_vectors_(model.parameters())
    opt = NDAdam(model.parameters(), lr=0.05)
    tracker = Tracker(model, LOSS, every=3)
    train(model, opt, data, tracker, 6)
    rec = tracker.records[-1]
    names = [n for n, _ in model.named_parameters()]
    own = opt.angular_step()
    assert own and {f"opt_angular_step/{names[i]}" for i in own} <= set(rec)
    for i, value in own.items():
        assert rec[f"opt_angular_step/{names[i]}"] == value
        assert rec[f"angle/{names[i]}"] == pytest.approx(value, rel=1e-6)  # computed independently
    for i, value in opt.update_cosine().items():
        assert rec[f"opt_update_cosine/{names[i]}"] == value


def test_wall_time_excludes_the_trackers_own_work(setup):
    model, data = setup
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Slow(Tracker):
        def _record(self, optimizer, began):
            time.sleep(0.05)                         # analysis work
            return super()._record(optimizer, began)

    tracker = Slow(model, LOSS, every=2, layers=False)
    tracker.start()
    began = tracker._clock
    train(model, opt, data, tracker, 4)
    ended = tracker._clock                          # the clock restarts as each step returns
    assert tracker.overhead >= 0.1
    # every instant between start and the last return is either training or tracking
    assert tracker.train_time + tracker.overhead == pytest.approx(ended - began, rel=1e-9)
    assert tracker.train_time < (ended - began) - 0.1
    assert tracker.records[-1]["time"] == tracker.train_time


def test_save_json_csv_and_plot(setup, tmp_path):
    model, data = setup
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = Tracker(model, LOSS, every=2, eval_data=data)
    train(model, opt, data, tracker, 6)
    js, cs = tracker.save(tmp_path / "log", meta={"seed": 0})
    loaded = json.loads(js.read_text())
    assert loaded["meta"] == {"seed": 0} and loaded["records"] == tracker.records
    with cs.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and float(rows[-1]["train_loss"]) == tracker.records[-1]["train_loss"]
    fig = tracker.plot(tmp_path / "log.png")
    assert (tmp_path / "log.png").stat().st_size > 10_000 and not (tmp_path / "log.pdf").exists()
    assert {ax.get_ylabel() for ax in fig.axes} >= {"loss", "train_acc"}
    assert tracker.plot(tmp_path / "sub" / "run", title="t").axes   # folder made, png + pdf
    assert sorted(os.listdir(tmp_path / "sub")) == ["run.pdf", "run.png"]


def test_tracking_does_not_change_training():
    """Weights, BatchNorm statistics and grads end exactly as without a tracker."""
    x, y = classification_data(n=20, d=12)
    data = uneven_batches(x, y, sizes=(8, 12))
    ends = []
    for tracked in (False, True):
        model = cnn_bn()
        opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model=model)
        tracker = Tracker(model, LOSS, every=2 if tracked else 10 ** 6, eval_data=data,
                          test_data=data, curvature_data=data, lambda_max=True, trace=True,
                          grad_norm=True, trace_n_hvp=9, lanczos_max_hvp=5)
        train(model, opt, data, tracker, 4)
        assert len(tracker.records) == (2 if tracked else 0)
        ends.append(snapshot(model))
    for key in ("params", "buffers", "grads"):
        for name, value in ends[0][key].items():
            assert torch.equal(value, ends[1][key][name]), (key, name)


def test_bad_arguments(setup):
    model, _ = setup
    with pytest.raises(ValueError, match="every"):
        Tracker(model, LOSS, every=0)
    with pytest.raises(ValueError, match="curvature_data"):
        Tracker(model, LOSS, lambda_max=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"model_mode": "bogus"}, "model_mode must be one of"),
    ({"seed": -1}, "seed must be an int >= 0"),
    ({"seed": 1.5}, "seed must be an int"),
    ({"curvature_data": "generator", "lambda_max": True}, "curvature_data: data must be re-iter"),
    ({"eval_data": "generator"}, "eval_data: data must be re-iterable"),
    ({"trace_n_hvp": 3, "trace": True}, "trace_n_hvp must be an int >= 4"),
    ({"lanczos_tol": float("nan")}, "lanczos_tol must be a finite number > 0"),
    ({"lanczos_max_hvp": 0}, "lanczos_max_hvp must be an int >= 1"),
    ({"every": 2.0}, "every must be an int"),
    ({"trace": "no"}, "trace must be True or False"),
    ({"optimizer_methods": "angular_step"}, "optimizer_methods must be a sequence"),
])
def test_bad_settings_are_refused_at_construction(setup, kwargs, match):
    model, data = setup
    kwargs = {k: ((b for b in data) if v == "generator" else v) for k, v in kwargs.items()}
    kwargs.setdefault("curvature_data", data)
    with pytest.raises((ValueError, TypeError), match=match):
        Tracker(model, LOSS, **kwargs)


@pytest.mark.parametrize("stem", ["run_lr0.1", "run_lr0.01", "run.v2"])
def test_save_keeps_the_whole_name(setup, tmp_path, stem):
    model, data = setup
    tracker = Tracker(model, LOSS, every=1)
    tracker.log()
    js, cs = tracker.save(tmp_path / stem)
    assert (js.name, cs.name) == (stem + ".json", stem + ".csv") and js.exists() and cs.exists()
    assert tracker.save(tmp_path / "x.json")[0].name == "x.json"


def test_determinism_check_runs_at_the_first_curvature_record_only(setup, monkeypatch):
    from torch.utils.data import DataLoader, TensorDataset
    from analysis.core import guards

    model, data = setup
    calls = []
    real = guards.repeated_passes
    monkeypatch.setattr(guards, "repeated_passes",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)   # preconditioned lambda_max too
    tracker = Tracker(model, LOSS, every=1, curvature_data=data, lambda_max=True, trace=True,
                      lanczos_max_hvp=5, trace_n_hvp=8, layers=False)
    train(model, opt, data, tracker, 3)
    assert len(tracker.records) == 3 and "preconditioned_lambda_max" in tracker.records[-1]
    assert len(calls) == 1
    # a shuffled drop_last loader is still refused, at the first record
    x, y = classification_data(n=23)
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    for quantity in ("lambda_max", "trace"):
        tracker = Tracker(model, LOSS, curvature_data=loader, layers=False, **{quantity: True})
        with pytest.raises(ValueError, match="shuffle"):
            tracker.log()


def test_curvature_names_a_registered_curvature(monkeypatch):
    from analysis import HessianOperator, operator, register_curvature

    class Doubled(HessianOperator):
        def batch_product(self, batch, V):
            return 2.0 * super().batch_product(batch, V)

    monkeypatch.setattr(operator, "_REGISTRY", dict(operator._REGISTRY))
    register_curvature("doubled", Doubled)
    model = mlp((3, 4, 2))
    x, y = classification_data(n=11, d=3, classes=2)
    data = uneven_batches(x, y, sizes=(4, 7))
    tracker = Tracker(model, LOSS, curvature_data=data, lambda_max=True, trace=True,
                      lanczos_tol=1e-10, lanczos_max_hvp=200, trace_n_hvp=81, layers=False,
                      curvature="doubled")
    rec = tracker.log()
    H = exact_hessian(model, PLAIN, data)
    assert rec["lambda_max"] == pytest.approx(2 * float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)
    assert rec["trace"] == pytest.approx(2 * float(torch.trace(H)), rel=1e-8)
    with pytest.raises(ValueError, match="curvature must be one of 'hessian'"):
        Tracker(model, LOSS, curvature_data=data, lambda_max=True, curvature="nope")
