"""Sharpness-aware and auto-switching optimizers (imports only torch)."""
from .agd import AGD  # noqa: E402
from .sam import SAM  # noqa: E402
from .wsam import WSAM  # noqa: E402
from .adasam import AdaSAM  # noqa: E402
from .lookahead import Lookahead  # noqa: E402
from .sala import SALA  # noqa: E402
from .ndadam import BNSoftmax, NDAdam, logit_penalty, normalize_vectors_, regularized_cross_entropy  # noqa: E402
