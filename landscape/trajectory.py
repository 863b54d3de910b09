"""PCA directions of a training trajectory and its projection onto them (Li et al. 2018, Sec. 7)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from analysis.core import (check_bool, check_choice, check_int, flatten, ParamSelection,
                           records_metadata, register_result, select_params)

from analysis.core import (all_reduce_max_, all_reduce_sum_, is_dtensor, is_sharded, local_like,
                           rank, world_size)

from .directions import Direction, named_targets, check_direction, state_tensors

METHODS = ("auto", "svd", "gram")


@register_result
@dataclass
class PCAResult:
    r"""Top principal directions of a trajectory (unit norm, orthogonal) and the path on them.

    Iterating yields directions, so ``d1, d2 = pca_directions(...)`` works.

    Attributes:
        directions: :class:`Direction` dicts of torch tensors (to pass to ``plane``).
        explained_variance: $\sigma_k^2 / (T - 1)$ per direction, as in sklearn's PCA.
        explained_variance_ratio: its share of the total over all $T - 1$ components.
        coords: [T, n]; ``coords[t]`` are the coordinates of checkpoint t on the directions,
            relative to the model's weights (the origin of a ``plane`` along them).
        n_forward: 0 (PCA evaluates no loss).
        metadata: seed, config and versions (``analysis.core.records_metadata``).
    """
    directions: list[Direction]
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    coords: np.ndarray

    def __iter__(self) -> Iterator[Direction]:
        return iter(self.directions)

    def __len__(self) -> int:
        return len(self.directions)
    n_forward: int = 0
    metadata: dict = field(default_factory=dict)


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a plain tensor as it is), detached."""
    return t.detach().to_local() if is_dtensor(t) else t.detach()


def _matrix(trajectory: Sequence, model: nn.Module, names: list[str], like: list[Tensor]) -> Tensor:
    """[T, P] float64 matrix of the flattened checkpoints (state_dicts or checkpoint paths).

    For a ``fully_shard`` model, [T, P_local]: the concatenated local shards of each
    checkpoint (a full tensor in a checkpoint is sharded like its parameter first).
    """
    if isinstance(trajectory, (str, bytes, Mapping)) or len(trajectory) == 0:
        raise ValueError("trajectory must be a non-empty list of state_dicts or checkpoint paths")
    rows = []
    device = _local(like[0]).device
    for item in trajectory:
        t = state_tensors(model, item, names)
        rows.append(flatten([_local(t[n]).to(device, torch.float64) for n in names]))
    return torch.stack(rows)


def _mask(names: list[str], like: list[Tensor], ignore_bias_bn: bool) -> Tensor:
    """1 for each flat entry the PCA sees, 0 for the 1-D tensors' with ``ignore_bias_bn``."""
    return flatten([torch.full((t.numel(),), float(not (ignore_bias_bn and t.dim() <= 1)),
                               dtype=torch.float64, device=t.device) for t in like])


def _check_moves(var: Tensor, n: int, theta: Tensor, P: int | None = None,
                 top: float | None = None) -> None:
    """Refuse a trajectory that moves in fewer than ``n`` directions.

    A component carries no
    direction (its vector would be rounding noise) when its variance ``sigma^2`` is below
    the rounding level of the centring, ``(10 eps sqrt(T P) max |theta|)^2``, or of the Gram
    eigenvalues, ``10 T eps sigma_1^2`` (the same rule for both methods). ``P`` and ``top``
    (``max |theta|``) override ``theta``'s for a sharded model's local matrix.
    """
    T, P = theta.shape[0], theta.shape[1] if P is None else P
    top = float(theta.abs().max()) if top is None else top
    eps = torch.finfo(theta.dtype).eps
    floor = max((10 * eps * math.sqrt(T * P) * top) ** 2,
                10 * T * eps * float(var[0]))
    rank = int((var > floor).sum())
    if rank == 0:
        raise ValueError("trajectory does not move: its checkpoints are identical on the "
                         "selected parameters (up to rounding), so it has no principal direction")
    if n > rank:
        raise ValueError(f"n must be <= {rank}: the trajectory moves in only {rank} "
                         f"direction(s) (up to rounding), got {n}")


@records_metadata
def pca_directions(trajectory: Sequence, model: nn.Module, n: int = 2, *,
                   params: ParamSelection = None, ignore_bias_bn: bool = False,
                   method: str = "auto") -> PCAResult:
    r"""The ``n`` principal directions of the checkpoints ``trajectory`` around their mean.

    Li et al. 2018, Sec. 7: the rows of the centred matrix $M = [\theta_t - \bar\theta]_t$
    ([T, P]) are decomposed, $M = U \Sigma V^\top$, and the directions are the first ``n``
    rows of $V^\top$, with explained variance $\sigma_k^2 / (T - 1)$ (sklearn's convention;
    its ratio is over all $T - 1$ components). The sign of each direction makes its
    largest-magnitude entry positive.

    ``ignore_bias_bn`` defaults to False, unlike :func:`landscape.random_direction`'s True (fixed
    by the API contract): Li et al.'s trajectory code also includes the 1-D tensors unless
    asked (``--ignore biasbn``), the directions then follow the whole trajectory, and
    switching the default would silently change the directions of every existing call.
    Pass ``ignore_bias_bn=True`` to leave biases and BatchNorm out, as Li et al.'s random
    directions do.

    Args:
        trajectory: a list of state_dicts or checkpoint paths (loaded with weights_only=True).
        model: a model of their architecture; its weights are the origin of ``coords``.
        n: the number of directions, at most ``len(trajectory) - 1`` and the number of
            parameters.
        params: the parameters the directions cover (default: all with requires_grad).
        ignore_bias_bn: zero the 1-D tensors' (biases', BatchNorm's) entries first.
        method: "svd" of $M$, or "gram": eigendecomposition of the T x T matrix $M M^\top$
            with directions $M^\top u / \sigma$ (cheaper when T << P); "auto" picks "gram"
            when T < P.

    Returns:
        The :class:`PCAResult`.

    A model sharded with FSDP2's ``fully_shard``: the checkpoints are sharded state_dicts
    (DTensors, e.g. ``model.state_dict()``) or full tensors, each rank keeping only its shards;
    the "gram" method runs on them (the Gram matrix $M M^\top$ is a local product plus one
    all-reduce, so no rank holds a full-length vector; "auto" picks it whatever $T$ and $P$),
    and the directions come back as DTensors placed like the parameters (``full_tensor()``
    gives the unsharded ones), the same on every rank as one process's.

    Raises:
        ValueError: an empty trajectory, a checkpoint that lacks a tensor, ``n`` outside its
            range, a trajectory that moves in fewer than ``n`` directions (up to rounding), an
            unknown ``method``, or ``method="svd"`` on a sharded model.
    """
    check_choice("method", method, METHODS)
    ignore_bias_bn = check_bool("ignore_bias_bn", ignore_bias_bn)
    names, like = select_params(model, params)
    like = [p.detach() for p in like]
    if is_sharded(model):
        return _sharded_pca(trajectory, model, n, names, like, ignore_bias_bn, method)
    theta = _matrix(trajectory, model, names, like)
    T, P = theta.shape
    n = check_int("n", n, 1, min(T - 1, P))  # at most len(trajectory) - 1 and n_params
    m = (theta - theta.mean(dim=0)) * _mask(names, like, ignore_bias_bn)
    if method == "svd" or (method == "auto" and T >= P):
        _, s, vh = torch.linalg.svd(m, full_matrices=False)
        var, vecs = s ** 2, vh
    else:
        lam, u = torch.linalg.eigh(m @ m.T)
        var, u = lam.flip(0).clamp_min(0), u.flip(1)
        vecs = None
    _check_moves(var, n, theta)
    if vecs is None:
        vecs = m.T @ u[:, :n] / var[:n].sqrt()
        vecs = vecs.T
    vecs = vecs[:n]
    idx = vecs.abs().argmax(dim=1)
    vecs = vecs * torch.sign(vecs.gather(1, idx[:, None]))
    dirs = []
    for k, v in enumerate(vecs):
        parts = torch.split(v, [t.numel() for t in like])
        tensors = {name: c.reshape(t.shape).to(t) for name, c, t in zip(names, parts, like)}
        dirs.append(Direction(tensors, {"kind": "pca", "index": k}))
    total = float(var.sum())
    explained = (var[:n] / (T - 1)).cpu().numpy()
    ratio = (var[:n] / total).cpu().numpy() if total > 0 else np.zeros(n)
    return PCAResult(dirs, explained, ratio, project_trajectory(trajectory, model, dirs))


def project_trajectory(trajectory: Sequence, model: nn.Module,
                       directions: Sequence[Mapping[str, Tensor]]) -> np.ndarray:
    r"""Coordinates [T, k] of each checkpoint minus the model's weights on ``directions``.

    The least-squares coordinates $c_t = \arg\min_c \|\theta_t - w - \sum_k c_k d_k\|$
    (the exact projection also for directions that are not orthogonal, e.g. two random ones).

    Args:
        trajectory: a list of state_dicts or checkpoint paths.
        model: a model of their architecture; its weights are the origin $w$.
        directions: the directions $d_k$ (dicts name -> tensor).

    Returns:
        The coordinates, a [T, k] numpy array.

    A model sharded with FSDP2's ``fully_shard``: the checkpoints are sharded state_dicts
    (DTensors) or full tensors, the directions DTensors placed like the parameters (or full
    tensors); the coordinates solve the normal equations $(B^\top B) c_t = B^\top
    (\theta_t - w)$, whose $k \times k$ and $k \times T$ matrices are local dots plus one
    all-reduce (no rank holds a full-length vector), the same on every rank.

    Raises:
        ValueError: an invalid direction, or a checkpoint that lacks a tensor.
    """
    dirs = [check_direction(model, d, f"directions[{k}]") for k, d in enumerate(directions)]
    names = list(dict.fromkeys(n for d in dirs for n in d))
    targets = named_targets(model)
    like = [targets[n].detach() for n in names]
    theta = _matrix(trajectory, model, names, like)
    if is_sharded(model):
        return _sharded_projection(theta, names, like, dirs)
    w = flatten([t.to(torch.float64) for t in like])
    basis = torch.stack([flatten([d.get(n, torch.zeros_like(t)).to(torch.float64)
                                  for n, t in zip(names, like)]) for d in dirs], dim=1)
    coords = torch.linalg.lstsq(basis, (theta - w).T).solution.T
    return coords.cpu().numpy()


def _sharded_pca(trajectory: Sequence, model: nn.Module, n: int, names: list[str],
                 like: list[Tensor], ignore_bias_bn: bool, method: str) -> PCAResult:
    """:func:`pca_directions` of a ``fully_shard`` model, by the Gram method on local shards."""
    if method == "svd":
        raise ValueError('method="svd" needs every checkpoint whole on one rank; a model sharded '
                         'with fully_shard uses method="gram" (or "auto")')
    theta = _matrix(trajectory, model, names, like)
    T, P = theta.shape[0], sum(p.numel() for p in like)
    n = check_int("n", n, 1, min(T - 1, P))
    local = [_local(p) for p in like]
    m = (theta - theta.mean(dim=0)) * _mask(names, local, ignore_bias_bn)
    gram = m @ m.T
    top = (theta.abs().amax() if theta.numel() else theta.new_zeros(())).reshape(1).cpu()
    all_reduce_sum_([gram])
    all_reduce_max_([top])
    lam, u = torch.linalg.eigh(gram)
    var, u = lam.flip(0).clamp_min(0), u.flip(1)
    _check_moves(var, n, theta, P, float(top))
    vecs = (m.T @ u[:, :n] / var[:n].sqrt()).T
    vecs = vecs * _global_signs(vecs, [t.numel() for t in local])[:, None]
    dirs = []
    for k, v in enumerate(vecs):
        parts = torch.split(v, [t.numel() for t in local])
        tensors = {name: local_like(c.reshape(t.shape).to(t), p)
                   for name, c, t, p in zip(names, parts, local, like)}
        dirs.append(Direction(tensors, {"kind": "pca", "index": k}))
    total = float(var.sum())
    explained = (var[:n] / (T - 1)).cpu().numpy()
    ratio = (var[:n] / total).cpu().numpy() if total > 0 else np.zeros(n)
    return PCAResult(dirs, explained, ratio, project_trajectory(trajectory, model, dirs))


def _global_signs(vecs: Tensor, sizes: list[int]) -> Tensor:
    """The sign of each row's largest-magnitude entry over all ranks' shards.

    The first such entry in the unsharded flat order, as one process's ``argmax``: FSDP2
    shards each parameter along dim 0 in rank order, so that order is parameter by
    parameter, then rank by rank. Each rank fills its column of a table (the others' are
    zero), summed in one all-reduce; every rank gets the same signs.
    """
    k, me = len(vecs), rank()
    table = torch.zeros(2, k, len(sizes), world_size(), dtype=torch.float64)  # |max|, value
    for i, piece in enumerate(torch.split(vecs, sizes, dim=1)):
        if piece.shape[1] == 0:  # an empty shard: below every entry
            table[0, :, i, me] = -1.0
            continue
        value = piece.gather(1, piece.abs().argmax(dim=1)[:, None])[:, 0].cpu()
        table[0, :, i, me], table[1, :, i, me] = value.abs(), value
    all_reduce_sum_([table])
    size, value = table[0].reshape(k, -1), table[1].reshape(k, -1)
    first = (size == size.max(dim=1, keepdim=True).values).to(torch.int8).argmax(dim=1)
    return torch.sign(value.gather(1, first[:, None])[:, 0]).to(vecs)


def _sharded_projection(theta: Tensor, names: list[str], like: list[Tensor],
                        dirs: list[dict[str, Tensor]]) -> np.ndarray:
    """:func:`project_trajectory` of a ``fully_shard`` model by the normal equations."""
    w = flatten([_local(t).to(torch.float64) for t in like])
    basis = torch.stack([flatten([_local(d[n]).to(torch.float64) if n in d else
                                  torch.zeros_like(_local(t), dtype=torch.float64)
                                  for n, t in zip(names, like)]) for d in dirs], dim=1)
    normal, rhs = basis.T @ basis, basis.T @ (theta - w).T
    all_reduce_sum_([normal, rhs])
    coords = torch.linalg.lstsq(normal, rhs).solution.T
    return coords.cpu().numpy()
