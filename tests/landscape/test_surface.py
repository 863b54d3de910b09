"""line/plane: exact values on a quadratic, curvature d'Hd, vmap == loop, errors, model
unchanged."""
import numpy as np
import pytest
import torch
from torch import nn

from analysis import mean_loss, supervised
from landscape import line, plane, random_direction
from tests.oracles import (assert_unchanged, classification_data, cnn_bn, exact_hessian, mlp,
                           snapshot, uneven_batches)
from tests.landscape.problems import ce, quad_loss, quadratic_problem

CE = supervised(nn.CrossEntropyLoss())


def closed_form(model, b, v):
    w = model.w.detach() + v
    return (0.5 * w @ model.A @ w + b @ w).item()


def test_line_and_plane_exact_on_a_quadratic():
    model, data, b, d1, d2 = quadratic_problem()
    snap = snapshot(model)
    xs, ys = np.linspace(-1.5, 2.0, 6), np.array([-1.0, 0.0, 0.25])
    res = plane(model, quad_loss, data, d1, d2, xs, ys, progress=False)
    assert res.losses.shape == (3, 6)
    want = [[closed_form(model, b, x * d1["w"] + y * d2["w"]) for x in xs] for y in ys]
    np.testing.assert_allclose(res.losses, want, rtol=1e-13)
    assert res.n_forward == 18 * 3 + 1  # points x batches, plus one probe sizing the chunks
    lin = line(model, quad_loss, data, d1, xs, progress=False, chunk_size=4)
    np.testing.assert_allclose(lin.losses, [closed_form(model, b, a * d1["w"]) for a in xs],
                               rtol=1e-13)
    assert lin.n_forward == 6 * 3
    assert_unchanged(model, snap)


def test_second_difference_equals_directional_curvature():
    x, y = classification_data(n=23)
    model, data = mlp(), uneven_batches(x, y)
    d = random_direction(model, "filter", seed=2)
    h = 1e-3
    res = line(model, ce, data, d, [-h, 0.0, h], progress=False)
    second = (res.losses[0] - 2 * res.losses[1] + res.losses[2]) / h ** 2
    H = exact_hessian(model, ce, data)
    v = torch.cat([d[n].reshape(-1) for n, _ in model.named_parameters()])
    assert second == pytest.approx((v @ H @ v).item(), rel=1e-5)
    assert res.losses[1] == pytest.approx(mean_loss(model.eval(), CE, data), rel=1e-14)


@pytest.mark.parametrize("make,mode", [(mlp, "eval"), (cnn_bn, "eval"), (cnn_bn, "train")])
def test_vmap_path_equals_loop_path_and_model_unchanged(make, mode):
    model = make()
    x, y = classification_data(n=23, d=6 if make is mlp else 12)
    data = uneven_batches(x, y)
    model.train()
    snap = snapshot(model)
    d1, d2 = random_direction(model, seed=1), random_direction(model, "layer", seed=2)
    xs, ys = [-0.5, 0.0, 0.5], [-0.2, 0.3]
    kw = dict(model_mode=mode, progress=False, chunk_size=4)
    if mode == "train":  # BatchNorm updates its buffers in place: not vmappable, falls back
        with pytest.warns(RuntimeWarning, match="vmapped"):
            auto = plane(model, CE, data, d1, d2, xs, ys, **kw)
    else:
        auto = plane(model, CE, data, d1, d2, xs, ys, vectorize=True, **kw)
    loop = plane(model, CE, data, d1, d2, xs, ys, vectorize=False, **kw)
    np.testing.assert_allclose(auto.losses, loop.losses, rtol=1e-13)
    with torch.no_grad():  # one point by hand, weights written into a copy
        import copy
        ref = copy.deepcopy(model).train(mode == "train")
        for n, p in ref.named_parameters():
            p.add_(0.5 * d1[n] + 0.3 * d2[n])
        np.testing.assert_allclose(loop.losses[1, 2], mean_loss(ref, CE, data, model_mode=mode),
                                   rtol=1e-13)
    assert_unchanged(model, snap)


def test_cpu_auto_vmaps_small_work_and_loops_large(recwarn):
    """On a CPU, "auto" tries vmap only when MIN_CPU_CHUNK points fit the per-tensor budget; a
    loss that cannot be vmapped (``.item()``) shows which path was tried: the fallback warns."""
    from landscape import points as evaluate

    model = mlp()
    d1 = random_direction(model, seed=1)

    def unvmappable(m, batch):
        loss = CE(m, batch)
        return loss * (1.0 + 0.0 * loss.item())

    def run(n, **kw):
        x, y = classification_data(n=n, d=6)
        return line(model, unvmappable, [(x, y)], d1, np.linspace(-1, 1, 9), progress=False, **kw)

    per_sample = 8 * 8  # the widest activation: 8 float64 per sample
    with pytest.warns(RuntimeWarning, match="vmapped"):
        tried = run(64)
    recwarn.clear()
    large = evaluate.CPU_TENSOR_BYTES // (evaluate.MIN_CPU_CHUNK * per_sample) + 1
    looped = run(large)
    assert not [w for w in recwarn if "vmapped" in str(w.message)]
    assert looped.n_forward == 9 + 1 and tried.n_forward == 9 + 1
    with pytest.warns(RuntimeWarning, match="vmapped"):  # an explicit chunk_size always tries vmap
        run(large, chunk_size=9)


def test_direction_subset_and_buffer_keys():
    model = cnn_bn()
    x, y = classification_data(n=10, d=12)
    d = {"fc.weight": torch.ones_like(model.fc.weight),
         "bn.running_mean": torch.ones(3, dtype=torch.float64)}
    res = line(model, CE, [(x, y)], d, [0.1], progress=False)
    import copy
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref.fc.weight.add_(0.1)
        ref.bn.running_mean.add_(0.1)
    assert res.losses[0] == pytest.approx(CE(ref, (x, y)).item(), rel=1e-13)


@pytest.mark.filterwarnings("ignore:the model cannot be vmapped")
def test_errors_name_the_argument_or_point():
    model, data, _, d1, d2 = quadratic_problem()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="xs"):
        plane(model, quad_loss, data, d1, d2, [], [0.0], progress=False)
    with pytest.raises(ValueError, match="alphas"):
        line(model, quad_loss, data, d1, [0.0, np.nan], progress=False)
    with pytest.raises(ValueError, match="d2"):
        plane(model, quad_loss, data, d1, {"w": torch.zeros(3)}, [0.0], [0.0], progress=False)
    with pytest.raises(ValueError, match="not parameters"):
        line(model, quad_loss, data, {"v": torch.zeros(5)}, [0.0], progress=False)

    w0 = model.w.detach().clone()

    def blows_up(m, batch):  # NaN beyond x = 1.5
        x = (m.w - w0) @ d1["w"] / (d1["w"] @ d1["w"])
        return torch.where(x > 1.5, torch.nan, quad_loss(m, batch))

    with pytest.raises(ValueError, match=r"non-finite loss .* at grid point \(x=2, y=0\)"):
        plane(model, blows_up, data, d1, d2, [0.0, 1.0, 2.0], [0.0], progress=False)
    with pytest.raises(ValueError, match="scalar"):
        line(model, lambda m, b: m(b[0]), data, d1, [0.0], progress=False)
    with pytest.raises(ValueError, match="model_mode"):
        line(model, quad_loss, data, d1, [0.0], model_mode="test")
    with pytest.raises(ValueError, match="vectorize"):
        line(model, quad_loss, data, d1, [0.0], vectorize="yes")
    assert_unchanged(model, snap)


def test_filter_normalised_line_is_invariant_to_relu_rescaling():
    """Dinh et al.: scaling layer l by a and layer l+1 by 1/a keeps the function; the
    filter-normalised curve (same seed) must not change, the unnormalised one does."""
    model = mlp(sizes=(6, 8, 5, 3), act=nn.ReLU)
    x, y = classification_data(n=23)
    data = uneven_batches(x, y)
    import copy
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[0].weight.mul_(4.0)
        scaled[0].bias.mul_(4.0)
        scaled[2].weight.div_(4.0)
    alphas = np.linspace(-1, 1, 5)
    curves = {}
    for norm in ("filter", "none"):
        curves[norm] = [line(m, ce, data, random_direction(m, norm, seed=3), alphas,
                             progress=False).losses for m in (model, scaled)]
    np.testing.assert_allclose(curves["filter"][0], curves["filter"][1], rtol=1e-12)
    assert np.abs(curves["none"][0] - curves["none"][1]).max() > 1e-3
