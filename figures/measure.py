"""Measurements of a trained model.

Accuracy, Hessian quantities, per-vector update cosines and loss slices, built on the public
names of ``analysis`` and ``landscape``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from analysis import hessian_trace, top_eigenvalues, worst_case_sharpness
from landscape import line, plane, random_direction

SHARPNESS_RHO = 0.05


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float((model(x).argmax(dim=-1) == y).double().mean())
    finally:
        model.train(was_training)


def sharpness(model: nn.Module, loss_fn, data, size) -> dict:
    """Sharpness measures of ``model`` on ``data``.

    lambda_max (Lanczos), the Hessian trace (Hutch++) and the worst-case sharpness at rho 0.05,
    with the HVPs spent.
    """
    eig = top_eigenvalues(model, loss_fn, data, tol=1e-4, max_hvp=size.final_max_hvp, seed=0,
                          progress=False)
    tr = hessian_trace(model, loss_fn, data, n_hvp=size.trace_n_hvp, seed=0, progress=False)
    wc = worst_case_sharpness(model, loss_fn, data, rho=SHARPNESS_RHO,
                              steps=size.sharpness_steps, seed=0, progress=False)
    return {"lambda_max": float(eig.eigenvalues[0]), "trace": float(tr.estimate),
            "worst_case_sharpness": float(wc.value), "n_hvp": int(eig.n_hvp) + int(tr.n_hvp)}


def _momentum(opt, p: torch.Tensor) -> torch.Tensor | None:
    state = opt.state.get(p, {})
    return state.get("exp_avg", state.get("momentum_buffer"))


def vector_cosine(model: nn.Module, opt, before: list[torch.Tensor], *,
                  tangent: bool = False) -> float:
    r"""The mean per-vector cosine between a step and minus the momentum.

    For every weight vector (row of a tensor with ndim >= 2) with step $s = w - w_0$ and
    momentum $m$ (``exp_avg`` or ``momentum_buffer``), $\cos(s, -m)$; with ``tangent`` both
    are first projected on the tangent space of the sphere at $w_0$,
    $P = I - u u^\top$, $u = w_0 / \lVert w_0 \rVert$: the part of the step that changes the
    vector's direction, which is all that matters to a vector followed by BatchNorm (and all
    that ND-Adam's renormalisation leaves, Zhang et al. 2017, Sec. 3).

    Args:
        model: the model after the step.
        opt: the optimizer that took it.
        before: the parameters before the step, in ``model.parameters()`` order.
        tangent: project on the tangent space at ``before`` first.

    Returns:
        The mean cosine over vectors with a nonzero step and momentum (NaN if none): 1 when
        each vector moves along its momentum.
    """
    cosines = []
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            m = _momentum(opt, p)
            if p.dim() < 2 or m is None:
                continue
            step, m = (p - b).reshape(len(p), -1).double(), m.reshape(len(p), -1).double()
            if tangent:
                u = b.reshape(len(p), -1).double()
                u = u / u.norm(dim=1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
                step = step - (step * u).sum(dim=1, keepdim=True) * u
                m = m - (m * u).sum(dim=1, keepdim=True) * u
            denom = step.norm(dim=1) * m.norm(dim=1)
            keep = denom > 0
            cosines.append(-(step * m).sum(dim=1)[keep] / denom[keep])
    return float(torch.cat(cosines).mean()) if cosines else float("nan")


def slices(model: nn.Module, loss_fn, data, size, seed: int = 0) -> dict[str, np.ndarray]:
    """1D and 2D filter-normalised random slices of the loss around ``model``'s weights."""
    d1 = random_direction(model, normalization="filter", seed=seed)
    d2 = random_direction(model, normalization="filter", seed=seed + 1)
    alphas = np.linspace(-1.0, 1.0, size.line_points)
    grid = np.linspace(-1.0, 1.0, size.grid)
    ln = line(model, loss_fn, data, d1, alphas, progress=False)
    pl = plane(model, loss_fn, data, d1, d2, grid, grid, progress=False)
    return {"line_alphas": np.asarray(ln.alphas), "line_losses": np.asarray(ln.losses),
            "plane_xs": np.asarray(pl.xs), "plane_ys": np.asarray(pl.ys),
            "plane_losses": np.asarray(pl.losses)}
