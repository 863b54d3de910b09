"""Loss landscapes: directions, 1D/2D surfaces, interpolation, trajectories, plots."""
from .directions import (Direction, eigenvector_directions, random_direction,
                         update_direction)
from .interpolate import interpolate, recalibrate_bn
from .plot import (plot_contour, plot_line, plot_spectral_density, plot_surface3d,
                   plot_trajectory, save_figure)
from .results import InterpolationResult, LineResult, PlaneResult, load_result, save_result
from .surface import line, plane
from .trajectory import PCAResult, pca_directions, project_trajectory

__all__ = [
    "Direction", "random_direction", "update_direction", "eigenvector_directions",
    "line", "plane", "interpolate", "recalibrate_bn",
    "pca_directions", "project_trajectory", "PCAResult",
    "LineResult", "PlaneResult", "InterpolationResult", "load_result", "save_result",
    "plot_line", "plot_contour", "plot_surface3d", "plot_trajectory", "plot_spectral_density",
    "save_figure",
]
