"""Sharpness-aware and auto-switching optimizers (imports only torch)."""
from .agd import AGD
from .sam import SAM
from .wsam import WSAM
from .adasam import AdaSAM
from .lookahead import Lookahead
from .sala import SALA
from .ndadam import BNSoftmax, NDAdam, logit_penalty, normalize_vectors_, regularized_cross_entropy

__all__ = ["AGD", "SAM", "WSAM", "AdaSAM", "Lookahead", "SALA", "NDAdam",
           "BNSoftmax", "logit_penalty", "normalize_vectors_", "regularized_cross_entropy"]
