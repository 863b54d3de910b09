"""ND-Adam (Zhang et al. 2017) against Adam and SGD on an MLP with BatchNorm: weight-vector norms,
angular steps per layer, the cosine between the update and the negative gradient, and test
accuracy with and without the paper's batch-normalised softmax (logit regularisation)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .common import (Missing, Size, dataset, entry, mlp, need, not_available, plot_histories,
                     pyplot, save_result, save_runs, savefig, trials)

NAME = "ndadam_direction"
ND_LR, SCALAR_LR = 0.05, 1e-3          # alpha_v = 50 alpha_s (spec Sec. 3.3)
ADAM_LR = 1e-3
SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
LOGIT_SCALE = 2.5                       # BN-softmax gamma_c (CIFAR-10 value)
CLAIM = ("On an MLP with BatchNorm, ND-Adam keeps every weight vector at unit norm while Adam's "
         "hidden weight-vector norms grow over training, ND-Adam's update is better aligned with"
         " the negative gradient than Adam's (mean layer cosine), ND-Adam's mean test accuracy "
         "over seeds is at least Adam's, and the batch-normalised softmax (logit regularisation)"
         " does not lower any optimizer's test accuracy.")


def optimizers(NDAdam, normalize_vectors_):
    def ndadam(model):
        normalize_vectors_(model.parameters())          # start on the sphere (spec Sec. 3.2)
        vectors = [p for p in model.parameters() if p.dim() >= 2]
        scalars = [p for p in model.parameters() if p.dim() < 2]
        return NDAdam([{"params": vectors, "lr": ND_LR}, {"params": scalars, "lr": SCALAR_LR}])
    return {"ND-Adam": ndadam,
            "Adam": lambda model: torch.optim.Adam(model.parameters(), lr=ADAM_LR),
            "SGD": lambda model: torch.optim.SGD(model.parameters(), **SGD)}


def run(size: Size, out: Path) -> dict:
    try:
        NDAdam, normalize_vectors_, BNSoftmax = need("optim", "NDAdam", "normalize_vectors_",
                                                     "BNSoftmax")
    except Missing as err:
        return not_available(CLAIM, str(err))
    ds = dataset(size)
    runs = {}
    for reg in (False, True):
        for name, make in optimizers(NDAdam, normalize_vectors_).items():
            label = f"{name} + BN-softmax" if reg else name
            def model(seed, reg=reg):
                head = BNSoftmax(10, scale=LOGIT_SCALE) if reg else None
                return mlp(size, seed=seed, batchnorm=True, head=head)
            runs[label] = trials(label, model, make, ds, size, schedule=True)
    vector_layers = [k.split("/", 1)[1] for k in runs["Adam"].first.tracker.keys()
                     if k.startswith("rownorm/")]
    hidden = vector_layers[:-1]

    def rownorm(run_, n):
        return run_.tracker.history(f"rownorm/{n}")[1]

    nd_dev = max(abs(v - 1.0) for label in ("ND-Adam", "ND-Adam + BN-softmax")
                 for run_ in runs[label].runs for n in vector_layers for v in rownorm(run_, n))
    adam_growth = {label: {n: [rownorm(r, n)[-1] / rownorm(r, n)[0] for r in runs[label].runs]
                           for n in hidden} for label in ("Adam", "Adam + BN-softmax")}
    cosines = {label: float(np.mean([t.curve_mean(f"cos/{n}") for n in vector_layers]))
               for label, t in runs.items()}
    angles = {label: {n: t.curve_mean(f"angle/{n}") for n in vector_layers}
              for label, t in runs.items()}
    acc = {label: t.test_acc for label, t in runs.items()}
    own = runs["ND-Adam"].first.tracker
    own_keys = [k for k in own.keys() if k.startswith("opt_angular_step/")]
    agreement = max((abs(a - b) for k in own_keys
                     for a, b in zip(own.history(k)[1], own.history("angle/" + k.split("/", 1)[1])[1])),
                    default=float("nan"))
    checks = {
        "ndadam_unit_norm": nd_dev < 1e-3,
        "adam_hidden_norms_grow": all(g > 1.0 for d in adam_growth.values() for gs in d.values()
                                      for g in gs),
        "ndadam_cosine_above_adam": cosines["ND-Adam"] > cosines["Adam"]
                                    and cosines["ND-Adam + BN-softmax"] > cosines["Adam + BN-softmax"],
        "ndadam_acc_at_least_adam": acc["ND-Adam"] >= acc["Adam"]
                                    and acc["ND-Adam + BN-softmax"] >= acc["Adam + BN-softmax"],
        "bn_softmax_does_not_hurt": all(acc[f"{n} + BN-softmax"] >= acc[n]
                                        for n in ("ND-Adam", "Adam", "SGD")),
    }
    measured = {"test_acc": acc, "seeds": size.seeds,
                "test_acc_per_seed": {label: t.values("test_acc") for label, t in runs.items()},
                "mean_update_neg_grad_cosine": cosines,
                "mean_angular_step_rad": angles,
                "adam_rownorm_growth_final_over_initial": adam_growth,
                "ndadam_max_rownorm_deviation": nd_dev,
                "ndadam_own_vs_tracker_angle_max_diff": agreement,
                "final_mean_rownorm_seed0": {label: {n: rownorm(t.first, n)[-1] for n in vector_layers}
                                             for label, t in runs.items()}}
    config = {"nd_lr": ND_LR, "scalar_lr": SCALAR_LR, "adam_lr": ADAM_LR, "sgd": SGD,
              "logit_regularisation": f"BN-softmax, scale {LOGIT_SCALE}",
              "model": "MLP Linear-BN-ReLU x2 + Linear", "schedule": "cosine per step"}
    save_runs(out, NAME, list(runs.values()), size, config)
    save_result(out, NAME, {f"rownorm_{label}_{n}": np.array(t.first.tracker.history(f"rownorm/{n}"))
                            for label, t in runs.items() for n in vector_layers}, config)
    figure = plot({label: t.first for label, t in runs.items()}, acc, vector_layers, out)
    return entry(CLAIM, measured, checks, figure)


def plot(runs, acc, layers, out: Path) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    plain = [r for label, r in runs.items() if "BN-softmax" not in label]
    reg = [r for label, r in runs.items() if "BN-softmax" in label]
    first = layers[0]
    for group, style in ((plain, "-"), (reg, "--")):
        for i, r in enumerate(group):
            axes[0, 0].plot(*r.tracker.history(f"rownorm/{first}"), style, color=f"C{i}",
                            label=r.name)
    axes[0, 0].set(xlabel="step", ylabel=f"mean weight-vector norm ({first})", yscale="log",
                   title="weight-vector norms, first hidden layer (dashed: BN-softmax)")
    axes[0, 0].legend(fontsize=7)
    styles = dict(zip(layers, ["-", "--", ":"]))
    for ax, key, ylabel, title in [
            (axes[0, 1], "angle", "mean angular step (rad)",
             "angular step per layer (with BN-softmax)"),
            (axes[0, 2], "cos", "cos(update, -gradient)",
             "update vs negative gradient (with BN-softmax)")]:
        for i, r in enumerate(reg):
            for n in layers:
                steps, vals = r.tracker.history(f"{key}/{n}")
                ax.plot(steps, vals, styles[n], color=f"C{i}", label=f"{r.name.split(' +')[0]} {n}")
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        if key == "angle":
            ax.set_yscale("log")
        ax.legend(fontsize=6, ncol=2)
    plot_histories(axes[1, 0], plain, "test_acc", "test accuracy")
    axes[1, 0].set_title("test accuracy, plain softmax (seed 0)")
    plot_histories(axes[1, 1], reg, "test_acc", "test accuracy")
    axes[1, 1].set_title("test accuracy, BN-softmax (seed 0)")
    names = [r.name for r in plain]
    x = np.arange(len(names))
    axes[1, 2].bar(x - 0.2, [acc[r.name] for r in plain], 0.4, label="plain softmax")
    axes[1, 2].bar(x + 0.2, [acc[r.name] for r in reg], 0.4, label="BN-softmax")
    axes[1, 2].set_xticks(x, names)
    lo = min(acc.values())
    axes[1, 2].set(ylabel="final test accuracy (mean over seeds)", title="final test accuracy",
                   ylim=(max(0.0, lo - 0.1), None))
    axes[1, 2].legend(fontsize=8)
    return savefig(fig, out, f"{NAME}.png")
