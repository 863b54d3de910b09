"""Reproductions of the papers' claims on MNIST-1D (``python -m figures``)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _check_own_packages() -> None:
    """Check that ``analysis``, ``landscape`` and ``optim`` are sharpscape's own packages.

    figures composes sharpscape's own ``analysis``, ``landscape`` and ``optim``: a module or
    folder of the same name earlier on ``sys.path`` (e.g. in the working directory) is an
    error, not a silently different experiment.

    Raises:
        ImportError: One of them resolves to something else.
    """
    for name in ("analysis", "landscape", "optim"):
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        if origin is None or Path(origin).resolve().parent.parent != _ROOT:
            raise ImportError(
                f"figures needs sharpscape's '{name}' package from {_ROOT}, but '{name}' "
                f"resolves to {origin or 'nothing'}: a module or folder named '{name}' earlier "
                "on sys.path (e.g. in the working directory) shadows it; run from another "
                "directory or rename it")


_check_own_packages()
