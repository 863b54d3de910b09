"""The edge of stability at full batch (Cohen et al. 2021; Cohen et al. 2022, "Adaptive gradient
methods at the edge of stability"): plain gradient descent's lambda_max against 2/lr, and Adam's
and AGD's preconditioned sharpness lambda_max(P^-1 H) against their threshold
(2 + 2 beta1) / ((1 - beta1) lr) (EMA momentum beta1), over training on a fixed subset of the
MNIST-1D training data with a constant learning rate, as ``analysis.Tracker`` logs them.

GD is plain gradient descent (momentum 0), so its threshold is exactly 2/lr (heavy-ball's would
be 2(1 + beta)/lr). The Hessian is that of the whole training subset, the full-batch loss."""
from __future__ import annotations

import numpy as np

from . import plotting
from .harness import job
from .runner import compact
from .verdict import every_seed

NAME = "adaptive_eos"
LRS = {"GD": (0.5, 1.0), "Adam": (3e-3, 1e-2), "AGD": (3e-3, 1e-2)}
OPTIMIZERS = {"GD": ("SGD", {"momentum": 0.0}), "Adam": ("Adam", {}),
              "AGD": ("AGD", {"delta": 1e-5})}
RATIO = {"GD": "eos_ratio", "Adam": "preconditioned_eos_ratio",
         "AGD": "preconditioned_eos_ratio"}
SHARPNESS = {"GD": "lambda_max", "Adam": "preconditioned_lambda_max",
             "AGD": "preconditioned_lambda_max"}
THRESHOLD = {"GD": "2/lr", "Adam": "(2 + 2β₁)/((1 − β₁) lr)", "AGD": "(2 + 2β₁)/((1 − β₁) lr)"}
BETA1 = 0.9                                          # torch Adam's and AGD's default
BAND = (0.8, 1.2)
WINDOW = 0.5                                         # the last half of training
SIZE = {"tiny": {"subset": 128, "steps": 20, "seeds": 2},
        "quick": {"subset": 500, "steps": 300, "seeds": 3},
        "full": {"subset": 2000, "steps": 3000, "seeds": 8}}
CONFIG = {"lrs": LRS, "optimizers": OPTIMIZERS, "beta1": BETA1, "band": BAND, "window": WINDOW,
          "sizes": SIZE, "schedule": "constant", "batch": "full (the whole subset)",
          "loss": "cross-entropy", "gd_momentum": 0.0}
CLAIM = ("At full batch and constant lr, the sharpness rises to and hovers at its stability "
         "threshold: the ratio lambda_max * lr / 2 (plain GD), and Adam's and AGD's "
         "preconditioned sharpness lambda_max(P^-1 H) over (2 + 2 beta1) / ((1 - beta1) lr), "
         f"reaches {BAND[0]:g} during training and its median over the last half of training "
         f"lies in [{BAND[0]:g}, {BAND[1]:g}], for every seed at every lr in "
         f"{list(LRS['GD'])} (GD), {list(LRS['Adam'])} (Adam) and {list(LRS['AGD'])} (AGD, "
         "delta 1e-5).")


def cost(size) -> float:
    """Plain training runs this costs (a tracked full-batch run counts 2)."""
    return 2 * sum(map(len, LRS.values())) * SIZE[size.name]["seeds"]


def experiment(size, runner):
    sz = SIZE[size.name]
    jobs = {(name, lr): [job(NAME, f"{name} lr={lr:g}", OPTIMIZERS[name][0], s,
                             {**OPTIMIZERS[name][1], "lr": lr}, batch_size=sz["subset"],
                             steps=sz["steps"], schedule="constant", subset=sz["subset"],
                             track=("lambda_max",))
                         for s in range(sz["seeds"])]
            for name, lrs in LRS.items() for lr in lrs}
    results = runner.run([j for js in jobs.values() for j in js])
    n = sz["seeds"]
    runs: dict[str, dict[str, list]] = {name: {} for name in LRS}
    for i, (name, lr) in enumerate(jobs):
        runs[name][f"{lr:g}"] = [compact(r, ("lr", "lambda_max", RATIO[name], SHARPNESS[name]))
                                 for r in results[i * n:(i + 1) * n]]
    return {"runs": runs, "steps": sz["steps"], "subset": sz["subset"]}, {}


def late_median(run: dict, key: str, window: float = WINDOW) -> float:
    """The median of the curve ``key`` over the records in the last ``window`` of training."""
    steps, values = (np.asarray(v, dtype=float) for v in run["history"][key])
    return float(np.median(values[steps > (1.0 - window) * steps[-1]]))


def rule(data):
    checks, medians, peaks = {}, {}, {}
    for name, by_lr in data["runs"].items():
        medians[name] = {lr: [late_median(r, RATIO[name]) for r in rs]
                         for lr, rs in by_lr.items()}
        peaks[name] = {lr: [float(np.max(r["history"][RATIO[name]][1])) for r in rs]
                       for lr, rs in by_lr.items()}
        peak = [v for vs in peaks[name].values() for v in vs]
        late = [v for vs in medians[name].values() for v in vs]
        checks[f"{name} rises to ≥ {BAND[0]:g}"] = every_seed(
            f"{name}: the maximum of sharpness / threshold ({THRESHOLD[name]}) over training "
            f">= {BAND[0]:g} (values: per lr and seed)", peak, [v >= BAND[0] for v in peak])
        checks[f"{name} hovers in [{BAND[0]:g}, {BAND[1]:g}]"] = every_seed(
            f"{name}: the median of sharpness / threshold over the last half of training in "
            f"[{BAND[0]:g}, {BAND[1]:g}] (values: per lr and seed)",
            late, [BAND[0] <= v <= BAND[1] for v in late])
    measured = {"late_median_ratio": medians, "max_ratio": peaks, "steps": data["steps"],
                "subset": data["subset"], "seeds": len(next(iter(data["runs"]["GD"].values()))),
                "headline": {f"{name} ratio, peak / late median": ", ".join(
                    f"lr {lr}: {np.mean(peaks[name][lr]):.2g} / {np.mean(vs):.2g}"
                    for lr, vs in values.items()) for name, values in medians.items()}}
    return measured, checks


def figure(data, arrays, entry, out):
    fig, axes = plotting.figure(2, 3, 17, 8.5)
    for col, (name, by_lr) in enumerate(data["runs"].items()):
        top, bottom = axes[0, col], axes[1, col]
        for lr, rs in by_lr.items():
            line = plotting.history_band(top, rs, SHARPNESS[name], f"lr {lr}")
            ratio = np.asarray(rs[0]["history"][RATIO[name]][1])
            sharp = np.asarray(rs[0]["history"][SHARPNESS[name]][1])
            top.axhline(float(np.median(sharp / ratio)), color=line.get_color(), ls="--", lw=1,
                        label=f"{THRESHOLD[name]}, lr {lr}")
            plotting.history_band(bottom, rs, RATIO[name], f"lr {lr}", color=line.get_color())
        label = "λ_max(H)" if name == "GD" else "λ_max(P⁻¹H)"
        top.set(xlabel="step", ylabel=f"{label} (full-batch loss)", yscale="log",
                title=f"{name}: {'sharpness' if name == 'GD' else 'preconditioned sharpness'}"
                      " (dashed: threshold)")
        plotting.outside_legend(top)
        bottom.axhspan(*BAND, color="0.85", zorder=0, label=f"rule band {list(BAND)}")
        bottom.axhline(1.0, color="k", ls="--", lw=0.8, label="threshold")
        bottom.axvline((1.0 - WINDOW) * data["steps"], color="k", ls=":", lw=0.8,
                       label="rule window starts")
        plotting.autoscale(bottom, [r["history"][RATIO[name]][1] for rs in by_lr.values()
                                    for r in rs])
        bottom.set(xlabel="step", ylabel=f"{label} / {THRESHOLD[name]}",
                   title=f"{name}: sharpness over its threshold (band: range over seeds)")
        plotting.outside_legend(bottom)
    return plotting.save(fig, out, NAME, entry)
