"""Figures of landscape results in one style.

1D curves, contours, 3D surfaces, trajectories, Hessian spectral densities. Built on
``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no GUI, nothing shown).

Every function takes a result object (or the path of its .npz file, so figures can be re-made
from the file alone) and, as ``ax``, either

* matplotlib axes to draw on (or None: a new figure's): it returns the axes, or
* a file path: it draws a new figure, saves it there with :func:`save_figure` and returns the
  figure (``plot_contour(surface, "plane.png")``).

:func:`save_figure` (``analysis.core.save_figure``, shared with ``analysis.Tracker.plot``)
writes atomically with ``bbox_inches="tight"``, so no label is clipped. Axes are labelled with
the directions' names, read from the result's ``metadata["directions"]`` (e.g. "direction 1
(random, filter-normalised)", "PC1", "Hessian eigenvector 1"); ``xlabel=``/``ylabel=``
override them. Log axes carry plain tick labels (``0.01``, ``1e-06``), not ``10^{-2}``.
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
from matplotlib.ticker import LogFormatter

from analysis.core import (ArgumentTypeError, check_bool, check_choice, check_int, check_number,
                           check_positive, load_result)
from analysis.core import save_figure as _save_figure

Target = Axes | str | os.PathLike | None
_NORMALISED = {"filter": "filter-normalised", "layer": "layer-normalised", "none": "unnormalised"}

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


def _target(ax: Target, projection: str | None = None) -> tuple[Axes, str | os.PathLike | None]:
    """The axes to draw on and the file to save to (None: return the axes)."""
    if isinstance(ax, (str, os.PathLike)):
        return _axes(None, projection), ax
    if ax is not None and not isinstance(ax, Axes):
        raise ArgumentTypeError(f"ax must be matplotlib axes, a file path or None, "
                                f"got {type(ax).__name__}")
    return _axes(ax, projection), None


def _finish(ax: Axes, path: str | os.PathLike | None) -> Axes | Figure:
    """The axes, or (given a path) their figure saved there by :func:`save_figure`."""
    if path is None:
        return ax
    save_figure(ax.figure, path)
    return ax.figure


def _load(result):
    return load_result(result) if isinstance(result, (str, os.PathLike)) else result


def direction_names(result, count: int = 2) -> list[str]:
    """Axis names of the directions of a surface, from its ``metadata["directions"]``.

    Args:
        result: A :class:`LineResult` or :class:`PlaneResult` (anything with ``metadata``).
        count: How many names (directions without a record get "direction k").

    Returns:
        ``count`` names: "direction k (random, filter-normalised)", "PCk", "Hessian eigenvector
        k (λ = ...)", "update direction" or "direction k".
    """
    infos = list(dict(getattr(result, "metadata", None) or {}).get("directions") or [])
    names = []
    for k in range(1, count + 1):
        info = dict(infos[k - 1]) if k <= len(infos) else {}
        kind, index = info.get("kind"), info.get("index")
        if kind == "random":
            norm = _NORMALISED.get(info.get("normalization"), info.get("normalization"))
            names.append(f"direction {k} (random, {norm})" if norm else f"direction {k} (random)")
        elif kind == "pca" and index is not None:
            names.append(f"PC{int(index) + 1}")
        elif kind == "hessian_eigenvector" and index is not None:
            value = info.get("eigenvalue")
            at = f" (λ = {value:.3g})" if isinstance(value, (int, float)) else ""
            names.append(f"Hessian eigenvector {int(index) + 1}{at}")
        elif kind == "update":
            names.append("update direction")
        else:
            names.append(f"direction {k}")
    return names


class _PlainLog(LogFormatter):
    """matplotlib's log formatter (which ticks are labelled) writing ``0.2``, not ``2e-01``."""

    def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
        return f"{x:g}"


def plain_log_ticks(ax: Axes, axis: str = "y") -> None:
    """Plain tick labels (``0.01``, ``2``, ``1e-06``) on a log ``axis`` instead of ``10^{k}``.

    On a range of about a decade or less, some minor ticks are labelled too (``0.2``, ``3``),
    never as ``2x10^0``.

    Args:
        ax: The axes.
        axis: "x", "y" or "z" (3D axes).
    """
    check_choice("axis", axis, ("x", "y", "z"))
    target = getattr(ax, f"{axis}axis")
    target.set_major_formatter(_PlainLog())
    target.set_minor_formatter(_PlainLog(labelOnlyBase=False))


def save_figure(fig: Figure, path: str | os.PathLike, formats: Sequence[str] | None = None
                ) -> list[str]:
    """Save ``fig`` as ``path`` in the package's style (:func:`analysis.core.save_figure`).

    ``plane.png`` writes ``plane.png``; a name without a known image extension gets ``.png``
    and ``.pdf`` appended to the whole name (``"run_lr0.1"`` gives ``run_lr0.1.png`` and
    ``run_lr0.1.pdf``); explicit ``formats`` write one file per extension. Atomic, with
    ``bbox_inches="tight"`` (no clipped labels).

    Args:
        fig: the figure (e.g. ``ax.figure``).
        path: the file name, with or without an extension.
        formats: the file extensions, e.g. ``("png", "pdf")``; None: as above.

    Returns:
        The names of the files written.

    Raises:
        ArgumentTypeError: ``formats`` is neither None nor a non-empty sequence of alphanumeric
            extensions.
    """
    with style():
        return _save_figure(fig, path, formats)


def _line_label(result) -> str:
    """The x label of a line: "α along <direction>", or the interpolation's ends."""
    if dict(getattr(result, "metadata", None) or {}).get("kind") == "interpolate" or hasattr(
            result, "barrier"):
        return "α (0: model a, 1: model b)"
    return f"α along {direction_names(result, 1)[0]}"


def plot_line(results, ax: Target = None, label: str | None = None, band: str = "std",
              xlabel: str | None = None, ylabel: str = "loss") -> Axes | Figure:
    """Loss along a line (or interpolation).

    Several results on the same alphas (e.g. one per seed) are drawn as their mean with a
    band.

    Args:
        results: a :class:`LineResult` or :class:`InterpolationResult`, the path of its file,
            or a list of them.
        ax: the axes to draw on (default: a new figure's), or a file path to save a new
            figure to (module docstring).
        label: the curve's legend label.
        band: "std" (mean +- one standard deviation) or "minmax".
        xlabel: the x axis label (default: "α along" the direction's name, or the
            interpolation's ends).
        ylabel: the y axis label.

    Returns:
        The axes; given a path, the saved figure.

    Raises:
        ValueError: an unknown ``band``, or results on different alphas.
    """
    check_choice("band", band, ("std", "minmax"))
    results = [_load(r) for r in (results if isinstance(results, (list, tuple)) else [results])]
    alphas = results[0].alphas
    if any(r.alphas.shape != alphas.shape or not np.allclose(r.alphas, alphas) for r in results):
        raise ValueError("all results must share the same alphas to be averaged")
    losses = np.stack([r.losses for r in results])
    ax, path = _target(ax)
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
        ax.set_xlabel(_line_label(results[0]) if xlabel is None else xlabel)
        ax.set_ylabel(ylabel)
        if label is not None or n > 1:
            ax.legend(frameon=False)
    return _finish(ax, path)


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


def plot_contour(result, ax: Target = None, levels: int | Sequence[float] = 15,
                 log: bool = False, filled: bool = True, xlabel: str | None = None,
                 ylabel: str | None = None, colorbar: bool = True) -> Axes | Figure:
    """Contours of a plane with labelled levels.

    Args:
        result: a :class:`PlaneResult` or the path of its file.
        ax: the axes to draw on (default: a new figure's), or a file path to save a new
            figure to (module docstring).
        levels: the number of levels (an int >= 2) or increasing level values.
        log: geometric levels (for positive losses) instead of evenly spaced ones.
        filled: fill between the levels.
        xlabel: the x axis label (default: the first direction's name, :func:`direction_names`).
        ylabel: the y axis label (default: the second direction's name).
        colorbar: draw a colour bar (with ``filled``).

    Returns:
        The axes; given a path, the saved figure.

    Raises:
        ValueError: invalid ``levels``.
        ArgumentTypeError: ``log``, ``filled`` or ``colorbar`` is not a bool.
    """
    log, filled, colorbar = (check_bool(k, v) for k, v in (("log", log), ("filled", filled),
                                                            ("colorbar", colorbar)))
    res = _load(result)
    ax, path = _target(ax)
    names = direction_names(res)
    with style():
        z = res.losses
        lv = _levels(z, levels, log)
        if filled:
            cf = ax.contourf(res.xs, res.ys, z, levels=lv, cmap=CMAP, alpha=0.85)
            if colorbar:
                ax.figure.colorbar(cf, ax=ax, label="loss")
        cs = ax.contour(res.xs, res.ys, z, levels=lv, colors="k", linewidths=0.6)
        ax.clabel(cs, cs.levels[::2], inline=True, fontsize=7, fmt="%.3g")
        ax.set_xlabel(names[0] if xlabel is None else xlabel)
        ax.set_ylabel(names[1] if ylabel is None else ylabel)
        ax.set_aspect("auto")
        ax.grid(False)
    return _finish(ax, path)


def plot_surface3d(result, ax: Target = None, log: bool = False, xlabel: str | None = None,
                   ylabel: str | None = None) -> Axes | Figure:
    """The plane as a 3D surface.

    Args:
        result: a :class:`PlaneResult` or the path of its file.
        ax: 3D axes to draw on (default: a new figure's), or a file path to save a new figure
            to (module docstring).
        log: plot log10 of the loss.
        xlabel: the x axis label (default: the first direction's name, :func:`direction_names`).
        ylabel: the y axis label (default: the second direction's name).

    Returns:
        The axes; given a path, the saved figure.

    Raises:
        ArgumentTypeError: ``log`` is not a bool.
    """
    log = check_bool("log", log)
    res = _load(result)
    ax, path = _target(ax, projection="3d")
    names = direction_names(res)
    with style():
        x, y = np.meshgrid(res.xs, res.ys)
        z = np.log10(res.losses) if log else res.losses
        ax.plot_surface(x, y, z, cmap=CMAP, linewidth=0, antialiased=True, rcount=100, ccount=100)
        ax.set_xlabel(names[0] if xlabel is None else xlabel, labelpad=8)
        ax.set_ylabel(names[1] if ylabel is None else ylabel, labelpad=8)
        ax.set_zlabel("log10 loss" if log else "loss", labelpad=10)
    return _finish(ax, path)


def plot_trajectory(result, coords: np.ndarray, ax: Target = None,
                    explained_variance_ratio: Sequence[float] | None = None,
                    levels: int | Sequence[float] = 15, log: bool = False, filled: bool = True,
                    colorbar: bool = True) -> Axes | Figure:
    """A training path over the contour of the plane spanned by the same directions.

    Args:
        result: a :class:`PlaneResult` (or its file) along the directions of ``coords``.
        coords: the path, [T, 2] (``PCAResult.coords`` or ``project_trajectory``).
        ax: the axes to draw on (default: a new figure's), or a file path to save a new
            figure to (module docstring).
        explained_variance_ratio: the directions' ratios, given in the axis labels (which
            otherwise name the plane's directions).
        levels: as in :func:`plot_contour`.
        log: as in :func:`plot_contour`.
        filled: as in :func:`plot_contour`.
        colorbar: as in :func:`plot_contour`.

    Returns:
        The axes; given a path, the saved figure.

    Raises:
        ValueError: ``coords`` is not of shape [T, 2], or as :func:`plot_contour`.
    """
    coords = np.asarray(coords, dtype=float)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must have shape [T, 2], got {coords.shape}")
    result = _load(result)
    labels = direction_names(result)
    if explained_variance_ratio is not None:
        labels = [f"PC{i + 1} ({100 * r:.1f}% var.)"
                  for i, r in enumerate(explained_variance_ratio[:2])]
    ax, path = _target(ax)
    plot_contour(result, ax, levels, log, filled, labels[0], labels[1], colorbar)
    with style():
        ax.plot(coords[:, 0], coords[:, 1], "-o", color=PATH_COLOR, markersize=3, linewidth=1.4,
                label="trajectory")
        ax.plot(*coords[0], "s", color=PATH_COLOR, markersize=7, label="start")
        ax.plot(*coords[-1], "*", color="w", markeredgecolor=PATH_COLOR, markersize=12,
                label="end")
        ax.legend(frameon=True, loc="best")
    return _finish(ax, path)


def plot_spectral_density(density, ax: Target = None, log: bool = True,
                          floor: float = 1e-12) -> Axes | Figure:
    """A Hessian spectral density; quadrature nodes (``.nodes``), if present, marked.

    Args:
        density: anything with ``.grid`` and ``.density``, e.g. the result of
            ``analysis.spectral_density``, or the path of its file.
        ax: the axes to draw on (default: a new figure's), or a file path to save a new
            figure to (module docstring).
        log: a log y axis (plain tick labels), the density clipped at ``floor``.
        floor: the smallest density shown with ``log``.

    Returns:
        The axes; given a path, the saved figure.

    Raises:
        ValueError: ``floor`` is not positive.
        ArgumentTypeError: ``log`` is not a bool.
    """
    log, floor = check_bool("log", log), check_positive("floor", floor)
    density = _load(density)
    grid = np.asarray(density.grid, dtype=float)
    dens = np.asarray(density.density, dtype=float)
    ax, path = _target(ax)
    with style():
        ax.plot(grid, np.maximum(dens, floor) if log else dens, color=LINE_COLOR)
        if log:
            ax.set_yscale("log")
            plain_log_ticks(ax, "y")
            ax.set_ylim(bottom=max(floor, dens[dens > 0].min() if (dens > 0).any() else floor))
        nodes = getattr(density, "nodes", None)
        if nodes is not None:
            at = ax.get_ylim()[0] if log else 0.0
            ax.plot(np.ravel(np.asarray(nodes, dtype=float)), np.full(np.size(nodes), at),
                    "|", color=PATH_COLOR, markersize=8, alpha=0.5, label="Ritz values")
            ax.legend(frameon=False)
        scale = getattr(density, "log_scale", False)
        ax.set_xlabel("log10 |eigenvalue|" if scale else "eigenvalue")
        ax.set_ylabel("density")
    return _finish(ax, path)
