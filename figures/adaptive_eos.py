"""The edge of stability at full batch on Cohen et al.'s protocol.

Cohen et al. (2021), "Gradient descent on neural networks typically occurs at the edge of
stability": full-batch gradient descent with the square loss, on a 5,000-sample subset, at a
learning rate whose 2/lr lies above the initial sharpness, run until 99% training accuracy: the
sharpness lambda_max(H) rises to 2/lr and hovers there. Cohen et al. (2022), "Adaptive gradient
methods at the edge of stability": Adam's preconditioned sharpness lambda_max(P^-1 H) rises to
(2 + 2 beta1) / ((1 - beta1) lr) (38/lr at beta1 0.9) and hovers there, while the raw sharpness
lambda_max(H) keeps rising. With cross-entropy the sharpness rises to, and hovers "at or just
above", 2/lr (Cohen et al. 2021, Sec. 3.2), a weaker statement reported with its own band.

GD is plain gradient descent (momentum 0), so its threshold is exactly 2/lr. The Hessian is
that of the whole training subset (the full-batch loss), measured by ``analysis.Tracker``
(warm-started Lanczos). The statistic of each run is taken from the first record at which its
ratio (sharpness over threshold) reaches 0.9 to the stop.
"""
from __future__ import annotations

import math

import numpy as np

from analysis import top_eigenvalues

from . import plotting
from .harness import LOSSES, job, mlp, subset_split
from .runner import compact
from .verdict import every_seed

NAME = "adaptive_eos"
# label -> optimizer, fixed hyperparameters, loss, learning rates per size and the record
# interval (steps) at the quick and full sizes. The lrs are fixed a priori, each with 2/lr (GD)
# above the initial sharpness (checked per seed): at the quick size one lr per method, the first
# one tried (picked for run time, none replaced after seeing a result); --full adds a second.
RUNS = {"GD, square loss": {"opt": "SGD", "hp": {"momentum": 0.0}, "loss": "square",
                            "lrs": {"tiny": (0.3,), "quick": (0.3,), "full": (0.2, 0.3)},
                            "every": 100},
        "Adam, square loss": {"opt": "Adam", "hp": {}, "loss": "square",
                              "lrs": {"tiny": (1e-3,), "quick": (1e-3,), "full": (1e-3, 2e-3)},
                              "every": 25},
        "GD, cross-entropy": {"opt": "SGD", "hp": {"momentum": 0.0}, "loss": "cross_entropy",
                              "lrs": {"tiny": (1.0,), "quick": (1.0,), "full": (0.5, 1.0)},
                              "every": 25}}
PRECONDITIONED = {"GD, square loss": False, "Adam, square loss": True,
                  "GD, cross-entropy": False}
BETA1 = 0.9                                          # torch Adam's default
REACH = 0.9                                          # the statistic starts where ratio >= 0.9
STOP_ACC = 0.99                                      # training stops at 99% train accuracy
BAND = (0.8, 1.2)                                    # "hovers at the threshold"
CE_BAND = (0.8, 1.5)                                 # "at or just above" (cross-entropy)
SIZE = {"tiny": {"samples": 256, "cap": 40, "every": 5, "seeds": 2},
        "quick": {"samples": 5000, "cap": 20000, "every": None, "seeds": 2},
        "full": {"samples": 5000, "cap": 40000, "every": None, "seeds": 5}}
PROTOCOL = ("MNIST-1D (analysis.mnist1d, seed 42): the first 5,000 of the generated samples "
            "(the 3,200 training, 800 validation and the first 1,000 test samples of the other "
            "reproductions' split), MLP 40-100-100-10 ReLU, full-batch GD (momentum 0) and Adam "
            "(beta1 0.9, beta2 0.999), constant lr, square loss 0.5||f(x) - onehot(y)||^2 "
            "(mean over samples) and, separately, cross-entropy; stop after the first step whose "
            "starting weights reach 99% training accuracy (cap 20,000 steps); lambda_max of "
            "the full-batch Hessian every 100 (GD, square loss) or 25 steps (Lanczos, "
            "warm-started, at most 20 products); statistic from the first record with ratio "
            ">= 0.9 to the stop; quick: 2 seeds, one lr per method (GD 0.3, Adam 1e-3, GD on "
            "cross-entropy 1.0).")
PAPER = ("Cohen et al. 2021: 5,000-sample subsets of CIFAR-10 (also MNIST, SST-2, ...), "
         "fully-connected, VGG, ResNet and transformer networks, full-batch GD, square and "
         "cross-entropy losses, run to 99% training accuracy, several lrs with 2/lr above the "
         "initial sharpness. Cohen et al. 2022: the same data, full-batch Adam/RMSProp with "
         "beta1 0.9 and threshold 38/lr, square loss.")
DIFFERS = ("data set (MNIST-1D, not CIFAR-10), model (a small MLP), one lr per method and 2 "
           "seeds at the quick size, sharpness measured every 25-100 steps with at most 20 "
           "Lanczos products; "
           "the cross-entropy band [0.8, 1.5] is our reading of 'at or just above', stated "
           "before this protocol's runs but after an earlier measurement (1.24-1.35) was known.")
CONFIG = {"runs": RUNS, "beta1": BETA1, "reach": REACH, "stop_acc": STOP_ACC, "band": BAND,
          "ce_band": CE_BAND, "sizes": SIZE, "schedule": "constant", "gd_momentum": 0.0,
          "batch": "full (the whole subset)", "curvature": "the whole subset",
          "protocol": PROTOCOL, "paper": PAPER, "differs": DIFFERS}
CLAIM = ("On Cohen et al.'s protocol (full batch, constant lr with 2/lr above the initial "
         "sharpness, stop at 99% training accuracy; statistic from the first record at which "
         f"sharpness / threshold reaches {REACH:g} to the stop): with the square loss, GD's "
         f"lambda_max * lr / 2 reaches {REACH:g} and its median lies in [{BAND[0]:g}, "
         f"{BAND[1]:g}], Adam's preconditioned sharpness lambda_max(P^-1 H) over 38/lr "
         f"(beta1 0.9) does the same while its raw lambda_max(H) rises from reaching to the "
         f"stop; with cross-entropy GD's ratio reaches {REACH:g} and its median lies at or "
         f"just above 1, in [{CE_BAND[0]:g}, {CE_BAND[1]:g}]; for every seed at every lr.")


def cost(size) -> float:
    """Plain training runs this costs (a full-batch run to 99% counts 6 at the quick size)."""
    return (6 if size.name != "tiny" else 2) * SIZE[size.name]["seeds"] * sum(
        len(r["lrs"][size.name]) for r in RUNS.values())


def _job(label: str, lr: float, seed: int, sz: dict):
    r = RUNS[label]
    return job(NAME, f"{label} lr={lr:g}", r["opt"], seed, {**r["hp"], "lr": lr},
               batch_size=sz["samples"], subset=sz["samples"], steps=sz["cap"],
               schedule="constant", loss=r["loss"], stop_acc=STOP_ACC,
               every=sz["every"] or r["every"], curvature=sz["samples"], track=("lambda_max",))


def initial_sharpness(size, sz: dict, loss: str, seed: int) -> float:
    """lambda_max of the full-batch Hessian at the initialisation of ``seed``."""
    data = subset_split(size, sz["samples"])
    batch = [(data.x, data.y)]
    eig = top_eigenvalues(mlp(size, seed), LOSSES[loss], batch, k=1, tol=1e-4,
                          max_hvp=size.final_max_hvp, seed=0, progress=False)
    return float(eig.eigenvalues[0])


def experiment(size, runner):
    """Every run of RUNS on every seed, and the initial lambda_max of each loss and seed."""
    sz = SIZE[size.name]
    jobs = {(label, lr): [_job(label, lr, s, sz) for s in range(sz["seeds"])]
            for label, r in RUNS.items() for lr in r["lrs"][size.name]}
    results = runner.run([j for js in jobs.values() for j in js])
    n = sz["seeds"]
    runs: dict[str, dict[str, list]] = {label: {} for label in RUNS}
    keep = ("lr", "lambda_max", "eos_ratio", "preconditioned_lambda_max",
            "preconditioned_eos_ratio")
    for i, (label, lr) in enumerate(jobs):
        runs[label][f"{lr:g}"] = [{**compact(r, keep), "steps": r["steps"],
                                   "stop_train_acc": r["stop_train_acc"]}
                                  for r in results[i * n:(i + 1) * n]]
    losses = sorted({r["loss"] for r in RUNS.values()})
    lam0 = {loss: [initial_sharpness(size, sz, loss, s) for s in range(n)] for loss in losses}
    return {"runs": runs, "samples": sz["samples"], "cap": sz["cap"], "every": sz["every"],
            "initial_lambda_max": lam0}, {}


def ratio_key(label: str) -> str:
    """The Tracker curve of sharpness over threshold for the runs of ``label``."""
    return "preconditioned_eos_ratio" if PRECONDITIONED[label] else "eos_ratio"


def sharpness_key(label: str) -> str:
    """The Tracker curve of the sharpness compared with the threshold for ``label``."""
    return "preconditioned_lambda_max" if PRECONDITIONED[label] else "lambda_max"


def hover(run: dict, key: str, reach: float = REACH) -> dict:
    """The statistic of one run.

    The step of the first record with ratio ``key`` >= ``reach`` (None if never), the median
    of the ratio from there to the stop, the fraction of those records in BAND, and the growth
    of the raw lambda_max from that record to the last one.
    """
    steps, values = (np.asarray(v, dtype=float) for v in run["history"][key])
    raw = np.asarray(run["history"]["lambda_max"][1], dtype=float)
    hit = np.flatnonzero(values >= reach)
    if len(hit) == 0:
        return {"reached_at": None, "median": math.nan, "in_band": math.nan,
                "raw_growth": math.nan, "records": 0}
    after = values[hit[0]:]
    return {"reached_at": float(steps[hit[0]]), "median": float(np.median(after)),
            "in_band": float(np.mean((after >= BAND[0]) & (after <= BAND[1]))),
            "raw_growth": float(raw[-1] / raw[hit[0]]), "records": int(len(after))}


def rule(data):
    """The checks of CLAIM on the saved data, and what was measured."""
    checks, stats = {}, {}
    for label, by_lr in data["runs"].items():
        stats[label] = {lr: [hover(r, ratio_key(label)) for r in rs] for lr, rs in by_lr.items()}
        flat = [s for ss in stats[label].values() for s in ss]
        reached = [s["reached_at"] is not None for s in flat]
        med = [s["median"] for s in flat]
        band = CE_BAND if "cross-entropy" in label else BAND
        what = "λ_max(P⁻¹H) / (38/lr)" if PRECONDITIONED[label] else "λ_max · lr / 2"
        checks[f"{label}: reaches {REACH:g}"] = every_seed(
            f"{label}: {what} reaches {REACH:g} before 99% train accuracy (values: the step "
            "it does, per lr and seed; a run that stops first leaves the claim undecided, "
            "never refuted)", [s["reached_at"] or math.nan for s in flat], reached,
            refutable=False)
        checks[f"{label}: median in [{band[0]:g}, {band[1]:g}]"] = every_seed(
            f"{label}: median of {what} from reaching {REACH:g} to the stop in "
            f"[{band[0]:g}, {band[1]:g}] (values: per lr and seed; a run that never reaches "
            "does not pass, and refutes nothing)", med, [band[0] <= m <= band[1] for m in med],
            refutable=any(reached))
        if PRECONDITIONED[label]:
            growth = [s["raw_growth"] for s in flat]
            checks[f"{label}: raw λ_max rises"] = every_seed(
                f"{label}: raw λ_max(H) at the stop / at reaching {REACH:g} > 1 (values: the "
                "ratio, per lr and seed)", growth, [g > 1.0 for g in growth],
                refutable=any(reached))
        else:
            lam0 = data["initial_lambda_max"][RUNS[label]["loss"]]
            margin = [2.0 / float(lr) / lam for lr in by_lr for lam in lam0]
            checks[f"{label}: 2/lr > initial λ_max"] = every_seed(
                f"{label}: 2/lr over the initial lambda_max > 1 (the protocol's precondition, "
                "values: per lr and seed)", margin, [m > 1.0 for m in margin], sanity=True)
    measured = {
        "protocol": PROTOCOL, "paper_protocol": PAPER, "differs": DIFFERS,
        "statistics": stats, "initial_lambda_max": data["initial_lambda_max"],
        "samples": data["samples"],
        "seeds": len(next(iter(data["runs"]["GD, square loss"].values()))),
        "headline": {f"{label}: median ratio after reaching (steps to 99%)": ", ".join(
            f"lr {lr}: " + " / ".join(
                f"{s['median']:.3g}" for s in ss) + " (" + " / ".join(
                str(r["steps"]) for r in data["runs"][label][lr]) + ")"
            for lr, ss in by_lr.items()) for label, by_lr in stats.items()}}
    measured["headline"]["Adam raw λ_max growth after reaching"] = ", ".join(
        f"lr {lr}: " + " / ".join(f"{s['raw_growth']:.3g}" for s in ss)
        for lr, ss in stats["Adam, square loss"].items())
    return measured, checks


def figure(data, arrays, entry, out):
    """Sharpness and its ratio to the threshold over training, one column per run kind."""
    fig, axes = plotting.figure(2, 3, 17, 11)
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for col, (label, by_lr) in enumerate(data["runs"].items()):
        top, bottom = axes[0, col], axes[1, col]
        values = []
        for (lr, rs), color in zip(by_lr.items(), colors):
            threshold = (2 + 2 * BETA1) / ((1 - BETA1) * float(lr)) if PRECONDITIONED[label] \
                else 2.0 / float(lr)
            for i, r in enumerate(rs):
                steps, sharp = r["history"][sharpness_key(label)]
                top.plot(steps, sharp, color=color, lw=1, alpha=0.8,
                         label=f"lr {lr} (one line per seed, n={len(rs)})" if i == 0 else None)
                values += sharp
                if PRECONDITIONED[label]:
                    raw_steps, raw = r["history"]["lambda_max"]
                    top.plot(raw_steps, raw, color=color, lw=1, ls=":",
                             label=f"raw λ_max(H), lr {lr}" if i == 0 else None)
                    values += raw
                rsteps, ratio = r["history"][ratio_key(label)]
                bottom.plot(rsteps, ratio, color=color, lw=1, alpha=0.8,
                            label=f"lr {lr}" if i == 0 else None)
                s = hover(r, ratio_key(label))
                if s["reached_at"] is not None:
                    bottom.plot([s["reached_at"]], [REACH], "v", color=color, ms=6,
                                label=f"reaches {REACH:g}, lr {lr}" if i == 0 else None)
                bottom.axvline(r["steps"], color=color, ls=":", lw=0.8,
                               label="stop at 99% train acc." if i == 0 and lr ==
                               next(iter(by_lr)) else None)
            top.axhline(threshold, color=color, ls="--", lw=1,
                        label=("38/lr" if PRECONDITIONED[label] else "2/lr") + f", lr {lr}")
        sharp_name = "λ_max(P⁻¹H)" if PRECONDITIONED[label] else "λ_max(H)"
        plotting.autoscale(top, values)
        top.set(xlabel="step", ylabel=f"{sharp_name}, full-batch loss",
                title=f"{label}: {sharp_name} (dashed: threshold)")
        plotting.outside_legend(top)
        band = CE_BAND if "cross-entropy" in label else BAND
        bottom.axhspan(*band, color="0.85", zorder=0, label=f"rule band {list(band)}")
        bottom.axhline(1.0, color="k", ls="--", lw=0.8, label="threshold")
        bottom.set(xlabel="step", ylabel=f"{sharp_name} / "
                   + ("(38/lr)" if PRECONDITIONED[label] else "(2/lr)"),
                   title=f"{label}: sharpness over its threshold")
        plotting.outside_legend(bottom)
    return plotting.save(fig, out, NAME, entry)
