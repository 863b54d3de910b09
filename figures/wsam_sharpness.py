"""WSAM (Yue et al. 2023) against SGD and SAM on one SGD-momentum base.

Test accuracy of WSAM against SGD and SAM and over WSAM's gamma (the weight of the sharpness
term, a = gamma / (1 - gamma)) in the range the paper reports as stable, the lr and rho of each
method and of each gamma chosen on validation for it (the same initialisations and batches within
a seed); lambda_max and the loss slices around the solutions are reported, not checked.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from landscape import LineResult, PlaneResult, plot_contour, plot_line

from . import plotting
from .harness import job
from .runner import ACCURACIES, means, per_seed, pop_arrays, search, slashed, trials
from .verdict import TIE_RULE, paired, settle

NAME = "wsam_sharpness"
SGD = {"momentum": 0.9, "weight_decay": 5e-4}
LRS = (0.05, 0.1, 0.2)
RHOS = (0.02, 0.05, 0.1, 0.2)
GAMMA = 0.9                       # the paper's default
GAMMAS = (0.8, 0.9, 0.95)         # the range the paper reports as stable
JOINT_EXTEND = 1                  # (lr, rho) grids grow at most once past an edge optimum
MARGIN = 0.005
CONFIG = {"sgd": SGD, "lr_grid": LRS, "rho_grid": RHOS, "gamma": GAMMA, "gammas": GAMMAS,
          "joint_extend": JOINT_EXTEND, "margin": MARGIN, "schedule": "cosine per step",
          "tie_rule": TIE_RULE, "selection": "lr and rho per method and per gamma",
          "slices": "filter-normalised random directions (seeds 0, 1) on the curvature subset"}
CLAIM = ("With an SGD-momentum base (cosine schedule), the lr and rho of each method chosen on "
         "validation for it and WSAM's rho re-tuned at each gamma: WSAM (gamma 0.9, the paper's "
         "default) reaches a final test accuracy at least that of the better of SGD and SAM (by "
         f"validation) minus {100 * MARGIN:g} points, and at every gamma in {list(GAMMAS)} (the "
         "range the paper's gamma ablation reports as stable) WSAM's final test accuracy is at "
         f"least SAM's minus {100 * MARGIN:g} points (paired over seeds). Sharpness "
         "(lambda_max) is reported, not checked.")
PROTOCOL = ("MNIST-1D (3,200 training, 800 validation, 20,000 test samples), MLP 40-100-100-10, "
            "batch 128, 25 epochs, cosine lr decay per step; SGD-momentum 0.9 (weight decay "
            "5e-4) as the base of SAM and of WSAM (decoupled); SGD's lr on {0.05, 0.1, 0.2}, "
            "SAM's and WSAM's (gamma 0.9) (lr, rho) jointly on {0.05, 0.1, 0.2} x {0.02, 0.05, "
            "0.1, 0.2}, WSAM's rho re-tuned at gamma 0.8 and 0.95 (at gamma 0.9's lr), all on "
            "validation (2 seeds; grids grow past an edge optimum; points within one pooled "
            "standard error of the best are tied and the smallest (lr, rho) of the tie is "
            "taken); 8 paired seeds; lambda_max by "
            "Lanczos on 1,000 training samples.")
PAPER = ("Yue et al. 2023 (KDD): ResNet-18, WRN-28-10 and PyramidNet on CIFAR-10/100 (200 "
         "epochs) and ImageNet, against SGD/Adam, SAM and SAM variants with rho tuned per "
         "method; WSAM's generalization is better than or competitive with SAM's; the gamma "
         "ablation reports accuracy over gamma, stable for gamma in about [0.8, 0.95].")
DIFFERS = ("data set and model (an MLP on MNIST-1D), 25 epochs, no augmentation; the lr is "
           "chosen per method (the paper shares the base optimizer's lr); the paper's numbers "
           "and the exact shape of its gamma ablation were not retrieved (the stable range is "
           "from a summary of the paper).")


def cost(size) -> float:
    """Plain training runs this costs (a SAM-type run counts 2, its measurements 1 more)."""
    joint = (len(LRS) + JOINT_EXTEND) * len(RHOS) * 2
    rho = (len(RHOS) + size.extend) * 2 * (len(GAMMAS) - 1)
    return (len(LRS) + size.extend + 2 * joint + rho) * size.select_seeds \
        + (1 + 3 + 3 * len(GAMMAS)) * size.seeds


def _tuned(runner, name: str, extra: dict, lr: float | None = None):
    """The (lr, rho) search (rho alone at ``lr`` when given) of a SAM-type method, settled."""
    label = name if "gamma" not in extra else f"WSAM γ={extra['gamma']:g}"

    def make(p, s):
        return job(NAME, f"{label} lr={p['lr']:g} ρ={p['rho']:g}", name, s,
                   {**SGD, **p, **extra})
    if lr is None:
        found = search(runner, {"lr": LRS, "rho": RHOS}, make, extend=JOINT_EXTEND)
    else:
        found = search(runner, {"rho": RHOS}, lambda p, s: make({**p, "lr": lr}, s))
        found.scores = [({**p, "lr": lr}, v) for p, v in found.scores]
    settle(runner, found, make)
    return found


def experiment(size, runner):
    """Run the training runs (searches and trials) that CLAIM is checked on.

    Args:
        size: The ``Size`` (seeds, epochs, grid extensions).
        runner: The ``Runner`` of the training runs.

    Returns:
        The JSON-able data that ``rule`` and ``figure`` read, and the named arrays saved with it.
    """
    def make_sgd(p, s):
        return job(NAME, f"SGD lr={p['lr']:g}", "SGD", s, {**SGD, **p})
    found = {"SGD": search(runner, {"lr": LRS}, make_sgd)}
    settle(runner, found["SGD"], make_sgd)
    found["SAM"] = _tuned(runner, "SAM", {})
    key = f"γ={GAMMA:g}"
    found[key] = _tuned(runner, "WSAM", {"gamma": GAMMA})
    for g in GAMMAS:
        if g != GAMMA:          # rho re-tuned per gamma at the lr chosen for gamma 0.9
            found[f"γ={g:g}"] = _tuned(runner, "WSAM", {"gamma": g}, found[key].best["lr"])
    hp = {n: {**SGD, **f.best} for n, f in found.items()}
    configs = {"SGD": ("SGD", hp["SGD"]), "SAM": ("SAM", hp["SAM"]),
               "WSAM": ("WSAM", {**hp[key], "gamma": GAMMA})}
    runs = trials(runner, NAME, configs, measure=("sharpness", "slices"))
    others = trials(runner, NAME, {f"γ={g:g}": ("WSAM", {**hp[f"γ={g:g}"], "gamma": g})
                                   for g in GAMMAS if g != GAMMA}, measure=("sharpness",))
    arrays = pop_arrays(runs)
    sweep = {f"γ={g:g}": runs["WSAM"] if g == GAMMA else others[f"γ={g:g}"] for g in GAMMAS}
    data = {"searches": {n: {**f.summary(), "selection": f.selection} for n, f in found.items()},
            "chosen": {n: f.best for n, f in found.items()},
            "rho": {"SAM": found["SAM"].best["rho"], "WSAM": found[f"γ={GAMMA:g}"].best["rho"]},
            "runs": runs, "sweep": sweep}
    return data, arrays


def rule(data):
    """The checks of CLAIM on the saved data, and what was measured.

    Args:
        data: The data ``experiment`` saved.

    Returns:
        The measured values (with a ``headline``), and the checks by name.
    """
    runs, sweep = data["runs"], data["sweep"]
    lam = {n: per_seed(rs, "lambda_max") for n, rs in runs.items()}
    acc = {n: per_seed(rs, "final_test_acc") for n, rs in runs.items()}
    val = {n: np.mean(per_seed(runs[n], "final_val_acc")) for n in ("SGD", "SAM")}
    better = max(val, key=val.get)
    gammas = [float(g.split("=")[1]) for g in sweep]
    sweep_lam = np.array([per_seed(rs, "lambda_max") for rs in sweep.values()])   # gamma x seed
    spearman = [float(spearmanr(gammas, col).statistic) for col in sweep_lam.T]
    checks = {f"WSAM acc >= {better} - 0.5pt": paired(
        f"WSAM's (gamma {GAMMA:g}) final test accuracy - {better}'s > -margin", acc["WSAM"],
        acc[better], MARGIN)}
    for g, rs in sweep.items():
        if float(g.split("=")[1]) != GAMMA:
            checks[f"WSAM {g} acc >= SAM - 0.5pt"] = paired(
                f"WSAM's ({g}, its own lr and rho) final test accuracy - SAM's > -margin",
                per_seed(rs, "final_test_acc"), acc["SAM"], MARGIN)
    m = means(runs, ACCURACIES + ("lambda_max", "trace", "worst_case_sharpness"))
    measured = {"protocol": PROTOCOL, "paper_protocol": PAPER, "differs": DIFFERS,
                **m, "rho": data["rho"], "chosen": data["chosen"], "better_of_sgd_sam": better,
                "searches": data["searches"], "seeds": len(acc["SGD"]),
                "gamma_sweep": {g: {"lambda_max": float(np.mean(v)), "final_test_acc": float(
                    np.mean(per_seed(sweep[g], "final_test_acc"))), "train_loss": float(
                    np.mean([r["curves"]["train_loss"][-1] for r in sweep[g]])),
                    **data["chosen"][g]} for g, v in zip(sweep, sweep_lam)},
                "reported_not_checked": {
                    "lambda_max SGD - SAM (mean, per seed)": list(np.subtract(lam["SGD"],
                                                                              lam["SAM"])),
                    "lambda_max SGD - WSAM (mean, per seed)": list(np.subtract(lam["SGD"],
                                                                               lam["WSAM"])),
                    "spearman(gamma, lambda_max) per seed": spearman},
                "headline": {"test acc SGD / SAM / WSAM": slashed(m["final_test_acc"], runs,
                                                                  ".3f"),
                             "test acc by γ": ", ".join(
                                 f"{g} {np.mean(per_seed(rs, 'final_test_acc')):.3f}"
                                 for g, rs in sweep.items()),
                             "λ_max SGD / SAM / WSAM (reported)": slashed(m["lambda_max"], runs,
                                                                         ".2f"),
                             "(lr, ρ) SAM / WSAM": " / ".join(
                                 f"({data['chosen'][n]['lr']:g}, {data['chosen'][n]['rho']:g})"
                                 for n in ("SAM", f"γ={GAMMA:g}"))}}
    return measured, checks


def figure(data, arrays, entry, out):
    """The loss slices, lambda_max and accuracy of each method, and the gamma sweep.

    Args:
        data: The data ``experiment`` saved.
        arrays: The arrays ``experiment`` saved.
        entry: The summary entry (verdict and checks) written under the figure.
        out: The output folder.

    Returns:
        The PNG's file name.
    """
    runs, sweep = data["runs"], data["sweep"]
    names = list(runs)
    fig, axes = plotting.figure(3, len(names), 4.3 * len(names), 11)
    planes = {n: PlaneResult(xs=arrays[f"{n}__seed0__plane_xs"],
                             ys=arrays[f"{n}__seed0__plane_ys"],
                             losses=arrays[f"{n}__seed0__plane_losses"]) for n in names}
    top = float(np.quantile(np.concatenate([p.losses.ravel() for p in planes.values()]), 0.9))
    low = float(min(p.losses.min() for p in planes.values()))
    for i, n in enumerate(names):
        lines = [LineResult(alphas=arrays[f"{n}__seed{r['seed']}__line_alphas"],
                            losses=arrays[f"{n}__seed{r['seed']}__line_losses"])
                 for r in runs[n]]
        ax = plot_line(lines, axes[0, i], label=n, xlabel="α (filter-normalised direction)",
                       ylabel="training loss")
        rho = f" (ρ {data['rho'][n]:g})" if n in data["rho"] else ""
        ax.set_title(f"{n}{rho}: 1D slices")
        plotting.legend_below(ax)
        clipped = PlaneResult(xs=planes[n].xs, ys=planes[n].ys,
                              losses=np.minimum(planes[n].losses, top))
        ax = plot_contour(clipped, axes[1, i], levels=np.linspace(low, top, 12),
                          xlabel="direction 1", ylabel="direction 2", colorbar=i == len(names) - 1)
        ax.plot(0, 0, "r*", ms=10)
        ax.set_title(f"{n}: 2D slice, seed 0 (clipped at 90% quantile)")
    top_line = max(max(arrays[k].max() for k in arrays if k.endswith("__line_losses")), 0)
    for ax in axes[0]:
        ax.set_ylim(0, 1.05 * top_line)              # one scale: the slices compare sharpness
    ax = axes[2, 0]
    plotting.bars(ax, names, [per_seed(runs[n], "lambda_max") for n in names])
    ax.set(ylabel="λ_max at the end (± sd over seeds)",
           title="top Hessian eigenvalue (reported, not checked)")
    ax = axes[2, 1]
    gammas = [float(g.split("=")[1]) for g in sweep]
    lam = np.array([per_seed(rs, "lambda_max") for rs in sweep.values()])
    ax.errorbar(gammas, lam.mean(1), yerr=lam.std(1, ddof=1) if lam.shape[1] > 1 else None,
                fmt="o-", capsize=3, color="tab:red")
    ax.set(xlabel="WSAM γ", ylabel="λ_max (± sd over seeds)",
           title="WSAM γ (ρ re-tuned): sharpness, reported")
    ax = axes[2, 2]
    acc = np.array([per_seed(rs, "final_test_acc") for rs in sweep.values()])
    ax.errorbar(gammas, acc.mean(1), yerr=acc.std(1, ddof=1) if acc.shape[1] > 1 else None,
                fmt="s-", capsize=3, color="tab:green")
    ax.set(xlabel="WSAM γ", ylabel="final test accuracy (± sd over seeds)",
           title="WSAM γ (ρ re-tuned per γ): accuracy")
    return plotting.save(fig, out, NAME, entry)
