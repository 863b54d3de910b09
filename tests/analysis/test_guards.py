"""Guards of the data and loss protocol (issue 13, "Data and losses"): non-deterministic data is
refused by every routine that passes over it repeatedly, a single batch is not taken for an
iterable of batches, and sum-reduced losses give the quantities of the total loss."""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from analysis import (average_sharpness, evaluate, FisherOperator, full_grad_norm, GGNOperator,
                      HessianOperator, hessian_trace, hvp, keskar_sharpness, layerwise, mean_loss,
                      pac_bayes_sigma,
                      sharpness_vs_curvature, spectral_density, supervised, top_eigenvalues,
                      worst_case_sharpness)
from analysis.core import fingerprint
from landscape import eigenvector_directions, interpolate, line, plane, random_direction
from tests.oracles import (assert_unchanged, classification_data, cnn_bn, exact_grad, exact_hessian,
                           mlp, snapshot, uneven_batches)

CE = supervised(nn.CrossEntropyLoss())
CE_SUM = supervised(nn.CrossEntropyLoss(reduction="sum"))
QUIET = dict(progress=False)


def problem(n=23):
    x, y = classification_data(n=n, d=6)
    return mlp((6, 5, 3)), x, y


def shuffled(x, y, seed=0):
    """The issue's loader: shuffled, drop_last (23 samples, batches of 5: 3 dropped per pass)."""
    return DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def with_dropout():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3)).double()


class Varying:
    """A re-iterable whose passes differ in their batch sizes (a resampling loader)."""

    def __init__(self, x, y):
        self.x, self.y, self.passes = x, y, 0

    def __iter__(self):
        return self._batches()

    def _batches(self):
        self.passes += 1
        cut = 10 + self.passes % 2
        yield self.x[:cut], self.y[:cut]
        yield self.x[cut:], self.y[cut:]


def direction(model):
    return random_direction(model, seed=1, ignore_bias_bn=False)


# every routine that passes over data more than once, called cheaply
ROUTINES = {
    "HessianOperator": lambda m, d, **kw: HessianOperator(m, CE, d, **kw),
    "GGNOperator": lambda m, d, **kw: GGNOperator(m, CE, d, **kw),
    "FisherOperator": lambda m, d, **kw: FisherOperator(m, CE, d, kind="mc", **kw),
    "top_eigenvalues": lambda m, d, **kw: top_eigenvalues(m, CE, d, k=1, max_hvp=3, **kw),
    "hessian_trace": lambda m, d, **kw: hessian_trace(m, CE, d, n_hvp=4, **kw),
    "spectral_density": lambda m, d, **kw: spectral_density(m, CE, d, 2, 1, **kw),
    "layerwise": lambda m, d, **kw: layerwise(m, CE, d, n_hvp_trace=4, **kw),
    "worst_case_sharpness": lambda m, d, **kw: worst_case_sharpness(m, CE, d, steps=1, **kw),
    "average_sharpness": lambda m, d, **kw: average_sharpness(m, CE, d, n_samples=2, **kw),
    "sharpness_vs_curvature": lambda m, d, **kw: sharpness_vs_curvature(
        m, CE, d, [0.1], steps=1, max_hvp=3, **kw),
    "keskar_sharpness": lambda m, d, **kw: keskar_sharpness(m, CE, d, max_iter=1, **kw),
    "pac_bayes_sigma": lambda m, d, **kw: pac_bayes_sigma(m, CE, d, n_samples=1, max_iter=1, **kw),
    "eigenvector_directions": lambda m, d, **kw: eigenvector_directions(m, CE, d, 1, max_hvp=3,
                                                                        **kw),
    "line": lambda m, d, **kw: line(m, CE, d, direction(m), [0.0, 0.5], **kw),
    "plane": lambda m, d, **kw: plane(m, CE, d, direction(m), direction(m), [0.0], [0.5], **kw),
    "interpolate": lambda m, d, **kw: interpolate(m, mlp((6, 5, 3), seed=1), CE, d, [0.5], **kw),
}


@pytest.mark.parametrize("name", sorted(ROUTINES))
def test_every_repeated_pass_routine_refuses_a_shuffled_drop_last_loader(name):
    model, x, y = problem()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="shuffle.*drop_last=True.*check_deterministic=False"):
        ROUTINES[name](model, shuffled(x, y), **QUIET)
    assert_unchanged(model, snap)
    # the same loader in a fixed order passes; check_deterministic=False skips the check
    ROUTINES[name](model, DataLoader(TensorDataset(x, y), batch_size=5, drop_last=True), **QUIET)
    ROUTINES[name](model, shuffled(x, y), check_deterministic=False, **QUIET)


@pytest.mark.parametrize("name", ["HessianOperator", "top_eigenvalues", "hessian_trace",
                                  "average_sharpness", "line"])
def test_dropout_in_train_mode_is_named(name):
    _, x, y = problem()
    model = with_dropout()
    with pytest.raises(ValueError,
                       match="stochastic layers in train mode \\(Dropout\\).*model_mode=.eval."):
        ROUTINES[name](model, uneven_batches(x, y), model_mode="train", **QUIET)
    ROUTINES[name](model, uneven_batches(x, y), **QUIET)  # eval mode: deterministic


def test_changing_sample_counts_are_named():
    model, x, y = problem()
    with pytest.raises(ValueError, match=r"sample counts differ.*\(2 batches of 23 samples, "
                                         r"then 2 of 23; they first differ at batch 0\)"):
        hessian_trace(model, CE, Varying(x, y), n_hvp=4, **QUIET)


def test_the_issue_case_fails_loudly_and_its_deterministic_loader_is_exact():
    """Shuffled drop_last gave eigenvalues off by 8 % with converged=True; a fixed-order loader
    over the same samples gives the exact ones, and the check does not reject it."""
    model, x, y = problem()
    with pytest.raises(ValueError, match="shuffle"):
        top_eigenvalues(model, CE, shuffled(x, y), k=3, **QUIET)
    fixed = DataLoader(TensorDataset(x, y), batch_size=5)  # 5, 5, 5, 5, 3
    exact = torch.linalg.eigvalsh(exact_hessian(model, CE, uneven_batches(x, y))).flip(0)[:3]
    res = top_eigenvalues(model, CE, fixed, k=3, tol=1e-10, **QUIET)
    np.testing.assert_allclose(res.eigenvalues, exact.numpy(), rtol=1e-8)
    H = exact_hessian(model, CE, [(x, y)])
    tr = hessian_trace(model, CE, fixed, n_hvp=3 * len(H), **QUIET)  # a full sketch: exact
    assert tr.estimate == pytest.approx(float(H.trace()), rel=1e-10)


def test_check_deterministic_false_skips_the_two_passes():
    model, x, y = problem()
    calls = []

    def counting(model, batch):
        calls.append(len(batch[0]))
        return CE(model, batch)

    data = uneven_batches(x, y)
    hessian_trace(model, counting, data, n_hvp=4, chunk=4, **QUIET)
    checked = len(calls)
    calls.clear()
    hessian_trace(model, counting, data, n_hvp=4, chunk=4, check_deterministic=False, **QUIET)
    assert checked - len(calls) == 2 * len(data)  # two forward passes, nothing else
    # and a non-deterministic loader is then accepted (the user's responsibility)
    top_eigenvalues(model, CE, shuffled(x, y), max_hvp=3, check_deterministic=False, **QUIET)
    with pytest.raises(ValueError, match="check_deterministic must be True or False"):
        top_eigenvalues(model, CE, data, check_deterministic="no", **QUIET)


def test_shuffling_without_drop_last_keeps_the_operator_and_passes():
    model, x, y = problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    res = top_eigenvalues(model, CE, loader, k=1, tol=1e-10, **QUIET)
    exact = torch.linalg.eigvalsh(exact_hessian(model, CE, [(x, y)]))[-1]
    assert res.eigenvalues[0] == pytest.approx(float(exact), rel=1e-8)


def test_train_mode_batchnorm_with_any_shuffling_is_refused():
    """Batch statistics depend on which samples share a batch: shuffling without drop_last
    keeps the eval-mode operator but changes the train-mode one."""
    x, y = classification_data(n=23, d=12)
    model = cnn_bn()
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="with train-mode BatchNorm any shuffling"):
        top_eigenvalues(model, CE, loader, model_mode="train", **QUIET)
    top_eigenvalues(model, CE, loader, max_hvp=3, **QUIET)


# ----------------------------------------------------------------------------- a single batch

@pytest.mark.parametrize("data, what", [
    (lambda x, y: (x, y), "a tuple of tensors"), (lambda x, y: (x.numpy(), y.numpy()),
                                                  "a tuple of tensors"),
    (lambda x, y: x, "a Tensor"),
    (lambda x, y: {"x": x, "y": y}, "a dict"), (lambda x, y: x.numpy(), "a ndarray")])
def test_a_single_batch_as_data_is_refused_with_the_fix(data, what):
    model, x, y = problem()
    for call in (lambda d: mean_loss(model, CE, d, **QUIET),
                 lambda d: top_eigenvalues(model, CE, d, **QUIET),
                 lambda d: line(model, CE, d, direction(model), [0.0], **QUIET)):
        with pytest.raises(ValueError, match=f"got {what}, which is one batch: pass \\[batch\\]"):
            call(data(x, y))


def test_a_dataset_is_refused_and_a_list_of_tensor_batches_is_accepted():
    model, x, y = problem()
    with pytest.raises(ValueError, match="TensorDataset.*DataLoader"):
        mean_loss(model, CE, TensorDataset(x, y), **QUIET)
    auto = mlp((6, 4, 6))

    def reconstruction(model, batch):
        return F.mse_loss(model(batch), batch)

    batches = [x[:7], x[7:10], x[10:]]  # an autoencoder's list of tensor batches
    whole = reconstruction(auto, x).item()
    assert mean_loss(auto, reconstruction, batches, **QUIET) == pytest.approx(whole, rel=1e-12)
    H = top_eigenvalues(auto, reconstruction, batches, tol=1e-10, **QUIET).eigenvalues[0]
    assert H == pytest.approx(float(torch.linalg.eigvalsh(
        exact_hessian(auto, lambda m, b: reconstruction(m, b[0]), [(x,)]))[-1]), rel=1e-8)


# ----------------------------------------------------------------------------- sum reduction

def total_loss_problem():
    model, x, y = problem()
    return model, uneven_batches(x, y), len(x)   # batches of 7, 3, 9, 4


def test_sum_reduced_criterion_gives_the_hessian_of_the_total_loss():
    model, data, n = total_loss_problem()
    H_total = n * exact_hessian(model, CE, data)  # the total loss is n times the mean loss
    V = torch.randn(3, H_total.shape[0], generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    torch.testing.assert_close(HessianOperator(model, CE_SUM, data).matmat(V), V @ H_total,
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hvp(model, CE_SUM, data, V[0], **QUIET), V[0] @ H_total,
                               rtol=1e-10, atol=1e-10)
    top = top_eigenvalues(model, CE_SUM, data, k=2, tol=1e-10, **QUIET).eigenvalues
    np.testing.assert_allclose(top, torch.linalg.eigvalsh(H_total).flip(0)[:2].numpy(), rtol=1e-8)
    tr = hessian_trace(model, CE_SUM, data, n_hvp=3 * H_total.shape[0], **QUIET).estimate
    assert tr == pytest.approx(float(H_total.trace()), rel=1e-10)
    # the GGN of the total loss likewise; the Fisher is that of the mean loss only
    torch.testing.assert_close(GGNOperator(model, CE_SUM, data).matmat(V),
                               n * GGNOperator(model, CE, data).matmat(V), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="Fisher is defined for the mean loss"):
        FisherOperator(model, CE_SUM, data, kind="empirical")


def test_sum_reduced_losses_everywhere_and_a_user_flag():
    model, data, n = total_loss_problem()
    mean = mean_loss(model, CE, data, **QUIET)
    assert mean_loss(model, CE_SUM, data, **QUIET) == pytest.approx(n * mean, rel=1e-12)
    loss, acc = evaluate(model, CE_SUM, data, **QUIET)
    assert (loss, acc) == pytest.approx((n * mean, evaluate(model, CE, data, **QUIET)[1]),
                                        rel=1e-12)
    g = float(torch.linalg.vector_norm(exact_grad(model, CE, data)))
    assert full_grad_norm(model, CE_SUM, data, **QUIET) == pytest.approx(n * g, rel=1e-10)
    d = direction(model)
    np.testing.assert_allclose(line(model, CE_SUM, data, d, [0.0, 0.3], **QUIET).losses,
                               n * line(model, CE, data, d, [0.0, 0.3], **QUIET).losses,
                               rtol=1e-12)

    def user(model, batch):  # a user's loss_fn flagged as a sum over the batch
        return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    user.reduction = "sum"
    assert mean_loss(model, user, data, **QUIET) == pytest.approx(n * mean, rel=1e-12)
    user.reduction = "total"
    with pytest.raises(ValueError, match="loss_fn.reduction must be one of 'mean', 'sum'"):
        mean_loss(model, user, data, **QUIET)
    with pytest.raises(ValueError, match="criterion.reduction must be one of"):
        supervised(nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(ValueError, match="m-sharpness.*'mean'"):
        worst_case_sharpness(model, CE_SUM, data, m=5, **QUIET)


def test_fingerprints_tell_apart_what_must_agree_between_ranks():
    model = mlp((6, 5, 3))
    d0, d1 = random_direction(model, seed=0), random_direction(model, seed=1)
    same = {"seed": 3, "which": "LA", "direction": d0, "alphas": np.linspace(0, 1, 3)}
    assert fingerprint(same) == fingerprint({**same, "direction": random_direction(model, seed=0)})
    assert fingerprint(dict(reversed(list(d0.items())))) == fingerprint(d0)  # order of building
    for changed in ({"seed": 4}, {"which": "SA"}, {"direction": d1}, {"alphas": [0, 0.5, 2]}):
        assert fingerprint({**same, **changed}) != fingerprint(same), changed
    assert fingerprint(model) != fingerprint(mlp((6, 5, 3), seed=1))
    assert fingerprint(np.array(["a", "b"])) == fingerprint(["a", "b"])
    assert fingerprint(lambda: 0) == fingerprint(print)  # callables are not compared


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.complex64])
def test_non_finite_vectors_are_refused_wherever_they_sit(dtype):
    """``all_finite`` (one min/max pass) against ``isfinite().all()``: NaN, +inf and -inf at the
    first, a middle and the last element, in a non-contiguous view too; the Hessian product and
    the Lanczos warm start name the argument."""
    from analysis import HessianOperator, top_eigenvalues
    from analysis.core import all_finite
    base = torch.randn(6, 7).to(dtype)
    assert all_finite(base) and all_finite(base[:0]) and all_finite(torch.arange(4))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for index in ((0, 0), (3, 4), (5, 6)):
            x = base.clone()
            x[index] = bad if not x.is_complex() else complex(0.0, bad)
            assert not all_finite(x) and not all_finite(x.T)
            assert all_finite(x) == bool(torch.isfinite(x).all())
    x, y = classification_data(n=12, d=5)
    model = mlp((5, 4, 3))
    op = HessianOperator(model, CE, [(x, y)], progress=False)
    v = torch.zeros(op.shape[0], dtype=torch.float64)
    v[-1] = -float("inf")
    with pytest.raises(ValueError, match="finite"):
        op.matvec(v)
    with pytest.raises(ValueError, match="v0 must be finite"):
        top_eigenvalues(model, CE, [(x, y)], v0=v, progress=False)


# ----------------------------------------------------------------------------- known verdicts

def seen_by_check(monkeypatch, call) -> int:
    """Samples that ``nn.Sequential.forward`` sees in the determinism check of ``call(**kw)``
    (its samples with the check on, less those with it off; a class patch, not a hook, so the
    model keeps the stacked path)."""
    seen = []
    forward = nn.Sequential.forward

    def counting(self, x):
        seen.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(nn.Sequential, "forward", counting)
    call(check_deterministic=True)
    checked = sum(seen)
    seen.clear()
    call(check_deterministic=False)
    return checked - sum(seen)


class Rotating(list):
    """A list of batches whose passes differ: each pass starts one batch later, the last dropped."""
    passes = 0

    def __iter__(self):
        Rotating.passes += 1
        k = Rotating.passes % len(self)
        return iter((self[k:] + self[:k])[:-1])


class Wrapped(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def hooked(model):
    model.register_forward_hook(lambda *_: None)
    return model


def hooked_ce():
    criterion = nn.CrossEntropyLoss()
    criterion.register_forward_hook(lambda *_: None)
    return criterion


def ce_function(out, y):
    return F.cross_entropy(out, y)


def surfaces(model, loss_fn, data, **kw):
    """line, plane and interpolate (to a copy of ``model``): each a function of more keywords."""
    other = copy.deepcopy(model)
    return {"line": lambda **k: line(model, loss_fn, data, direction(model), [0.0, 0.5],
                                     **QUIET, **kw, **k),
            "plane": lambda **k: plane(model, loss_fn, data, direction(model), direction(model),
                                       [0.0], [0.5], **QUIET, **kw, **k),
            "interpolate": lambda **k: interpolate(model, other, loss_fn, data, [0.5], **QUIET,
                                                   **kw, **k)}


def batchnorm_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.filterwarnings("ignore:the model cannot be vmapped")  # train-mode BatchNorm
@pytest.mark.parametrize("name", ["line", "plane", "interpolate"])
def test_surfaces_skip_the_check_exactly_where_its_verdict_is_known(monkeypatch, name):
    """Fixed tensor batches through the stacked path's deterministic layers: the check's two
    passes are skipped; any other data, model or loss keeps them."""
    model, x, y = problem()
    data = uneven_batches(x, y)

    def passes(model=model, loss_fn=CE, data=data, **kw):
        return seen_by_check(monkeypatch, surfaces(model, loss_fn, data, **kw)[name])

    assert passes() == 0 and passes(data=tuple(data)) == 0
    assert passes(model_mode="train") == 0  # Linear and Tanh: nothing random in train mode
    assert passes(model=with_dropout()) == 0  # eval-mode Dropout is the identity
    assert passes(model=batchnorm_mlp()) == 0  # eval-mode BatchNorm: running statistics
    assert passes(vectorize=False) == 0  # the verdict does not depend on the path
    checked = [dict(data=DataLoader(TensorDataset(x, y), batch_size=5)),  # same batches
               dict(data=Rotating(data[:3] + data[3:])),  # a list, but not a plain one
               dict(loss_fn=lambda m, b: CE(m, b)),  # a custom loss, not supervised
               dict(loss_fn=supervised(ce_function)), dict(loss_fn=supervised(hooked_ce())),
               dict(model=hooked(mlp((6, 5, 3)))), dict(model=Wrapped(mlp((6, 5, 3)))),
               dict(batch_size_fn=lambda b: len(b[1])),
               dict(model=batchnorm_mlp(), model_mode="train")]  # batch statistics
    for case in checked:
        if isinstance(case.get("data"), Rotating):
            with pytest.raises(ValueError, match="sample counts differ"):
                surfaces(model, CE, case["data"])[name]()
        else:
            assert passes(**case) == 2 * len(x), case


@pytest.mark.parametrize("name", ["line", "plane", "interpolate"])
def test_randomness_the_plan_excludes_is_still_caught(name):
    """Dropout in train mode (the model left in eval mode by the user), an in-place layer
    changing the batch's own tensor before the first Linear: the check runs and raises."""
    _, x, y = problem()
    with pytest.raises(ValueError, match="stochastic layers in train mode \\(Dropout\\)"):
        surfaces(with_dropout().eval(), CE, uneven_batches(x, y), model_mode="train")[name]()
    torch.manual_seed(0)
    elu = nn.Sequential(nn.ELU(inplace=True), nn.Linear(6, 5), nn.Tanh(),
                        nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match="the loss differs between two passes"):
        surfaces(elu, CE, [(x - 1, y)])[name]()
