"""SALA (Tan et al. 2024) against its base SGD, Lookahead and SAM.

Forward-backward passes per step as counted during training, when stage 2 (SAM steps) starts,
lambda_max along training and test accuracy (slow weights). Every method's lr is chosen on
validation for that method (ties within the selection's standard error go to the smallest lr).
"""
from __future__ import annotations

import numpy as np

from . import plotting
from .harness import job
from .runner import ACCURACIES, means, per_seed, search, slashed, trials
from .verdict import TIE_RULE, every_seed, paired, settle

NAME = "sala_overhead"
SGD = {"momentum": 0.9, "weight_decay": 5e-4}
LRS = (0.05, 0.1, 0.2)
SALA = {"k": 2, "alpha": 0.5, "rho": 0.2}          # the authors' README default
LOOKAHEAD = {"k": 2, "alpha": 0.5}                 # SALA's k and alpha without the SAM steps
SAM_RHO = 0.05                                     # the authors' SAM baseline
MAX_PASSES = 1.25
MARGIN = 0.005
METHODS = {"SGD": {}, "Lookahead": LOOKAHEAD, "SALA": SALA, "SAM": {"rho": SAM_RHO}}
CONFIG = {"sgd": SGD, "lr_grid": LRS, "lr_per_method": True, "tie_rule": TIE_RULE,
          "sala": SALA, "lookahead": LOOKAHEAD, "sam_rho": SAM_RHO,
          "max_passes": MAX_PASSES, "margin": MARGIN, "schedule": "cosine per step",
          "evaluation": "slow weights for Lookahead and SALA"}
CLAIM = (f"With an SGD base (momentum 0.9, cosine schedule; each method's lr chosen on validation "
         f"for that method), SALA "
         f"(k 2, alpha 0.5, rho 0.2) needs at most {MAX_PASSES:g} forward-backward passes per "
         f"step as counted during training (SAM with rho {SAM_RHO:g} needs 2), and its final "
         f"test accuracy is at least SAM's minus {100 * MARGIN:g} points (paired over seeds).")
PROTOCOL = ("MNIST-1D (3,200 training, 800 validation, 20,000 test samples), MLP 40-100-100-10, "
            "batch 128, 25 epochs, cosine lr decay per step; SGD-momentum 0.9 with weight decay "
            "5e-4 as every method's base; SGD, Lookahead (k 2, alpha 0.5), SALA (k 2, alpha 0.5, "
            "rho 0.2) and SAM (rho 0.05) each with its own lr chosen on validation (grid 0.05, "
            "0.1, 0.2, extended geometrically up to 3 times past an edge optimum; 2 seeds; "
            "points within one pooled standard error of the best are tied and the smallest lr "
            "of the tie is taken); passes counted during training; Lookahead and SALA "
            "evaluated on their slow weights; 8 paired seeds.")
PAPER = ("Tan et al. 2024 (and the authors' code): ResNets, WRN-28-10 and PyramidNet on "
         "CIFAR-10/100 for 200 epochs, SGD-Nesterov base with lr from a sweep over 0.01-0.1, "
         "SALA k 2, alpha 0.5, rho 0.2 and SAM rho 0.05; claim: about 25% overhead over the "
         "base optimizer and the generalization of SAM.")
DIFFERS = ("data set and model (an MLP on MNIST-1D), 25 epochs, plain momentum instead of "
           "Nesterov, no data augmentation; rho 0.2 is an absolute fast-slow distance, so the "
           "share of training in stage 2 (and the overhead) depends on the model's size; the "
           "lrs are chosen on validation per method rather than taken from a CIFAR sweep.")


def cost(size) -> float:
    """Plain training runs this costs (lambda_max tracking makes a run count 2.5)."""
    return 4 * (len(LRS) + size.extend) * size.select_seeds * 1.5 + 5 * 2.5 * size.seeds


def experiment(size, runner):
    """Run the training runs (searches and trials) that CLAIM is checked on.

    Args:
        size: The ``Size`` (seeds, epochs, grid extensions).
        runner: The ``Runner`` of the training runs.

    Returns:
        The JSON-able data that ``rule`` and ``figure`` read, and the named arrays saved with it.
    """
    searches, configs = {}, {}
    for name, extra in METHODS.items():
        def make(p, s, name=name, extra=extra):
            return job(NAME, f"{name} lr={p['lr']:g}", name, s, {**SGD, **extra, **p})
        searches[name] = search(runner, {"lr": LRS}, make)
        settle(runner, searches[name], make)
        configs[name] = (name, {**SGD, **extra, "lr": searches[name].best["lr"]})
    runs = trials(runner, NAME, configs, track=("lambda_max",), measure=("sharpness",),
                  history=("lambda_max", "stage", "distance"))
    return {"searches": {n: {**f.summary(), "selection": f.selection}
                         for n, f in searches.items()},
            "lr": {n: f.best["lr"] for n, f in searches.items()}, "runs": runs}, {}


def rule(data):
    """The checks of CLAIM on the saved data, and what was measured.

    Args:
        data: The data ``experiment`` saved.

    Returns:
        The measured values (with a ``headline``), and the checks by name.
    """
    runs = data["runs"]
    passes = per_seed(runs["SALA"], "passes_per_step")
    stage2 = [float(np.mean(np.asarray(r["history"]["stage"][1]) == 2)) for r in runs["SALA"]]
    checks = {
        "SALA passes/step <= 1.25": every_seed(f"SALA's passes per step <= {MAX_PASSES:g}",
                                               passes, [p <= MAX_PASSES for p in passes]),
        "SALA acc >= SAM - 0.5pt": paired("SALA's final test accuracy - SAM's > -margin",
                                          per_seed(runs["SALA"], "final_test_acc"),
                                          per_seed(runs["SAM"], "final_test_acc"), MARGIN)}
    measured = means(runs, ACCURACIES + ("passes_per_step", "lambda_max"))
    measured.update(protocol=PROTOCOL, paper_protocol=PAPER, differs=DIFFERS,
                    sala_stage2_fraction_of_records=stage2, lr=data["lr"],
                    lr_searches=data["searches"], seeds=len(passes),
                    headline={"lr": ", ".join(f"{n} {v:g}" for n, v in data["lr"].items()),
                              "passes/step SALA": f"{np.mean(passes):.3f}",
                              "stage-2 fraction": f"{np.mean(stage2):.2f}",
                              "test acc SALA / SAM / SGD": slashed(
                                  measured["final_test_acc"], ("SALA", "SAM", "SGD"), ".3f"),
                              "λ_max SALA / SAM / SGD": slashed(
                                  measured["lambda_max"], ("SALA", "SAM", "SGD"), ".2f")})
    return measured, checks


def figure(data, arrays, entry, out):
    """SALA's fast-slow distance and stage, passes per step, lambda_max and test accuracy.

    Args:
        data: The data ``experiment`` saved.
        arrays: The arrays ``experiment`` saved.
        entry: The summary entry (verdict and checks) written under the figure.
        out: The output folder.

    Returns:
        The PNG's file name.
    """
    runs = data["runs"]
    fig, axes = plotting.figure(2, 2, 11, 8)
    ax = axes[0, 0]
    sala = runs["SALA"]
    steps = sala[0]["history"]["distance"][0]
    plotting.band(ax, steps, [r["history"]["distance"][1] for r in sala], "fast–slow distance")
    ax.axhline(SALA["rho"], color="k", ls="--", lw=0.8, label="ρ = 0.2 (stage 2 below)")
    stage2 = np.mean([np.asarray(r["history"]["stage"][1]) == 2 for r in sala], axis=0)
    twin = ax.twinx()
    twin.step(steps[:len(stage2)], stage2, where="post", color="tab:red", lw=1,
              label="share of seeds in stage 2 (right axis)")
    twin.set(ylabel="share of seeds in stage 2", ylim=(-0.05, 1.05))
    twin.grid(False)
    ax.set(xlabel="step", ylabel="‖θ − φ‖", title="SALA: fast–slow distance and stage")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False,
              ncol=2)
    ax = axes[0, 1]
    names = list(runs)
    plotting.bars(ax, names, [per_seed(runs[n], "passes_per_step") for n in names],
                  color="tab:gray")
    ax.axhline(MAX_PASSES, color="k", ls="--", lw=0.8)
    ax.text(len(names) - 0.5, MAX_PASSES, f" claimed ≤ {MAX_PASSES:g}", va="bottom", ha="right",
            fontsize=8)
    ax.set(ylabel="forward-backward passes per step", title="counted passes per step")
    ax = axes[1, 0]
    values = []
    for n in names:
        steps, _ = runs[n][0]["history"]["lambda_max"]
        per = [r["history"]["lambda_max"][1] for r in runs[n]]
        values += per
        plotting.band(ax, steps, per, n)
    plotting.autoscale(ax, values)
    ax.set(xlabel="step", ylabel="λ_max (fast weights)", title="sharpness along training")
    plotting.outside_legend(ax)
    ax = axes[1, 1]
    for n in names:
        plotting.band(ax, runs[n][0]["curves"]["epoch"],
                      [r["curves"]["test_acc"] for r in runs[n]], n)
    ax.set(xlabel="epoch", ylabel="test accuracy (slow weights)", title="test accuracy")
    plotting.outside_legend(ax)
    return plotting.save(fig, out, NAME, entry)
