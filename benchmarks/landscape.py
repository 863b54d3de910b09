"""41x41 filter-normalised plane of the MNIST-1D MLP 40-100-100-10 over 4000 samples:
``landscape.plane`` against loss-landscapes' ``random_plane``, in one process, at identical points.

The peer draws its own directions; we capture them (after its normalisation and scaling) by
wrapping its ``orthogonal_to``, and evaluate ours on the same weights. The peer walks its grid
in a serpentine with in-place adds and, because of an off-by-one in that walk, its even
columns are shifted by one step along the second direction; the grid below (41 x 42 points,
a superset) holds every point the peer evaluates, and each peer value is compared with ours
at the peer's actual coordinates.

Run: ``python benchmarks/landscape.py [--steps 41] [--repeats 1]``.
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
from analysis.datasets import mnist1d  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=41)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    s = args.steps
    data = mnist1d()
    x, y = data.x[:4000], data.y[:4000]
    model = trained_mlp(x, y)
    names = [n for n, _ in model.named_parameters()]
    loss_fn = supervised(nn.CrossEntropyLoss())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{sum(p.numel() for p in model.parameters())} parameters, {len(y)} samples, {s}x{s} grid")

    peer_times, ours_times, loop_times = [], [], []
    for _ in range(args.repeats):
        peer, d1, d2, t_peer = peer_plane(copy.deepcopy(model), x, y, s)
        peer_times.append(t_peer)
        dirs = [{n: t.detach().clone() for n, t in zip(names, d.parameters)} for d in (d1, d2)]
        xs = np.arange(s) - s / 2           # peer column i is at x = i - s/2
        ys = np.arange(s + 1) - s / 2       # peer rows are at y = j - s/2 or j + 1 - s/2
        start = time.perf_counter()
        ours = plane(model, loss_fn, [(x, y)], dirs[0], dirs[1], xs, ys, progress=False)
        ours_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        plane(model, loss_fn, [(x, y)], dirs[0], dirs[1], xs, ys[:s], progress=False,
              vectorize=False)
        loop_times.append(time.perf_counter() - start)

    # peer[i][j] is at (x = i - s/2, y = j + (1 if i is even else 0) - s/2)
    rows = np.arange(s)[None, :] + (np.arange(s)[:, None] % 2 == 0)
    matched = ours.losses[rows, np.arange(s)[:, None]]
    diff = np.abs(matched - peer).max()
    t_peer, t_ours, t_loop = (float(np.median(t)) for t in (peer_times, ours_times, loop_times))
    print(f"loss-landscapes random_plane : {t_peer:7.2f} s  ({s * s} points)")
    print(f"sharpscape plane (vmap)      : {t_ours:7.2f} s  ({ours.losses.size} points)  "
          f"speed-up x{t_peer / t_ours:.2f}  (per point x{t_peer / (s * s) / (t_ours / ours.losses.size):.2f})")
    print(f"sharpscape plane (loop)      : {t_loop:7.2f} s  ({s * s} points)  speed-up x{t_peer / t_loop:.2f}")
    print(f"max |ours - peer| at the peer's points: {diff:.3e} (losses {peer.min():.3f}..{peer.max():.3f})")
    naive = np.abs(ours.losses[:s] - peer.T).max()
    print(f"(peer values vs the grid it claims, ignoring its serpentine offset: max diff {naive:.3e})")


if __name__ == "__main__":
    main()
