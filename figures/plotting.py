"""Plot helpers shared by the reproductions.

Seed bands, bars with error bars on an axis that shows their differences, axis scales chosen by
the data's range (log axes with plain tick labels), legends outside the data, and the verdict on
every figure.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.core import write_figure
from landscape import plain_log_ticks

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
    """The mean over seeds of ``per_seed`` curves with the band of their range over seeds.

    The band never leaves the data, so it stays positive on a log axis.
    """
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
    """Bars of the mean over seeds with +- one standard deviation.

    The value axis spans the bars' error bars (:func:`difference_axis`), not zero to the top,
    so the compared differences can be seen; bars drawn on the same axes widen it together.

    Args:
        ax: The axes.
        names: The bars' tick labels.
        per_seed: The values over seeds of each bar.
        color: The bars' colour.
        offset: Shift of the bars from the ticks (several series side by side).
        width: The bars' width.
        label: The series' legend label.
    """
    means = np.array([float(np.mean(v)) for v in per_seed])
    sds = np.array([float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in per_seed])
    x = np.arange(len(names)) + offset
    ax.bar(x, means, width, yerr=sds, capsize=3, color=color, label=label)
    ax.set_xticks(np.arange(len(names)), ["\n".join(textwrap.wrap(n, 10)) for n in names])
    difference_axis(ax, means - sds, means + sds)


def difference_axis(ax, low, high) -> None:
    """Fit the y axis to the values between ``low`` and ``high`` (and earlier calls'), with room.

    The axis starts at zero only where zero is within a third of the values' span from them;
    otherwise a note on the axis says that it does not start at zero.

    Args:
        ax: The axes.
        low: The lowest value of each bar (mean less its error bar).
        high: The highest value of each bar.
    """
    lo, hi = float(np.nanmin(low)), float(np.nanmax(high))
    if getattr(ax, "_values_span", None):
        lo, hi = min(lo, ax._values_span[0]), max(hi, ax._values_span[1])
    ax._values_span = (lo, hi)
    pad = 0.25 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-12)
    bottom = 0.0 if 0 <= lo <= 3 * pad else lo - pad
    ax.set_ylim(bottom, hi + pad)
    note = getattr(ax, "_zero_note", None)
    if bottom != 0.0 and note is None:
        ax._zero_note = ax.annotate("axis not from 0", (0, 1), xycoords="axes fraction",
                                    xytext=(2, -2), textcoords="offset points", fontsize=6,
                                    color="0.4", va="top")  # above the bars, not on them
    elif bottom == 0.0 and note is not None:
        note.remove()
        ax._zero_note = None


def autoscale(ax, values, axis: str = "y") -> None:
    """Log scale only when the positive ``values`` span more than a decade."""
    v = np.asarray([x for x in np.ravel(values) if x is not None and np.isfinite(x)], float)
    if len(v) and v.min() > 0 and v.max() / v.min() > 10:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        plain_log_ticks(ax, axis)


def outside_legend(ax, **kwargs) -> None:
    """The legend to the right of the axes, never over the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, borderaxespad=0,
              **kwargs)


def legend_below(ax, ncol: int = 3) -> None:
    """The legend under the axes (for panels whose right side holds a colour bar)."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False, ncol=ncol)


PROTOCOL_KEYS = {"protocol": "This run", "paper_protocol": "Paper", "differs": "Differs"}


def with_verdict(fig, name: str, entry: dict) -> None:
    """The reproduction's verdict as the title, and below the figure what was measured.

    Its protocol next to the paper's and what differs (where ``measured`` states them), and
    every check with its interval.
    """
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
