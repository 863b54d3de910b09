"""Progress-bar ETAs against the time actually left, on the documentation's examples.

    python3 benchmarks/eta.py [--out FILE.json] [--quick] [--threads N]

Runs the examples of README.md, docs/getting-started.md and docs/how-to/huggingface.md (an MLP
trained with WSAM: ``top_eigenvalues(k=3)``, ``top_eigenvalues(k=1)``,
``hessian_trace(n_hvp=60)``, ``spectral_density(n_lanczos=30, n_vectors=2)``; the tiny GPT-2:
``top_eigenvalues(k=2)``, ``hessian_trace(n_hvp=24)``) and a small 1-D CNN of the kind issue
29 tried (``top_eigenvalues(k=3)``), each with its bars recorded at every redraw: the ETA
tqdm shows there (``(total - n) / rate``, its own rate) against the time the bar actually had
left until it closed. The figure per bar is the worst ratio ``max(shown / left, left / shown)``
over the redraws after the first 10 % of the bar's time and before it reaches its final count
(the redraws after the last product show what is done); a redraw without a total (no ETA
shown) is counted apart, and an ETA of zero with products still to come counts as infinitely
off. Each bar's log is printed as ``(seconds, n, total, shown ETA, left)``.
"""
from __future__ import annotations

import io
import warnings
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import std

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import parse, parser, Recorder  # noqa: E402

import analysis  # noqa: E402
import analysis.core.progress  # noqa: E402
import analysis.density  # noqa: E402
import analysis.lanczos  # noqa: E402
import analysis.trace  # noqa: E402
from analysis import (hessian_trace, mnist1d, spectral_density, supervised,  # noqa: E402
                      top_eigenvalues)

BARS: list["Recording"] = []


class Recording(std.tqdm):
    """A tqdm bar that draws nowhere and records ``(time, n, total, shown ETA)`` per redraw."""

    def __init__(self, *args, **kwargs):
        kwargs.update(file=io.StringIO(), disable=False, mininterval=0, miniters=0)
        self.log: list[tuple[float, float, float | None, float | None]] = []
        super().__init__(*args, **kwargs)
        self.started, self.closed = time.perf_counter(), None
        BARS.append(self)

    def display(self, *args, **kwargs):
        d = self.format_dict
        rate = d["rate"] or (d["n"] / d["elapsed"] if d["elapsed"] else None)
        eta = (d["total"] - d["n"]) / rate if d["total"] and rate else None
        self.log.append((time.perf_counter(), d["n"], d["total"], eta))
        return super().display(*args, **kwargs)

    def close(self):
        if self.closed is None:
            self.closed = time.perf_counter()
        return super().close()


def worst_ratio(bar: Recording, skip: float = 0.1) -> dict:
    """The worst ``max(shown / left, left / shown)`` after ``skip`` of the bar's time."""
    span = bar.closed - bar.started
    worst, silent, seen = 1.0, 0, 0
    for t, n, total, eta in bar.log:
        left = bar.closed - t
        if t - bar.started < skip * span or n >= bar.n:  # the work is done at the final n
            continue
        seen += 1
        if eta is None:
            silent += 1
            continue
        ratio = math.inf if eta <= 0 else max(eta / left, left / eta)
        worst = max(worst, ratio)
    log = [(round(t - bar.started, 3), round(n, 2), total, eta and round(eta, 3),
            round(bar.closed - t, 3)) for t, n, total, eta in bar.log]
    return {"desc": bar.desc, "worst_ratio": worst, "redraws": seen, "without_eta": silent,
            "seconds": span, "products": bar.n, "log": log}


def readme_mlp():
    """README.md's example: an MLP trained one epoch with WSAM on 1024 MNIST-1D samples."""
    from optim import WSAM
    torch.manual_seed(0)
    train = mnist1d().batches(128, limit=1024)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))
    loss_fn = supervised(nn.CrossEntropyLoss())
    opt = WSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05, model=model)
    for batch in train:
        def closure():
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            return loss
        opt.step(closure)
    return model, loss_fn, train


def cnn():
    """A small 1-D CNN on MNIST-1D (a user's own model, as in issue 29), briefly trained."""
    torch.manual_seed(0)
    train = mnist1d().batches(128, limit=1024)
    model = nn.Sequential(nn.Unflatten(1, (1, 40)), nn.Conv1d(1, 8, 5), nn.ReLU(),
                          nn.Conv1d(8, 8, 5, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16, 10))
    loss_fn = supervised(nn.CrossEntropyLoss())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in train * 2:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    return model, loss_fn, train


def gpt2():
    """docs/how-to/huggingface.md's tiny GPT-2 (random weights) and its two uneven batches."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    batches = []
    for n in (4, 3):
        ids = torch.randint(1, 32, (n, 8), generator=gen)
        labels = ids.clone()
        labels[0, 6:] = -100
        batches.append({"input_ids": ids, "attention_mask": (labels != -100).long(),
                        "labels": labels})
    return model, (lambda m, b: m(**b).loss), batches


def examples(quick: bool):
    """``(name, call)`` of every example."""
    mlp, loss, train = readme_mlp()
    net, cnn_loss, cnn_train = cnn()
    lm, lm_loss, lm_batches = gpt2()
    yield "README MLP top_eigenvalues(k=3)", lambda: top_eigenvalues(mlp, loss, train, k=3)
    yield "getting-started top_eigenvalues(k=1)", lambda: top_eigenvalues(mlp, loss, train, k=1)
    yield "README hessian_trace(n_hvp=60)", lambda: hessian_trace(mlp, loss, train, n_hvp=60)
    yield ("getting-started spectral_density(30, 2)",
           lambda: spectral_density(mlp, loss, train, n_lanczos=30, n_vectors=2))
    yield "CNN top_eigenvalues(k=3)", lambda: top_eigenvalues(net, cnn_loss, cnn_train, k=3)
    yield "GPT-2 top_eigenvalues(k=2)", lambda: top_eigenvalues(lm, lm_loss, lm_batches, k=2)
    if not quick:
        yield ("GPT-2 hessian_trace(n_hvp=24)",
               lambda: hessian_trace(lm, lm_loss, lm_batches, n_hvp=24))


def main() -> None:
    p = parser(__doc__, threads=True)
    args = parse(p)
    run = Recorder("eta", args)
    warnings.filterwarnings("ignore", "clamping frac", std.TqdmWarning)  # n past a predicted total
    for module in (analysis.core.progress, analysis.lanczos, analysis.trace):
        module.tqdm = Recording
    analysis.density.trange = lambda *a, **k: Recording(range(*a), **k)
    results = {}
    for name, call in examples(args.quick):
        BARS.clear()
        start = time.perf_counter()
        out = call()
        bars = [worst_ratio(bar) for bar in BARS if bar.closed is not None and bar.log]
        results[name] = {"seconds": time.perf_counter() - start, "bars": bars,
                         "n_hvp": getattr(out, "n_hvp", None)}
        worst = max((b["worst_ratio"] for b in bars), default=float("nan"))
        print(f"{name}: worst ETA ratio {worst:.2f} over {len(bars)} bar(s), "
              f"{results[name]['seconds']:.1f} s, n_hvp {results[name]['n_hvp']}", flush=True)
    print(json.dumps(results, indent=1, default=float))
    run.write(results)


if __name__ == "__main__":
    main()
