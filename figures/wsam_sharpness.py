"""WSAM (Yue et al. 2023) against SGD and SAM (plus AdaSAM and SALA): sharpness and accuracy of
solutions trained from one initialisation on the same batches, the loss surface around each, and
a sweep over WSAM's gamma (the weight of the sharpness term, a = gamma / (1 - gamma))."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from scipy.stats import spearmanr

from .common import (CROSS_ENTROPY, SEED, Missing, Size, dataset, entry, eval_batches, mlp, need,
                     not_available, pyplot, save_result, save_runs, sharpness_report,
                     slow_evaluator, trials)

NAME = "wsam_sharpness"
RHO = 0.05
GAMMA = 0.9
GAMMAS = (0.5, 0.7, 0.8, 0.9, 0.95)
SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
CLAIM = ("Trained from the same initialisations on the same batches (SGD momentum 0.9 base, rho "
         "0.05, cosine lr; means over seeds), SAM and WSAM (gamma 0.9) end at a lower lambda_max"
         " than SGD, WSAM's test accuracy is within 0.5 points of the better of SGD and SAM or "
         "above it, and WSAM's lambda_max falls as gamma grows (Spearman correlation < 0 over "
         f"gamma in {list(GAMMAS)}).")


def optimizers(opt):
    """name -> factory(params) of the compared optimizers (all wrap the same SGD setting)."""
    sgd = lambda ps: torch.optim.SGD(ps, **SGD)  # noqa: E731
    return {"SGD": sgd,
            "SAM": lambda ps: opt.SAM(sgd(ps), rho=RHO),
            "WSAM": lambda ps: opt.WSAM(sgd(ps), rho=RHO, gamma=GAMMA),
            "AdaSAM": lambda ps: opt.AdaSAM(ps, lr=1e-3, rho=RHO),
            "SALA": lambda ps: opt.SALA(sgd(ps), k=5, alpha=0.8, rho=RHO)}


def run(size: Size, out: Path) -> dict:
    try:
        opt = need("optim", "SAM", "WSAM", "AdaSAM", "SALA")
        plane_fns = need("landscape", "random_direction", "line", "plane")
    except Missing as err:
        return not_available(CLAIM, str(err))
    opt = SimpleNamespace(**dict(zip(["SAM", "WSAM", "AdaSAM", "SALA"], opt)))
    ds = dataset(size)

    def measure(model, run_):
        run_.extra.update(sharpness_report(model, ds, size, rho=RHO))
        if run_.seed == SEED:
            run_.artifacts["surface"] = surface(model, ds, size, *plane_fns)

    common = dict(schedule=True, evaluator=slow_evaluator(ds, size), after=measure)
    init = lambda seed: mlp(size, seed=seed)  # noqa: E731  (the same initialisation for all)
    runs = [trials(name, init, lambda model, make=make: make(model.parameters()), ds, size,
                   **common) for name, make in optimizers(opt).items()]
    by = {r.name: r for r in runs}
    sweep = {GAMMA: by["WSAM"]}
    for gamma in GAMMAS:
        if gamma != GAMMA:
            sweep[gamma] = trials(
                f"WSAM gamma={gamma:g}", init,
                lambda model, g=gamma: opt.WSAM(torch.optim.SGD(model.parameters(), **SGD),
                                                rho=RHO, gamma=g),
                ds, size, layers=False, **common)
    sweep = dict(sorted(sweep.items()))
    acc = {n: r.test_acc for n, r in by.items()}
    lam = {n: r.mean("lambda_max") for n, r in by.items()}
    rho_s = float(spearmanr(list(sweep), [t.mean("lambda_max") for t in sweep.values()]).statistic)
    checks = {"SAM_lambda_max_below_SGD": lam["SAM"] < lam["SGD"],
              "WSAM_lambda_max_below_SGD": lam["WSAM"] < lam["SGD"],
              "WSAM_acc_within_0.5pt_of_best_of_SGD_SAM":
                  acc["WSAM"] >= max(acc["SGD"], acc["SAM"]) - 0.005,
              "lambda_max_falls_with_gamma": rho_s < 0}
    measured = {"lambda_max": lam,
                "trace": {n: r.mean("trace") for n, r in by.items()},
                "worst_case_sharpness": {n: r.mean("worst_case_sharpness") for n, r in by.items()},
                "test_acc": acc, "seeds": size.seeds,
                "lambda_max_per_seed": {n: r.values("lambda_max") for n, r in by.items()},
                "test_acc_per_seed": {n: r.values("test_acc") for n, r in by.items()},
                "train_loss": {n: r.mean("train_loss") for n, r in by.items()},
                "gamma_sweep": {f"{g:g}": {"lambda_max": t.mean("lambda_max"),
                                           "test_acc": t.test_acc} for g, t in sweep.items()},
                "gamma_lambda_max_spearman": rho_s,
                "passes_per_step": {n: r.mean("passes_per_step") for n, r in by.items()}}
    config = {"rho": RHO, "gamma": GAMMA, "gammas": GAMMAS, "sgd": SGD,
              "adasam": {"lr": 1e-3, "rho": RHO}, "sala": {"k": 5, "alpha": 0.8, "rho": RHO},
              "surfaces": "filter-normalised random directions (seeds 0, 1) around each seed-0 "
                          "solution, on the training subset used for curvature",
              "schedule": "cosine per step", "seeds": size.seeds}
    save_runs(out, NAME, runs + [t for g, t in sweep.items() if g != GAMMA], size, config)
    surfaces = {n: r.first.artifacts["surface"] for n, r in by.items()}
    arrays = {}
    for name, (ln, pl) in surfaces.items():
        arrays.update({f"line_alphas_{name}": ln.alphas, f"line_losses_{name}": ln.losses,
                       f"plane_xs_{name}": pl.xs, f"plane_ys_{name}": pl.ys,
                       f"plane_losses_{name}": pl.losses})
    save_result(out, NAME, arrays, {**config, "measured": measured})
    figure = plot(surfaces, lam, acc, measured["gamma_sweep"], out)
    return entry(CLAIM, measured, checks, figure)


def surface(model, ds, size: Size, random_direction, line, plane):
    """1D and 2D filter-normalised random slices of the loss around ``model``'s weights."""
    data = eval_batches(ds, size)["curvature_data"]
    d1 = random_direction(model, normalization="filter", seed=SEED)
    d2 = random_direction(model, normalization="filter", seed=SEED + 1)
    alphas = np.linspace(-1.0, 1.0, size.line_points)
    grid = np.linspace(-1.0, 1.0, size.grid)
    return (line(model, CROSS_ENTROPY, data, d1, alphas, progress=False),
            plane(model, CROSS_ENTROPY, data, d1, d2, grid, grid, progress=False))


def plot(surfaces, lam, acc, sweep, out: Path) -> str:
    plt = pyplot()
    names = list(surfaces)
    fig = plt.figure(figsize=(4.0 * len(names), 8.2), layout="constrained")
    grid = fig.add_gridspec(2, len(names))
    ax = fig.add_subplot(grid[0, :2])
    for name, (ln, _) in surfaces.items():
        ax.plot(ln.alphas, ln.losses, label=f"{name} (mean test acc {acc[name]:.3f})")
    ax.set(xlabel="alpha (filter-normalised direction)", ylabel="training loss",
           title="1D slices around each solution")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[0, 2])
    ax.bar(names, [lam[n] for n in names], color="tab:blue")
    ax.set(ylabel="lambda_max (training subset)", title="top Hessian eigenvalue at the end")
    ax.tick_params(axis="x", rotation=30)
    ax = fig.add_subplot(grid[0, 3:])
    gammas = [float(g) for g in sweep]
    ax.plot(gammas, [v["lambda_max"] for v in sweep.values()], "o-", color="tab:red",
            label="lambda_max")
    ax.set(xlabel="WSAM gamma", ylabel="lambda_max", title="WSAM gamma sweep")
    twin = ax.twinx()
    twin.plot(gammas, [v["test_acc"] for v in sweep.values()], "s--", color="tab:green",
              label="test accuracy")
    twin.set_ylabel("test accuracy")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], fontsize=8)
    planes = [pl for _, pl in surfaces.values()]
    top = float(np.quantile(np.concatenate([p.losses.ravel() for p in planes]), 0.9))
    low = float(min(p.losses.min() for p in planes))
    levels = np.linspace(low, top, 15)
    for i, (name, pl) in enumerate(zip(names, planes)):
        ax = fig.add_subplot(grid[1, i])
        cs = ax.contourf(pl.xs, pl.ys, np.minimum(pl.losses, top), levels=levels, cmap="viridis")
        ax.contour(pl.xs, pl.ys, pl.losses, levels=levels, colors="k", linewidths=0.3)
        ax.plot(0, 0, "r*", ms=10)
        ax.set(xlabel="direction 1", ylabel="direction 2" if i == 0 else None,
               title=f"{name}: 2D slice")
    fig.colorbar(cs, ax=fig.axes[-len(names):], label="training loss (clipped at 90% quantile)")
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{NAME}.png", dpi=100)
    pyplot().close(fig)
    return f"{NAME}.png"
