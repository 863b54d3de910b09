"""ND-Adam (Zhang et al. 2017) against Adam and SGD on an MLP with BatchNorm.

Weight-vector norms; the cosine between each weight vector's update and its momentum measured
in the tangent space of the sphere at the vector (the part of a step that changes a
BatchNorm-followed vector's direction, the direction ND-Adam preserves, Sec. 3), against
Adam's per-vector deviation measured the same way; and test accuracy with and without the
batch-normalised softmax (Sec. 4), its scale chosen on validation. ND-Adam's lr alpha_v is
chosen on validation within a factor 3 of the paper's alpha_v = 0.05 (no extension past it),
ties within the selection's standard error going to the paper's 0.05; Adam's and SGD's lrs on
validation with the shared grid extension, ties going to the smallest lr.
"""
from __future__ import annotations

import numpy as np

from . import plotting
from .harness import job
from .runner import ACCURACIES, means, per_seed, search, trials
from .verdict import TIE_RULE, every_seed, paired, settle

NAME = "ndadam_direction"
LRS = {"ND-Adam": (0.05 / 3, 0.05, 0.15), "Adam": (1e-3, 3e-3, 1e-2),
       "SGD": (0.02, 0.05, 0.1)}
EXTEND = {"ND-Adam": 0}           # the paper's alpha_v scale; the others: the shared rule
UNIT = 1e-3                       # ND-Adam's tangent cosine is 1 to this (its definition)
PAPER_LR = {"ND-Adam": {"lr": 0.05}}   # preferred among ties (Sec. 5); the others: the smallest
SCALAR_RATIO = 50                 # alpha_v = 50 alpha_s (Sec. 5)
SGD = {"momentum": 0.9, "weight_decay": 5e-4}
SCALES = (1.0, 2.5, 5.0, 10.0)    # BN-softmax gamma_c: set per data set in the paper
MARGIN = 0.005
COSINE_SPAN = 0.9      # the cosine is averaged over the first 90% of training: at the end of the
                       # cosine schedule the updates fall to float32 rounding of the weights
CONFIG = {"cosine_span": COSINE_SPAN, "lr_grids": LRS, "extend": EXTEND, "unit": UNIT,
          "cosine": "tangent space at the vector before the step",
          "scalar_ratio": SCALAR_RATIO, "sgd": SGD, "tie_rule": TIE_RULE, "preferred": PAPER_LR,
          "scales": SCALES, "margin": MARGIN, "model": "MLP Linear-BN-ReLU x2 + Linear",
          "schedule": "cosine per step"}
CLAIM = ("On an MLP with BatchNorm (lrs and the BN-softmax scale chosen on validation, ND-Adam's "
         "alpha_v within a factor 3 of the paper's 0.05), ND-Adam keeps every weight vector at "
         "unit norm while Adam's hidden weight-vector norms grow, ND-Adam's update of each "
         "weight vector is better aligned with its momentum than Adam's, both measured in the "
         "tangent space of the sphere at the vector (mean per-vector cosine over the first 90% "
         "of training, paired over seeds), "
         f"ND-Adam's final test accuracy is at least Adam's minus {100 * MARGIN:g} points with "
         "and without the BN-softmax, and the BN-softmax lowers no optimizer's final test "
         f"accuracy by more than {100 * MARGIN:g} points.")
KINDS = {"ND-Adam": "NDAdam", "Adam": "Adam", "SGD": "SGD"}
PROTOCOL = ("MNIST-1D (3,200 training, 800 validation, 20,000 test samples), MLP 40-100-100-10 "
            "with Linear-BN-ReLU blocks, batch 128, 25 epochs, cosine lr decay per step; "
            "ND-Adam's alpha_v chosen on validation in {0.0167, 0.05, 0.15} (no extension), "
            "alpha_s = alpha_v / 50; Adam's and SGD-momentum's (weight decay 5e-4) lrs and "
            "every BN-softmax scale chosen on validation (2 seeds; points within one pooled "
            "standard error of the best are tied: ND-Adam's ties go to the paper's 0.05, every "
            "other tie to the smallest value); per-vector cosines of "
            "weight matrices' rows every 25 steps, projected on the tangent space at the vector "
            "before the step; 8 paired seeds.")
PAPER = ("Zhang et al. 2017: wide residual networks on CIFAR-10 and CIFAR-100 with BatchNorm, "
         "ND-Adam at alpha_v = 0.05, BN-softmax with its scale set per data set; the direction "
         "preservation is derived (Sec. 3), the evidence is test error against Adam and SGD.")
DIFFERS = ("data set and model (an MLP on MNIST-1D, not a WRN on CIFAR), 25 epochs, alpha_v "
           "chosen on validation within a factor 3 of the paper's; the direction statement is "
           "measured on every step of training rather than derived, and ND-Adam's side of it "
           "holds by construction (a sanity check).")


def cost(size) -> float:
    """Plain training runs this costs (a tracked comparison run counts 2.5)."""
    grids = sum(map(len, LRS.values())) + 3 * len(SCALES) + 2 * size.extend
    return grids * size.select_seeds + 6 * 2.5 * size.seeds


def hyper(name: str, lr: float) -> dict:
    """The hyperparameters of one method at one learning rate.

    Args:
        name: A key of KINDS.
        lr: The (vector) learning rate (ND-Adam's scalar parameters take lr / SCALAR_RATIO).

    Returns:
        The optimizer's keyword arguments.
    """
    return {"NDAdam": {"lr": lr, "scalar_lr": lr / SCALAR_RATIO}, "Adam": {"lr": lr},
            "SGD": {**SGD, "lr": lr}}[KINDS[name]]


def experiment(size, runner):
    """Run the training runs (searches and trials) that CLAIM is checked on.

    The lr searches, then the BN-softmax scale searches at the chosen lr (each settled by the
    tie rule), then the compared runs on every seed.

    Args:
        size: The ``Size`` (seeds, epochs, grid extensions).
        runner: The ``Runner`` of the training runs.

    Returns:
        The JSON-able data that ``rule`` and ``figure`` read, and the named arrays saved with it.
    """
    lrs, scales, configs = {}, {}, {}
    for name, kind in KINDS.items():
        def make_lr(p, s, name=name):
            return job(NAME, f"{name} lr={p['lr']:g}", KINDS[name], s, hyper(name, p["lr"]),
                       batchnorm=True)
        lrs[name] = search(runner, {"lr": LRS[name]}, make_lr, extend=EXTEND.get(name))
        settle(runner, lrs[name], make_lr, PAPER_LR.get(name))
        hp = hyper(name, lrs[name].best["lr"])

        def make_scale(p, s, name=name, hp=hp):
            return job(NAME, f"{name} + BN-softmax γ_c={p['scale']:g}", KINDS[name], s, hp,
                       batchnorm=True, head_scale=p["scale"])
        scales[name] = search(runner, {"scale": SCALES}, make_scale)
        settle(runner, scales[name], make_scale)
        configs[name] = (kind, hp, {"batchnorm": True})
        configs[f"{name} + BN-softmax"] = (kind, hp, {"batchnorm": True,
                                                      "head_scale": scales[name].best["scale"]})
    runs = trials(runner, NAME, configs, track=("layers", "vector_cosine", "tangent_cosine"),
                  history=("rownorm/", "vector_cosine", "tangent_cosine"))
    data = {"searches": {**{f"{n} lr": {**s.summary(), "selection": s.selection}
                            for n, s in lrs.items()},
                         **{f"{n} scale": {**s.summary(), "selection": s.selection}
                            for n, s in scales.items()}},
            "lr": {n: s.best["lr"] for n, s in lrs.items()},
            "scale": {n: s.best["scale"] for n, s in scales.items()}, "runs": runs}
    return data, {}


def _rownorms(run: dict) -> dict[str, list[float]]:
    """The recorded weight-vector norm histories of a run, by layer."""
    return {k.split("/", 1)[1]: v[1] for k, v in run["history"].items()
            if k.startswith("rownorm/")}


def mean_cosine(run: dict, key: str = "tangent_cosine") -> float:
    """The mean per-vector cosine of a run over the first COSINE_SPAN of its steps.

    Args:
        run: One training run's result with its ``key`` history.
        key: "tangent_cosine" (projected on the sphere's tangent space) or "vector_cosine".

    Returns:
        The mean cosine (NaN entries ignored).
    """
    steps, values = map(np.asarray, run["history"][key])
    return float(np.nanmean(values[steps <= COSINE_SPAN * steps[-1]]))


def rule(data):
    """The checks of CLAIM on the saved data, and what was measured.

    Args:
        data: The data ``experiment`` saved.

    Returns:
        The measured values (with a ``headline``), and the checks by name.
    """
    runs = data["runs"]
    acc = {n: per_seed(rs, "final_test_acc") for n, rs in runs.items()}
    cos = {n: [mean_cosine(r) for r in rs] for n, rs in runs.items()}
    full = {n: [mean_cosine(r, "vector_cosine") for r in rs] for n, rs in runs.items()}
    nd_cos = cos["ND-Adam"] + cos["ND-Adam + BN-softmax"]
    deviation = [max(abs(v - 1.0) for vs in _rownorms(r).values() for v in vs)
                 for r in runs["ND-Adam"] + runs["ND-Adam + BN-softmax"]]
    growth = [min(vs[-1] / vs[0] for vs in list(_rownorms(r).values())[:-1])
              for r in runs["Adam"] + runs["Adam + BN-softmax"]]
    checks = {
        "ND-Adam unit norm": every_seed("max |mean weight-vector norm - 1| < 1e-3 (values: the "
                                        "deviation; both heads; ND-Adam's definition)", deviation,
                                        [d < 1e-3 for d in deviation], sanity=True),
        "ND-Adam tangent cosine = 1": every_seed(
            f"ND-Adam's mean tangent cos(update, -momentum) > 1 - {UNIT:g} (values: per seed, "
            "both heads; its update is -alpha_v m / (sqrt(v) + eps) before renormalising)",
            nd_cos, [c > 1 - UNIT for c in nd_cos], sanity=True),
        "Adam hidden norms grow": every_seed("final / initial mean weight-vector norm > 1 in "
                                             "every hidden layer (values: the smallest ratio)",
                                             growth, [g > 1.0 for g in growth]),
        "ND-Adam cosine > Adam": paired("ND-Adam's mean per-vector tangent cos(update, "
                                        "-momentum) - Adam's > 0", cos["ND-Adam"], cos["Adam"],
                                        0.0)}
    for head in ("", " + BN-softmax"):
        checks[f"ND-Adam acc >= Adam - 0.5pt{head}"] = paired(
            f"ND-Adam{head}'s final test accuracy - Adam{head}'s > -margin",
            acc[f"ND-Adam{head}"], acc[f"Adam{head}"], MARGIN)
    for name in KINDS:
        checks[f"BN-softmax keeps {name} acc"] = paired(
            f"{name} + BN-softmax's final test accuracy - {name}'s > -margin",
            acc[f"{name} + BN-softmax"], acc[name], MARGIN)
    m = means(runs, ACCURACIES)
    measured = {"protocol": PROTOCOL, "paper_protocol": PAPER, "differs": DIFFERS,
                **m, "lr": data["lr"], "scale": data["scale"], "searches": data["searches"],
                "mean_tangent_cosine": {n: float(np.mean(v)) for n, v in cos.items()},
                "mean_vector_cosine": {n: float(np.mean(v)) for n, v in full.items()},
                "ndadam_max_rownorm_deviation": max(deviation),
                "adam_smallest_hidden_norm_growth": min(growth), "seeds": len(acc["Adam"]),
                "headline": {
                    "test acc plain / BN-softmax": ", ".join(
                        f"{n} {m['final_test_acc'][n]:.3f} / "
                        f"{m['final_test_acc'][n + ' + BN-softmax']:.3f}" for n in KINDS),
                    "per-vector tangent cos(update, −m) (whole vector)": ", ".join(
                        f"{n} {np.mean(cos[n]):.4f} ({np.mean(full[n]):.3f})" for n in KINDS),
                    "lr": ", ".join(f"{n} {v:.3g}" for n, v in data["lr"].items()),
                    "BN-softmax γ_c": ", ".join(f"{n} {v:g}" for n, v in data["scale"].items())}}
    return measured, checks


def figure(data, arrays, entry, out):
    """Norms, tangent cosines, the BN-softmax search and test accuracies.

    Args:
        data: The data ``experiment`` saved.
        arrays: The arrays ``experiment`` saved.
        entry: The summary entry (verdict and checks) written under the figure.
        out: The output folder.

    Returns:
        The PNG's file name.
    """
    runs = data["runs"]
    fig, axes = plotting.figure(2, 3, 16, 10)
    colors = dict(zip(KINDS, ("tab:blue", "tab:orange", "tab:green")))
    ax = axes[0, 0]
    first = next(iter(_rownorms(runs["Adam"][0])))
    values = []
    for n, rs in runs.items():
        base = n.split(" +")[0]
        steps = rs[0]["history"][f"rownorm/{first}"][0]
        per = [r["history"][f"rownorm/{first}"][1] for r in rs]
        values += per
        plotting.band(ax, steps, per, n, colors[base], "--" if "BN" in n else "-")
    plotting.autoscale(ax, values)
    ax.set(xlabel="step", ylabel=f"mean weight-vector norm ({first})",
           title="weight-vector norms, first hidden layer")
    plotting.outside_legend(ax)
    ax = axes[0, 1]
    for n, rs in runs.items():
        ln = plotting.history_band(ax, rs, "tangent_cosine", n, colors[n.split(" +")[0]],
                                   "--" if "BN" in n else "-")
        if n.startswith("ND-Adam"):          # under SGD's line at 1: drawn wide to show
            ln.set(linewidth=4, alpha=0.5)
    end = runs["Adam"][0]["history"]["tangent_cosine"][0][-1]
    ax.axvspan(COSINE_SPAN * end, end, color="0.85", lw=0,
               label="left out (float32 rounding at lr → 0)")
    ax.set(xlabel="step", ylabel="tangent cos(update, −momentum)",
           title="per-vector direction, tangent space")
    plotting.outside_legend(ax)
    ax = axes[0, 2]
    for n in KINDS:
        points = data["searches"][f"{n} scale"]["val_acc"]
        ax.plot([p["scale"] for p in points], [p["val_acc"] for p in points], "o-",
                color=colors[n], label=f"{n} (chosen {data['scale'][n]:g})")
    ax.set(xlabel="BN-softmax scale γ_c", ylabel="validation accuracy (search seeds)",
           title="BN-softmax scale chosen on validation")
    plotting.outside_legend(ax)
    for ax, head in ((axes[1, 0], ""), (axes[1, 1], " + BN-softmax")):
        for n in KINDS:
            rs = runs[n + head]
            plotting.band(ax, rs[0]["curves"]["epoch"], [r["curves"]["test_acc"] for r in rs],
                          n, colors[n])
        ax.set(xlabel="epoch", ylabel="test accuracy",
               title="test accuracy, " + ("BN-softmax" if head else "plain softmax"))
        plotting.outside_legend(ax)
    ax = axes[1, 2]
    names = list(KINDS)
    plotting.bars(ax, names, [per_seed(runs[n], "final_test_acc") for n in names],
                  offset=-0.2, width=0.4, label="plain softmax")
    plotting.bars(ax, names, [per_seed(runs[n + " + BN-softmax"], "final_test_acc")
                              for n in names], color="tab:orange", offset=0.2, width=0.4,
                  label="BN-softmax")
    ax.set(ylabel="final test accuracy (± sd over seeds)", title="final test accuracy")
    plotting.outside_legend(ax)
    return plotting.save(fig, out, NAME, entry)
