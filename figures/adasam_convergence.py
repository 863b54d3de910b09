"""AdaSAM (Sun et al. 2023) against SAM and AMSGrad, and its linear-speedup rate.

AdaSAM against SAM and AMSGrad at constant learning rates (each lr chosen on validation), and its
linear-speedup rate: over T iterations the average squared full-gradient norm is O(1/sqrt(bT))
when lr and rho scale with the batch size b as the convergence theorem requires (lr proportional
to sqrt(b / T), rho to 1 / sqrt(bT)), so at a fixed T the slope of log(mean ||grad f||^2)
against log b is at most -1/2.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from . import plotting
from .harness import job
from .runner import ACCURACIES, means, per_seed, search, slashed, trials
from .verdict import mean_above, paired

NAME = "adasam_convergence"
RHO = 0.05
LRS = {"AdaSAM": (3e-4, 1e-3, 3e-3), "AMSGrad": (3e-4, 1e-3, 3e-3), "SAM": (0.02, 0.05, 0.1)}
KINDS = {"AdaSAM": "AdaSAM", "AMSGrad": "AMSGrad", "SAM": "SAM"}
BATCHES = (32, 128, 512)
REFERENCE_BATCH = 128            # the batch size at which the lr was chosen
RATE = -0.5
SLOPE_MARGIN = 0.1
MARGIN = 0.005
CONFIG = {"rho": RHO, "lr_grids": LRS, "sam_momentum": 0.9, "batches": BATCHES,
          "reference_batch": REFERENCE_BATCH, "rate": RATE, "slope_margin": SLOPE_MARGIN,
          "margin": MARGIN, "schedule": "constant",
          "scaling": "lr(b) = lr * sqrt(b / 128), rho(b) = rho * sqrt(128 / b), T fixed"}
CLAIM = (f"At constant learning rates (each chosen on validation; rho {RHO:g}), AdaSAM's final "
         f"test accuracy is at least SAM's (SGD-momentum base) and AMSGrad's minus "
         f"{100 * MARGIN:g} points (paired over seeds); and with lr proportional to sqrt(b) and "
         f"rho to 1/sqrt(b) at a fixed number of iterations T, the slope of log(mean squared "
         f"full-gradient norm over the T iterations) against log b, for b in {list(BATCHES)}, is "
         f"below {RATE + SLOPE_MARGIN:g} (the O(1/sqrt(bT)) rate's -1/2 with a margin of "
         f"{SLOPE_MARGIN:g}).")


def cost(size) -> float:
    """Plain training runs this costs (an AdaSAM or SAM run counts 2)."""
    speed = sum(size.speedup_steps * b / 128 for b in BATCHES) / (size.epochs * 25)
    return 4 * 3 * size.select_seeds + 4 * size.seeds + 2 * speed * size.seeds


def hyper(name: str, lr: float) -> dict:
    """The hyperparameters of one method at one learning rate.

    Args:
        name: "AdaSAM", "AMSGrad" or "SAM".
        lr: The learning rate.

    Returns:
        The optimizer's keyword arguments (rho RHO for the SAM family, momentum 0.9 for SAM).
    """
    return {"AdaSAM": {"lr": lr, "rho": RHO}, "AMSGrad": {"lr": lr},
            "SAM": {"lr": lr, "momentum": 0.9, "rho": RHO}}[name]


def experiment(size, runner):
    """Run the training runs (searches and trials) that CLAIM is checked on.

    Args:
        size: The ``Size`` (seeds, epochs, grid extensions).
        runner: The ``Runner`` of the training runs.

    Returns:
        The JSON-able data that ``rule`` and ``figure`` read, and the named arrays saved with it.
    """
    found = {n: search(runner, {"lr": LRS[n]},
                       lambda p, s, n=n: job(NAME, f"{n} lr={p['lr']:g}", KINDS[n], s,
                                             hyper(n, p["lr"]), schedule="constant"))
             for n in KINDS}
    runs = trials(runner, NAME, {n: (KINDS[n], hyper(n, f.best["lr"])) for n, f in found.items()},
                  schedule="constant")
    lr = found["AdaSAM"].best["lr"]
    batches = BATCHES if size.name != "tiny" else (16, 32, 64)
    speed = trials(runner, NAME, {
        f"b={b}": ("AdaSAM", {"lr": lr * math.sqrt(b / REFERENCE_BATCH),
                              "rho": RHO * math.sqrt(REFERENCE_BATCH / b)}, {"batch_size": b})
        for b in batches}, steps=size.speedup_steps, schedule="constant", track=("grad_norm",),
        history=("grad_norm",))
    data = {"searches": {n: f.summary() for n, f in found.items()},
            "lr": {n: f.best["lr"] for n, f in found.items()}, "batches": list(batches),
            "iterations": size.speedup_steps, "runs": runs, "speed": speed}
    return data, {}


def mean_squared_norms(data) -> np.ndarray:
    """Batch x seed: the mean over the recorded iterations of ||grad f(x_t)||^2."""
    return np.array([[np.mean(np.square(r["history"]["grad_norm"][1])) for r in rs]
                     for rs in data["speed"].values()])


def slopes(data) -> list[float]:
    """Per seed, the least-squares slope of log(mean squared gradient norm) on log b."""
    logb = np.log(data["batches"])
    return [float(np.polyfit(logb, np.log(col), 1)[0]) for col in mean_squared_norms(data).T]


def rule(data):
    """The checks of CLAIM on the saved data, and what was measured.

    Args:
        data: The data ``experiment`` saved.

    Returns:
        The measured values (with a ``headline``), and the checks by name.
    """
    runs = data["runs"]
    acc = {n: per_seed(rs, "final_test_acc") for n, rs in runs.items()}
    per = slopes(data)
    sq = mean_squared_norms(data)
    pooled = stats.linregress(np.repeat(np.log(data["batches"]), sq.shape[1]),
                              np.log(sq).ravel())
    checks = {f"AdaSAM acc >= {n} - 0.5pt": paired(
        f"AdaSAM's final test accuracy - {n}'s > -margin", acc["AdaSAM"], acc[n], MARGIN)
        for n in ("SAM", "AMSGrad")}
    checks["slope < -1/2 + 0.1"] = mean_above(
        f"the slope of log(mean ||grad||^2) on log b < {RATE + SLOPE_MARGIN:g}", per,
        RATE + SLOPE_MARGIN, margin=SLOPE_MARGIN, below=True)
    m = means(runs, ACCURACIES)
    measured = {**m, "lr": data["lr"], "searches": data["searches"], "seeds": len(per),
                "slope_per_seed": per, "pooled_slope": float(pooled.slope),
                "pooled_slope_stderr": float(pooled.stderr),
                "mean_sq_grad_norm": {b: float(v) for b, v in zip(data["speed"], sq.mean(1))},
                "iterations": data["iterations"],
                "headline": {"test acc " + " / ".join(KINDS):
                             slashed(m["final_test_acc"], KINDS, ".3f"),
                    "slope (mean over seeds)": f"{np.mean(per):.2f} (rate −0.5)"}}
    return measured, checks


def figure(data, arrays, entry, out):
    """Test accuracy at constant lr, the squared gradient norms, and the linear speed-up.

    Args:
        data: The data ``experiment`` saved.
        arrays: The arrays ``experiment`` saved.
        entry: The summary entry (verdict and checks) written under the figure.
        out: The output folder.

    Returns:
        The PNG's file name.
    """
    runs, speed = data["runs"], data["speed"]
    fig, axes = plotting.figure(1, 3, 16, 4.8)
    ax = axes[0, 0]
    for n, rs in runs.items():
        plotting.band(ax, rs[0]["curves"]["epoch"], [r["curves"]["test_acc"] for r in rs],
                      f"{n} (lr {data['lr'][n]:g})")
    ax.set(xlabel="epoch", ylabel="test accuracy", title="constant lr: test accuracy")
    plotting.outside_legend(ax)
    ax = axes[0, 1]
    values = []
    for label, rs in speed.items():
        steps = rs[0]["history"]["grad_norm"][0]
        per = np.square([r["history"]["grad_norm"][1] for r in rs])
        values += list(per.ravel())
        plotting.band(ax, steps, per, label)
    plotting.autoscale(ax, values)
    ax.set(xlabel="iteration", ylabel="‖∇f(x_t)‖²",
           title="AdaSAM: squared full-gradient norm")
    plotting.outside_legend(ax)
    ax = axes[0, 2]
    b = np.asarray(data["batches"], dtype=float)
    sq = mean_squared_norms(data)
    for col in sq.T:
        ax.plot(b, col, "o", color="tab:blue", alpha=0.3, ms=4)
    ax.plot(b, sq.mean(1), "o-", color="tab:blue", label="mean over seeds (dots: seeds)")
    ref = sq.mean(1)[0] * np.sqrt(b[0] / b)
    ax.plot(b, ref, "k--", lw=1, label="1/√b reference (rate −1/2)")
    ax.set_xscale("log")
    ax.set_xticks(b, [f"{v:g}" for v in b])
    ax.minorticks_off()
    ax.set(xlabel="batch size b", ylabel=f"mean ‖∇f‖² over T={data['iterations']}",
           title="linear speed-up: lr ∝ √b, ρ ∝ 1/√b")
    if sq.max() / sq.min() > 10:
        ax.set_yscale("log")
    plotting.outside_legend(ax)
    return plotting.save(fig, out, NAME, entry)
