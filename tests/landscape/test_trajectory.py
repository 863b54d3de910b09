"""PCA of a synthetic trajectory with known principal directions; projection onto the plane."""
import numpy as np
import pytest
import torch

from landscape import pca_directions, project_trajectory, random_direction
from tests.oracles import assert_unchanged, mlp, snapshot


def synthetic_trajectory(model, seed=0):
    """theta_t = w + s_t u1 + r_t u2 (+ mean offset), u1, u2 orthonormal, sum s = sum r = 0."""
    names = [n for n, _ in model.named_parameters()]
    like = [p.detach() for p in model.parameters()]
    P = sum(t.numel() for t in like)
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(P, 2, generator=g, dtype=torch.float64))
    t = torch.arange(9, dtype=torch.float64)
    s = 3.0 * (t - t.mean())                            # the dominant direction
    r = torch.tensor([1., -2., 0., 2., -1., 1., -2., 0., 1.], dtype=torch.float64)
    r = r - (r @ s) / (s @ s) * s                       # orthogonal to s, zero mean
    w = torch.cat([p.reshape(-1) for p in like])
    offset = 0.5 * u[:, 0] - 0.25 * u[:, 1]
    traj = []
    for k in range(len(t)):
        flat = w + offset + s[k] * u[:, 0] + r[k] * u[:, 1]
        parts = torch.split(flat, [p.numel() for p in like])
        traj.append({n: c.reshape(p.shape) for n, c, p in zip(names, parts, like)})
    return traj, u, s, r, offset


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_pca_recovers_known_directions_and_variance(method):
    model = mlp()
    traj, u, s, r, offset = synthetic_trajectory(model)
    snap = snapshot(model)
    pca = pca_directions(traj, model, n=2, method=method)
    assert_unchanged(model, snap)
    d1, d2 = pca
    flat = [torch.cat([d[n].reshape(-1) for n, _ in model.named_parameters()]) for d in (d1, d2)]
    for v, want in zip(flat, (u[:, 0], u[:, 1])):
        assert abs((v @ want).item()) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(pca.explained_variance, [(s @ s).item() / 8, (r @ r).item() / 8],
                               rtol=1e-10)
    np.testing.assert_allclose(pca.explained_variance_ratio.sum(), 1.0, rtol=1e-12)
    signs = np.array([np.sign((flat[0] @ u[:, 0]).item()), np.sign((flat[1] @ u[:, 1]).item())])
    want = np.stack([(s + offset @ u[:, 0]).numpy(), (r + offset @ u[:, 1]).numpy()], axis=1)
    np.testing.assert_allclose(pca.coords, want * signs, atol=1e-10)


def test_gram_and_svd_agree_and_paths_load(tmp_path):
    model = mlp()
    traj, *_ = synthetic_trajectory(model, seed=1)
    for k, sd in enumerate(traj):
        torch.save(sd, tmp_path / f"{k}.pt")
    paths = [tmp_path / f"{k}.pt" for k in range(len(traj))]
    a = pca_directions(paths, model, method="gram")
    b = pca_directions(traj, model, method="svd")
    for da, db in zip(a, b):
        for n in da:
            torch.testing.assert_close(da[n], db[n], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="n must be"):
        pca_directions(traj, model, n=9)
    with pytest.raises(ValueError, match="non-empty list"):
        pca_directions([], model)


def test_projection_onto_non_orthogonal_directions_is_least_squares():
    model = mlp()
    d1, d2 = random_direction(model, seed=1), random_direction(model, seed=2)
    w = {n: p.detach() for n, p in model.named_parameters()}
    coords = [(0.3, -1.2), (2.0, 0.5)]
    traj = [{n: w[n] + a * d1[n] + b * d2[n] for n in w} for a, b in coords]
    np.testing.assert_allclose(project_trajectory(traj, model, [d1, d2]), coords, atol=1e-10)


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_a_trajectory_that_does_not_move_is_refused(method):
    model = mlp()
    sd = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="trajectory does not move"):
        pca_directions([sd, sd, sd], model, method=method)
    moved = {n: t + 0.1 for n, t in sd.items()}
    with pytest.raises(ValueError, match="n must be <= 1: the trajectory moves in only 1"):
        pca_directions([sd, moved, sd], model, n=2, method=method)
    one = pca_directions([sd, moved, sd], model, n=1, method=method)
    flat = torch.cat([t.reshape(-1) for t in one.directions[0].values()])
    assert torch.isfinite(flat).all() and float(flat.norm()) == pytest.approx(1.0, rel=1e-12)
    assert one.explained_variance_ratio[0] == pytest.approx(1.0, rel=1e-12)
