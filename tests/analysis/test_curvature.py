"""GGN and Fisher operators against dense float64 oracles (torch.func Jacobians, criterion
Hessians, per-sample gradients by a plain autograd loop), and curvature= on the routines."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn import functional as F

from analysis import (FisherOperator, GGNOperator, HessianOperator, hessian_trace, layerwise,
                      load_result, save_result, spectral_density, split_loss, supervised,
                      top_eigenvalues)
from tests.oracles import (assert_unchanged, classification_data, cnn_bn, exact_hessian, mlp,
                           snapshot, uneven_batches)

CE = supervised(nn.CrossEntropyLoss())
MSE = supervised(nn.MSELoss())
SIZES = (7, 3, 9, 4)


def regression_data(n=23, d=6, out=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=gen, dtype=torch.float64),
            torch.randn(n, out, generator=gen, dtype=torch.float64))


def problem(kind):
    model = mlp((6, 5, 3))
    x, y = classification_data() if kind == "ce" else regression_data()
    return model, (CE if kind == "ce" else MSE), uneven_batches(x, y, SIZES), x, y


def dense(op):
    return op.matmat(torch.eye(op.shape[0], dtype=torch.float64))


def exact_ggn(model, data, criterion, names=None):
    """sum_b n_b J_b^T H_b J_b / N with J from jacrev and H_b the criterion's Hessian."""
    named = dict(model.named_parameters())
    names = names or list(named)
    sizes, shapes = [named[k].numel() for k in names], [named[k].shape for k in names]
    theta = torch.cat([named[k].detach().reshape(-1) for k in names])

    def f(th, xb):
        pieces = {k: t.view(s) for k, t, s in zip(names, torch.split(th, sizes), shapes)}
        return functional_call(model, pieces, (xb,))

    total, n = 0.0, sum(len(b[0]) for b in data)
    for xb, yb in data:
        out = f(theta, xb).detach()
        J = jacrev(f)(theta, xb).reshape(out.numel(), -1)
        H = hessian(lambda o: criterion(o.view(out.shape), yb))(out.reshape(-1))
        total = total + len(xb) * J.T @ H @ J
    return total / n


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_ggn_matches_jacobian_oracle_and_fisher_equals_ggn(kind):
    model, loss, data, _, _ = problem(kind)
    crit = F.cross_entropy if kind == "ce" else F.mse_loss
    G = dense(GGNOperator(model, loss, data))
    torch.testing.assert_close(G, exact_ggn(model, data, crit), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(dense(FisherOperator(model, loss, data)), G, rtol=1e-10,
                               atol=1e-13)


def test_fisher_equals_ggn_for_per_position_cross_entropy():
    """Outputs [N, C, L] (a class per position): the criterion averages over N * L observations."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 1), nn.Tanh(), nn.Conv1d(4, 3, 1)).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, 2, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (11, 5), generator=gen)
    data = uneven_batches(x, y, (4, 7))
    G = dense(GGNOperator(model, CE, data))
    torch.testing.assert_close(dense(FisherOperator(model, CE, data)), G, rtol=1e-10, atol=1e-13)


def test_param_subset_is_a_block_and_split_loss_declares_the_split():
    model, _, data, _, _ = problem("ce")
    names = ["2.weight", "0.bias"]
    G = dense(GGNOperator(model, CE, data, params=names))
    order = [n for n, _ in model.named_parameters() if n in names]
    torch.testing.assert_close(G, exact_ggn(model, data, F.cross_entropy, order), rtol=1e-10,
                               atol=1e-13)
    own = split_loss(lambda m, b: m(b[0]), lambda out, b: F.cross_entropy(out, b[1]))
    torch.testing.assert_close(dense(GGNOperator(model, own, data, params=names)), G)
    # an own split with a declared likelihood gives the exact Fisher too
    torch.testing.assert_close(
        dense(FisherOperator(model, own, data, params=names, likelihood="categorical")), G)


def test_ggn_is_psd_while_the_hessian_is_not():
    model, _, data, _, _ = problem("ce")
    kw = dict(k=1, which="SA", tol=1e-10, progress=False)
    ggn = top_eigenvalues(model, CE, data, curvature="ggn", **kw)
    hess = top_eigenvalues(model, CE, data, **kw)
    assert ggn.curvature == "ggn" and hess.curvature == "hessian"
    assert ggn.eigenvalues[0] >= -1e-12
    assert hess.eigenvalues[0] < -0.1


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_mc_fisher_is_unbiased_and_converges(kind):
    model, loss, data, _, _ = problem(kind)
    exact = FisherOperator(model, loss, data)
    n = exact.shape[0]
    v = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = float(v @ exact.matvec(v))
    quad = np.array([float(v @ FisherOperator(model, loss, data, kind="mc", seed=s).matvec(v))
                     for s in range(40)])
    z = (quad.mean() - target) / (quad.std(ddof=1) / np.sqrt(len(quad)))
    assert abs(z) < 4, z
    assert quad.std() > 1e-3 * abs(target)  # really random
    many = FisherOperator(model, loss, data, kind="mc", mc_samples=400, seed=0)
    err = float(torch.linalg.matrix_norm(dense(many) - dense(exact)) /
                torch.linalg.matrix_norm(dense(exact)))
    one = FisherOperator(model, loss, data, kind="mc", mc_samples=1, seed=0)
    err_one = float(torch.linalg.matrix_norm(dense(one) - dense(exact)) /
                    torch.linalg.matrix_norm(dense(exact)))
    assert err < err_one / 5 and err < 0.15, (err, err_one)


def test_mc_fisher_is_one_matrix_whatever_the_batch_order():
    model, _, data, _, _ = problem("ce")
    op = FisherOperator(model, CE, data, kind="mc", mc_samples=3, seed=7)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = op.matvec(v)
    torch.testing.assert_close(op.matvec(v), first, rtol=0, atol=0)
    reordered = FisherOperator(model, CE, data[::-1], kind="mc", mc_samples=3, seed=7)
    torch.testing.assert_close(reordered.matvec(v), first, rtol=1e-12, atol=1e-15)
    other = FisherOperator(model, CE, data, kind="mc", mc_samples=3, seed=8).matvec(v)
    assert not torch.allclose(other, first)


def test_mc_draws_are_independent_across_batches_of_the_same_shape():
    """Same inputs, different targets: the predictive distributions are equal, so only
    independent draws per batch make eight batches more accurate than one."""
    model = mlp((6, 5, 3))
    x, _ = classification_data(n=3)
    gen = torch.Generator().manual_seed(0)
    batches = [(x, torch.randint(0, 3, (3,), generator=gen)) for _ in range(8)]
    exact = dense(FisherOperator(model, CE, batches[:1]))

    def error(data, seed):
        mc = dense(FisherOperator(model, CE, data, kind="mc", seed=seed))
        return float(torch.linalg.matrix_norm(mc - exact) / torch.linalg.matrix_norm(exact))

    many = np.mean([error(batches, s) for s in range(6)])
    one = np.mean([error(batches[:1], s) for s in range(6)])
    assert many < 0.6 * one, (many, one)


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_empirical_fisher_is_the_mean_of_per_sample_outer_products(kind):
    """curvlinops' scale: per-datum gradients of the summed observation losses, over their
    number; for MSE with d outputs that is d times the mean of the per-sample outer products."""
    model, loss, data, x, y = problem(kind)
    params = list(model.parameters())
    grads = []
    for i in range(len(x)):
        g = torch.autograd.grad(loss(model, (x[i:i + 1], y[i:i + 1])), params)
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(grads)
    op = FisherOperator(model, loss, data, kind="empirical")
    assert op.curvature == "empirical_fisher"
    d = y.shape[1] if kind == "mse" else 1  # the observations of a datum
    torch.testing.assert_close(dense(op), d * G.T @ G / len(x), rtol=1e-10, atol=1e-14)


def test_routines_take_curvature_and_say_which():
    model, _, data, _, _ = problem("ce")
    G = dense(GGNOperator(model, CE, data))
    n = G.shape[0]
    top = top_eigenvalues(model, CE, data, k=3, tol=1e-10, curvature="fisher", progress=False)
    np.testing.assert_allclose(top.eigenvalues, torch.linalg.eigvalsh(G).flip(0)[:3].numpy(),
                               rtol=1e-8)
    assert (top.curvature, top.preconditioned) == ("fisher", False)
    assert top.metadata["config"]["curvature"] == "fisher"
    tr = hessian_trace(model, CE, data, n_hvp=3 * n, curvature="ggn", progress=False)
    assert tr.curvature == "ggn"
    np.testing.assert_allclose(tr.estimate, float(torch.trace(G)), rtol=1e-10)
    dens = spectral_density(model, CE, data, n_lanczos=n, n_vectors=2, curvature="ggn",
                            progress=False)
    assert dens.curvature == "ggn" and dens.nodes.min() > -1e-10
    emp = top_eigenvalues(model, CE, data, k=1, curvature="empirical_fisher", progress=False)
    assert emp.curvature == "empirical_fisher"


def test_preconditioned_spectrum_matches_dense_p_inverse_h(tmp_path):
    model, _, data, _, _ = problem("ce")
    H = exact_hessian(model, CE, data)
    n = H.shape[0]
    P = torch.rand(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3 + 0.1
    dense_pre = H / P.sqrt()[:, None] / P.sqrt()[None, :]
    want = torch.linalg.eigvalsh(dense_pre)
    # the same spectrum as the non-symmetric P^-1 H
    np.testing.assert_allclose(np.sort(np.linalg.eigvals((H / P[:, None]).numpy()).real),
                               want.numpy(), atol=1e-10)
    got = top_eigenvalues(model, CE, data, k=3, tol=1e-10, preconditioner=P, progress=False)
    np.testing.assert_allclose(got.eigenvalues, want.flip(0)[:3].numpy(), rtol=1e-8)
    assert got.preconditioned and got.curvature == "hessian"
    path = tmp_path / "eig.npz"
    save_result(got, path)
    back = load_result(path)
    assert back.preconditioned and back.curvature == "hessian"
    np.testing.assert_array_equal(back.eigenvalues, got.eigenvalues)
    torch.testing.assert_close(dense(HessianOperator(model, CE, data, preconditioner=P)),
                               dense_pre, rtol=1e-10, atol=1e-13)
    # the dict form, per parameter name
    named = dict(zip([k for k, _ in model.named_parameters()],
                     torch.split(P, [p.numel() for p in model.parameters()])))
    named = {k: t.view(p.shape) for (k, t), p in zip(named.items(), model.parameters())}
    tr = hessian_trace(model, CE, data, n_hvp=3 * n, preconditioner=named, progress=False)
    np.testing.assert_allclose(tr.estimate, float(torch.trace(dense_pre)), rtol=1e-10)
    # GGN with a preconditioner
    G = exact_ggn(model, data, F.cross_entropy)
    torch.testing.assert_close(
        dense(GGNOperator(model, CE, data, preconditioner=named)),
        G / P.sqrt()[:, None] / P.sqrt()[None, :], rtol=1e-10, atol=1e-13)


def adam_trained(model, data, opt_cls=torch.optim.Adam, steps=3, **kw):
    opt = opt_cls(model.parameters(), lr=1e-2, **kw)
    for t in range(steps):
        opt.zero_grad()
        CE(model, data[t % len(data)]).backward()
        opt.step()
    model.zero_grad()
    return opt


@pytest.mark.parametrize("opt_cls,kw", [(torch.optim.Adam, {}), (torch.optim.AdamW, {}),
                                        (torch.optim.Adam, {"amsgrad": True})])
def test_torch_adam_is_read_from_its_state(opt_cls, kw):
    model, _, data, _, _ = problem("ce")
    opt = adam_trained(model, data, opt_cls, **kw)
    key = "max_exp_avg_sq" if kw.get("amsgrad") else "exp_avg_sq"
    P = torch.cat([(opt.state[p][key] / (1 - 0.999 ** 3)).sqrt().reshape(-1) + 1e-8
                   for p in model.parameters()])
    H = exact_hessian(model, CE, data)
    want = torch.linalg.eigvalsh(H / P.sqrt()[:, None] / P.sqrt()[None, :]).flip(0)[:2]
    got = top_eigenvalues(model, CE, data, k=2, tol=1e-10, preconditioner=opt, progress=False)
    np.testing.assert_allclose(got.eigenvalues, want.numpy(), rtol=1e-8)


def test_layerwise_blocks_use_their_part_of_the_preconditioner():
    model, _, data, _, _ = problem("ce")
    opt = adam_trained(model, data)
    P = torch.cat([(opt.state[p]["exp_avg_sq"] / (1 - 0.999 ** 3)).sqrt().reshape(-1) + 1e-8
                   for p in model.parameters()])
    G = exact_ggn(model, data, F.cross_entropy)
    A = G / P.sqrt()[:, None] / P.sqrt()[None, :]
    res = layerwise(model, CE, data, tol=1e-10, n_hvp_trace=300, curvature="ggn",
                    preconditioner=opt, progress=False)
    assert (res.curvature, res.preconditioned) == ("ggn", True)
    offset = 0
    for block, size in zip(res.blocks, res.n_params):
        sub = A[offset:offset + size, offset:offset + size]
        np.testing.assert_allclose(res.top_eigenvalue[res.blocks.index(block)],
                                   float(torch.linalg.eigvalsh(sub)[-1]), rtol=1e-8)
        offset += size
    np.testing.assert_allclose(res.trace.sum(), float(torch.trace(A)), rtol=1e-10)
    flat = layerwise(model, CE, data, tol=1e-10, n_hvp_trace=300, curvature="ggn",
                     preconditioner=P, progress=False)
    np.testing.assert_allclose(flat.top_eigenvalue, res.top_eigenvalue, rtol=1e-10)


@pytest.mark.parametrize("curvature", ["ggn", "fisher", "empirical_fisher"])
def test_model_is_restored(curvature):
    model = cnn_bn(12)
    x, y = classification_data(n=23, d=12)
    data = uneven_batches(x, y, SIZES)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    model.train()
    snap = snapshot(model)
    mode = "eval" if curvature == "empirical_fisher" else "train"
    top_eigenvalues(model, CE, data, k=1, max_hvp=5, curvature=curvature, model_mode=mode,
                    preconditioner=torch.ones(sum(p.numel() for p in model.parameters()),
                                              dtype=torch.float64), progress=False)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError):
        top_eigenvalues(model, CE, data, k=1, curvature=curvature, model_mode=mode,
                        preconditioner=-torch.ones(sum(p.numel() for p in model.parameters()),
                                                   dtype=torch.float64), progress=False)
    assert_unchanged(model, snap)


def test_bad_input_is_rejected_with_clear_errors():
    model, _, data, _, _ = problem("ce")
    n = sum(p.numel() for p in model.parameters())

    def plain(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    with pytest.raises(ValueError, match="split"):
        GGNOperator(model, plain, data)
    with pytest.raises(ValueError, match="curvature must be one of"):
        top_eigenvalues(model, CE, data, curvature="kfac", progress=False)
    with pytest.raises(ValueError, match="kind must be one of"):
        FisherOperator(model, CE, data, kind="true")
    with pytest.raises(ValueError, match="likelihood"):
        FisherOperator(model, supervised(nn.L1Loss()), data)
    with pytest.raises(ValueError, match="likelihood"):
        FisherOperator(model, supervised(nn.CrossEntropyLoss(label_smoothing=0.1)), data)
    with pytest.raises(ValueError, match="mc_samples must be"):
        FisherOperator(model, CE, data, kind="mc", mc_samples=0)
    with pytest.raises(ValueError, match='curvature="hessian" only'):
        top_eigenvalues(model, CE, data, curvature="ggn", hvp_method="forward", progress=False)
    with pytest.raises(ValueError, match="finite and positive"):
        HessianOperator(model, CE, data, preconditioner=torch.zeros(n, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"length {n}"):
        HessianOperator(model, CE, data, preconditioner=torch.ones(n + 1))
    with pytest.raises(ValueError, match="no entry"):
        HessianOperator(model, CE, data, preconditioner={"0.weight": torch.ones(5, 6)})
    with pytest.raises(ValueError, match="shape"):
        HessianOperator(model, CE, data, params=["0.weight"],
                        preconditioner={"0.weight": torch.ones(6, 5)})
    with pytest.raises(TypeError, match="preconditioner must be"):
        HessianOperator(model, CE, data,
                        preconditioner=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no entry"):   # an Adam that has not stepped
        HessianOperator(model, CE, data,
                        preconditioner=torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match='kind="empirical"'):
        FisherOperator(cnn_bn(12), CE, data, kind="empirical", model_mode="train")
