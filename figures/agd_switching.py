"""AGD (Yue et al. 2023): how often it takes the SGD branch, per delta and per layer (Sec. 1.3
of the optimizer spec), its test accuracy against Adam and SGD, and its path on Beale's function."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .common import (Missing, Size, dataset, entry, mlp, need, not_available, plot_histories,
                     pyplot, save_result, save_runs, savefig, trials)

NAME = "agd_switching"
DELTAS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-8)
AGD_LR = 1e-3                      # for the delta sweep
AGD_LRS = (3e-3, 1e-2, 3e-2)       # then tried at the best delta: 4 lrs, as for the baselines
BASELINE_LRS = {"Adam": (1e-3, 3e-3, 1e-2, 3e-2), "SGD": (0.02, 0.05, 0.1, 0.2)}   # tuned on a grid
CLAIM = ("AGD switches between SGD-like and adaptive updates according to delta: its mean "
         "fraction of SGD-branch elements never decreases as delta grows and spans < 0.1 to > "
         "0.9 over the delta grid, for some delta the fraction moves by > 0.1 during training, "
         "and AGD at its best (delta tuned at lr 1e-3, then lr over 4 values at that delta) "
         "reaches a mean test accuracy over seeds within 1 point of the better of Adam and SGD "
         "(momentum 0.9), each at its best of 4 learning rates.")

BEALE_MIN = (3.0, 0.5)
BEALE_START = (1.0, 1.5)


def beale(xy: torch.Tensor) -> torch.Tensor:
    """Beale's function; global minimum 0 at (3, 0.5)."""
    x, y = xy[..., 0], xy[..., 1]
    return ((1.5 - x + x * y) ** 2 + (2.25 - x + x * y ** 2) ** 2
            + (2.625 - x + x * y ** 3) ** 2)


def toy_path(make_opt, steps: int) -> np.ndarray:
    """The iterates of an optimizer on Beale's function from ``BEALE_START``."""
    xy = torch.nn.Parameter(torch.tensor(BEALE_START, dtype=torch.float64))
    opt = make_opt([xy])
    path = [xy.detach().clone()]
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = beale(xy)
            loss.backward()
            return loss
        opt.step(closure)
        path.append(xy.detach().clone())
    return torch.stack(path).numpy()


def optimizers(AGD):
    """name -> factory(params) for the MNIST-1D runs."""
    makers = {f"AGD d={d:g}": (lambda ps, d=d: AGD(ps, lr=AGD_LR, delta=d)) for d in DELTAS}
    for lr in BASELINE_LRS["Adam"]:
        makers[f"Adam lr={lr:g}"] = lambda ps, lr=lr: torch.optim.Adam(ps, lr=lr)
    for lr in BASELINE_LRS["SGD"]:
        makers[f"SGD lr={lr:g}"] = lambda ps, lr=lr: torch.optim.SGD(ps, lr=lr, momentum=0.9)
    return makers


def run(size: Size, out: Path) -> dict:
    try:
        (AGD,) = need("optim", "AGD")
    except Missing as err:
        return not_available(CLAIM, str(err))
    ds = dataset(size)

    def run_one(name, make):
        return trials(name, lambda seed: mlp(size, seed=seed),
                      lambda model: make(model.parameters()), ds, size, schedule=True)

    runs = [run_one(name, make) for name, make in optimizers(AGD).items()]
    agd = [r for r in runs if r.name.startswith("AGD")]
    best_delta = DELTAS[int(np.argmax([r.test_acc for r in agd]))]
    agd_lr = [run_one(f"AGD lr={lr:g} d={best_delta:g}",
                      lambda ps, lr=lr: AGD(ps, lr=lr, delta=best_delta)) for lr in AGD_LRS]
    runs += agd_lr
    mean_frac = {f"{d:g}": r.curve_mean("sgd_fraction") for d, r in zip(DELTAS, agd)}
    swing = {f"{d:g}": max(float(np.ptp(run.tracker.history("sgd_fraction")[1]))
                           for run in r.runs) for d, r in zip(DELTAS, agd)}
    per_layer = {f"{d:g}": {k.split("/", 1)[1]: r.curve_mean(k)
                            for k in r.first.tracker.keys() if k.startswith("sgd_fraction/")}
                 for d, r in zip(DELTAS, agd)}
    acc = {r.name: r.test_acc for r in runs}
    best = max(agd + agd_lr, key=lambda r: r.test_acc)
    best_of = {b: max((r for r in runs if r.name.startswith(b)), key=lambda r: r.test_acc)
               for b in BASELINE_LRS}
    ordered = [mean_frac[f"{d:g}"] for d in sorted(DELTAS)]
    checks = {
        "fraction_nondecreasing_in_delta": all(a <= b + 1e-12 for a, b in zip(ordered, ordered[1:])),
        "fraction_spans_0.1_to_0.9": ordered[0] < 0.1 and ordered[-1] > 0.9,
        "fraction_moves_during_training": max(swing.values()) > 0.1,
        "best_agd_within_1pt_of_best_baseline":
            best.test_acc >= max(r.test_acc for r in best_of.values()) - 0.01,
    }
    steps = size.toy_steps
    toy_makers = {"AGD": lambda ps: AGD(ps, lr=0.1, delta=1e-1),
                  "Adam": lambda ps: torch.optim.Adam(ps, lr=0.1),
                  "SGD": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9)}
    paths = {n: toy_path(m, steps) for n, m in toy_makers.items()}
    toy_dist = {n: float(np.hypot(*(p[-1] - np.array(BEALE_MIN)))) for n, p in paths.items()}
    config = {"deltas": DELTAS, "agd_lr": AGD_LR, "agd_lrs_at_best_delta": AGD_LRS,
              "baseline_lrs": BASELINE_LRS, "toy": {"start": BEALE_START, "steps": steps,
              "AGD": {"lr": 0.1, "delta": 0.1}, "Adam": {"lr": 0.1},
              "SGD": {"lr": 1e-3, "momentum": 0.9}}, "schedule": "cosine per step"}
    save_runs(out, NAME, runs, size, config)
    arrays = {f"path_{n}": p for n, p in paths.items()}
    for r in agd:
        arrays[f"sgd_fraction_{r.name}"] = np.array(r.first.tracker.history("sgd_fraction"))
    save_result(out, NAME, arrays, config)
    figure = plot([best] + list(best_of.values()), agd, paths, out)
    measured = {"mean_sgd_fraction": mean_frac, "seeds": size.seeds,
                "test_acc_per_seed": {r.name: r.values("test_acc") for r in runs},
                "sgd_fraction_range_over_training": swing,
                "per_layer_mean_sgd_fraction": per_layer, "test_acc": acc,
                "best_agd": best.name,
                "best_baselines": {b: r.name for b, r in best_of.items()},
                "beale_final_distance_to_min": toy_dist,
                "beale_steps": steps}
    return entry(CLAIM, measured, checks, figure)


def plot(runs, agd, paths, out: Path) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    plot_histories(axes[0, 0], agd, "sgd_fraction", "fraction of elements on the SGD branch")
    axes[0, 0].set_title("AGD: SGD-branch fraction, per delta")
    mid = min((r.first for r in agd),
              key=lambda r: abs(np.mean(r.tracker.history("sgd_fraction")[1]) - 0.5))
    for key in [k for k in mid.tracker.keys() if k.startswith("sgd_fraction/")]:
        axes[0, 1].plot(*mid.tracker.history(key), label=key.split("/", 1)[1])
    axes[0, 1].set(xlabel="step", ylabel="SGD-branch fraction",
                   title=f"per layer, {mid.name}")
    axes[0, 1].legend(fontsize=7)
    plot_histories(axes[1, 0], runs, "test_acc", "test accuracy")
    axes[1, 0].set_title("MNIST-1D test accuracy, best setting of each (seed 0)")
    ax = axes[1, 1]
    xs, ys = np.meshgrid(np.linspace(-0.5, 4.0, 200), np.linspace(-1.5, 2.0, 200))
    zs = beale(torch.tensor(np.stack([xs, ys], -1))).numpy()
    ax.contour(xs, ys, np.log10(zs + 1e-6), levels=30, cmap="viridis", linewidths=0.6)
    for name, path in paths.items():
        ax.plot(path[:, 0], path[:, 1], ".-", ms=2, lw=1, label=name)
    ax.plot(*BEALE_MIN, "r*", ms=12, label="minimum (3, 0.5)")
    ax.set(xlabel="x", ylabel="y", title=f"Beale's function, {len(path) - 1} steps")
    ax.legend(fontsize=7)
    return savefig(fig, out, f"{NAME}.png")
