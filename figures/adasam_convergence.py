"""AdaSAM (Sun et al. 2023) against SAM and AMSGrad: training curves from shared initialisations, and
the full-gradient norm for several batch sizes (the linear-speedup claim: the average over T
iterations of ||grad f(x_t)||^2 is O(1/sqrt(bT)), so at a fixed T it falls like 1/sqrt(b), and b
times larger batches need b times fewer iterations)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from analysis import full_grad_norm

from .common import (CROSS_ENTROPY, SEED, Missing, Size, dataset, entry, eval_batches, mlp, need,
                     not_available, plot_histories, pyplot, save_result, save_runs, savefig,
                     trials)

NAME = "adasam_convergence"
RHO = 0.05
ADAM_LR = 1e-3
SAM_SGD = {"lr": 0.05, "momentum": 0.9}
BATCHES = (32, 128, 512)
SLACK = 2.0           # allowed factor over the predicted 1/sqrt(b) fall
CLAIM = ("From the same initialisations at constant learning rates, AdaSAM (lr 1e-3, rho 0.05) "
         "ends with a mean test accuracy over seeds at least that of SAM (SGD momentum 0.9 base)"
         " and of AMSGrad, and over T iterations the average squared full-gradient norm of "
         "AdaSAM falls with the batch size b at least like 1/sqrt(b) (the O(1/sqrt(bT)) linear-"
         f"speedup rate) up to a factor {SLACK:g}, for b in {list(BATCHES)} with lr scaled by "
         "sqrt(b / 32).")


def run(size: Size, out: Path) -> dict:
    try:
        AdaSAM, SAM = need("optim", "AdaSAM", "SAM")
    except Missing as err:
        return not_available(CLAIM, str(err))
    ds = dataset(size)
    makers = {"AdaSAM": lambda ps: AdaSAM(ps, lr=ADAM_LR, rho=RHO),
              "SAM": lambda ps: SAM(torch.optim.SGD(ps, **SAM_SGD), rho=RHO),
              "AMSGrad": lambda ps: torch.optim.Adam(ps, lr=ADAM_LR, amsgrad=True)}
    init = lambda seed: mlp(size, seed=seed)  # noqa: E731
    runs = [trials(name, init, lambda model, make=make: make(model.parameters()), ds, size,
                   layers=False) for name, make in makers.items()]
    batches = BATCHES if size.name != "tiny" else (16, 32, 64)
    every = max(1, size.speedup_steps // 40)
    speed = [trials(f"AdaSAM b={b}", init,
                    lambda model, b=b: AdaSAM(model.parameters(), rho=RHO,
                                              lr=ADAM_LR * math.sqrt(b / batches[0])),
                    ds, size, batch_size=b, steps=size.speedup_steps, every=every, grad_norm=True,
                    layers=False, eval_data=None, test_data=None) for b in batches]
    initial = {seed: initial_grad_norm(ds, size, seed) for seed in range(SEED, SEED + size.seeds)}

    def avg_sq_norm(run_):                   # records are evenly spaced; add the start point
        return float(np.mean(np.square([initial[run_.seed]] + run_.tracker.history("grad_norm")[1])))

    avg_sq = {b: float(np.mean([avg_sq_norm(r) for r in t.runs])) for b, t in zip(batches, speed)}
    ratio = {b: avg_sq[b] / avg_sq[batches[0]] for b in batches[1:]}
    predicted = {b: math.sqrt(batches[0] / b) for b in batches[1:]}
    acc = {t.name: t.test_acc for t in runs}
    checks = {"adasam_acc_at_least_sam_and_amsgrad": acc["AdaSAM"] >= max(acc["SAM"], acc["AMSGrad"]),
              "avg_sq_grad_norm_falls_like_1/sqrt(b)": all(ratio[b] <= SLACK * predicted[b]
                                                             for b in batches[1:])}
    measured = {"test_acc": acc, "seeds": size.seeds,
                "test_acc_per_seed": {t.name: t.values("test_acc") for t in runs},
                "train_loss": {t.name: t.mean("train_loss") for t in runs},
                "initial_grad_norm": {str(k): v for k, v in initial.items()},
                "avg_sq_grad_norm": {str(b): v for b, v in avg_sq.items()},
                "avg_sq_grad_norm_ratio_to_smallest_batch": {str(b): v for b, v in ratio.items()},
                "predicted_ratio_1/sqrt(b)": {str(b): v for b, v in predicted.items()},
                "iterations": size.speedup_steps}
    config = {"rho": RHO, "adam_lr": ADAM_LR, "sam_sgd": SAM_SGD, "batches": batches,
              "slack": SLACK, "lr_scaling": "sqrt(b / b_min)", "schedule": "constant",
              "speedup_steps": size.speedup_steps, "grad_norm_every": every}
    save_runs(out, NAME, runs + speed, size, config)
    save_result(out, NAME, {f"grad_norm_b{b}": np.array(t.first.tracker.history("grad_norm"))
                            for b, t in zip(batches, speed)}, config)
    figure = plot(runs, [t.first for t in speed], batches, initial[SEED], avg_sq, out)
    return entry(CLAIM, measured, checks, figure)


def initial_grad_norm(ds, size: Size, seed: int) -> float:
    """||grad f(x_0)|| on the curvature subset at the initialisation of ``seed``."""
    return full_grad_norm(mlp(size, seed=seed), CROSS_ENTROPY,
                          eval_batches(ds, size)["curvature_data"], progress=False)


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
                label=f"b={b}: running average (seed-mean final {avg_sq[b]:.3g})")
    ax.set(xlabel="iteration", ylabel="squared full-gradient norm (thin: raw)", yscale="log",
           title="AdaSAM per batch size (seed 0)")
    ax.legend(fontsize=7)
    return savefig(fig, out, f"{NAME}.png")
