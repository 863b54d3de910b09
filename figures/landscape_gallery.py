"""A landscape gallery of SGD-trained MLPs (one per seed).

1D and 2D filter-normalised slices, the 3D surface, the training trajectory on its PCA plane,
the Hessian spectral density, and lambda_max along training against the edge-of-stability bound
2/lr.
"""
from __future__ import annotations

import numpy as np

from analysis import spectral_density, top_eigenvalues
from landscape import (LineResult, PlaneResult, pca_directions, plane, plot_contour, plot_line,
                       plot_spectral_density, plot_surface3d, plot_trajectory)

from . import plotting
from .measure import slices
from .runner import ACCURACIES, means, pop_arrays, trials
from .verdict import every_seed

NAME = "landscape_gallery"
SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
TOLERANCE = 0.05
CONFIG = {"sgd": SGD, "schedule": "cosine per step", "tolerance": TOLERANCE,
          "density": "SLQ on the curvature subset", "trajectory": "a checkpoint every record"}
CLAIM = ("The landscape tools agree on SGD-trained MLPs (every seed): the solution is the lowest "
         "point of its 1D and 2D filter-normalised slices, and the largest node of the SLQ "
         f"spectral density matches the Lanczos lambda_max within {100 * TOLERANCE:g}%.")


def cost(size) -> float:
    """Plain training runs this costs (tracking and the analyses make a run count 4)."""
    return 4 * size.seeds


def analyse(model, loss_fn, data, size, trajectory) -> tuple[dict, dict]:
    """Slices, the PCA plane of ``trajectory``, the spectral density and lambda_max."""
    arrays = slices(model, loss_fn, data, size)
    pca = pca_directions(trajectory, model)
    reach = np.abs(pca.coords).max(axis=0) * 1.25
    pl = plane(model, loss_fn, data, pca.directions[0], pca.directions[1],
               np.linspace(-reach[0], reach[0], size.grid),
               np.linspace(-reach[1], reach[1], size.grid), progress=False)
    density = spectral_density(model, loss_fn, data, n_lanczos=size.density_lanczos,
                               n_vectors=size.density_vectors, seed=0, progress=False)
    eig = top_eigenvalues(model, loss_fn, data, tol=1e-6, max_hvp=size.final_max_hvp, seed=0,
                          progress=False)
    arrays.update(pca_xs=np.asarray(pl.xs), pca_ys=np.asarray(pl.ys),
                  pca_losses=np.asarray(pl.losses), pca_coords=np.asarray(pca.coords),
                  density_grid=np.asarray(density.grid), density=np.asarray(density.density))
    numbers = {"lambda_max_lanczos": float(eig.eigenvalues[0]),
               "density_top_node": float(np.max(density.nodes)),
               "pca_explained_variance_ratio": [float(v) for v in
                                                pca.explained_variance_ratio[:2]]}
    return numbers, arrays


def experiment(size, runner):
    """Run the training runs (searches and trials) that CLAIM is checked on.

    Args:
        size: The ``Size`` (seeds, epochs, grid extensions).
        runner: The ``Runner`` of the training runs.

    Returns:
        The JSON-able data that ``rule`` and ``figure`` read, and the named arrays saved with it.
    """
    runs = trials(runner, NAME, {"SGD": ("SGD", SGD)}, track=("lambda_max", "trajectory"),
                  measure=(f"{__name__}:analyse",), history=("lambda_max", "lr"))
    arrays = pop_arrays(runs)
    for r in runs["SGD"]:
        s = r["seed"]
        line_min = int(np.argmin(arrays[f"SGD__seed{s}__line_losses"]))
        losses = arrays[f"SGD__seed{s}__plane_losses"]
        r["extra"].update(
            line_min_at_centre=line_min == size.line_points // 2,
            plane_min_at_centre=np.unravel_index(int(np.argmin(losses)), losses.shape)
            == (size.grid // 2, size.grid // 2))
    return {"runs": runs}, arrays


def rule(data):
    """The checks of CLAIM on the saved data, and what was measured.

    Args:
        data: The data ``experiment`` saved.

    Returns:
        The measured values (with a ``headline``), and the checks by name.
    """
    runs = data["runs"]["SGD"]
    extra = [r["extra"] for r in runs]
    lam = np.array([e["lambda_max_lanczos"] for e in extra])
    rel = np.abs(np.array([e["density_top_node"] for e in extra]) - lam) / np.abs(lam)
    checks = {"1D slice minimum at the solution": every_seed(
                  "argmin of the 1D slice is its centre (values: 1 if so)",
                  [float(e["line_min_at_centre"]) for e in extra],
                  [e["line_min_at_centre"] for e in extra]),
              "2D slice minimum at the solution": every_seed(
                  "argmin of the 2D slice is its centre (values: 1 if so)",
                  [float(e["plane_min_at_centre"]) for e in extra],
                  [e["plane_min_at_centre"] for e in extra]),
              "density top node ≈ λ_max (5%)": every_seed(
                  "|top SLQ node - lambda_max| / lambda_max < 0.05 (values: that ratio)",
                  rel, list(rel < TOLERANCE))}
    eos = [max(np.asarray(r["history"]["lambda_max"][1]) * np.asarray(r["history"]["lr"][1]) / 2)
           for r in runs]
    measured = {**means(data["runs"], ACCURACIES), "lambda_max": lam.tolist(),
                "density_relative_error": rel.tolist(), "max_eos_ratio_plain_gd": eos,
                "pca_explained_variance_ratio": [e["pca_explained_variance_ratio"] for e in extra],
                "seeds": len(runs),
                "headline": {"λ_max (Lanczos)": f"{lam.mean():.3f} ± {lam.std():.3f}",
                             "top SLQ node relative error": f"{rel.max():.2g} (max)",
                             "max λ·lr/2": f"{max(eos):.2f}"}}
    return measured, checks


def figure(data, arrays, entry, out):
    """The 1D slices over seeds; seed 0's 2D slice, surface, trajectory and density; lambda_max.

    Args:
        data: The data ``experiment`` saved.
        arrays: The arrays ``experiment`` saved.
        entry: The summary entry (verdict and checks) written under the figure.
        out: The output folder.

    Returns:
        The PNG's file name.
    """
    runs = data["runs"]["SGD"]
    seeds = [r["seed"] for r in runs]
    fig = plotting.figure(0, 0, 16, 9)[0]
    get = lambda key, s=0: arrays[f"SGD__seed{s}__{key}"]  # noqa: E731
    ax = plot_line([LineResult(alphas=get("line_alphas", s), losses=get("line_losses", s))
                    for s in seeds], fig.add_subplot(2, 3, 1), label="SGD",
                   xlabel="α (filter-normalised direction)", ylabel="training loss")
    plotting.legend_below(ax)
    ax.set_title("1D slices (mean ± sd over seeds)")
    pl = PlaneResult(xs=get("plane_xs"), ys=get("plane_ys"), losses=get("plane_losses"))
    ax = plot_contour(pl, fig.add_subplot(2, 3, 2), xlabel="direction 1", ylabel="direction 2")
    ax.set_title("2D slice, seed 0")
    ax = plot_surface3d(pl, fig.add_subplot(2, 3, 3, projection="3d"))
    ax.set_title("2D slice as a surface, seed 0")
    pca = PlaneResult(xs=get("pca_xs"), ys=get("pca_ys"), losses=get("pca_losses"))
    ax = plot_trajectory(pca, get("pca_coords"), fig.add_subplot(2, 3, 4),
                         explained_variance_ratio=runs[0]["extra"]["pca_explained_variance_ratio"])
    ax.set_title("training trajectory on its PCA plane, seed 0")
    plotting.legend_below(ax)
    density = type("Density", (), {"grid": get("density_grid"), "density": get("density")})
    ax = plot_spectral_density(density, fig.add_subplot(2, 3, 5))
    lam = runs[0]["extra"]["lambda_max_lanczos"]
    ax.axvline(lam, color="tab:red", ls="--", lw=0.8, label=f"Lanczos λ_max {lam:.3g}")
    ax.set(xlabel="eigenvalue", title="Hessian spectral density (SLQ), seed 0")
    plotting.legend_below(ax)
    ax = fig.add_subplot(2, 3, 6)
    plotting.history_band(ax, runs, "lambda_max", "λ_max (Lanczos)")
    lrs = np.asarray(runs[0]["history"]["lr"][1])
    beta = SGD["momentum"]
    with np.errstate(divide="ignore"):
        ax.plot(runs[0]["history"]["lr"][0], np.where(lrs > 0, 2 * (1 + beta) / lrs, np.nan),
                "k:", lw=1, label=f"2(1 + β)/lr, heavy-ball bound (β {beta:g})")
    ax.set(xlabel="step", ylabel="sharpness", yscale="log",
           title="λ_max along training (log: the bound spans decades)")
    plotting.outside_legend(ax)
    return plotting.save(fig, out, NAME, entry)
