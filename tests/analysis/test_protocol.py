"""The shared loss/data protocol, flattening, seeding and model restoration."""
import pytest
import torch
from torch import nn

from analysis import mean_loss, preserved, select_params, supervised
from analysis.core import flatten, unflatten
from analysis.core import check_data, check_loss, data_mean
from analysis.core import make_generator, rademacher
from tests.oracles import assert_unchanged, classification_data, cnn_bn, snapshot, uneven_batches

CE = supervised(nn.CrossEntropyLoss())


def test_mean_loss_weights_batches_by_sample_count():
    x, y = classification_data(n=23)
    model = cnn_bn(length=6)
    full = CE(model.eval(), (x, y)).item()
    assert mean_loss(model, CE, uneven_batches(x, y)) == pytest.approx(full, rel=1e-12)
    equal_weights = sum(CE(model, b).item() for b in uneven_batches(x, y)) / 4
    assert abs(equal_weights - full) > 1e-6  # the bug we do not copy would be detectable


def test_data_mean_rejects_empty_and_one_shot_data():
    with pytest.raises(ValueError, match="empty"):
        data_mean([], lambda b: [torch.zeros(1)])
    with pytest.raises(ValueError, match="re-iterable"):
        data_mean(iter([(torch.zeros(2), torch.zeros(2))]), lambda b: [torch.zeros(1)])


def test_each_pass_over_a_dataloader_makes_one_iterator(monkeypatch):
    """check_data asks a DataLoader for no iterator (with workers, each one starts them), and
    data_mean's progress bar asks for one per pass (tqdm.auto, given the loader, asks twice)."""
    from torch.utils.data import DataLoader, TensorDataset

    made = []
    real = DataLoader._get_iterator
    monkeypatch.setattr(DataLoader, "_get_iterator", lambda self: made.append(1) or real(self))
    x, y = classification_data(n=23)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    check_data(loader)
    assert made == []
    model = cnn_bn(length=6)
    assert mean_loss(model, CE, loader) == pytest.approx(  # with its progress bar
        mean_loss(model, CE, uneven_batches(x, y), progress=False), rel=1e-12)
    assert len(made) == 1


def test_check_loss_rejects_non_scalar_and_non_finite():
    with pytest.raises(ValueError, match="scalar"):
        check_loss(torch.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        check_loss(torch.tensor(float("nan")))
    assert check_loss(torch.ones(1)).dim() == 0


def test_select_params_by_names_predicate_and_errors():
    model = cnn_bn()
    names, params = select_params(model, ["fc.weight", "conv.bias"])
    assert names == ["conv.bias", "fc.weight"]
    names, _ = select_params(model, lambda n, p: n.startswith("bn"))
    assert names == ["bn.weight", "bn.bias"]
    with pytest.raises(ValueError, match="not found"):
        select_params(model, ["nope"])
    with pytest.raises(ValueError, match="no parameters"):
        select_params(model, lambda n, p: False)


def test_flatten_roundtrip_and_length_check():
    ts = [torch.randn(2, 3), torch.randn(4)]
    v = flatten(ts)
    assert all(torch.equal(a, b) for a, b in zip(unflatten(v, ts), ts))
    with pytest.raises(ValueError, match="elements"):
        unflatten(torch.zeros(5), ts)


def test_seeded_draws_are_reproducible():
    a = rademacher((100,), make_generator(3), like=torch.zeros(1))
    b = rademacher((100,), make_generator(3), like=torch.zeros(1))
    assert torch.equal(a, b) and set(a.tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="seed"):
        make_generator(-1)


def test_preserved_restores_everything_even_on_error():
    model = cnn_bn()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    model.conv.bias.requires_grad_(False)
    snap = snapshot(model)
    with pytest.raises(RuntimeError):
        with preserved(model, "train", trainable=[model.fc.weight]):
            with torch.no_grad():
                model.fc.weight.add_(1.0)
            model(torch.randn(8, 12, dtype=torch.float64)).sum().backward()  # BN stats move
            assert model.training and model.fc.weight.grad is not None
            raise RuntimeError("boom")
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="model_mode"):
        with preserved(model, "test"):
            pass


@pytest.mark.parametrize("model_mode", ["eval", "train"])
def test_mean_loss_leaves_a_train_mode_batchnorm_model_unchanged(model_mode):
    model = cnn_bn()
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    x, y = classification_data(n=23, d=12)
    snap = snapshot(model)
    mean_loss(model, CE, uneven_batches(x, y), model_mode=model_mode, progress=False)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("criterion", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum"),
                                       torch.nn.functional.cross_entropy])
def test_a_criterion_passed_as_loss_fn_names_supervised(criterion):
    import analysis
    import landscape
    from analysis import Tracker
    x, y = classification_data(n=9)
    model, data = cnn_bn(length=6), [(x, y)]
    calls = [lambda: analysis.hessian_trace(model, criterion, data, n_hvp=4, progress=False),
             lambda: analysis.top_eigenvalues(model, criterion, data, progress=False),
             lambda: landscape.line(model, criterion, data,
                                    landscape.random_direction(model), [0.0], progress=False),
             lambda: Tracker(model, criterion)]
    for call in calls:
        with pytest.raises(TypeError, match=r"supervised\(criterion\)"):
            call()
    assert supervised(nn.CrossEntropyLoss())(model, (x, y)).ndim == 0
