"""interpolate: endpoints, the barrier in closed form, BatchNorm buffers and recalibration."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from analysis import mean_loss, supervised
from landscape import interpolate, recalibrate_bn
from tests.oracles import assert_unchanged, classification_data, cnn_bn, snapshot, uneven_batches
from tests.landscape.problems import quad_loss, quadratic_problem

CE = supervised(nn.CrossEntropyLoss())


def test_barrier_closed_form_on_a_quadratic():
    model_a, data, b, _, _ = quadratic_problem()
    model_b = copy.deepcopy(model_a)
    with torch.no_grad():  # move along a negative-curvature direction: a real barrier
        evals, evecs = torch.linalg.eigh(model_a.A)
        model_b.w.add_(2.0 * evecs[:, 0] + 0.3 * evecs[:, -1])
    sa, sb = snapshot(model_a), snapshot(model_b)
    alphas = np.linspace(-0.25, 1.25, 13)
    res = interpolate(model_a, model_b, quad_loss, data, alphas, progress=False)
    delta = model_b.w.detach() - model_a.w.detach()

    def L(w):
        return (0.5 * w @ model_a.A @ w + b @ w).item()

    la, lb = L(model_a.w.detach()), L(model_b.w.detach())
    want = [L(model_a.w.detach() + a * delta) for a in alphas]
    np.testing.assert_allclose(res.losses, want, rtol=1e-13)
    assert res.loss_a == pytest.approx(la, rel=1e-14) and res.loss_b == pytest.approx(lb, rel=1e-13)
    # L(alpha) - chord = -1/2 alpha (1 - alpha) delta' A delta
    curv = (delta @ model_a.A @ delta).item()
    assert curv < 0
    assert res.barrier == pytest.approx(max(-0.5 * a * (1 - a) * curv for a in alphas), rel=1e-10)
    assert res.n_forward > 0
    assert_unchanged(model_a, sa)
    assert_unchanged(model_b, sb)


def test_endpoints_and_interpolated_batchnorm_buffers(tmp_path):
    a, b = cnn_bn(seed=0), cnn_bn(seed=1)
    x, y = classification_data(n=23, d=12)
    data = uneven_batches(x, y)
    torch.save(b.state_dict(), tmp_path / "b.pt")
    res = interpolate(a, tmp_path / "b.pt", CE, data, [0.0, 0.5, 1.0], progress=False)
    assert res.losses[0] == pytest.approx(mean_loss(a.eval(), CE, data), rel=1e-13)
    assert res.losses[2] == pytest.approx(mean_loss(b.eval(), CE, data), rel=1e-13)
    mid = copy.deepcopy(a)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    mid.load_state_dict({k: 0.5 * sd_a[k] + 0.5 * sd_b[k] if sd_a[k].is_floating_point()
                         else sd_a[k] for k in sd_a})
    assert res.losses[1] == pytest.approx(mean_loss(mid.eval(), CE, data), rel=1e-12)
    fixed = interpolate(a, b, CE, data, [0.5], buffers=False, progress=False)
    with torch.no_grad():
        for k in ("bn.running_mean", "bn.running_var"):
            mid.get_buffer(k).copy_(sd_a[k])
    assert fixed.losses[0] == pytest.approx(mean_loss(mid.eval(), CE, data), rel=1e-12)


def test_batchnorm_recalibration_at_each_point():
    a, b = cnn_bn(seed=0), cnn_bn(seed=1)
    snap = snapshot(a)
    x, y = classification_data(n=23, d=12)
    data = uneven_batches(x, y)
    bn_data = [(x[:15], y[:15])]
    res = interpolate(a, b, CE, data, [0.25], bn_data=bn_data, progress=False)
    ref = copy.deepcopy(a)
    with torch.no_grad():  # weights at alpha = 0.25, statistics by hand on the batch
        for p, pb in zip(ref.parameters(), b.parameters()):
            p.mul_(0.75).add_(0.25 * pb)
        h = ref.conv(x[:15].unsqueeze(1))
        ref.bn.running_mean.copy_(h.mean(dim=(0, 2)))
        ref.bn.running_var.copy_(h.var(dim=(0, 2), unbiased=True))
    assert res.losses[0] == pytest.approx(mean_loss(ref.eval(), CE, data), rel=1e-12)
    assert res.n_forward == 3 * (1 + len(data))  # alpha, 0 and 1: recalibration + evaluation
    assert_unchanged(a, snap)
    assert recalibrate_bn(nn.Linear(2, 2), CE, bn_data) == 0
    with pytest.raises(ValueError, match="bn_data"):
        recalibrate_bn(copy.deepcopy(a), CE, [])


def test_recalibrate_bn_changes_nothing_on_error():
    model = cnn_bn()
    model.train()
    x, y = classification_data(n=23, d=12)
    snap = snapshot(model)

    def failing(model, batch, calls=[]):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return CE(model, batch)

    for data, error in [([], ValueError), (iter([(x, y)]), ValueError),
                        ([(x[:9], y[:9]), (x[9:], y[9:])], RuntimeError)]:
        with pytest.raises(error):
            recalibrate_bn(model, failing if error is RuntimeError else CE, data)
        assert_unchanged(model, snap)
        assert model.bn.momentum == 0.1
    assert recalibrate_bn(model, CE, [(x, y)]) == 1  # success: the new statistics stay
    h = model.conv(x.unsqueeze(1)).detach()
    torch.testing.assert_close(model.bn.running_mean, h.mean(dim=(0, 2)))
    assert model.training and model.bn.momentum == 0.1


def test_interpolate_rejects_mismatched_models():
    a = cnn_bn()
    with pytest.raises(ValueError, match="model_b lacks"):
        interpolate(a, {"fc.weight": torch.zeros(3, 36)}, CE, [classification_data(d=12)], [0.5])
