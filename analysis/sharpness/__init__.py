"""Sharpness measures of a point in weight space, one module per measure.

* ``worst_case``: :func:`worst_case_sharpness` (SAM's sharpness, plain or adaptive; m-sharpness).
* ``average``: :func:`average_sharpness` (expected increase under random noise).
* ``keskar``: :func:`keskar_sharpness` (Keskar et al.'s epsilon-sharpness).
* ``pac_bayes``: :func:`pac_bayes_sigma` (Jiang et al.'s PAC-Bayes flatness).
* ``quadratic``: :func:`sharpness_vs_curvature` (sharpness against ``rho^2 lambda_max / 2``).

Shared pieces: ``perturbation`` (the loss at perturbed weights, adaptive scales, constraint
sets), ``apgd`` (the ascent), ``m_batches`` (the batches of m-sharpness).
"""
from .average import AverageSharpness, average_sharpness
from .keskar import KeskarSharpness, keskar_sharpness
from .pac_bayes import PacBayesSigma, classification_error, pac_bayes_sigma
from .quadratic import SharpnessVsCurvature, sharpness_vs_curvature
from .worst_case import WorstCaseSharpness, worst_case_sharpness

__all__ = [
    "AverageSharpness", "average_sharpness", "KeskarSharpness", "keskar_sharpness",
    "PacBayesSigma", "classification_error", "pac_bayes_sigma", "SharpnessVsCurvature",
    "sharpness_vs_curvature", "WorstCaseSharpness", "worst_case_sharpness",
]
