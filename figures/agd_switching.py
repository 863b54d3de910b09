"""AGD (Yue et al. 2023): its SGD-branch fraction over delta, and its accuracy against baselines.

How often AGD takes its SGD branch as a function of delta (sanity checks: they follow from the
update's definition), and its test accuracy branch by branch: AGD with delta on its SGD branch
against SGD-momentum, AGD with delta = 1e-8 (its adaptive branch) against Adam, each method's
hyperparameters chosen on validation with the declared tie rule.

On its SGD branch AGD is heavy-ball SGD with effective learning rate alpha (1 - beta1) / delta
(the paper's Algorithm 1 with sqrt(b_t) < delta), so AGD's (alpha, delta) grid is laid out as
(alpha, eta) with delta = alpha (1 - beta1) / eta and eta over SGD's own lr grid, plus
delta = 1e-8 (the Adam-like limit) at every alpha.
"""
from __future__ import annotations

import numpy as np
import torch

import optim

from . import plotting
from .harness import job
from .runner import ACCURACIES, means, per_seed, search, slashed, trials
from .verdict import TIE_RULE, every_seed, paired, settle

NAME = "agd_switching"
BETA1 = 0.9
AGD_LRS = (1e-3, 3e-3, 1e-2)
SGD_LRS = (0.01, 0.03, 0.1, 0.3)          # SGD's grid, and the etas of AGD's SGD branch
ADAM_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
ADAM_DELTA = 1e-8
SWEEP_DELTAS = (1e-8, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
MARGIN = 0.01
TOLERANCE = 0.01       # "never decreases" between separate runs, up to this much
CONFIG = {"beta1": BETA1, "agd_lrs": AGD_LRS, "sgd_lrs": SGD_LRS, "adam_lrs": ADAM_LRS,
          "adam_delta": ADAM_DELTA, "sweep_deltas": SWEEP_DELTAS, "margin": MARGIN,
          "tolerance": TOLERANCE, "tie_rule": TIE_RULE, "comparison": "branch by branch",
          "sgd_momentum": 0.9, "schedule": "cosine per step",
          "toy": {"start": (1.0, 1.5), "AGD": {"lr": 0.1, "delta": 0.1}, "Adam": {"lr": 0.1},
                  "SGD": {"lr": 1e-3, "momentum": 0.9}}}
CLAIM = ("AGD is at least competitive with the optimizer each of its branches stands for: AGD "
         "on its SGD branch ((lr, delta) chosen on validation over delta = lr (1 - beta1) / eta) "
         "reaches a final test accuracy at least SGD-momentum's, and AGD on its adaptive branch "
         "(delta 1e-8, lr chosen on validation) at least Adam's, minus "
         f"{100 * MARGIN:g} point (paired over seeds; every lr chosen on validation for its "
         "method). Sanity checks (they follow from the definition of the switch): at the SGD "
         "branch's lr the mean fraction of SGD-branch elements never decreases as delta grows "
         f"(up to {TOLERANCE:g} between runs), spans < 0.1 to > 0.9 over delta in "
         f"{list(SWEEP_DELTAS)}, and moves by > 0.1 during training for some delta.")
PROTOCOL = ("MNIST-1D (3,200 training, 800 validation, 20,000 test samples), MLP 40-100-100-10, "
            "batch 128, 25 epochs, cosine lr decay per step; AGD's SGD branch searched over lr "
            "{1e-3, 3e-3, 1e-2} x eta {0.01, 0.03, 0.1, 0.3} (delta = lr (1 - 0.9) / eta), its "
            "adaptive branch over lr at delta 1e-8, SGD-momentum 0.9 over {0.01, 0.03, 0.1, "
            "0.3}, Adam over {3e-4, 1e-3, 3e-3, 1e-2}; grids grow past an edge optimum; 2 "
            "validation seeds, points within one pooled standard error of the best tied and "
            "the smallest point of the tie taken; 8 paired seeds; SGD-branch fractions from "
            "AGD's own state every 25 steps.")
PAPER = ("Yue et al. 2023 (NeurIPS): Transformer-XL/Transformer (NLP), ResNets on CIFAR-10 and "
         "ImageNet, CTR models (RecSys) against SGD(M), Adam, AdamW, AdaBelief and others with "
         "delta set per task; AGD 'highly competitive or significantly better'; a figure of the "
         "share of elements in each mode over training for several delta.")
DIFFERS = ("data set and model (an MLP on MNIST-1D), 25 epochs, no weight decay; the paper's "
           "per-task delta and numbers were not retrieved, so delta is searched per branch; the "
           "comparison is made per branch (which branch a 2-seed selection picks flips on "
           "rounding when the branches are close), not between AGD's best and the best "
           "baseline.")

BEALE_MIN = (3.0, 0.5)


def cost(size) -> float:
    """Plain training runs this costs.

    Grid extensions are included at their limit; the tracked sweep runs count 1.5.
    """
    agd = (len(AGD_LRS) + size.extend) * (len(SGD_LRS) + size.extend + 1)
    return (agd + len(SGD_LRS) + len(ADAM_LRS) + 2) * size.select_seeds \
        + (4 + 1.5 * len(SWEEP_DELTAS)) * size.seeds


def agd_job(point: dict, seed: int, **options):
    """The AGD training job of one grid point.

    Args:
        point: {"lr", "eta"} (delta = lr (1 - BETA1) / eta) or {"lr", "delta"}.
        seed: The seed.
        **options: Passed to ``harness.job``.

    Returns:
        The job.
    """
    delta = point.get("delta") or point["lr"] * (1 - BETA1) / point["eta"]
    label = f"AGD lr={point['lr']:.3g} δ={delta:.3g}"
    return job(NAME, label, "AGD", seed, {"lr": point["lr"], "delta": delta}, **options)


def experiment(size, runner):
    """Run the training runs (searches and trials) that CLAIM is checked on.

    Args:
        size: The ``Size`` (seeds, epochs, grid extensions).
        runner: The ``Runner`` of the training runs.

    Returns:
        The JSON-able data that ``rule`` and ``figure`` read, and the named arrays saved with it.
    """
    def adaptive_job(p, s):
        return agd_job({**p, "delta": ADAM_DELTA}, s)

    def sgd_job(p, s):
        return job(NAME, f"SGD lr={p['lr']:g}", "SGD", s, p)

    def adam_job(p, s):
        return job(NAME, f"Adam lr={p['lr']:g}", "Adam", s, p)
    found = {"AGD (SGD branch)": ({"lr": AGD_LRS, "eta": SGD_LRS}, agd_job),
             "AGD (adaptive branch)": ({"lr": AGD_LRS}, adaptive_job),
             "SGD": ({"lr": SGD_LRS}, sgd_job), "Adam": ({"lr": ADAM_LRS}, adam_job)}
    for name, (axes, make) in found.items():
        found[name] = search(runner, axes, make)
        settle(runner, found[name], make)
    best = {"AGD (SGD branch)": agd_job(found["AGD (SGD branch)"].best, 0).params,
            "AGD (adaptive branch)": adaptive_job(found["AGD (adaptive branch)"].best, 0).params,
            "SGD": found["SGD"].best, "Adam": found["Adam"].best}
    configs = {n: ("AGD" if n.startswith("AGD") else n, hp) for n, hp in best.items()}
    runs = trials(runner, NAME, configs)
    lr = best["AGD (SGD branch)"]["lr"]
    sweep = trials(runner, NAME, {f"δ={d:g}": ("AGD", {"lr": lr, "delta": d})
                                  for d in SWEEP_DELTAS},
                   track=("layers",), history=("sgd_fraction", "sgd_fraction/"))
    paths = {n: toy_path(n, size.toy_steps) for n in ("AGD", "Adam", "SGD")}
    data = {"searches": {n: {**f.summary(), "selection": f.selection} for n, f in found.items()},
            "best": best, "runs": runs, "sweep": sweep}
    return data, {f"path_{n}": p for n, p in paths.items()}


def rule(data):
    """The checks of CLAIM on the saved data, and what was measured.

    Args:
        data: The data ``experiment`` saved.

    Returns:
        The measured values (with a ``headline``), and the checks by name.
    """
    runs, sweep = data["runs"], data["sweep"]
    fractions = np.array([[np.nanmean(r["history"]["sgd_fraction"][1]) for r in rs]
                          for rs in sweep.values()])                # delta x seed
    swings = np.array([[np.ptp(r["history"]["sgd_fraction"][1]) for r in rs]
                       for rs in sweep.values()])
    ordered = fractions.T                                           # seed x delta (ascending)
    acc = {n: per_seed(rs, "final_test_acc") for n, rs in runs.items()}
    checks = {
        "fraction nondecreasing in δ": every_seed(
            "the mean SGD-branch fraction never decreases as delta grows",
            np.min(np.diff(ordered, axis=1), axis=1),
            [bool(np.all(np.diff(f) >= -TOLERANCE)) for f in ordered], sanity=True),
        "fraction spans <0.1 to >0.9": every_seed(
            "min over delta < 0.1 and max > 0.9 (values: max - min)",
            ordered.max(axis=1) - ordered.min(axis=1),
            [f.min() < 0.1 and f.max() > 0.9 for f in ordered], sanity=True),
        "fraction moves >0.1 in training": every_seed(
            "for some delta the fraction's range over training > 0.1 (values: largest range)",
            swings.max(axis=0), list(swings.max(axis=0) > 0.1), sanity=True)}
    for branch, base in (("SGD branch", "SGD"), ("adaptive branch", "Adam")):
        checks[f"AGD ({branch}) acc >= {base} - 1pt"] = paired(
            f"AGD's ({branch}) final test accuracy - {base}'s > -margin",
            acc[f"AGD ({branch})"], acc[base], MARGIN)
    acc = means(runs, ACCURACIES)
    measured = {"protocol": PROTOCOL, "paper_protocol": PAPER, "differs": DIFFERS,
                **acc, "best": data["best"], "searches": data["searches"],
                "seeds": len(runs["SGD"]),
                "mean_sgd_fraction": {d: float(v) for d, v in zip(sweep, fractions.mean(1))},
                "per_layer_mean_sgd_fraction": {
                    d: {k.split("/", 1)[1]: float(np.mean([np.nanmean(r["history"][k][1])
                                                           for r in rs]))
                        for k in rs[0]["history"] if k.startswith("sgd_fraction/")}
                    for d, rs in sweep.items()},
                "headline": {
                    "test acc AGD (SGD branch) / SGD": slashed(
                        acc["final_test_acc"], ("AGD (SGD branch)", "SGD"), ".3f"),
                    "test acc AGD (adaptive branch) / Adam": slashed(
                        acc["final_test_acc"], ("AGD (adaptive branch)", "Adam"), ".3f"),
                    "AGD (lr, δ) SGD branch / adaptive": " / ".join(
                        f"({data['best'][n]['lr']:.3g}, {data['best'][n]['delta']:.3g})"
                        for n in ("AGD (SGD branch)", "AGD (adaptive branch)")),
                    "SGD-branch fraction over δ": ", ".join(
                        f"{v:.2f}" for v in fractions.mean(1))}}
    return measured, checks


def beale(xy: torch.Tensor) -> torch.Tensor:
    """Beale's function; global minimum 0 at (3, 0.5)."""
    x, y = xy[..., 0], xy[..., 1]
    return ((1.5 - x + x * y) ** 2 + (2.25 - x + x * y ** 2) ** 2
            + (2.625 - x + x * y ** 3) ** 2)


def toy_path(name: str, steps: int = 1000) -> np.ndarray:
    """The iterates of AGD, Adam or SGD (CONFIG["toy"]) on Beale's function."""
    xy = torch.nn.Parameter(torch.tensor(CONFIG["toy"]["start"], dtype=torch.float64))
    hp = CONFIG["toy"][name]
    opt = {"AGD": lambda: optim.AGD([xy], **hp), "Adam": lambda: torch.optim.Adam([xy], **hp),
           "SGD": lambda: torch.optim.SGD([xy], **hp)}[name]()
    path = [xy.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        beale(xy).backward()
        opt.step()
        path.append(xy.detach().clone())
    return torch.stack(path).numpy()


def grid_panel(ax, found: dict) -> None:
    """AGD's validation accuracy over its (lr, eta) grid, the chosen point circled."""
    lrs, etas = found["axes"]["lr"], found["axes"]["eta"]
    acc = np.full((len(etas), len(lrs)), np.nan)
    for p in found["val_acc"]:
        if "eta" in p:
            acc[etas.index(p["eta"]), lrs.index(p["lr"])] = p["val_acc"]
    image = ax.imshow(acc, origin="lower", cmap="viridis", aspect="auto")
    ax.figure.colorbar(image, ax=ax, label="validation accuracy")
    ax.set_xticks(range(len(lrs)), [f"{v:.2g}" for v in lrs])
    ax.set_yticks(range(len(etas)), [f"{v:.2g}" for v in etas])
    best = found["best"]
    if "eta" in best:
        ax.plot(lrs.index(best["lr"]), etas.index(best["eta"]), "o", mfc="none", mec="red",
                ms=14, mew=2)
        chosen = "circled"
    else:
        chosen = f"chosen: α {best['lr']:.2g}, δ {best['delta']:g} (off this grid)"
    ax.set(xlabel="AGD lr α", ylabel="η = α(1 − β₁)/δ (SGD-branch lr)",
           title=f"SGD branch: (α, δ) on validation; {chosen}")
    ax.grid(False)


def figure(data, arrays, entry, out):
    """SGD-branch fractions over delta, accuracies, AGD's grid search and Beale paths.

    Args:
        data: The data ``experiment`` saved.
        arrays: The arrays ``experiment`` saved.
        entry: The summary entry (verdict and checks) written under the figure.
        out: The output folder.

    Returns:
        The PNG's file name.
    """
    runs, sweep = data["runs"], data["sweep"]
    fig, axes = plotting.figure(2, 3, 17, 8.5)
    ax = axes[0, 0]
    for d, rs in sweep.items():
        plotting.history_band(ax, rs, "sgd_fraction", d)
    ax.set(xlabel="step", ylabel="fraction of elements on the SGD branch",
           title=f"AGD at lr {data['best']['AGD (SGD branch)']['lr']:.3g}: SGD-branch "
                 "fraction per δ")
    plotting.outside_legend(ax)
    ax = axes[0, 1]
    deltas = [float(d.split("=")[1]) for d in sweep]
    fr = np.array([[np.nanmean(r["history"]["sgd_fraction"][1]) for r in rs]
                   for rs in sweep.values()])
    ax.errorbar(deltas, fr.mean(1), yerr=fr.std(1, ddof=1) if fr.shape[1] > 1 else None,
                fmt="o-", capsize=3)
    ax.set(xscale="log", xlabel="δ", ylabel="mean SGD-branch fraction (± sd over seeds)",
           ylim=(-0.05, 1.05), title="switching as a function of δ")
    ax = axes[1, 0]
    for n, rs in runs.items():
        best = data["best"][n]
        label = ", ".join(f"{'δ' if k == 'delta' else k} {v:.3g}" for k, v in best.items()
                          if k in ("lr", "delta"))
        plotting.band(ax, rs[0]["curves"]["epoch"], [r["curves"]["test_acc"] for r in rs],
                      f"{n} ({label})")
    ax.set(xlabel="epoch", ylabel="test accuracy", title="chosen on validation: test accuracy")
    plotting.outside_legend(ax)
    grid_panel(axes[0, 2], data["searches"]["AGD (SGD branch)"])
    ax = axes[1, 2]
    names = list(runs)
    plotting.bars(ax, names, [per_seed(runs[n], "final_test_acc") for n in names], offset=-0.2,
                  width=0.4, label="final epoch")
    plotting.bars(ax, names, [per_seed(runs[n], "best_epoch_test_acc") for n in names],
                  color="tab:orange", offset=0.2, width=0.4, label="best epoch (on test)")
    ax.set(ylabel="test accuracy (± sd over seeds)", title="final and best-epoch test accuracy")
    plotting.outside_legend(ax)
    ax = axes[1, 1]
    xs, ys = np.meshgrid(np.linspace(-0.5, 4.0, 200), np.linspace(-1.5, 2.0, 200))
    zs = beale(torch.tensor(np.stack([xs, ys], -1))).numpy()
    ax.contour(xs, ys, np.log10(zs + 1e-6), levels=30, cmap="viridis", linewidths=0.6)
    for name in ("AGD", "Adam", "SGD"):
        path = arrays[f"path_{name}"]
        ax.plot(path[:, 0], path[:, 1], ".-", ms=2, lw=1, label=name)
    ax.plot(*BEALE_MIN, "r*", ms=12, label="minimum (3, 0.5)")
    ax.set(xlabel="x", ylabel="y", title=f"Beale's function, {len(path) - 1} steps")
    plotting.outside_legend(ax)
    return plotting.save(fig, out, NAME, entry)
