"""Progress-bar ETAs against the time actually left, on the documentation's examples.

    python3 benchmarks/eta.py [--out FILE.json] [--quick] [--threads N]
                              [--burn K [--burn-when rise|fall]] [--replay FILE.json ...]

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
off. *before the last product* is the same figure over the redraws before the bar's last
product (the rest of a bar's last product and the work after it are at most a time slice or
two under load, whose length no rate foresees); *over 2x* is the share of that time during
which the ETA shown was off by more than 2x (a load that changes during the bar makes every
rule 2x off for a moment: this says for how long). Each bar's log is printed as
``(seconds, n, total, shown ETA, left)``.

``--burn K`` changes the load during every bar: K CPU-burning children (``python -c 'while 1:
pass'``, started from this process, so in its session and scheduler autogroup, at its nice
level) are started when the bar passes half its total (``--burn-when rise``, the default) and
stopped when it closes, or run from the bar's start until it passes half (``fall``). With K
burners in its autogroup the measured process gets about 1 / (K + 1) of the autogroup's CPU:
its rate falls (or rises) by about that factor midway; other sessions' processes keep their
share (the autogroup as a whole is one competitor).
"""
from __future__ import annotations

import io
import warnings
import json
import math
import subprocess
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
    """A tqdm bar that draws nowhere and records ``(time, n, total, shown ETA)`` per redraw.

    The ETA is tqdm's own, ``(total - n) / rate``, or, on a bar a :class:`Traced`
    ConvergenceBar drives, the one it put into the bar's format (``ConvergenceBar.eta``).
    """

    def __init__(self, *args, **kwargs):
        kwargs.update(file=io.StringIO(), disable=False, mininterval=0, miniters=0)
        self.log: list[tuple[float, float, float | None, float | None]] = []
        self.trace: list[tuple] = []   # a ConvergenceBar's updates (Traced)
        self.budget, self.driver = None, None
        super().__init__(*args, **kwargs)
        self.started, self.closed = time.perf_counter(), None
        BARS.append(self)

    burn: tuple[int, str] = (0, "rise")   # --burn K, --burn-when (Burners)

    def display(self, *args, **kwargs):
        d = self.format_dict
        if self.driver is not None:
            eta = self.driver.eta
        else:
            rate = d["rate"] or (d["n"] / d["elapsed"] if d["elapsed"] else None)
            eta = (d["total"] - d["n"]) / rate if d["total"] and rate else None
        self.log.append((time.perf_counter(), d["n"], d["total"], eta))
        self._burn(d["n"], d["total"])
        return super().display(*args, **kwargs)

    def _burn(self, n, total):
        """Start (``rise``) or stop (``fall``) the burners once the bar passes half its total."""
        count, when = self.burn
        if not count:
            return
        if not hasattr(self, "burners"):
            self.burners = Burners(count if when == "fall" else 0)
            self.halfway = False
        if not self.halfway and total and n >= total / 2:
            self.halfway = True
            self.log_halfway = time.perf_counter()
            self.burners.stop() if when == "fall" else self.burners.start(count)

    def close(self):
        if self.closed is None:
            self.closed = time.perf_counter()
            if hasattr(self, "burners"):
                self.burners.stop()
        return super().close()


class Burners:
    """``count`` CPU-burning child processes (``python -c 'while 1: pass'``), this process's
    children: same session, autogroup and nice level."""

    def __init__(self, count: int = 0):
        self.children: list[subprocess.Popen] = []
        self.start(count)

    def start(self, count: int) -> None:
        self.children += [subprocess.Popen([sys.executable, "-c", "while 1: pass"])
                          for _ in range(count)]

    def stop(self) -> None:
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.wait()
        self.children = []


class Traced(analysis.core.progress.ConvergenceBar):
    """A ConvergenceBar recording ``(time, products, gap, after, settled)`` at every update (the
    solver's state as it was handed over: the replay feeds it to other rules)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bar.budget, self.bar.driver = self.budget, self

    def update(self, products, gap, **postfix):
        self.bar.trace.append((time.perf_counter(), products, gap, self.after, self.settled))
        super().update(products, gap, **postfix)


class TracedCount(getattr(analysis.core.progress, "CountBar", object)):
    """A CountBar whose ETA the :class:`Recording` it drives records (run on the code before
    CountBar, the trace and SLQ bars are tqdm's, with its mean-rate ETA)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bar.driver = self


DISPLAY = 1.0  # seconds: tqdm shows an ETA in whole seconds


def score(log: list, span: float, final: float, skip: float = 0.1) -> dict:
    """The worst ``max(shown / left, left / shown)`` of ``log`` (``(t, n, total, eta, left)``,
    seconds from the bar's start) after ``skip`` of the bar's time and before ``final`` products
    (and before ``final - 1``), the share of that time during which the ETA shown was off by
    more than 2x, the redraws counted there, those without an ETA, and the share of the bar's
    time without."""
    worst, silent, seen, at, early, off, counted = 1.0, 0, 0, None, 1.0, 0.0, 0.0
    displayed = 1.0
    for k, (t, n, total, eta, left) in enumerate(log):
        if t < skip * span or n >= final:  # the work is done at the final n
            continue
        seen += 1
        if eta is None:
            silent += 1
            continue
        ratio = math.inf if eta <= 0 else max(eta / left, left / eta)
        low, high = sorted((max(eta, DISPLAY), max(left, DISPLAY)))
        displayed = max(displayed, high / low)
        shown = (log[k + 1][0] if k + 1 < len(log) else span) - t   # until the next redraw
        counted += shown
        off += shown if ratio > 2 else 0.0
        if ratio > worst:
            worst, at = ratio, round(t / span, 2)
        if n < final - 1:
            early = max(early, ratio)
    return {"worst_ratio": worst, "worst_at": at, "before_last_product": early,
            "worst_displayed": displayed,
            "over_2x_fraction": off / counted if counted else 0.0, "redraws": seen,
            "without_eta": silent, "no_eta_fraction": no_eta_fraction(log, span)}


def worst_ratio(bar: Recording) -> dict:
    """:func:`score` of a closed bar, with its log and (a ConvergenceBar's) updates."""
    span = bar.closed - bar.started
    log = [(round(t - bar.started, 5), round(n, 2), total, eta and round(eta, 5),
            round(bar.closed - t, 5)) for t, n, total, eta in bar.log]
    updates = [(round(t - bar.started, 5), n, g, after, settled)
               for t, n, g, after, settled in bar.trace]
    return {"desc": bar.desc, **score(log, span, bar.n), "seconds": span, "products": bar.n,
            "budget": bar.budget, "log": log, "updates": updates}


def no_eta_fraction(log: list, span: float) -> float:
    """The share of the bar's time (start to close) during which it showed no ETA: from each
    redraw without one to the next redraw (the start to the first redraw counts as without)."""
    silent, last, shown = 0.0, 0.0, False
    for t, _, _, eta, _ in log:
        silent += 0.0 if shown else t - last
        last, shown = t, eta is not None
    silent += 0.0 if shown else span - last
    return silent / span if span > 0 else 0.0


# -- offline replay: other rules on the recorded runs -----------------------------------------
class _Null:
    """A tqdm stand-in that draws nothing."""

    n, total, bar_format = 0.0, None, None

    def update(self, k=1):
        self.n += k

    def close(self):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def refresh(self):
        pass


class MeanRate(analysis.core.progress.ConvergenceBar):
    """The products predicted now, with tqdm's ETA: the products left at the mean rate so far."""

    def seconds_left(self, n, now):
        return None if self.total is None or n <= 0 else (self.total - n) * (now - self.start) / n


class Before(MeanRate):
    """The rule before (2026-12-07): tqdm's ETA and the sooner of the two extrapolations at
    every iteration, trusted or not."""

    def _rest(self):
        done, gap = self.history[-1]
        points = self.history[1:]
        if len(points) < 2:
            return None
        first_n, first_gap = points[0]
        slope = analysis.core.progress._slope(points[-analysis.core.progress._WINDOW:])
        rests = [gap / -slope] if slope < 0 else []
        if first_gap > gap:
            rests.append(gap * (done - first_n) / (first_gap - gap))
        return min(rests) if rests else None


RULES = {"before": Before, "count now, tqdm's ETA": MeanRate,
         "now (count and time by phase)": analysis.core.progress.ConvergenceBar}


def replay(bar: dict, rule) -> dict:
    """:func:`score` of ``rule`` (a ConvergenceBar class) on a recorded bar: its updates fed at
    their recorded times (and the solver's ``after`` / ``settled`` as it set them), its ETA
    taken at each recorded redraw."""
    now = [0.0]
    updates, span = bar["updates"], bar["seconds"]
    sim = rule(bar["budget"], "replay", bar=_Null(), after=updates[0][3], clock=lambda: now[0])
    log, i, previous = [], 0, 0.0
    for t, n, *_ in bar["log"]:
        while i < len(updates) and updates[i][0] <= t:
            at, products, g, after, settled = updates[i]
            if settled is not None and settled != sim.settled:  # set after the last update
                now[0] = previous
                sim.settled = settled
            now[0], sim.after = at, after
            sim.update(products, g)
            i, previous = i + 1, at
        now[0], sim.bar.n = t, n
        log.append((t, n, sim.total, sim.seconds_left(n, t), span - t))
    return score(log, span, bar["products"])


COUNT_RULES = {"mean rate (before)": 1e12,
               **{f"rate decayed, half-life {h:g}": h for h in (2, 4, 8, 16)}}


def replay_count(bar: dict, half_life: float) -> dict:
    """:func:`score` of a CountBar with ``half_life`` on a recorded fixed-count bar: each redraw's
    products counted at its recorded time (a half-life of 1e12 products is the mean rate)."""
    now = [0.0]
    span, log = bar["seconds"], bar["log"]
    sim = analysis.core.progress.CountBar(log[-1][2], "replay", bar=_Null(),
                                          clock=lambda: now[0], half_life=half_life)
    replayed = []
    for t, n, total, *_ in log:
        now[0] = t
        sim.update(n - sim.n)
        replayed.append((t, n, total, sim.eta, span - t))
    return score(replayed, span, bar["products"])


def replay_files(paths: list[Path]) -> None:
    """Print each rule's worst ratio (and share of time without an ETA) on each recorded
    ConvergenceBar of the ``--out`` files ``paths``, and each half-life's worst ratio (and
    before the last product) on each recorded fixed-count bar."""
    runs = [json.loads(Path(p).read_text())["results"] for p in paths]
    for name in runs[0]:
        bars = [(k, b) for k, run in enumerate(runs) for b in run[name]["bars"] if b["updates"]]
        counted = [b for run in runs for b in run[name]["bars"] if not b["updates"]]
        if counted:
            print(name, "(worst ratio; before the last product; share of the time over 2x)")
            for label, half_life in COUNT_RULES.items():
                got = [replay_count(b, half_life) for b in counted]
                print(f"  {label:28s}" + "  ".join(
                    f"{g['worst_ratio']:5.2f}; {g['before_last_product']:4.2f}; "
                    f"{g['over_2x_fraction']:.2f}" for g in got))
        if not bars:
            continue
        print(name)
        for label, rule in RULES.items():
            got = [replay(b, rule) for _, b in bars]
            print(f"  {label:28s}" + "  ".join(
                f"{g['worst_ratio']:5.2f} at {g['worst_at']} (no ETA {g['no_eta_fraction']:.2f})"
                for g in got))


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
    p.add_argument("--replay", nargs="+", type=Path, metavar="FILE.json",
                   help="replay the recorded bars of these --out files under each rule in RULES")
    p.add_argument("--burn", type=int, default=0, metavar="K",
                   help="K CPU-burning children during each bar, from or until its half")
    p.add_argument("--burn-when", choices=["rise", "fall"], default="rise",
                   help="rise: start the burners at the bar's half; fall: stop them there")
    args = parse(p)
    if args.replay:
        return replay_files(args.replay)
    run = Recorder("eta", args)
    warnings.filterwarnings("ignore", "clamping frac", std.TqdmWarning)  # n past a predicted total
    for module in (analysis.core.progress, analysis.lanczos, analysis.trace, analysis.density):
        module.tqdm = Recording   # trace and density: their bars before CountBar (--before runs)
    analysis.lanczos.ConvergenceBar = Traced
    if hasattr(analysis.trace, "CountBar"):
        analysis.trace.CountBar = analysis.density.CountBar = TracedCount
    Recording.burn = (args.burn, args.burn_when)
    results = {}
    for name, call in examples(args.quick):
        BARS.clear()
        start = time.perf_counter()
        out = call()
        bars = [worst_ratio(bar) for bar in BARS if bar.closed is not None and bar.log]
        results[name] = {"seconds": time.perf_counter() - start, "bars": bars,
                         "n_hvp": getattr(out, "n_hvp", None)}
        worst = max((b["worst_ratio"] for b in bars), default=float("nan"))
        early = max((b["before_last_product"] for b in bars), default=float("nan"))
        dark = max((b["no_eta_fraction"] for b in bars), default=float("nan"))
        off = max((b["over_2x_fraction"] for b in bars), default=float("nan"))
        print(f"{name}: worst ETA ratio {worst:.2f} ({early:.2f} before the last product, "
              f"over 2x {100 * off:.0f} % of the time) over {len(bars)} bar(s), "
              f"no ETA {100 * dark:.0f} % of the time, "
              f"{results[name]['seconds']:.1f} s, n_hvp {results[name]['n_hvp']}", flush=True)
    for name, result in results.items():  # each bar's log, and its updates (products, log gap)
        for bar in result["bars"]:
            print(f"{name} [{bar['desc']}] log (seconds, n, total, ETA, left):", bar["log"])
            if bar["updates"]:
                print(f"{name} [{bar['desc']}] updates (seconds, products, gap, after, "
                      "settled):", bar["updates"])
    run.write(results)


if __name__ == "__main__":
    main()
