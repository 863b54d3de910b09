"""AdaSAM (Sun et al. 2023) against SAM and AMSGrad: training curves from one initialisation, and
the full-gradient norm for several batch sizes (the linear-speedup claim: the average over T
iterations of ||grad f(x_t)||^2 is O(1/sqrt(bT)), so at a fixed T it falls like 1/sqrt(b), and b
times larger batches need b times fewer iterations)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from analysis.diagnostics import full_grad_norm

from .common import (CROSS_ENTROPY, Missing, eval_batches, Size, dataset, entry, mlp, need, not_available, plot_histories,
                     pyplot, save_result, save_runs, savefig, train)

NAME = "adasam_convergence"
RHO = 0.05
ADAM_LR = 1e-3
SAM_SGD = {"lr": 0.05, "momentum": 0.9}
BATCHES = (32, 128, 512)
SLACK = 2.0           # allowed factor over the predicted 1/sqrt(b) fall
CLAIM = ("From one initialisation at constant learning rates, AdaSAM (lr 1e-3, rho 0.05) ends "
         "with a test accuracy at least that of SAM (SGD momentum 0.9 base) and of AMSGrad, and "
         "over T iterations the average squared full-gradient norm of AdaSAM falls with the batch "
         "size b at least like 1/sqrt(b) (the O(1/sqrt(bT)) linear-speedup rate) up to a factor "
         f"{SLACK:g}, for b in {list(BATCHES)} with lr scaled by sqrt(b / 32).")


def run(size: Size, out: Path) -> dict:
    try:
        AdaSAM, SAM = need("optim", "AdaSAM", "SAM")
    except Missing as err:
        return not_available(CLAIM, str(err))
    ds = dataset(size)
    makers = {"AdaSAM": lambda ps: AdaSAM(ps, lr=ADAM_LR, rho=RHO),
              "SAM": lambda ps: SAM(torch.optim.SGD(ps, **SAM_SGD), rho=RHO),
              "AMSGrad": lambda ps: torch.optim.Adam(ps, lr=ADAM_LR, amsgrad=True)}
    runs = []
    for name, make in makers.items():
        model = mlp(size)
        runs.append(train(name, model, make(model.parameters()), ds, size, layers=False))
    batches = BATCHES if size.name != "tiny" else (16, 32, 64)
    every = max(1, size.speedup_steps // 40)
    speed = []
    for b in batches:
        model = mlp(size)
        lr = ADAM_LR * math.sqrt(b / batches[0])
        opt = AdaSAM(model.parameters(), lr=lr, rho=RHO)
        speed.append(train(f"AdaSAM b={b}", model, opt, ds, size, batch_size=b,
                           steps=size.speedup_steps, every=every, grad_norm=True, layers=False,
                           eval_data=None, test_data=None))
    initial = initial_grad_norm(ds, size)
    avg_sq = {}
    for b, r in zip(batches, speed):
        norms = [initial] + r.tracker.history("grad_norm")[1]      # records are evenly spaced
        avg_sq[b] = float(np.mean(np.square(norms)))
    ratio = {b: avg_sq[b] / avg_sq[batches[0]] for b in batches[1:]}
    predicted = {b: math.sqrt(batches[0] / b) for b in batches[1:]}
    acc = {r.name: r.test_acc for r in runs}
    checks = {"adasam_acc_at_least_sam_and_amsgrad": acc["AdaSAM"] >= max(acc["SAM"], acc["AMSGrad"]),
              "avg_sq_grad_norm_falls_like_1/sqrt(b)": all(ratio[b] <= SLACK * predicted[b]
                                                             for b in batches[1:])}
    measured = {"test_acc": acc, "train_loss": {r.name: r.train_loss for r in runs},
                "initial_grad_norm": initial,
                "avg_sq_grad_norm": {str(b): v for b, v in avg_sq.items()},
                "avg_sq_grad_norm_ratio_to_smallest_batch": {str(b): v for b, v in ratio.items()},
                "predicted_ratio_1/sqrt(b)": {str(b): v for b, v in predicted.items()},
                "iterations": size.speedup_steps}
    config = {"rho": RHO, "adam_lr": ADAM_LR, "sam_sgd": SAM_SGD, "batches": batches,
              "slack": SLACK, "lr_scaling": "sqrt(b / b_min)", "schedule": "constant",
              "speedup_steps": size.speedup_steps, "grad_norm_every": every}
    save_runs(out, NAME, runs + speed, size, config)
    save_result(out, NAME, {f"grad_norm_b{b}": np.array(r.tracker.history("grad_norm"))
                            for b, r in zip(batches, speed)}, config)
    figure = plot(runs, speed, batches, initial, avg_sq, out)
    return entry(CLAIM, measured, checks, figure)


def initial_grad_norm(ds, size: Size) -> float:
    """||grad f(x_0)|| on the curvature subset at the shared initialisation."""
    return full_grad_norm(mlp(size), CROSS_ENTROPY, eval_batches(ds, size)["curvature_data"])


def plot(runs, speed, batches, initial, avg_sq, out: Path) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    plot_histories(axes[0], runs, "loss", "training loss (mean over the interval)", logy=True)
    axes[0].set_title("training loss")
    plot_histories(axes[1], runs, "test_acc", "test accuracy")
    axes[1].set_title("test accuracy")
    ax = axes[2]
    for i, (b, r) in enumerate(zip(batches, speed)):
        steps, norms = r.tracker.history("grad_norm")
        sq = np.square([initial] + norms)
        ax.plot([0] + steps, sq, color=f"C{i}", lw=0.7, alpha=0.5)
        ax.plot([0] + steps, np.cumsum(sq) / np.arange(1, len(sq) + 1), color=f"C{i}", lw=2,
                label=f"b={b}: running average (final {avg_sq[b]:.3g})")
    ax.set(xlabel="iteration", ylabel="squared full-gradient norm", yscale="log",
           title="AdaSAM: gradient norm per batch size (thin: raw)")
    ax.legend(fontsize=7)
    return savefig(fig, out, f"{NAME}.png")
