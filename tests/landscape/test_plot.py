"""Every figure kind renders from a result or its file, and is saved as PNG and PDF."""
import os
from types import SimpleNamespace

import numpy as np
import pytest

from landscape import (LineResult, PlaneResult, plot_contour, plot_line, plot_spectral_density,
                       plot_surface3d, plot_trajectory, save_figure, save_result)


def bowl(n=15):
    xs = ys = np.linspace(-1, 1, n)
    z = 1.0 + xs[None, :] ** 2 + 3 * ys[:, None] ** 2
    meta = {"kind": "plane"}
    return PlaneResult(xs, ys, z, 0, meta)


def check_saved(ax, path):
    files = save_figure(ax.figure, path)
    assert [f[-3:] for f in files] == ["png", "pdf"]
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(8)
        assert head.startswith(b"\x89PNG") or head.startswith(b"%PDF")


def test_all_figure_kinds(tmp_path):
    alphas = np.linspace(-1, 1, 21)
    lines = [LineResult(alphas, (1 + s * 0.1) * alphas ** 2, 0, {"kind": "line"}) for s in range(3)]
    ax = plot_line(lines, label="3 seeds", band="minmax")
    assert len(ax.collections) == 1  # the band
    np.testing.assert_allclose(ax.lines[0].get_ydata(), 1.1 * alphas ** 2)
    check_saved(ax, tmp_path / "line")
    save_result(bowl(), tmp_path / "plane.npz")
    ax = plot_contour(tmp_path / "plane.npz", levels=8, log=True)  # re-made from the file alone
    assert len(ax.texts) > 0  # labelled levels
    check_saved(ax, tmp_path / "contour")
    check_saved(plot_surface3d(bowl()), tmp_path / "surface")
    path = np.stack([np.linspace(-0.8, 0, 6), np.linspace(0.5, 0, 6)], axis=1)
    ax = plot_trajectory(bowl(), path, explained_variance_ratio=[0.9, 0.05])
    assert "90.0%" in ax.get_xlabel()
    check_saved(ax, tmp_path / "trajectory")
    grid = np.linspace(-1, 5, 200)
    density = SimpleNamespace(grid=grid, density=np.exp(-grid ** 2) / np.sqrt(np.pi),
                              nodes=np.array([0.0, 4.0]), weights=np.array([0.9, 0.1]))
    ax = plot_spectral_density(density, log=True)
    assert ax.get_yscale() == "log"
    check_saved(ax, tmp_path / "density")


def test_plot_errors():
    a = LineResult(np.linspace(0, 1, 3), np.zeros(3))
    b = LineResult(np.linspace(0, 2, 3), np.zeros(3))
    with pytest.raises(ValueError, match="same alphas"):
        plot_line([a, b])
    with pytest.raises(ValueError, match="band"):
        plot_line(a, band="iqr")
    with pytest.raises(ValueError, match="coords"):
        plot_trajectory(bowl(), np.zeros((3, 3)))


def test_contour_orientation():
    """losses[i, j] is at (xs[j], ys[i]): a loss that depends only on x has vertical contours
    spread along the x axis, over the xs range (a transposed plot fails both)."""
    from matplotlib.contour import ContourSet

    xs, ys = np.linspace(-1.0, 2.0, 7), np.linspace(10.0, 20.0, 4)
    flat_in_y = PlaneResult(xs, ys, np.tile(xs, (len(ys), 1)), 0, {})
    ax = plot_contour(flat_in_y, levels=[-0.5, 0.5, 1.5])
    assert ax.get_xlim() == pytest.approx((xs[0], xs[-1]))
    assert ax.get_ylim() == pytest.approx((ys[0], ys[-1]))
    lines = [c for c in ax.collections if isinstance(c, ContourSet) and not c.filled]
    assert len(lines) == 1
    for level, segments in zip(lines[0].levels, lines[0].allsegs):
        assert segments, f"no contour at level {level}"
        points = np.concatenate(segments)  # inline labels cut a line into pieces
        np.testing.assert_allclose(points[:, 0], level, atol=1e-12)  # x = level: vertical
        assert (points[:, 1].min(), points[:, 1].max()) == pytest.approx((ys[0], ys[-1]))


def test_save_figure_keeps_the_whole_name(tmp_path):
    ax = plot_contour(bowl())
    for stem in ("run_lr0.1", "run_lr0.01"):
        files = save_figure(ax.figure, tmp_path / stem)
        assert files == [str(tmp_path / f"{stem}.{ext}") for ext in ("png", "pdf")]
    png = str(tmp_path / "fig.png")
    assert save_figure(ax.figure, png, formats=("png",)) == [png]
    assert sorted(os.listdir(tmp_path)) == ["fig.png", "run_lr0.01.pdf", "run_lr0.01.png",
                                            "run_lr0.1.pdf", "run_lr0.1.png"]
    for formats in ("png", (), ("png", 1), (".png",)):
        with pytest.raises(TypeError, match="formats must be"):
            save_figure(ax.figure, tmp_path / "x", formats=formats)


@pytest.mark.parametrize("levels", [[1.0, 0.5], [], [1.0, float("nan")], 1, True, 2.5, "10"])
def test_bad_contour_levels_are_refused(levels):
    with pytest.raises(ValueError, match="levels"):
        plot_contour(bowl(), levels=levels)


def named_bowl():
    res = bowl()
    res.metadata["directions"] = [
        {"kind": "random", "seed": 1, "normalization": "filter"},
        {"kind": "hessian_eigenvector", "index": 0, "eigenvalue": 2.5}]
    return res


@pytest.mark.parametrize("draw", [
    lambda r, t: plot_contour(r, t), lambda r, t: plot_surface3d(r, t),
    lambda r, t: plot_trajectory(r, np.zeros((3, 2)), t),
    lambda r, t: plot_line(LineResult(r.xs, r.losses[0], 0, r.metadata), t)])
def test_a_path_saves_and_returns_the_figure_with_named_axes(draw, tmp_path):
    from matplotlib.figure import Figure
    fig = draw(named_bowl(), tmp_path / "plane.png")
    assert isinstance(fig, Figure) and os.listdir(tmp_path) == ["plane.png"]
    ax = fig.axes[0]
    assert "direction 1 (random, filter-normalised)" in ax.get_xlabel()
    if ax.get_ylabel() != "loss":
        assert ax.get_ylabel() == "Hessian eigenvector 1 (λ = 2.5)"
    if hasattr(ax, "get_zlabel"):
        assert ax.get_zlabel() == "loss"
    drawn_on = draw(named_bowl(), ax)   # axes in, the same axes out
    assert drawn_on is ax


def test_unnamed_directions_and_overrides():
    ax = plot_contour(bowl())
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("direction 1", "direction 2")
    ax = plot_surface3d(bowl(), xlabel="a", ylabel="b")
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("a", "b")
    with pytest.raises(TypeError, match="ax must be matplotlib axes, a file path or None"):
        plot_contour(bowl(), 3)


def test_saved_figures_are_not_clipped(tmp_path):
    """A y label drawn left of the figure's edge is inside the saved image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    from analysis.core import write_figure
    fig = Figure(figsize=(4, 3), dpi=100)
    FigureCanvasAgg(fig)
    fig.add_axes([0, 0, 1, 1]).set_ylabel("a long loss label")
    (png,) = save_figure(fig, tmp_path / "clip.png")
    assert imread(png).shape[1] > 4 * 150   # tight: wider than the figure (4 in at 150 dpi)
    write_figure(fig, tmp_path / "direct.png", dpi=100)   # the writer under every figure
    assert imread(tmp_path / "direct.png").shape[1] > 4 * 100


def test_log_axes_have_plain_tick_labels():
    grid = np.linspace(0, 1, 50)
    density = SimpleNamespace(grid=grid, density=np.exp(-20 * (grid - 0.5) ** 2) + 0.5)
    ax = plot_spectral_density(density, log=True)
    ax.figure.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels(which="both") if t.get_text()]
    assert labels and not any("$" in t or "times" in t for t in labels), labels
