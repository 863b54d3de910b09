"""Curvature, sharpness and training diagnostics on the ``loss_fn(model, batch)`` protocol."""
from .datasets import mnist1d
from .protocol import mean_loss, select_params, supervised
from .restore import preserved

__all__ = ["mnist1d", "mean_loss", "preserved", "select_params", "supervised"]
