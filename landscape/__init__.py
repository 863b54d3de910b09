"""Loss landscapes: directions, 1D/2D surfaces, interpolation, trajectories, plots."""
import importlib.util as _util
import os as _os

_spec = _util.find_spec("analysis")  # a user's analysis.py in the cwd would shadow ours
_where = list(_spec.submodule_search_locations or []) if _spec else []
if not _where or not _os.path.isfile(_os.path.join(_where[0], "core", "protocol.py")):
    raise ImportError(f"landscape needs sharpscape's analysis package, but 'import analysis' finds "
                      f"{getattr(_spec, 'origin', None) or _where}: rename that file or folder, it "
                      "shadows sharpscape's analysis package")

# the imports follow the check above: a shadowing package would fail them less clearly
from .directions import (Direction, eigenvector_directions, random_direction,  # noqa: E402
                         update_direction)
from .interpolate import interpolate, recalibrate_bn  # noqa: E402
from .plot import (direction_names, plain_log_ticks, plot_contour, plot_line,  # noqa: E402
                   plot_spectral_density, plot_surface3d, plot_trajectory, save_figure)
from analysis.core import load_result, save_result  # noqa: E402
from .results import InterpolationResult, LineResult, PlaneResult  # noqa: E402
from .surface import line, plane  # noqa: E402
from .trajectory import PCAResult, pca_directions, project_trajectory  # noqa: E402

__all__ = [
    "Direction", "random_direction", "update_direction", "eigenvector_directions",
    "line", "plane", "interpolate", "recalibrate_bn",
    "pca_directions", "project_trajectory", "PCAResult",
    "LineResult", "PlaneResult", "InterpolationResult", "load_result", "save_result",
    "plot_line", "plot_contour", "plot_surface3d", "plot_trajectory", "plot_spectral_density",
    "save_figure", "direction_names", "plain_log_ticks",
]
