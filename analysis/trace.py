"""Stochastic trace estimates of the Hessian with standard errors from their own probes.

* Hutchinson (1989): ``tr H ~ (1/m) sum_i z_i^T H z_i`` with Rademacher ``z_i``; the standard
  error is the sample standard deviation of the ``m`` probe values over ``sqrt(m)``.
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021, Alg. 1): a third of the budget sketches
  ``H S``, ``Q = orth(H S)``; a third computes ``tr(Q^T H Q)`` exactly; the rest runs
  Hutchinson on the deflated ``(I - QQ^T) H (I - QQ^T)``. Since
  ``tr H = tr(Q^T H Q) + tr((I - QQ^T) H (I - QQ^T))`` for every orthonormal ``Q``, the
  estimate is unbiased given ``Q``, and its standard error is that of the Hutchinson part:
  the sample standard deviation of its ``g`` probe values over ``sqrt(g)`` (conditional on
  the sketch). It is exact when ``rank H <= n_hvp // 3``; when ``n <= n_hvp // 3`` the
  sketch spans everything and only ``2n`` products are spent (stderr 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .hvp import HessianOperator
from .lanczos import _check_int
from .protocol import BatchSizeFn, LossFn, ParamSelection
from .seeding import make_generator, rademacher

TRACE_METHODS = ("hutch++", "hutchinson")
MatMat = Callable[[Tensor], Tensor]


@dataclass
class TraceResult:
    """``estimate`` of ``tr H``, its ``stderr``, the products spent, and the per-probe values
    of the stochastic part (``samples``)."""
    estimate: float
    stderr: float
    n_hvp: int
    method: str
    samples: np.ndarray


def _apply(matmat: MatMat, rows: Tensor, chunk: int, bar) -> Tensor:
    """``H`` applied to the rows of ``rows``, ``chunk`` vectors per pass over the data."""
    out = []
    for piece in torch.split(rows, chunk):
        out.append(matmat(piece))
        bar.update(len(piece))
    return torch.cat(out)


def trace_estimate(matmat: MatMat, n: int, n_hvp: int, *, method: str = "hutch++",
                   seed: int = 0, like: Tensor, chunk: int = 8, progress: bool = False
                   ) -> TraceResult:
    """The estimators on any symmetric ``matmat`` (rows in, rows out) of size ``n``."""
    gen = make_generator(seed)
    sketch = min(n_hvp // 3, n) if method == "hutch++" else 0
    g = n_hvp - 2 * sketch if sketch < n else 0  # a full sketch makes the trace exact
    with tqdm(total=n_hvp, desc=method, disable=not progress, leave=False) as bar:
        exact, Q = 0.0, like.new_zeros(0, n)
        if sketch:
            S = rademacher((sketch, n), gen, like=like)
            Q = torch.linalg.qr(_apply(matmat, S, chunk, bar).T.to(torch.float64))[0].T.to(like)
            exact = float((Q.to(torch.float64) * _apply(matmat, Q, chunk, bar)).sum())
        G = rademacher((g, n), gen, like=like)
        G = G - (G @ Q.T) @ Q
        samples = (G.to(torch.float64) * _apply(matmat, G, chunk, bar)).sum(1).cpu().numpy()
    if g == 0:
        return TraceResult(exact, 0.0, 2 * sketch, method, samples)
    return TraceResult(exact + float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(g)),
                       2 * sketch + g, method, samples)


def hessian_trace(model: nn.Module, loss_fn: LossFn, data: Iterable, n_hvp: int = 99,
                  method: str = "hutch++", seed: int = 0, params: ParamSelection = None,
                  model_mode: str = "eval", batch_size_fn: BatchSizeFn | None = None,
                  progress: bool = True, chunk: int = 8, hvp_method: str = "reverse"
                  ) -> TraceResult:
    """An unbiased estimate of the Hessian trace from ``n_hvp`` Hessian-vector products.

    method: "hutch++" (default; needs ``n_hvp >= 4``) or "hutchinson" (``n_hvp >= 2``).
    chunk: probes per pass over the data (memory ``chunk * n`` per pass).
    Probes are Rademacher vectors drawn from ``seed`` (identical on every rank).
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    n_hvp = _check_int(n_hvp, "n_hvp", 4 if method == "hutch++" else 2)
    chunk = _check_int(chunk, "chunk", 1)
    make_generator(seed)
    op = HessianOperator(model, loss_fn, data, params=params, model_mode=model_mode,
                         batch_size_fn=batch_size_fn, hvp_method=hvp_method)
    with op:
        return trace_estimate(op.matmat, op.shape[0], n_hvp, method=method, seed=seed,
                              like=op.params[0].detach(), chunk=chunk, progress=progress)
