"""Figures of landscape results in one style.

1D curves, contours, 3D surfaces, trajectories, Hessian spectral densities. Built on
``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no GUI, nothing shown);
:func:`save_figure` writes PNG and PDF.

Every function takes a result object (or the path of its .npz file, so figures can be re-made
from the file alone) and an optional ``ax``; without one it creates a figure.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.core import (ArgumentTypeError, check_bool, check_choice, check_int, check_number,
                           check_positive, load_result)

STYLE = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "lines.linewidth": 1.8, "figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight",
    "image.cmap": "viridis",
}
CMAP = "viridis"
LINE_COLOR = "#1f5fa8"
PATH_COLOR = "#d1495b"


@contextmanager
def style() -> Iterator[None]:
    """The package's matplotlib style (rcParams) for the duration of the block.

    Yields:
        None; ``STYLE`` applies inside the block.
    """
    with matplotlib.rc_context(STYLE):
        yield


def _axes(ax: Axes | None, projection: str | None = None) -> Axes:
    if ax is not None:
        return ax
    with style():
        fig = Figure(figsize=(5.0, 4.0))
        FigureCanvasAgg(fig)
        return fig.add_subplot(projection=projection)


def _load(result):
    return load_result(result) if isinstance(result, (str, os.PathLike)) else result


def save_figure(fig: Figure, path: str | os.PathLike, formats: Sequence[str] = ("png", "pdf")
                ) -> list[str]:
    """Save ``fig`` as ``path`` with each extension in ``formats``.

    The extensions are appended to the whole name (``"run_lr0.1"`` gives ``run_lr0.1.png``);
    a name already ending in one of ``formats`` has that ending replaced.

    Args:
        fig: the figure (e.g. ``ax.figure``).
        path: the file name, with or without an extension.
        formats: the file extensions, e.g. ``("png", "pdf")``.

    Returns:
        The names of the files written.

    Raises:
        ArgumentTypeError: ``formats`` is not a non-empty sequence of alphanumeric extensions.
    """
    if (isinstance(formats, str) or not formats
            or not all(isinstance(f, str) and f.isalnum() for f in formats)):
        raise ArgumentTypeError(f"formats must be a sequence of file extensions such as "
                                f"('png', 'pdf'), got {formats!r}")
    stem, ext = os.path.splitext(os.fspath(path))
    if ext[1:].lower() not in {f.lower() for f in formats}:
        stem = os.fspath(path)
    out = []
    with style():
        for ext in formats:
            out.append(f"{stem}.{ext}")
            fig.savefig(out[-1])
    return out


def plot_line(results, ax: Axes | None = None, label: str | None = None, band: str = "std",
              xlabel: str = r"$\alpha$", ylabel: str = "loss") -> Axes:
    """Loss along a line (or interpolation).

    Several results on the same alphas (e.g. one per seed) are drawn as their mean with a
    band.

    Args:
        results: a :class:`LineResult` or :class:`InterpolationResult`, the path of its file,
            or a list of them.
        ax: the axes to draw on (default: a new figure's).
        label: the curve's legend label.
        band: "std" (mean +- one standard deviation) or "minmax".
        xlabel: the x axis label.
        ylabel: the y axis label.

    Returns:
        The axes.

    Raises:
        ValueError: an unknown ``band``, or results on different alphas.
    """
    check_choice("band", band, ("std", "minmax"))
    results = [_load(r) for r in (results if isinstance(results, (list, tuple)) else [results])]
    alphas = results[0].alphas
    if any(r.alphas.shape != alphas.shape or not np.allclose(r.alphas, alphas) for r in results):
        raise ValueError("all results must share the same alphas to be averaged")
    losses = np.stack([r.losses for r in results])
    ax = _axes(ax)
    with style():
        mean = losses.mean(axis=0)
        n = len(results)
        ax.plot(alphas, mean, color=LINE_COLOR,
                label=label if n == 1 or label is None else f"{label} (mean of {n})")
        if n > 1:
            lo, hi = ((mean - losses.std(axis=0), mean + losses.std(axis=0)) if band == "std"
                      else (losses.min(axis=0), losses.max(axis=0)))
            ax.fill_between(alphas, lo, hi, color=LINE_COLOR, alpha=0.25, linewidth=0,
                            label="± 1 std" if band == "std" else "min–max")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if label is not None or n > 1:
            ax.legend(frameon=False)
    return ax


def _levels(z: np.ndarray, levels: int | Sequence[float], log: bool) -> np.ndarray:
    """``levels`` contour values: a count (an int >= 2) or increasing finite values."""
    if isinstance(levels, (list, tuple, np.ndarray)):
        values = np.array([check_number("levels entries", v) for v in np.ravel(levels)])
        if len(values) == 0 or (np.diff(values) <= 0).any():
            raise ValueError(f"levels must be increasing values, got {levels!r}")
        return values
    levels = check_int("levels", levels, 2)
    lo, hi = np.nanmin(z), np.nanmax(z)
    if log and lo > 0:
        return np.geomspace(lo, hi, levels)
    return np.linspace(lo, hi, levels)


def plot_contour(result, ax: Axes | None = None, levels: int | Sequence[float] = 15,
                 log: bool = False, filled: bool = True, xlabel: str = "x", ylabel: str = "y",
                 colorbar: bool = True) -> Axes:
    """Contours of a plane with labelled levels.

    Args:
        result: a :class:`PlaneResult` or the path of its file.
        ax: the axes to draw on (default: a new figure's).
        levels: the number of levels (an int >= 2) or increasing level values.
        log: geometric levels (for positive losses) instead of evenly spaced ones.
        filled: fill between the levels.
        xlabel: the x axis label.
        ylabel: the y axis label.
        colorbar: draw a colour bar (with ``filled``).

    Returns:
        The axes.

    Raises:
        ValueError: invalid ``levels``.
        ArgumentTypeError: ``log``, ``filled`` or ``colorbar`` is not a bool.
    """
    log, filled, colorbar = (check_bool(k, v) for k, v in (("log", log), ("filled", filled),
                                                            ("colorbar", colorbar)))
    res = _load(result)
    ax = _axes(ax)
    with style():
        z = res.losses
        lv = _levels(z, levels, log)
        if filled:
            cf = ax.contourf(res.xs, res.ys, z, levels=lv, cmap=CMAP, alpha=0.85)
            if colorbar:
                ax.figure.colorbar(cf, ax=ax, label="loss")
        cs = ax.contour(res.xs, res.ys, z, levels=lv, colors="k", linewidths=0.6)
        ax.clabel(cs, cs.levels[::2], inline=True, fontsize=7, fmt="%.3g")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_aspect("auto")
        ax.grid(False)
    return ax


def plot_surface3d(result, ax: Axes | None = None, log: bool = False) -> Axes:
    """The plane as a 3D surface.

    Args:
        result: a :class:`PlaneResult` or the path of its file.
        ax: 3D axes to draw on (default: a new figure's).
        log: plot log10 of the loss.

    Returns:
        The axes.

    Raises:
        ArgumentTypeError: ``log`` is not a bool.
    """
    log = check_bool("log", log)
    res = _load(result)
    ax = _axes(ax, projection="3d")
    with style():
        x, y = np.meshgrid(res.xs, res.ys)
        z = np.log10(res.losses) if log else res.losses
        ax.plot_surface(x, y, z, cmap=CMAP, linewidth=0, antialiased=True, rcount=100, ccount=100)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_zlabel("log10 loss" if log else "loss", labelpad=10)
    return ax


def plot_trajectory(result, coords: np.ndarray, ax: Axes | None = None,
                    explained_variance_ratio: Sequence[float] | None = None,
                    levels: int | Sequence[float] = 15, log: bool = False, filled: bool = True,
                    colorbar: bool = True) -> Axes:
    """A training path over the contour of the plane spanned by the same directions.

    Args:
        result: a :class:`PlaneResult` (or its file) along the directions of ``coords``.
        coords: the path, [T, 2] (``PCAResult.coords`` or ``project_trajectory``).
        ax: the axes to draw on (default: a new figure's).
        explained_variance_ratio: the directions' ratios, given in the axis labels.
        levels: as in :func:`plot_contour`.
        log: as in :func:`plot_contour`.
        filled: as in :func:`plot_contour`.
        colorbar: as in :func:`plot_contour`.

    Returns:
        The axes.

    Raises:
        ValueError: ``coords`` is not of shape [T, 2], or as :func:`plot_contour`.
    """
    coords = np.asarray(coords, dtype=float)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must have shape [T, 2], got {coords.shape}")
    labels = ("PC1", "PC2")
    if explained_variance_ratio is not None:
        labels = tuple(f"PC{i + 1} ({100 * r:.1f}% var.)"
                       for i, r in enumerate(explained_variance_ratio[:2]))
    ax = plot_contour(result, ax, levels, log, filled, labels[0], labels[1], colorbar)
    with style():
        ax.plot(coords[:, 0], coords[:, 1], "-o", color=PATH_COLOR, markersize=3, linewidth=1.4,
                label="trajectory")
        ax.plot(*coords[0], "s", color=PATH_COLOR, markersize=7, label="start")
        ax.plot(*coords[-1], "*", color="w", markeredgecolor=PATH_COLOR, markersize=12,
                label="end")
        ax.legend(frameon=True, loc="best")
    return ax


def plot_spectral_density(density, ax: Axes | None = None, log: bool = True,
                          floor: float = 1e-12) -> Axes:
    """A Hessian spectral density; quadrature nodes (``.nodes``), if present, marked.

    Args:
        density: anything with ``.grid`` and ``.density``, e.g. the result of
            ``analysis.spectral_density``.
        ax: the axes to draw on (default: a new figure's).
        log: a log y axis, the density clipped at ``floor``.
        floor: the smallest density shown with ``log``.

    Returns:
        The axes.

    Raises:
        ValueError: ``floor`` is not positive.
        ArgumentTypeError: ``log`` is not a bool.
    """
    log, floor = check_bool("log", log), check_positive("floor", floor)
    grid = np.asarray(density.grid, dtype=float)
    dens = np.asarray(density.density, dtype=float)
    ax = _axes(ax)
    with style():
        ax.plot(grid, np.maximum(dens, floor) if log else dens, color=LINE_COLOR)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(floor, dens[dens > 0].min() if (dens > 0).any() else floor))
        nodes = getattr(density, "nodes", None)
        if nodes is not None:
            at = ax.get_ylim()[0] if log else 0.0
            ax.plot(np.ravel(np.asarray(nodes, dtype=float)), np.full(np.size(nodes), at),
                    "|", color=PATH_COLOR, markersize=8, alpha=0.5, label="Ritz values")
            ax.legend(frameon=False)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
    return ax
