"""41x41 filter-normalised plane of the MNIST-1D MLP 40-100-100-10 over 4000 samples:
``landscape.plane`` against loss-landscapes' ``random_plane``, in one process, at identical points.

The peer draws its own directions; we capture them (after its normalisation and scaling) by
wrapping its ``orthogonal_to``, and evaluate ours on the same weights. The peer walks its grid
in a serpentine with in-place adds and, because of an off-by-one in that walk, its even
columns are shifted by one step along the second direction; the grid below (41 x 42 points,
a superset) holds every point the peer evaluates, and each peer value is compared with ours
at the peer's actual coordinates.

The script also measures the machine's float32 matrix-multiply throughput (a 2048^3 product) and
prints the rate each tool reaches on the model's matrix products, to show how far from the
hardware limit each run is.

Run: ``python benchmarks/landscape.py [--steps 41] [--repeats 3] [--threads N]``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import loss_landscapes  # noqa: E402
import loss_landscapes.main as ll_main  # noqa: E402
from loss_landscapes.metrics import Loss  # noqa: E402

from analysis import supervised  # noqa: E402
from analysis import mnist1d  # noqa: E402
from landscape import plane  # noqa: E402


def trained_mlp(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                          nn.Linear(100, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def peer_plane(model: nn.Module, x, y, steps: int):
    """The peer's plane and the directions it used (per grid step)."""
    captured = {}
    original = ll_main.orthogonal_to

    def capture(vector):
        captured["d1"], captured["d2"] = vector, original(vector)
        return captured["d2"]

    ll_main.orthogonal_to = capture
    try:
        metric = Loss(nn.CrossEntropyLoss(), x, y)
        start = time.perf_counter()
        with torch.no_grad():
            values = loss_landscapes.random_plane(model, metric, distance=1, steps=steps,
                                                  normalization="filter", deepcopy_model=True)
        elapsed = time.perf_counter() - start
    finally:
        ll_main.orthogonal_to = original
    return np.asarray(values), captured["d1"], captured["d2"], elapsed


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 GFLOP/s of an n x n x n product on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def linear_flops(model: nn.Module, n_samples: int) -> int:
    """Multiply-add FLOPs of the model's linear layers for one forward over n_samples."""
    return sum(2 * n_samples * m.in_features * m.out_features
               for m in model.modules() if isinstance(m, nn.Linear))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=41)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = args.steps
    data = mnist1d()
    x, y = data.x[:4000], data.y[:4000]
    model = trained_mlp(x, y)
    names = [n for n, _ in model.named_parameters()]
    loss_fn = supervised(nn.CrossEntropyLoss())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{sum(p.numel() for p in model.parameters())} parameters, {len(y)} samples, {s}x{s} grid")

    runs = {"ours": ({}, s + 1), "vmap": ({"vectorize": True}, s), "loop": ({"vectorize": False}, s)}
    times: dict[str, list[float]] = {"peer": [], **{k: [] for k in runs}}
    for _ in range(args.repeats):
        peer, d1, d2, t_peer = peer_plane(copy.deepcopy(model), x, y, s)
        times["peer"].append(t_peer)
        dirs = [{n: t.detach().clone() for n, t in zip(names, d.parameters)} for d in (d1, d2)]
        xs = np.arange(s) - s / 2           # peer column i is at x = i - s/2
        ys = np.arange(s + 1) - s / 2       # peer rows are at y = j - s/2 or j + 1 - s/2
        for key, (options, rows) in runs.items():
            start = time.perf_counter()
            res = plane(model, loss_fn, [(x, y)], dirs[0], dirs[1], xs, ys[:rows], progress=False,
                        **options)
            times[key].append(time.perf_counter() - start)
            if key == "ours":
                ours = res

    # peer[i][j] is at (x = i - s/2, y = j + (1 if i is even else 0) - s/2)
    rows = np.arange(s)[None, :] + (np.arange(s)[:, None] % 2 == 0)
    matched = ours.losses[rows, np.arange(s)[:, None]]
    diff = np.abs(matched - peer).max()
    per_point = {k: float(np.median(t)) / (s * (s + 1) if k == "ours" else s * s) for k, t in times.items()}
    flops = linear_flops(model, len(y))
    peak = matmul_peak()
    labels = {"peer": "loss-landscapes random_plane", "ours": "sharpscape plane (default)",
              "vmap": "sharpscape vectorize=True", "loop": "sharpscape vectorize=False"}
    print(f"median of {args.repeats}; per point; {flops / 1e6:.0f} MFLOP of matrix products per point; "
          f"machine float32 matmul peak {peak:.0f} GFLOP/s")
    for key, t in per_point.items():
        print(f"{labels[key]:30s}: {t * 1e3:6.3f} ms/point  speed-up x{per_point['peer'] / t:5.2f}  "
              f"{flops / t / 1e9:5.0f} GFLOP/s ({flops / t / 1e9 / peak:4.0%} of peak)")
    print(f"5x the peer would need {5 * flops / per_point['peer'] / 1e9:.0f} GFLOP/s, "
          f"{5 * flops / per_point['peer'] / 1e9 / peak:.1f}x this machine's matmul peak")
    print(f"max |ours - peer| at the peer's points: {diff:.3e} (losses {peer.min():.3f}..{peer.max():.3f})")
    naive = np.abs(ours.losses[:s] - peer.T).max()
    print(f"(peer values vs the grid it claims, ignoring its serpentine offset: max diff {naive:.3e})")

if __name__ == "__main__":
    main()
