"""Worst-case sharpness of an MNIST-1D MLP with the EPFL settings (Andriushchenko et al. 2023):
20 APGD steps, m = 128, rho = 0.1, on 1024 training samples (their ``n_eval_sharpness``).

The MLP (40-100-100-10, ReLU) is trained here, seeded, with Adam (lr 1e-2, 60 epochs: 100 % train
accuracy). For each perturbation model the script prints the APGD value, the one-step SAM estimate
(the ratio shows what the ascent adds), the forward/backward passes and the wall time; then the
same with 5x more ascent steps (how far 20 steps are from converged) and full-data sharpness
beside ``rho^2 lambda_max / 2``. The EPFL code itself needs CUDA and its own batch format, so it
is not run here: only our numbers are reported.

    python benchmarks/sharpness.py [--threads 1] [--out FILE.json] [--quick]

``--quick``: 2 epochs, 128 samples, 2 APGD steps: a smoke test, not figures.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from analysis import (mnist1d, sharpness_vs_curvature, supervised,  # noqa: E402
                      worst_case_sharpness)
from harness import Recorder, parse, parser, timed  # noqa: E402

SEED, RHO, STEPS, M, N_EVAL = 0, 0.1, 20, 128, 1024
CE = supervised(nn.CrossEntropyLoss())


def train_mlp(data, epochs=60, seed=SEED) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                          nn.Linear(100, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(epochs):
        for batch in data.batches(128, shuffle_seed=seed + epoch):
            opt.zero_grad()
            CE(model, batch).backward()
            opt.step()
    return model


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


def main() -> None:
    p = parser(__doc__, threads=True)
    p.add_argument("--epochs", type=int, default=60, help="training epochs of the MLP")
    p.add_argument("--samples", type=int, default=N_EVAL, help="training samples evaluated")
    p.add_argument("--steps", type=int, default=STEPS, help="APGD steps (and 5x as many)")
    args = parse(p, quick={"epochs": 2, "samples": M, "steps": 2})
    run = Recorder("sharpness", args)
    data = mnist1d()
    model, train_time = timed(lambda: train_mlp(data, args.epochs))
    print(f"MLP 40-100-100-10 trained in {train_time:.1f}s: train acc "
          f"{accuracy(model, data.x, data.y):.3f}, test acc "
          f"{accuracy(model, data.x_test, data.y_test):.3f}")
    evaluation = data.batches(M, limit=args.samples)

    rows = []
    print(f"\nworst-case m-sharpness, rho={RHO}, m={M}, {args.samples} samples")
    print(f"{'norm':5} {'adaptive':9} {'steps':>5} {'APGD':>10} {'SAM 1-step':>10} "
          f"{'APGD/SAM':>8} {'fwd':>5} {'bwd':>5} {'time s':>7}")
    for norm in ("l2", "linf"):
        for adaptive in (False, True):
            for steps in (args.steps, 5 * args.steps):
                r, seconds = timed(lambda: worst_case_sharpness(
                    model, CE, evaluation, rho=RHO, norm=norm, adaptive=adaptive, steps=steps,
                    m=M, seed=SEED, progress=False))
                rows.append(dict(norm=norm, adaptive=adaptive, steps=steps, value=r.value,
                                 sam_value=r.sam_value, n_forward=r.n_forward,
                                 n_backward=r.n_backward, seconds=seconds))
                print(f"{norm:5} {str(adaptive):9} {steps:5d} {r.value:10.4g} "
                      f"{r.sam_value:10.4g} {r.value / r.sam_value:8.3f} {r.n_forward:5d} "
                      f"{r.n_backward:5d} {seconds:7.2f}")

    rhos = np.array([1e-3, 1e-2, 1e-1, 1.0])
    curve, seconds = timed(lambda: sharpness_vs_curvature(
        model, CE, [(data.x[:args.samples], data.y[:args.samples])], rhos=rhos,
        steps=args.steps, seed=SEED, progress=False))
    print(f"\nfull-data L2 sharpness vs rho^2 lambda_max / 2 (lambda_max = "
          f"{curve.lambda_max:.4g}, {curve.n_hvp} HVPs, {seconds:.1f}s)")
    print(f"{'rho':>7} {'APGD':>10} {'SAM 1-step':>10} {'quadratic':>10} {'ratio':>8}")
    for i, rho in enumerate(rhos):
        print(f"{rho:7.0e} {curve.sharpness[i]:10.4g} {curve.sam_values[i]:10.4g} "
              f"{curve.prediction[i]:10.4g} {curve.ratio[i]:8.3f}")

    run.write({"seed": SEED, "rho": RHO, "m": M, "train_seconds": train_time, "rows": rows,
               "curve": {"rhos": rhos, "sharpness": curve.sharpness,
                         "sam_values": curve.sam_values, "prediction": curve.prediction,
                         "ratio": curve.ratio, "lambda_max": curve.lambda_max,
                         "n_hvp": curve.n_hvp, "seconds": seconds}})


if __name__ == "__main__":
    main()
