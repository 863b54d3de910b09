"""AdaSAM (Sun et al. 2023) against SAM and AMSGrad, and its linear speed-up in the batch size.

AdaSAM against SAM and AMSGrad at constant learning rates (each lr chosen on validation for that
method), and the linear speed-up of its convergence theorem tested where the theorem applies:
stochastic gradients of fresh samples (each run makes one pass over its own b T samples, none
seen twice), lr proportional to sqrt(b / T) and rho to 1 / sqrt(bT) as the theorem requires, and
the averaged squared full-gradient norm after a burn-in. The theorem bounds that average by
O(1/sqrt(bT)); an upper bound's exponent cannot be read off a measured slope, so the tested
statement is the one-sided "the average decreases as b grows at a fixed T".
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from . import plotting
from .harness import job
from .runner import ACCURACIES, means, per_seed, search, slashed, trials
from .verdict import TIE_RULE, mean_above, paired, settle

NAME = "adasam_convergence"
RHO = 0.05
LRS = {"AdaSAM": (3e-4, 1e-3, 3e-3), "AMSGrad": (3e-4, 1e-3, 3e-3), "SAM": (0.02, 0.05, 0.1)}
KINDS = {"AdaSAM": "AdaSAM", "AMSGrad": "AMSGrad", "SAM": "SAM"}
BATCHES = (32, 64, 128)
REFERENCE_BATCH = 128            # the batch size at which the lr was chosen
ONE_PASS = {"tiny": 12, "quick": 150, "full": 170}   # T: b_max T fresh samples fit the pool
BURN_IN = 0.25                   # the first quarter of the iterations is left out
MARGIN = 0.005
CONFIG = {"rho": RHO, "lr_grids": LRS, "sam_momentum": 0.9, "batches": BATCHES,
          "reference_batch": REFERENCE_BATCH, "iterations": ONE_PASS, "burn_in": BURN_IN,
          "margin": MARGIN, "schedule": "constant", "tie_rule": TIE_RULE,
          "data": "one pass over b T fresh samples (training, then validation-free pool)",
          "scaling": "lr(b) = lr * sqrt(b / 128), rho(b) = rho * sqrt(128 / b), T fixed"}
CLAIM = (f"At constant learning rates (each chosen on validation for that method; rho {RHO:g}), "
         f"AdaSAM's final test accuracy is at least SAM's (SGD-momentum base) and AMSGrad's "
         f"minus {100 * MARGIN:g} points (paired over seeds); and in the regime of its "
         f"convergence theorem (one pass over fresh samples, lr proportional to sqrt(b/T), rho "
         f"to 1/sqrt(bT), T fixed) the average squared full-gradient norm after a burn-in of "
         f"{BURN_IN:.0%} of the iterations decreases as the batch size b grows over "
         f"{list(BATCHES)} (the slope of its log on log b is below 0; the theorem's "
         f"O(1/sqrt(bT)) is an upper bound, so its -1/2 is reported, not tested).")
PROTOCOL = ("MNIST-1D, MLP 40-100-100-10, constant lrs; accuracy: 3,200 training samples, "
            "batch 128, 25 epochs, each method's lr on validation (2 seeds; ties within one "
            "pooled standard error go to the smallest lr), 8 paired seeds; speed-up: AdaSAM at "
            "b in {32, 64, 128} for T = 150 iterations, each run one pass over its own first "
            "b T of 23,200 pooled samples (no sample seen twice), lr = lr_128 sqrt(b/128), "
            "rho = 0.05 sqrt(128/b), squared gradient norm on 1,000 training samples every T/40 "
            "iterations, averaged after the first 25%; 8 seeds.")
PAPER = ("Sun et al. 2023: RoBERTa-large fine-tuned on GLUE, AdaSAM against SGD, AMSGrad and "
         "SAM; Theorem: with lr ~ sqrt(b/T) and rho ~ 1/sqrt(bT), the average expected squared "
         "gradient norm over T iterations of stochastic (fresh-sample) gradients is "
         "O(1/sqrt(bT)), a linear speed-up in b.")
DIFFERS = ("data set and model (an MLP on MNIST-1D, not RoBERTa on GLUE), accuracy at constant "
           "lr over 25 epochs; the speed-up is measured on one pass of finite data, on the "
           "gradient of 1,000 training samples as the full gradient, and tested one-sided "
           "(decreasing in b), since an upper bound's rate cannot be confirmed by a slope.")


def cost(size) -> float:
    """Plain training runs this costs (an AdaSAM or SAM run counts 2)."""
    steps = ONE_PASS[size.name]
    speed = sum(steps * b / 128 for b in BATCHES) / (size.epochs * 25)
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
    found = {}
    for n in KINDS:
        def make(p, s, n=n):
            return job(NAME, f"{n} lr={p['lr']:g}", KINDS[n], s, hyper(n, p["lr"]),
                       schedule="constant")
        found[n] = search(runner, {"lr": LRS[n]}, make)
        settle(runner, found[n], make)
    runs = trials(runner, NAME, {n: (KINDS[n], hyper(n, f.best["lr"])) for n, f in found.items()},
                  schedule="constant")
    lr = found["AdaSAM"].best["lr"]
    batches = BATCHES if size.name != "tiny" else (16, 32, 64)
    steps = ONE_PASS[size.name]
    speed = trials(runner, NAME, {
        f"b={b}": ("AdaSAM", {"lr": lr * math.sqrt(b / REFERENCE_BATCH),
                              "rho": RHO * math.sqrt(REFERENCE_BATCH / b)},
                   {"batch_size": b, "subset": b * steps})
        for b in batches}, steps=steps, schedule="constant", track=("grad_norm",),
        history=("grad_norm",))
    data = {"searches": {n: {**f.summary(), "selection": f.selection} for n, f in found.items()},
            "lr": {n: f.best["lr"] for n, f in found.items()}, "batches": list(batches),
            "iterations": steps, "runs": runs, "speed": speed}
    return data, {}


def mean_squared_norms(data) -> np.ndarray:
    """Batch x seed: the mean of ||grad f(x_t)||^2 over the records after the burn-in.

    Args:
        data: The data ``experiment`` saved.

    Returns:
        The averages, one row per batch size and one column per seed.
    """
    def after(run):
        steps, norms = map(np.asarray, run["history"]["grad_norm"])
        return np.square(norms[steps > BURN_IN * data["iterations"]])
    return np.array([[np.mean(after(r)) for r in rs] for rs in data["speed"].values()])


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
    checks["decreasing in b"] = mean_above(
        "the slope of log(mean ||grad||^2 after the burn-in) on log b < 0", per, 0.0,
        below=True)
    m = means(runs, ACCURACIES)
    measured = {"protocol": PROTOCOL, "paper_protocol": PAPER, "differs": DIFFERS,
                **m, "lr": data["lr"], "searches": data["searches"], "seeds": len(per),
                "slope_per_seed": per, "pooled_slope": float(pooled.slope),
                "pooled_slope_stderr": float(pooled.stderr),
                "mean_sq_grad_norm": {b: float(v) for b, v in zip(data["speed"], sq.mean(1))},
                "iterations": data["iterations"],
                "headline": {"test acc " + " / ".join(KINDS):
                             slashed(m["final_test_acc"], KINDS, ".3f"),
                    "lr " + " / ".join(KINDS): " / ".join(f"{data['lr'][n]:g}" for n in KINDS),
                    "slope (mean over seeds)": f"{np.mean(per):.2f} (tested < 0; the bound's "
                                               f"rate −0.5 reported)"}}
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
    ax.axvspan(0, BURN_IN * data["iterations"], color="0.85", lw=0, label="burn-in (left out)")
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
    ax.set(xlabel="batch size b",
           ylabel=f"mean ‖∇f‖², iterations {BURN_IN * data['iterations']:.0f}–"
                  f"{data['iterations']}",
           title="one pass of fresh data: lr ∝ √b, ρ ∝ 1/√b")
    if sq.max() / sq.min() > 10:
        ax.set_yscale("log")
    plotting.outside_legend(ax)
    return plotting.save(fig, out, NAME, entry)
