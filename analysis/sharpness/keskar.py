r"""Keskar et al.'s epsilon-sharpness.

Keskar et al. 2017, "On large-batch training for deep learning: generalization gap and sharp
minima", Metric 2.1:

$$\phi_{w}(\epsilon, A) = 100\, \frac{\max_{y \in C_\epsilon} L(w + A y) - L(w)}{1 + L(w)},
\qquad C_\epsilon = \{y : |y_i| \le \epsilon (|(A^{+} w)_i| + 1)\},$$

with $A = I$ (the full space) or an $n \times p$ matrix with orthonormal columns spanning a
random subspace ($A^{+} = A^\top$).

The maximisation is scipy's L-BFGS-B algorithm (Byrd et al. 1995, as scipy >= 1.15 runs it)
ported to torch in :func:`analysis.core.lbfgsb.lbfgsb`: one process gets scipy's iterates (up
to the order of summation). On a model sharded with FSDP2's ``fully_shard`` the objective runs
on this rank's local shards (:mod:`.perturbation`), and so does the solver: in the full space
$y$, the box, the gradient and the solver's $2m$ stored pairs are this rank's rows of the
objective's space (every inner product one all-reduce; the starting point is this rank's slice
of the one-process draw); in a random subspace, $A$ is held as this rank's rows (sliced from
the one-process draw, orthonormalised by the space's TSQR) and the solver works on the $p$
coordinates $y$, the same on every rank. No rank holds a full parameter-sized vector.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core import (BatchSizeFn, LossFn, ParamSelection, check_data, check_int, check_positive,
                    guarded, make_generator, preserved, rank, records_metadata, register_result,
                    renamed_keywords, select_params)
from ..core.lbfgsb import lbfgsb
from ..core.sharding import pieces_like
from ..core.space import ShardedSpace, Space
from .perturbation import perturbed_loss


@register_result(formerly=("analysis.flatness:KeskarSharpness",))
@dataclass
class KeskarSharpness:
    r"""Keskar et al. (2017) epsilon-sharpness $\phi_w(\epsilon, A)$ (module docstring).

    Attributes:
        value: The sharpness, in percent:
            $100 (\max_{y \in C_\epsilon} L(w + A y) - L(w)) / (1 + L(w))$.
        max_increase: $\max L - L(w)$ over the points evaluated.
        loss: $L(w)$.
        n_iter: L-BFGS-B iterations.
        n_forward: Per-batch forward passes.
        n_backward: Per-batch backward passes.
        subspace: The ``[n, p]`` orthonormal basis $A$ of the random subspace, a torch tensor
            (None: the full space); for a model sharded with ``fully_shard``, its ``p``
            columns as sharded vectors (lists of DTensors placed like the selected
            parameters, as ``top_eigenvalues``' eigenvectors).
        metadata: Seed, configuration and versions.
    """

    value: float
    max_increase: float
    loss: float
    n_iter: int
    n_forward: int
    n_backward: int
    subspace: Tensor | None = None
    metadata: dict = field(default_factory=dict)


def _gaussian_rows(space: Space, p: int, gen: torch.Generator, like: Tensor) -> Tensor:
    r"""This rank's ``[n_local, p]`` rows of the one-process draw ``randn((n, p))``."""
    wide = Space(space.n * p) if not space.sharded else ShardedSpace(
        space.n * p, [(a * p, b * p) for a, b in space.ranges], rank=space.rank,
        world=space.world)
    return wide.randn(1, gen, like=like)[0].view(space.n_local, p)


def _subspace(space: Space, subspace_dim: int | None, gen: torch.Generator, like: Tensor
              ) -> Tensor | None:
    r"""The orthonormal basis $A$ as ``[p, n_local]`` rows (QR of a seeded Gaussian), or None.

    The QR's signs are fixed (the diagonal of $R$ non-negative), so one process and the
    space's TSQR on shards give the same basis.
    """
    if subspace_dim is None:
        return None
    p = check_int("subspace_dim", subspace_dim, 1)
    if p > space.n:
        raise ValueError(f"subspace_dim must be at most the number of selected "
                         f"parameter elements ({space.n}), got {p}")
    Q, R = space.qr(_gaussian_rows(space, p, gen, like).T)
    signs = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q)
    return Q * signs[:, None]


def _coordinates(space: Space, basis: Tensor | None) -> tuple:
    r"""``(to_solver, from_solver, solver_space)``: the maps between a row of ``space`` and $y$.

    In a subspace $y \mapsto A y$ (local rows) and $g \mapsto A^\top g$ (one all-reduce), $y$
    in a one-process ``Space(p)``, the same on every rank; in the full space $y$ is a row of
    ``space`` itself (this rank's shard on a sharded model).
    """
    if basis is not None:
        return ((lambda g: space.sum(basis @ g)), (lambda y: basis.T @ y),
                Space(len(basis)))
    return (lambda g: g), (lambda y: y), space


@renamed_keywords(maxiter="max_iter")
@records_metadata
@guarded(sharded=True)
def keskar_sharpness(model: nn.Module, loss_fn: LossFn, data: Iterable, eps: float = 1e-3,
                     subspace_dim: int | None = None, *, seed: int = 0, max_iter: int = 10,
                     params: ParamSelection = None, model_mode: str = "eval",
                     batch_size_fn: BatchSizeFn | None = None,
                     progress: bool = True, check_deterministic: bool = True) -> KeskarSharpness:
    r"""Keskar et al. (2017), Metric 2.1: the largest loss increase over the box $C_\epsilon$.

    $$\phi_{w}(\epsilon, A) = 100\, \frac{\max_{y \in C_\epsilon} L(w + A y) - L(w)}{1 + L(w)}$$

    maximised with L-BFGS-B (scipy's algorithm in torch, :func:`analysis.core.lbfgsb.lbfgsb`).
    Full space (``subspace_dim=None``): $A = I$, the box $|\delta_i| \le \epsilon (|w_i| + 1)$.
    Random subspace of dimension $p$: $A$ has orthonormal columns (QR of a seeded Gaussian
    $n \times p$ matrix, the signs fixed by a non-negative diagonal of $R$, so
    $A^{+} = A^\top$); it costs $n p$ memory ($n p / W$ per rank on a ``fully_shard`` model
    over $W$ ranks, module docstring). The ascent starts at a seeded uniform point of the box
    (at a minimum the gradient at $y = 0$ vanishes), runs at most ``max_iter`` L-BFGS-B
    iterations (Keskar et al. used 10; scipy's defaults otherwise) in float64 with gradients
    from autograd, and the best point evaluated is reported ($y = 0$ included). The model is
    left exactly as it was.

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: A deterministic re-iterable of batches.
        eps: The box size $\epsilon > 0$.
        subspace_dim: The dimension $p$ of the random subspace (None: the full space).
        seed: Seed of the subspace and of the starting point.
        max_iter: The most L-BFGS-B iterations (>= 1; formerly ``maxiter``, still accepted
            for one release with a DeprecationWarning).
        params: The parameter selection.
        model_mode: "eval" or "train".
        batch_size_fn: ``batch -> int`` sample count (default: the leading dimension).
        progress: Show a progress bar (rank 0).
        check_deterministic: First check that two passes over ``data`` agree (two forward
            passes).

    Returns:
        A :class:`KeskarSharpness`.

    Raises:
        ValueError: An argument outside its range (``subspace_dim`` above the number of
            selected parameter elements included).
    """
    eps = check_positive("eps", eps)
    max_iter = check_int("max_iter", max_iter, 1)
    gen = make_generator(seed)
    check_data(data)
    _, chosen = select_params(model, params)
    with preserved(model, model_mode, weights=True, trainable=chosen):
        objective = perturbed_loss(model, loss_fn, data, chosen, batch_size_fn)
        w, space = objective.base, objective.space
        basis = _subspace(space, subspace_dim, gen, w)
        to_solver, from_solver, solver_space = _coordinates(space, basis)
        bound = (eps * (to_solver(w).abs() + 1)).double()
        y0 = solver_space.uniform(1, gen, like=bound)[0] * bound
        loss, _ = objective(None)
        best = [loss]

        def negative(y: Tensor) -> tuple[float, Tensor]:
            value, g = objective(from_solver(y.to(w)), grad=True)
            best[0] = max(best[0], value)
            return -value, -to_solver(g).to(y)

        bar = tqdm(total=max_iter, desc="keskar sharpness", leave=False,
                   disable=not progress or rank() != 0)
        result = lbfgsb(negative, y0, -bound, bound, solver_space, max_iter=max_iter,
                        callback=lambda *_: bar.update())
        bar.close()
    increase = best[0] - loss
    if basis is not None:
        basis = [pieces_like(a.clone(), chosen) for a in basis] if space.sharded \
            else basis.T.contiguous()
    return KeskarSharpness(100.0 * increase / (1.0 + loss), increase, loss, int(result.nit),
                           objective.n_forward, objective.n_backward, basis)
