"""A landscape gallery of one trained model: 1D and 2D filter-normalised slices, the 3D surface, the
training trajectory on its PCA plane, the Hessian spectral density, and lambda_max along training
against the edge-of-stability bound 2/lr."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .common import (CROSS_ENTROPY, SEED, Missing, Size, Trials, dataset, entry, eval_batches, mlp,
                     need, not_available, pyplot, save_result, save_runs, savefig, train)

NAME = "landscape_gallery"
SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
CLAIM = ("The landscape tools agree on one SGD-trained MLP: the solution is the lowest point of "
         "its 1D and 2D filter-normalised slices, and the largest node of the SLQ spectral "
         "density matches the Lanczos lambda_max within 5%.")


def run(size: Size, out: Path) -> dict:
    try:
        ls = need("landscape", "random_direction", "line", "plane", "pca_directions",
                  "plot_line", "plot_contour", "plot_surface3d", "plot_trajectory",
                  "plot_spectral_density")
        (spectral_density,) = need("analysis.density", "spectral_density")
        (top_eigenvalues,) = need("analysis", "top_eigenvalues")
    except Missing as err:
        return not_available(CLAIM, str(err))
    (random_direction, line, plane, pca_directions, plot_line, plot_contour, plot_surface3d,
     plot_trajectory, plot_spectral_density) = ls
    ds = dataset(size)
    model = mlp(size)
    opt = torch.optim.SGD(model.parameters(), **SGD)
    run_ = train("SGD", model, opt, ds, size, schedule=True, lambda_max=True,
                 checkpoint_every=size.every)
    data = eval_batches(ds, size)["curvature_data"]
    d1 = random_direction(model, normalization="filter", seed=SEED)
    d2 = random_direction(model, normalization="filter", seed=SEED + 1)
    alphas = np.linspace(-1.0, 1.0, size.line_points)
    grid = np.linspace(-1.0, 1.0, size.grid)
    ln = line(model, CROSS_ENTROPY, data, d1, alphas, progress=False)
    pl = plane(model, CROSS_ENTROPY, data, d1, d2, grid, grid, progress=False)
    pca = pca_directions(run_.trajectory, model, n=2)
    reach = np.abs(pca.coords).max(axis=0) * 1.25
    pca_plane = plane(model, CROSS_ENTROPY, data, pca.directions[0], pca.directions[1],
                      np.linspace(-reach[0], reach[0], size.grid),
                      np.linspace(-reach[1], reach[1], size.grid), progress=False)
    density = spectral_density(model, CROSS_ENTROPY, data, n_lanczos=size.density_lanczos,
                               n_vectors=size.density_vectors, seed=SEED, progress=False)
    eig = top_eigenvalues(model, CROSS_ENTROPY, data, k=1, tol=1e-6, max_hvp=size.final_max_hvp,
                          seed=SEED, progress=False)
    lam = float(eig.eigenvalues[0])
    top_node = float(np.max(density.nodes))
    centre = (len(grid) // 2, len(grid) // 2)
    checks = {"minimum_of_1d_slice_at_solution": int(np.argmin(ln.losses)) == len(alphas) // 2,
              "minimum_of_2d_slice_at_solution":
                  np.unravel_index(int(np.argmin(pl.losses)), pl.losses.shape) == centre,
              "density_top_node_within_5pct_of_lambda_max": abs(top_node - lam) <= 0.05 * abs(lam)}
    measured = {"lambda_max": lam, "lambda_max_converged": bool(eig.converged),
                "density_top_node": top_node, "density_n_hvp": int(density.n_hvp),
                "pca_explained_variance_ratio": [float(v) for v in pca.explained_variance_ratio[:2]],
                "test_acc": run_.test_acc, "train_loss_at_solution": float(ln.losses[len(alphas) // 2]),
                "min_1d_slice_loss": float(np.min(ln.losses)),
                "min_2d_slice_loss": float(np.min(pl.losses)),
                "max_eos_ratio_plain_gd": max(run_.tracker.history("eos_ratio")[1], default=None),
                "max_lambda_over_momentum_bound": max(
                    (lam_t * lr / (2 * (1 + SGD["momentum"])) for lam_t, lr in
                     zip(run_.tracker.history("lambda_max")[1], run_.tracker.history("lr")[1])),
                    default=None)}
    config = {"sgd": SGD, "schedule": "cosine per step", "grid": size.grid,
              "line_points": size.line_points, "density": {"n_lanczos": size.density_lanczos,
                                                           "n_vectors": size.density_vectors},
              "checkpoint_every": size.every}
    save_runs(out, NAME, [Trials("SGD", [run_])], size, config)
    save_result(out, NAME, {"line_alphas": ln.alphas, "line_losses": ln.losses,
                            "plane_xs": pl.xs, "plane_ys": pl.ys, "plane_losses": pl.losses,
                            "pca_xs": pca_plane.xs, "pca_ys": pca_plane.ys,
                            "pca_losses": pca_plane.losses, "pca_coords": pca.coords,
                            "density_grid": density.grid, "density": density.density,
                            "density_nodes": density.nodes, "density_weights": density.weights,
                            "lambda_max_history": np.array(run_.tracker.history("lambda_max")),
                            "lr_history": np.array(run_.tracker.history("lr"))}, config)
    plt = pyplot()
    fig = plt.figure(figsize=(16, 9))
    plot_line(ln, fig.add_subplot(2, 3, 1), label="filter-normalised direction",
              xlabel="alpha", ylabel="training loss")
    fig.axes[0].set_title("1D slice")
    ax = plot_contour(pl, fig.add_subplot(2, 3, 2), xlabel="direction 1", ylabel="direction 2")
    ax.set_title("2D slice (contours)")
    ax = plot_surface3d(pl, fig.add_subplot(2, 3, 3, projection="3d"))
    ax.set_title("2D slice (surface)")
    ax = plot_trajectory(pca_plane, pca.coords, fig.add_subplot(2, 3, 4),
                         explained_variance_ratio=pca.explained_variance_ratio)
    ax.set_title("training trajectory on its PCA plane")
    ax = plot_spectral_density(density, fig.add_subplot(2, 3, 5))
    ax.axvline(lam, color="tab:red", ls="--", lw=0.8, label=f"Lanczos lambda_max {lam:.3g}")
    ax.set(xlabel="eigenvalue", ylabel="density", title="Hessian spectral density (SLQ)")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(2, 3, 6)
    steps, lams = run_.tracker.history("lambda_max")
    ax.plot(steps, lams, label="lambda_max (warm-started Lanczos)")
    lr_steps, lrs = run_.tracker.history("lr")
    ax.plot(lr_steps, [2.0 / v if v > 0 else np.nan for v in lrs], "k--", lw=0.8,
            label="2 / lr (edge of stability, plain GD)")
    beta = SGD["momentum"]
    ax.plot(lr_steps, [2.0 * (1 + beta) / v if v > 0 else np.nan for v in lrs], "k:", lw=0.8,
            label=f"2 (1 + {beta:g}) / lr (heavy-ball momentum)")
    ax.set(xlabel="step", ylabel="sharpness", yscale="log", title="sharpness along training")
    ax.legend(fontsize=8)
    figure = savefig(fig, out, f"{NAME}.png")
    return entry(CLAIM, measured, checks, figure)
