"""Curvature, sharpness and training diagnostics on the ``loss_fn(model, batch)`` protocol."""
from .datasets import mnist1d
from .core import (load_result, mean_loss, preserved, save_result, select_params, split_loss,
                   supervised)
from .operator import CurvatureOperator, register_curvature, registered_curvatures
from .hvp import HessianOperator, hvp
from .curvature import EmpiricalFisherOperator, FisherOperator, GGNOperator
from .lanczos import EigenResult, top_eigenvalues
from .trace import TraceResult, hessian_trace
from .density import DensityResult, spectral_density
from .layerwise import LayerwiseResult, layerwise
from .sharpness import (AverageSharpness, KeskarSharpness, PacBayesSigma, SharpnessVsCurvature,
                        WorstCaseSharpness, average_sharpness, keskar_sharpness, pac_bayes_sigma,
                        sharpness_vs_curvature, worst_case_sharpness)
from .metrics import evaluate, full_grad_norm
from .tracker import Tracker

__all__ = [
    "supervised", "split_loss", "mean_loss", "evaluate", "preserved", "select_params", "mnist1d",
    "CurvatureOperator", "register_curvature", "registered_curvatures", "HessianOperator",
    "GGNOperator", "FisherOperator", "EmpiricalFisherOperator", "hvp", "EigenResult",
    "top_eigenvalues", "TraceResult", "hessian_trace", "DensityResult", "spectral_density",
    "LayerwiseResult", "layerwise",
    "AverageSharpness", "SharpnessVsCurvature", "WorstCaseSharpness", "average_sharpness",
    "sharpness_vs_curvature", "worst_case_sharpness",
    "KeskarSharpness", "PacBayesSigma", "keskar_sharpness", "pac_bayes_sigma",
    "Tracker", "full_grad_norm", "save_result", "load_result",
]
