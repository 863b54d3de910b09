"""The batched sequential path (stacked weights, first layer computed once) against a plain loop.

The oracle evaluates every grid point alone: ``functional_call`` of the model at
``w + x d1 + y d2``, the criterion on each batch, the sample-weighted mean over the batches.
"""
import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from analysis import supervised
from landscape import line, plane, random_direction
from landscape import stacked
from tests.oracles import assert_unchanged, classification_data, snapshot, uneven_batches

pytestmark = pytest.mark.filterwarnings("error:the model cannot be vmapped")  # no silent fallback
XS, YS = np.linspace(-0.7, 0.9, 5), np.array([-0.4, 0.0, 0.6])


def plain(model, criterion, data, d1, d2):
    """losses[i, j] at (XS[j], YS[i]), one point at a time."""
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    out = np.zeros((len(YS), len(XS)))
    with torch.no_grad():
        for i, b in enumerate(YS):
            for j, a in enumerate(XS):
                point = {n: t + a * d1.get(n, 0) + b * d2.get(n, 0) for n, t in state.items()}
                total = sum(len(y) * criterion(functional_call(model, point, (x,)), y).item()
                            for x, y in data)
                out[i, j] = total / sum(len(y) for _, y in data)
    return out


def trained_bn(model):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 12) * 2 + 0.5)
    return model


def models():
    torch.manual_seed(0)
    return {
        "mlp": nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                             nn.Linear(16, 3)),
        "layernorm first": nn.Sequential(nn.LayerNorm(12), nn.Linear(12, 16), nn.GELU(),
                                         nn.Linear(16, 3)),
        "conv first": nn.Sequential(nn.Unflatten(1, (1, 12)), nn.Conv1d(1, 4, 3, padding=1),
                                    nn.ReLU(), nn.Flatten(), nn.Sequential(nn.Linear(48, 3))),
        "batchnorm": trained_bn(nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                              nn.Linear(16, 3))),
    }


CE = nn.CrossEntropyLoss()


def ce64(out, y):  # a loss in another dtype than the model
    return nn.functional.cross_entropy(out.double(), y)


@pytest.mark.parametrize("name", list(models()))
@pytest.mark.parametrize("criterion", [CE, ce64], ids=["float32 loss", "float64 loss"])
def test_batched_plane_equals_plain_loop(name, criterion):
    model = models()[name]
    x, y = classification_data(n=23, d=12, dtype=torch.float32)
    data = uneven_batches(x, y)
    d1, d2 = random_direction(model, seed=1), random_direction(model, "layer", seed=2)
    if name == "batchnorm":  # running statistics move too
        d2["1.running_mean"] = torch.randn(16) * 0.1
    model.eval()
    snap = snapshot(model)
    plan = stacked.sequential_plan(model, supervised(criterion),
                                   {n: [(1, d1[n])] for n in d1})
    assert plan is not None and plan.precompute == (name != "layernorm first")
    got = plane(model, supervised(criterion), data, d1, d2, XS, YS, progress=False)
    want = plain(model, criterion, data, d1, d2)
    np.testing.assert_allclose(got.losses, want, rtol=2e-6, atol=1e-6)
    assert got.n_forward == XS.size * YS.size * len(data) + 1
    assert_unchanged(model, snap)


@pytest.mark.parametrize("case", ["params subset", "zero on some tensors", "bias only"])
def test_batched_subsets_and_partial_directions(case):
    """(In chunks of 4 points: the stacked tensors are renewed per chunk and reused per batch,
    or formed per group for one batch.)"""
    model = models()["mlp"]
    x, y = classification_data(n=23, d=12, dtype=torch.float32)
    data = uneven_batches(x, y, (11, 12)) if case != "zero on some tensors" else [(x, y)]
    d1, d2 = random_direction(model, seed=1), random_direction(model, seed=2, ignore_bias_bn=False)
    kw = {}
    if case == "params subset":  # the first moving layer reads the fixed layers' output
        kw["params"] = ["2.weight", "4.bias"]
        keep = set(kw["params"])
    elif case == "zero on some tensors":
        keep = {"0.weight", "2.bias", "4.weight"}
        d2 = {n: t for n, t in d2.items() if n in {"0.bias", "2.weight"}}
    else:
        keep = {"0.bias", "4.bias"}
    d1 = {n: t for n, t in d1.items() if n in keep}
    if case != "zero on some tensors":
        d2 = {n: t for n, t in d2.items() if n in keep}
    got = plane(model, supervised(CE), data, d1, d2, XS, YS, progress=False, chunk_size=4, **kw)
    np.testing.assert_allclose(got.losses, plain(model.eval(), CE, data, d1, d2), rtol=2e-6,
                               atol=1e-6)


def test_batched_path_is_taken_in_groups_and_falls_back(monkeypatch):
    """A sequential model goes through the plan (in several groups when the CPU budget is small);
    a model that is not one, or a loss_fn that is not ``supervised``, gets no plan."""
    model = models()["mlp"]
    x, y = classification_data(n=40, d=12, dtype=torch.float32)
    d1 = random_direction(model, seed=1)
    calls = []
    original = stacked.SequentialPlan.losses

    def counted(self, cs, batch, group, device):
        calls.append((len(cs), group))
        return original(self, cs, batch, group, device)

    monkeypatch.setattr(stacked.SequentialPlan, "losses", counted)
    monkeypatch.setattr(stacked, "GROUP_ACTIVATION_BYTES", 3 * 40 * 16 * 4)
    alphas = np.linspace(-1, 1, 9)
    res = line(model, supervised(CE), [(x, y)], d1, alphas, progress=False)
    assert calls == [(9, 3)]
    origin = plain(model.eval(), CE, [(x, y)], {}, {})[0, 0]
    assert res.losses[4] == pytest.approx(origin, rel=1e-6)

    def custom(m, batch):
        return CE(m(batch[0]), batch[1])

    assert stacked.sequential_plan(model, custom, {"0.weight": [(1, d1["0.weight"])]}) is None
    wrapped = nn.Sequential(nn.Sequential(nn.Linear(12, 3)), nn.Dropout(0.5))
    assert stacked.sequential_plan(wrapped.train(), supervised(CE), {}) is None
    hooked = models()["mlp"]
    hooked[1].register_forward_hook(lambda *a: None)
    assert stacked.sequential_plan(hooked, supervised(CE), {}) is None
    for module in (nn.Softmax(dim=0), nn.Flatten(0), nn.BatchNorm1d(3, track_running_stats=False)):
        assert stacked.sequential_plan(nn.Sequential(nn.Linear(12, 3), module.eval()),
                                       supervised(CE), {}) is None


def test_tiled_linear_layers_equal_the_plain_loop(monkeypatch):
    """Weights formed in tiles of 3 rows (16 = 5 x 3 + 1: a partial last tile) for each group
    of points, on several batches run as one bunch: the plain loop's values."""
    model = models()["mlp"]
    x, y = classification_data(n=23, d=12, dtype=torch.float32)
    data = uneven_batches(x, y)
    d1, d2 = random_direction(model, seed=1), random_direction(model, seed=2)
    tiles = []
    original = stacked._tile_rows

    def spied(flat, n_out):
        rows = original(flat, n_out)
        tiles.append((len(flat), rows, n_out))
        return rows

    monkeypatch.setattr(stacked, "_tile_rows", spied)
    monkeypatch.setattr(stacked, "TILE_BYTES", 3 * 4 * 16 * 4)  # 3 rows for 4 points of 16 inputs
    got = plane(model, supervised(CE), data, d1, d2, XS, YS, progress=False, chunk_size=4)
    np.testing.assert_allclose(got.losses, plain(model.eval(), CE, data, d1, d2), rtol=2e-6,
                               atol=1e-6)
    assert (4, 3, 16) in tiles  # the hidden layer of a full group: tiled
    assert got.n_forward == XS.size * YS.size * len(data)


@pytest.mark.parametrize("criterion", [nn.CrossEntropyLoss(ignore_index=1),
                                       nn.CrossEntropyLoss(label_smoothing=0.2), nn.MSELoss()],
                         ids=["ignore_index", "label smoothing", "mse"])
def test_bunched_batches_equal_the_plain_loop(criterion, monkeypatch):
    """The batches of a list run as one forward per chunk of points (a batch of another input
    shape alone); each batch's mean is its own."""
    torch.manual_seed(0)
    model = models()["mlp"]
    x, y = classification_data(n=23, d=12, dtype=torch.float32)
    mse = isinstance(criterion, nn.MSELoss)
    y = torch.randn(23, 3) if mse else y
    other = torch.randn(5, 2, 3) if mse else torch.randint(0, 2, (5, 3))  # classes on dim 1
    data = uneven_batches(x, y) + [(torch.randn(5, 2, 12), other)]
    d1, d2 = random_direction(model, seed=1), random_direction(model, seed=2)
    forwards = []
    original = stacked.SequentialPlan._forward

    def counted(self, cs, x, ys, *args):
        forwards.append(len(ys))
        return original(self, cs, x, ys, *args)

    monkeypatch.setattr(stacked.SequentialPlan, "_forward", counted)
    weight_bytes = 4 * sum(p.numel() for p in model.parameters())
    got = plane(model, supervised(criterion), data, d1, d2, XS, YS, progress=False,
                max_memory=4 * weight_bytes)  # chunks of 4 points
    np.testing.assert_allclose(got.losses, plain(model.eval(), criterion, data, d1, d2), rtol=2e-6,
                               atol=1e-6)
    # per chunk: the four (N, 12) batches together, then the (N, 2, 12) one
    assert forwards == [4, 1] * 4


@pytest.mark.parametrize("name", list(models()))
def test_points_of_a_grid_row_add_one_vector_to_a_shared_base(name, monkeypatch):
    """One point per forward (as on large data): along a row of the plane only x changes, so
    the other vectors' sum (origin + y d2) is formed once per row and each point adds x d1;
    the plain loop's values, for every kind of moving layer."""
    monkeypatch.setattr(stacked, "GROUP_ACTIVATION_BYTES", 1)  # groups of one point
    seen = []
    original = stacked._Stack.at

    def spied(self, cs, start=0, stop=None, along=None):
        seen.append(along)
        return original(self, cs, start, stop, along)

    monkeypatch.setattr(stacked._Stack, "at", spied)
    model = models()[name]
    x, y = classification_data(n=23, d=12, dtype=torch.float32)
    data = uneven_batches(x, y)
    d1, d2 = random_direction(model, seed=1), random_direction(model, "layer", seed=2)
    if name == "batchnorm":
        d2["1.running_mean"] = torch.randn(16) * 0.1
    got = plane(model, supervised(CE), data, d1, d2, XS, YS, progress=False)
    np.testing.assert_allclose(got.losses, plain(model.eval(), CE, data, d1, d2), rtol=2e-6,
                               atol=1e-6)
    assert None not in seen and {m for m, _ in seen} == {1}
    assert sorted({key for _, key in seen}) == [(1.0, float(np.float32(b))) for b in YS]


def test_a_shared_base_is_keyed_by_the_varying_coefficient_too():
    """Symmetric grids give rows and columns the same other coefficients, (1, 0.5): a base of
    origin + 0.5 d2 must not be reused where origin + 0.5 d1 is wanted."""
    gen = torch.Generator().manual_seed(0)
    vs = torch.randn(3, 7, 5, dtype=torch.float64, generator=gen)
    stack = stacked._Stack.of(list(enumerate(vs)))
    for along, cs in [((1, (1.0, 0.5)), [[1.0, -1.0, 0.5], [1.0, 2.0, 0.5]]),
                      ((2, (1.0, 0.5)), [[1.0, 0.5, -1.0], [1.0, 0.5, 2.0]])]:
        cs = torch.tensor(cs, dtype=torch.float64)
        np.testing.assert_allclose(stack.at(cs, along=along).numpy(),
                                   torch.einsum("pj,jab->pab", cs, vs).numpy(), rtol=1e-12)


def test_rows_find_the_coefficient_that_varies_along_runs_of_points():
    xs, ys = [-0.5, 0.25, 1.0], [0.5, 2.0]
    plane_cs = torch.tensor([[1.0, a, b] for b in ys for a in xs])
    rows = [(1, (1.0, b)) for b in ys]
    assert stacked._rows(plane_cs, 1) == [rows[0]] * 3 + [rows[1]] * 3
    assert stacked._rows(plane_cs, 3) == rows
    assert stacked._rows(plane_cs, 2) == [rows[0], None, rows[1]]  # the middle group spans both
    assert stacked._rows(plane_cs, 6) == [None]
    line_cs = torch.tensor([[1.0, a] for a in xs])
    assert stacked._rows(line_cs, 1) == [(1, (1.0,))] * 3  # the base is the origin alone
    interpolation = torch.tensor([[1 - a, a] for a in xs])
    assert stacked._rows(interpolation, 1) == [None] * 3  # every coefficient changes
    walk = [(2, (1.0, a)) for a in xs[:2]]  # down the columns: y varies along the runs
    assert stacked._rows(plane_cs[[0, 3, 1, 4]], 1) == [walk[0]] * 2 + [walk[1]] * 2
    assert stacked._rows(plane_cs[[0, 4, 2]], 1) == [None] * 3  # runs of one point


def test_logsumexp_without_subnormals_equals_torch():
    """Exponents clamped at -87 change no value, in float32 or float64, however spread the
    logits (terms at e^-20 still count)."""
    for dtype in (torch.float32, torch.float64):
        h = torch.tensor([[0.0] + [-20.0] * 9, [0.0] + [-90.0] * 9, [1e3, -1e3] + [0.0] * 8,
                          [5.0, 4.0, -86.0, -88.0, -200.0, 3.0, 2.0, 1.0, 0.0, -1.0]], dtype=dtype)
        h = torch.cat([h, torch.randn(6, 10, dtype=dtype) * 50])[None]
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(stacked._logsumexp(h), h.logsumexp(2), rtol=2 * eps, atol=eps)
