"""ND-Adam (Zhang et al. 2017) against Adam and SGD on an MLP with BatchNorm.

Weight-vector norms, the cosine between each weight vector's update and its momentum (the
direction ND-Adam preserves, Sec. 3), and test accuracy with and without the batch-normalised
softmax (Sec. 4), its scale chosen on validation.
"""
from __future__ import annotations

import numpy as np

from . import plotting
from .harness import job
from .runner import ACCURACIES, means, per_seed, search, trials
from .verdict import every_seed, paired

NAME = "ndadam_direction"
LRS = {"ND-Adam": (0.01, 0.03, 0.1), "Adam": (1e-3, 3e-3, 1e-2), "SGD": (0.02, 0.05, 0.1)}
SCALAR_RATIO = 50                 # alpha_v = 50 alpha_s (Sec. 5)
SGD = {"momentum": 0.9, "weight_decay": 5e-4}
SCALES = (1.0, 2.5, 5.0, 10.0)    # BN-softmax gamma_c: set per data set in the paper
MARGIN = 0.005
COSINE_SPAN = 0.9      # the cosine is averaged over the first 90% of training: at the end of the
                       # cosine schedule the updates fall to float32 rounding of the weights
CONFIG = {"cosine_span": COSINE_SPAN, "lr_grids": LRS, "scalar_ratio": SCALAR_RATIO, "sgd": SGD,
          "scales": SCALES, "margin": MARGIN, "model": "MLP Linear-BN-ReLU x2 + Linear",
          "schedule": "cosine per step"}
CLAIM = ("On an MLP with BatchNorm (lrs and the BN-softmax scale chosen on validation), ND-Adam "
         "keeps every weight vector at unit norm while Adam's hidden weight-vector norms grow, "
         "ND-Adam's update of each weight vector is better aligned with its momentum than "
         "Adam's (mean per-vector cosine over the first 90% of training, paired over seeds), "
         f"ND-Adam's final test accuracy is at least Adam's minus {100 * MARGIN:g} points with "
         "and without the BN-softmax, and the BN-softmax lowers no optimizer's final test "
         f"accuracy by more than {100 * MARGIN:g} points.")
KINDS = {"ND-Adam": "NDAdam", "Adam": "Adam", "SGD": "SGD"}


def cost(size) -> float:
    """Plain training runs this costs (a tracked comparison run counts 2.5)."""
    grids = sum(map(len, LRS.values())) + 3 * len(SCALES) + 2 * size.extend
    return grids * size.select_seeds + 6 * 2.5 * size.seeds


def hyper(name: str, lr: float) -> dict:
    """The hyperparameters of one method at one learning rate.

    Args:
        name: A key of KINDS.
        lr: The learning rate (ND-Adam's scalar parameters take lr / SCALAR_RATIO).

    Returns:
        The optimizer's keyword arguments.
    """
    return {"NDAdam": {"lr": lr, "scalar_lr": lr / SCALAR_RATIO}, "Adam": {"lr": lr},
            "SGD": {**SGD, "lr": lr}}[KINDS[name]]


def experiment(size, runner):
    """Run the training runs (searches and trials) that CLAIM is checked on.

    Args:
        size: The ``Size`` (seeds, epochs, grid extensions).
        runner: The ``Runner`` of the training runs.

    Returns:
        The JSON-able data that ``rule`` and ``figure`` read, and the named arrays saved with it.
    """
    lrs, scales, configs = {}, {}, {}
    for name, kind in KINDS.items():
        lrs[name] = search(runner, {"lr": LRS[name]},
                           lambda p, s, name=name: job(NAME, f"{name} lr={p['lr']:g}", KINDS[name],
                                                       s, hyper(name, p["lr"]), batchnorm=True))
        hp = hyper(name, lrs[name].best["lr"])
        scales[name] = search(runner, {"scale": SCALES},
                              lambda p, s, name=name, hp=hp: job(
                                  NAME, f"{name} + BN-softmax γ_c={p['scale']:g}", KINDS[name], s,
                                  hp, batchnorm=True, head_scale=p["scale"]))
        configs[name] = (kind, hp, {"batchnorm": True})
        configs[f"{name} + BN-softmax"] = (kind, hp, {"batchnorm": True,
                                                      "head_scale": scales[name].best["scale"]})
    runs = trials(runner, NAME, configs, track=("layers", "vector_cosine"),
                  history=("rownorm/", "vector_cosine"))
    data = {"searches": {**{f"{n} lr": s.summary() for n, s in lrs.items()},
                         **{f"{n} scale": s.summary() for n, s in scales.items()}},
            "lr": {n: s.best["lr"] for n, s in lrs.items()},
            "scale": {n: s.best["scale"] for n, s in scales.items()}, "runs": runs}
    return data, {}


def _rownorms(run: dict) -> dict[str, list[float]]:
    """The recorded weight-vector norm histories of a run, by layer."""
    return {k.split("/", 1)[1]: v[1] for k, v in run["history"].items()
            if k.startswith("rownorm/")}


def mean_cosine(run: dict) -> float:
    """The mean update-momentum cosine of a run over the first COSINE_SPAN of its steps.

    Args:
        run: One training run's result with its ``vector_cosine`` history.

    Returns:
        The mean cosine (NaN entries ignored).
    """
    """The mean per-vector cosine over the records in the first COSINE_SPAN of training."""
    steps, values = map(np.asarray, run["history"]["vector_cosine"])
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
    deviation = [max(abs(v - 1.0) for vs in _rownorms(r).values() for v in vs)
                 for r in runs["ND-Adam"] + runs["ND-Adam + BN-softmax"]]
    growth = [min(vs[-1] / vs[0] for vs in list(_rownorms(r).values())[:-1])
              for r in runs["Adam"] + runs["Adam + BN-softmax"]]
    checks = {
        "ND-Adam unit norm": every_seed("max |mean weight-vector norm - 1| < 1e-3 (values: the "
                                        "deviation; both heads)", deviation,
                                        [d < 1e-3 for d in deviation]),
        "Adam hidden norms grow": every_seed("final / initial mean weight-vector norm > 1 in "
                                             "every hidden layer (values: the smallest ratio)",
                                             growth, [g > 1.0 for g in growth]),
        "ND-Adam cosine > Adam": paired("ND-Adam's mean per-vector cos(update, -momentum) - "
                                        "Adam's > 0", cos["ND-Adam"], cos["Adam"], 0.0)}
    for head in ("", " + BN-softmax"):
        checks[f"ND-Adam acc >= Adam - 0.5pt{head}"] = paired(
            f"ND-Adam{head}'s final test accuracy - Adam{head}'s > -margin",
            acc[f"ND-Adam{head}"], acc[f"Adam{head}"], MARGIN)
    for name in KINDS:
        checks[f"BN-softmax keeps {name} acc"] = paired(
            f"{name} + BN-softmax's final test accuracy - {name}'s > -margin",
            acc[f"{name} + BN-softmax"], acc[name], MARGIN)
    m = means(runs, ACCURACIES)
    measured = {**m, "lr": data["lr"], "scale": data["scale"], "searches": data["searches"],
                "mean_vector_cosine": {n: float(np.mean(v)) for n, v in cos.items()},
                "ndadam_max_rownorm_deviation": max(deviation),
                "adam_smallest_hidden_norm_growth": min(growth), "seeds": len(acc["Adam"]),
                "headline": {
                    "test acc plain / BN-softmax": ", ".join(
                        f"{n} {m['final_test_acc'][n]:.3f} / "
                        f"{m['final_test_acc'][n + ' + BN-softmax']:.3f}" for n in KINDS),
                    "per-vector cos(update, −m)": ", ".join(
                        f"{n} {np.mean(cos[n]):.3f}" for n in KINDS),
                    "BN-softmax γ_c": ", ".join(f"{n} {v:g}" for n, v in data["scale"].items())}}
    return measured, checks


def figure(data, arrays, entry, out):
    """Weight-vector norms, update-momentum cosines and test accuracies.

    Args:
        data: The data ``experiment`` saved.
        arrays: The arrays ``experiment`` saved.
        entry: The summary entry (verdict and checks) written under the figure.
        out: The output folder.

    Returns:
        The PNG's file name.
    """
    runs = data["runs"]
    fig, axes = plotting.figure(2, 3, 16, 8.5)
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
        plotting.history_band(ax, rs, "vector_cosine", n, colors[n.split(" +")[0]],
                              "--" if "BN" in n else "-")
    end = runs["Adam"][0]["history"]["vector_cosine"][0][-1]
    ax.axvspan(COSINE_SPAN * end, end, color="0.85", lw=0,
               label="left out (float32 rounding at lr → 0)")
    ax.set(xlabel="step", ylabel="per-vector cos(update, −momentum)",
           title="direction preservation per weight vector")
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
