"""Random, checkpoint-update and Hessian-eigenvector directions."""
import pytest
import torch
from torch import nn

from landscape import eigenvector_directions, random_direction, update_direction
from landscape.directions import check_direction
from tests.oracles import assert_unchanged, cnn_bn, mlp, snapshot


@pytest.mark.parametrize("make", [mlp, cnn_bn])
def test_filter_normalised_direction_has_the_weights_filter_norms(make):
    model = make()
    snap = snapshot(model)
    d = random_direction(model, "filter", ignore_bias_bn=True, seed=3)
    assert_unchanged(model, snap)
    assert d.keys() == dict(model.named_parameters()).keys()
    for name, w in model.named_parameters():
        if w.dim() <= 1:
            assert torch.count_nonzero(d[name]) == 0, name
        else:
            dn = d[name].reshape(len(w), -1).norm(dim=1)
            wn = w.detach().reshape(len(w), -1).norm(dim=1)
            torch.testing.assert_close(dn, wn, rtol=1e-12, atol=0)
            assert not torch.allclose(d[name], w.detach())  # random, not the weights


def test_unignored_1d_tensors_and_layer_normalisation():
    model = cnn_bn()
    d = random_direction(model, "filter", ignore_bias_bn=False, seed=1)
    lay = random_direction(model, "layer", ignore_bias_bn=False, seed=1)
    for name, w in model.named_parameters():
        if w.dim() == 1:  # a 1-D tensor is one filter
            assert d[name].norm().item() == pytest.approx(w.norm().item(), rel=1e-12)
        assert lay[name].norm().item() == pytest.approx(w.norm().item(), rel=1e-12)
        if w.norm() == 0:  # BatchNorm bias: a zero tensor gets a zero direction
            assert torch.count_nonzero(lay[name]) == 0
            continue
        # layer normalisation only rescales the whole Gaussian draw
        raw = random_direction(model, "none", ignore_bias_bn=False, seed=1)[name]
        cos = (raw * lay[name]).sum() / (raw.norm() * lay[name].norm())
        assert cos.item() == pytest.approx(1.0, abs=1e-12)


def test_seeded_and_validated():
    model = mlp()
    a, b = random_direction(model, seed=5), random_direction(model, seed=5)
    c = random_direction(model, seed=6)
    name = "0.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    assert a.info == {"kind": "random", "seed": 5, "normalization": "filter",
                      "ignore_bias_bn": True}
    with pytest.raises(ValueError, match="normalization"):
        random_direction(model, normalization="model")
    with pytest.raises(ValueError, match="seed"):
        random_direction(model, seed=-1)
    only = random_direction(model, params=["2.weight"])
    assert list(only) == ["2.weight"]


def test_check_direction_errors():
    model = mlp()
    with pytest.raises(ValueError, match="empty"):
        check_direction(model, {})
    with pytest.raises(ValueError, match="not parameters"):
        check_direction(model, {"nope": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(ValueError, match="shape"):
        check_direction(model, {"0.weight": torch.zeros(2, 2, dtype=torch.float64)})
    with pytest.raises(ValueError, match="dict"):
        check_direction(model, [torch.zeros(1)])


def test_update_direction_between_checkpoint_files(tmp_path):
    a, b = mlp(seed=0), mlp(seed=1)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save({"state_dict": b.state_dict()}, tmp_path / "b.pt")
    d = update_direction(tmp_path / "a.pt", tmp_path / "b.pt", a)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(d[name], pb.detach() - pa.detach())
    bn = cnn_bn()
    d = update_direction(bn.state_dict(), cnn_bn(seed=2).state_dict(), bn, buffers=True)
    assert "bn.running_mean" in d and "bn.num_batches_tracked" not in d


def test_hessian_eigenvector_directions_match_the_exact_hessian():
    from tests.oracles import classification_data, exact_hessian, uneven_batches

    def ce(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    model = mlp(sizes=(4, 5, 3))
    x, y = classification_data(n=17, d=4)
    data = uneven_batches(x, y, (9, 8))
    snap = snapshot(model)
    dirs = eigenvector_directions(model, ce, data, k=2, tol=1e-10, progress=False)
    assert_unchanged(model, snap)
    H = exact_hessian(model, ce, data)
    evals = torch.linalg.eigvalsh(H).flip(0)
    for i, d in enumerate(dirs):
        v = torch.cat([d[n].reshape(-1) for n, _ in model.named_parameters()])
        assert v.norm().item() == pytest.approx(1.0, abs=1e-10)
        assert (v @ H @ v).item() == pytest.approx(evals[i].item(), rel=1e-8)
        assert d.info["eigenvalue"] == pytest.approx(evals[i].item(), rel=1e-8)
        torch.testing.assert_close(H @ v, evals[i] * v, rtol=0, atol=1e-7)
