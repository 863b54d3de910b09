"""Plot helpers shared by the reproductions: seed bands, bars from zero with error bars, axis
scales chosen by the data's range, legends outside the data, and the verdict on every figure."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.core import write_figure

from .report import check_text

matplotlib.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.grid": True,
                            "grid.alpha": 0.3, "axes.spines.top": False,
                            "axes.spines.right": False, "legend.fontsize": 7})


def figure(rows: int, cols: int, width: float, height: float, **kwargs):
    """A constrained-layout figure (Agg canvas, no pyplot) and its axes array."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **kwargs) if rows * cols else None
    return fig, axes


def band(ax, x, per_seed: Sequence[Sequence[float]], label: str, color=None, style="-"):
    """The mean over seeds of ``per_seed`` curves with the band of their range over seeds (it
    never leaves the data, so it stays positive on a log axis)."""
    y = np.asarray(per_seed, dtype=float)
    n = min(len(x), y.shape[1])
    x, y = np.asarray(x, dtype=float)[:n], y[:, :n]
    mean = np.nanmean(y, axis=0)
    label = f"{label} (n={len(y)})" if len(y) > 1 else label
    (ln,) = ax.plot(x, mean, style, color=color, label=label, lw=1.4)
    if len(y) > 1:
        ax.fill_between(x, np.nanmin(y, axis=0), np.nanmax(y, axis=0), color=ln.get_color(),
                        alpha=0.2, lw=0)
    return ln


def history_band(ax, runs: Sequence[dict], key: str, label: str, color=None, style="-"):
    """``band`` of the history curve ``key`` over the seeds' ``runs`` (steps from the first)."""
    return band(ax, runs[0]["history"][key][0], [r["history"][key][1] for r in runs], label, color,
                style)


def bars(ax, names: Sequence[str], per_seed: Sequence[Sequence[float]], color="tab:blue",
         offset: float = 0.0, width: float = 0.8, label: str | None = None):
    """Bars of the mean over seeds with +- one standard deviation, the axis from zero."""
    means = [float(np.mean(v)) for v in per_seed]
    sds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in per_seed]
    x = np.arange(len(names)) + offset
    ax.bar(x, means, width, yerr=sds, capsize=3, color=color, label=label)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylim(bottom=0)


def autoscale(ax, values, axis: str = "y") -> None:
    """Log scale only when the positive ``values`` span more than a decade."""
    v = np.asarray([x for x in np.ravel(values) if x is not None and np.isfinite(x)], float)
    if len(v) and v.min() > 0 and v.max() / v.min() > 10:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def outside_legend(ax, **kwargs) -> None:
    """The legend to the right of the axes, never over the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, borderaxespad=0,
              **kwargs)


def legend_below(ax, ncol: int = 3) -> None:
    """The legend under the axes (for panels whose right side holds a colour bar)."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False, ncol=ncol)


PROTOCOL_KEYS = {"protocol": "This run", "paper_protocol": "Paper", "differs": "Differs"}


def with_verdict(fig, name: str, entry: dict) -> None:
    """The reproduction's verdict as the title, below the figure its protocol next to the
    paper's and what differs (where ``measured`` states them) and every check with its
    interval."""
    fig.suptitle(f"{name}: {entry['verdict']}", fontsize=12, fontweight="bold")
    measured = entry.get("measured", {})
    lines = ["\n    ".join(textwrap.wrap(f"{head}: {measured[key]}", 200))
             for key, head in PROTOCOL_KEYS.items() if key in measured]
    lines += [check_text(k, c, markdown=False) for k, c in entry["checks"].items()]
    fig.supxlabel("\n".join(lines), fontsize=7.5, ha="center")


def save(fig, out: Path, name: str, entry: dict) -> str:
    """Put the verdict on ``fig`` and write it to ``out/NAME.png`` atomically.

    The PNG goes through ``analysis.core``'s atomic writer: a killed run leaves the previous
    complete PNG (or none), and a symbolic link at the path is replaced, not written through.

    Args:
        fig: The reproduction's figure.
        out: The output folder.
        name: The reproduction.
        entry: Its summary entry (verdict and checks).

    Returns:
        The PNG's file name.
    """
    with_verdict(fig, name, entry)
    write_figure(fig, out / f"{name}.png", dpi=100)
    return f"{name}.png"
