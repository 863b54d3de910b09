"""WSAM (Yue et al. 2023) against SGD and SAM (plus AdaSAM and SALA): sharpness and accuracy of
solutions trained from one initialisation on the same batches, the loss surface around each, and
a sweep over WSAM's gamma (the weight of the sharpness term, a = gamma / (1 - gamma))."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from scipy.stats import spearmanr

from .common import (SEED, Missing, Size, dataset, entry, eval_batches, mlp, need, not_available,
                     pyplot, save_result, save_runs, savefig, sharpness_report, slow_evaluator,
                     solution, train, CROSS_ENTROPY)

NAME = "wsam_sharpness"
RHO = 0.05
GAMMA = 0.9
GAMMAS = (0.5, 0.7, 0.8, 0.9, 0.95)
SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
CLAIM = ("Trained from one initialisation on the same batches (SGD momentum 0.9 base, rho 0.05, "
         "cosine lr), SAM and WSAM (gamma 0.9) end at a lower lambda_max than SGD, WSAM's test "
         "accuracy is within 0.5 points of the better of SGD and SAM or above it, and WSAM's "
         "lambda_max falls as gamma grows (Spearman correlation < 0 over gamma in "
         f"{list(GAMMAS)}).")


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
    evaluator = slow_evaluator(ds, size)
    runs, reports, surfaces = [], {}, {}
    for name, make in optimizers(opt).items():
        model = mlp(size)                     # the same initialisation for every optimizer
        o = make(model.parameters())
        run_ = train(name, model, o, ds, size, schedule=True, evaluator=evaluator)
        runs.append(run_)
        with solution(o):
            reports[name] = sharpness_report(model, ds, size, rho=RHO)
            surfaces[name] = surface(model, ds, size, *plane_fns)
    sweep = {}
    for gamma in GAMMAS:
        if gamma == GAMMA:
            sweep[gamma] = {"lambda_max": reports["WSAM"]["lambda_max"],
                            "test_acc": next(r.test_acc for r in runs if r.name == "WSAM")}
            continue
        model = mlp(size)
        o = opt.WSAM(torch.optim.SGD(model.parameters(), **SGD), rho=RHO, gamma=gamma)
        r = train(f"WSAM gamma={gamma:g}", model, o, ds, size, schedule=True, layers=False)
        runs.append(r)
        sweep[gamma] = {"lambda_max": sharpness_report(model, ds, size, rho=RHO)["lambda_max"],
                        "test_acc": r.test_acc}
    acc = {r.name: r.test_acc for r in runs}
    lam = {k: v["lambda_max"] for k, v in reports.items()}
    rho_s = float(spearmanr(list(sweep), [v["lambda_max"] for v in sweep.values()]).statistic)
    checks = {"SAM_lambda_max_below_SGD": lam["SAM"] < lam["SGD"],
              "WSAM_lambda_max_below_SGD": lam["WSAM"] < lam["SGD"],
              "WSAM_acc_within_0.5pt_of_best_of_SGD_SAM":
                  acc["WSAM"] >= max(acc["SGD"], acc["SAM"]) - 0.005,
              "lambda_max_falls_with_gamma": rho_s < 0}
    measured = {"lambda_max": lam,
                "trace": {k: v["trace"] for k, v in reports.items()},
                "worst_case_sharpness": {k: v["worst_case_sharpness"] for k, v in reports.items()},
                "test_acc": {k: acc[k] for k in reports},
                "train_loss": {r.name: r.train_loss for r in runs if r.name in reports},
                "gamma_sweep": {f"{g:g}": v for g, v in sweep.items()},
                "gamma_lambda_max_spearman": rho_s,
                "passes_per_step": {r.name: r.passes_per_step for r in runs if r.name in reports}}
    missing = sorted({v["trace_missing"] for v in reports.values() if "trace_missing" in v})
    config = {"rho": RHO, "gamma": GAMMA, "gammas": GAMMAS, "sgd": SGD,
              "adasam": {"lr": 1e-3, "rho": RHO}, "sala": {"k": 5, "alpha": 0.8, "rho": RHO},
              "surfaces": "filter-normalised random directions (seeds 0, 1) around each solution,"
                          " on the training subset of 1000 samples",
              "schedule": "cosine per step"}
    save_runs(out, NAME, runs, size, config)
    arrays = {}
    for name, (ln, pl) in surfaces.items():
        arrays.update({f"line_alphas_{name}": ln.alphas, f"line_losses_{name}": ln.losses,
                       f"plane_xs_{name}": pl.xs, f"plane_ys_{name}": pl.ys,
                       f"plane_losses_{name}": pl.losses})
    save_result(out, NAME, arrays, {**config, "measured": measured})
    figure = plot(surfaces, lam, acc, sweep, out)
    extra = {"notes": missing} if missing else {}
    return entry(CLAIM, measured, checks, figure, **extra)


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
    fig = plt.figure(figsize=(4.0 * len(names), 8.2))
    grid = fig.add_gridspec(2, len(names))
    ax = fig.add_subplot(grid[0, :2])
    for name, (ln, _) in surfaces.items():
        ax.plot(ln.alphas, ln.losses, label=f"{name} (test acc {acc[name]:.3f})")
    ax.set(xlabel="alpha (filter-normalised direction)", ylabel="training loss",
           title="1D slices around each solution")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[0, 2])
    ax.bar(names, [lam[n] for n in names], color="tab:blue")
    ax.set(ylabel="lambda_max (training subset)", title="top Hessian eigenvalue at the end")
    ax.tick_params(axis="x", rotation=30)
    ax = fig.add_subplot(grid[0, 3:])
    gammas = list(sweep)
    ax.plot(gammas, [sweep[g]["lambda_max"] for g in gammas], "o-", color="tab:red",
            label="lambda_max")
    ax.set(xlabel="WSAM gamma", ylabel="lambda_max", title="WSAM gamma sweep")
    twin = ax.twinx()
    twin.plot(gammas, [sweep[g]["test_acc"] for g in gammas], "s--", color="tab:green",
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
        ax.set(xlabel="direction 1", ylabel="direction 2", title=f"{name}: 2D slice")
    fig.colorbar(cs, ax=fig.axes[-len(names):], label="training loss (clipped at 90% quantile)")
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{NAME}.png", dpi=100)
    pyplot().close(fig)
    return f"{NAME}.png"
