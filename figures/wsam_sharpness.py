"""WSAM (Yue et al. 2023) against SGD and SAM on one SGD-momentum base.

lambda_max and test accuracy of the solutions (the same initialisations and batches within a
seed, rho chosen on validation per method), the loss slices around them, and a sweep over WSAM's
gamma (the weight of the sharpness term, a = gamma / (1 - gamma)).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from landscape import LineResult, PlaneResult, plot_contour, plot_line

from . import plotting
from .harness import job
from .runner import ACCURACIES, means, per_seed, pop_arrays, search, slashed, trials
from .verdict import mean_above, paired

NAME = "wsam_sharpness"
SGD = {"momentum": 0.9, "weight_decay": 5e-4}
LRS = (0.05, 0.1, 0.2)
RHOS = (0.01, 0.02, 0.05, 0.1, 0.2)
GAMMA = 0.9
GAMMAS = (0.5, 0.7, 0.8, 0.9, 0.95)
MARGIN = 0.005
CONFIG = {"sgd": SGD, "lr_grid": LRS, "rho_grid": RHOS, "gamma": GAMMA, "gammas": GAMMAS,
          "margin": MARGIN, "schedule": "cosine per step",
          "slices": "filter-normalised random directions (seeds 0, 1) on the curvature subset"}
CLAIM = ("With one SGD-momentum base (lr chosen on validation, cosine schedule) and rho chosen on "
         "validation for each method, SAM and WSAM (gamma 0.9) end at a lower lambda_max than "
         "SGD (paired over seeds), WSAM's final test accuracy is at least that of the better of "
         f"SGD and SAM (by validation) minus {100 * MARGIN:g} points, and WSAM's lambda_max falls "
         f"as gamma grows (mean Spearman correlation over seeds < 0, gamma in {list(GAMMAS)}).")


def cost(size) -> float:
    """Plain training runs this costs (a SAM-type run counts 2, its measurements 1 more)."""
    return (len(LRS) + 4 * len(RHOS) + 2) * size.select_seeds \
        + (5 + 3 + 3 * len(GAMMAS)) * size.seeds


def experiment(size, runner):
    """Run the training runs (searches and trials) that CLAIM is checked on.

    Args:
        size: The ``Size`` (seeds, epochs, grid extensions).
        runner: The ``Runner`` of the training runs.

    Returns:
        The JSON-able data that ``rule`` and ``figure`` read, and the named arrays saved with it.
    """
    lr = search(runner, {"lr": LRS}, lambda p, s: job(NAME, f"SGD lr={p['lr']:g}", "SGD", s,
                                                      {**SGD, **p}))
    base = {**SGD, "lr": lr.best["lr"]}
    rho = {name: search(runner, {"rho": RHOS},
                        lambda p, s, name=name: job(NAME, f"{name} ρ={p['rho']:g}", name, s,
                                                    {**base, **p, **extra}))
           for name, extra in (("SAM", {}), ("WSAM", {"gamma": GAMMA}))}
    configs = {"SGD": ("SGD", base), "SAM": ("SAM", {**base, **rho["SAM"].best}),
               "WSAM": ("WSAM", {**base, **rho["WSAM"].best, "gamma": GAMMA})}
    runs = trials(runner, NAME, configs, measure=("sharpness", "slices"))
    sweep = trials(runner, NAME, {f"γ={g:g}": ("WSAM", {**base, **rho["WSAM"].best, "gamma": g})
                                  for g in GAMMAS}, measure=("sharpness",))
    arrays = pop_arrays(runs)
    data = {"searches": {"lr": lr.summary(), **{n: s.summary() for n, s in rho.items()}},
            "base": base, "rho": {n: s.best["rho"] for n, s in rho.items()},
            "runs": runs, "sweep": sweep}
    return data, arrays


def rule(data):
    """The checks of CLAIM on the saved data, and what was measured.

    Args:
        data: The data ``experiment`` saved.

    Returns:
        The measured values (with a ``headline``), and the checks by name.
    """
    runs, sweep = data["runs"], data["sweep"]
    lam = {n: per_seed(rs, "lambda_max") for n, rs in runs.items()}
    acc = {n: per_seed(rs, "final_test_acc") for n, rs in runs.items()}
    val = {n: np.mean(per_seed(runs[n], "final_val_acc")) for n in ("SGD", "SAM")}
    better = max(val, key=val.get)
    gammas = [float(g.split("=")[1]) for g in sweep]
    sweep_lam = np.array([per_seed(rs, "lambda_max") for rs in sweep.values()])   # gamma x seed
    spearman = [float(spearmanr(gammas, col).statistic) for col in sweep_lam.T]
    checks = {
        "SAM λ_max < SGD": paired("SGD's lambda_max - SAM's > 0", lam["SGD"], lam["SAM"], 0.0),
        "WSAM λ_max < SGD": paired("SGD's lambda_max - WSAM's > 0", lam["SGD"], lam["WSAM"], 0.0),
        f"WSAM acc >= {better} - 0.5pt": paired(
            f"WSAM's final test accuracy - {better}'s > -margin", acc["WSAM"], acc[better],
            MARGIN),
        "λ_max falls with γ": mean_above("the Spearman correlation of (gamma, lambda_max) < 0",
                                         spearman, 0.0, below=True)}
    m = means(runs, ACCURACIES + ("lambda_max", "trace", "worst_case_sharpness"))
    measured = {**m, "rho": data["rho"], "base": data["base"], "better_of_sgd_sam": better,
                "searches": data["searches"], "seeds": len(acc["SGD"]),
                "gamma_sweep": {g: {"lambda_max": float(np.mean(v)), "final_test_acc": float(
                    np.mean(per_seed(sweep[g], "final_test_acc")))}
                    for g, v in zip(sweep, sweep_lam)},
                "spearman_per_seed": spearman,
                "headline": {"λ_max SGD / SAM / WSAM": slashed(m["lambda_max"], runs, ".2f"),
                    "test acc SGD / SAM / WSAM": slashed(m["final_test_acc"], runs, ".3f"),
                    "ρ SAM / WSAM": f"{data['rho']['SAM']:g} / {data['rho']['WSAM']:g}"}}
    return measured, checks


def figure(data, arrays, entry, out):
    """The loss slices, lambda_max and accuracy of each method, and the gamma sweep.

    Args:
        data: The data ``experiment`` saved.
        arrays: The arrays ``experiment`` saved.
        entry: The summary entry (verdict and checks) written under the figure.
        out: The output folder.

    Returns:
        The PNG's file name.
    """
    runs, sweep = data["runs"], data["sweep"]
    names = list(runs)
    fig, axes = plotting.figure(3, len(names), 4.3 * len(names), 11)
    planes = {n: PlaneResult(xs=arrays[f"{n}__seed0__plane_xs"],
                             ys=arrays[f"{n}__seed0__plane_ys"],
                             losses=arrays[f"{n}__seed0__plane_losses"]) for n in names}
    top = float(np.quantile(np.concatenate([p.losses.ravel() for p in planes.values()]), 0.9))
    low = float(min(p.losses.min() for p in planes.values()))
    for i, n in enumerate(names):
        lines = [LineResult(alphas=arrays[f"{n}__seed{r['seed']}__line_alphas"],
                            losses=arrays[f"{n}__seed{r['seed']}__line_losses"])
                 for r in runs[n]]
        ax = plot_line(lines, axes[0, i], label=n, xlabel="α (filter-normalised direction)",
                       ylabel="training loss")
        rho = f" (ρ {data['rho'][n]:g})" if n in data["rho"] else ""
        ax.set_title(f"{n}{rho}: 1D slices")
        plotting.legend_below(ax)
        clipped = PlaneResult(xs=planes[n].xs, ys=planes[n].ys,
                              losses=np.minimum(planes[n].losses, top))
        ax = plot_contour(clipped, axes[1, i], levels=np.linspace(low, top, 12),
                          xlabel="direction 1", ylabel="direction 2", colorbar=i == len(names) - 1)
        ax.plot(0, 0, "r*", ms=10)
        ax.set_title(f"{n}: 2D slice, seed 0 (clipped at 90% quantile)")
    top_line = max(max(arrays[k].max() for k in arrays if k.endswith("__line_losses")), 0)
    for ax in axes[0]:
        ax.set_ylim(0, 1.05 * top_line)              # one scale: the slices compare sharpness
    ax = axes[2, 0]
    plotting.bars(ax, names, [per_seed(runs[n], "lambda_max") for n in names])
    ax.set(ylabel="λ_max at the end (± sd over seeds)", title="top Hessian eigenvalue")
    ax = axes[2, 1]
    gammas = [float(g.split("=")[1]) for g in sweep]
    lam = np.array([per_seed(rs, "lambda_max") for rs in sweep.values()])
    ax.errorbar(gammas, lam.mean(1), yerr=lam.std(1, ddof=1) if lam.shape[1] > 1 else None,
                fmt="o-", capsize=3, color="tab:red")
    ax.set(xlabel="WSAM γ", ylabel="λ_max (± sd over seeds)", title="WSAM γ sweep: sharpness")
    ax = axes[2, 2]
    acc = np.array([per_seed(rs, "final_test_acc") for rs in sweep.values()])
    ax.errorbar(gammas, acc.mean(1), yerr=acc.std(1, ddof=1) if acc.shape[1] > 1 else None,
                fmt="s-", capsize=3, color="tab:green")
    ax.set(xlabel="WSAM γ", ylabel="final test accuracy (± sd over seeds)",
           title="WSAM γ sweep: accuracy")
    return plotting.save(fig, out, NAME, entry)
