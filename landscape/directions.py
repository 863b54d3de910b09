"""Directions in weight space: random (filter/layer-normalised), updates, Hessian eigenvectors.

A direction is a dict from a parameter (or floating buffer) name to a tensor of the same
shape. The helpers here return :class:`Direction`, a dict that also carries ``info`` (how it
was made: seed, normalisation, ...), which surfaces copy into their saved metadata.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from analysis import top_eigenvalues
from analysis.core import all_reduce_max_, as_sharded, is_dtensor, local_like
from analysis.core import (all_finite, BatchSizeFn, check_bool, check_choice, guarded, LossFn,
                           make_generator, ParamSelection, randn, register_result, select_params,
                           unflatten)
from analysis.sharded import sharded_space

NORMALIZATIONS = ("filter", "layer", "none")


@register_result
class Direction(dict):
    """``dict`` name -> tensor, plus ``info`` describing how it was made.

    Args:
        tensors: name -> tensor of the parameter's (or floating buffer's) shape.
        info: how it was made (kind, seed, normalisation, ...); surfaces copy it into their
            metadata.
    """

    def __init__(self, tensors: Mapping[str, Tensor], info: Mapping[str, Any] | None = None):
        super().__init__(tensors)
        self.info = dict(info or {})


def named_targets(model: nn.Module) -> dict[str, Tensor]:
    """Everything a direction may move: parameters and floating-point buffers.

    Args:
        model: the model.

    Returns:
        name -> tensor (the model's own tensors, not copies), buffers first.
    """
    out = {n: b for n, b in model.named_buffers() if b.is_floating_point()}
    out.update(dict(model.named_parameters()))
    return out


def state_buffers(model: nn.Module) -> list[str]:
    """Names of the floating buffers a state_dict holds.

    BatchNorm statistics; not the non-persistent ones such as rotary-embedding frequencies,
    which are recomputed.

    Args:
        model: the model.

    Returns:
        The buffers' names, in ``named_buffers`` order.
    """
    state = model.state_dict(keep_vars=True)
    return [n for n, b in model.named_buffers() if b.is_floating_point() and n in state]


def check_direction(model: nn.Module, direction: Mapping[str, Tensor], argname: str = "direction"
                    ) -> dict[str, Tensor]:
    """Validate ``direction`` against ``model``; return it detached, on the model's device/dtype.

    Keys must name parameters (or floating buffers, e.g. BatchNorm running statistics) and
    shapes must match. Names the direction leaves out stay fixed.

    Args:
        model: the model the direction moves.
        direction: name -> floating-point tensor.
        argname: the argument's name, for the error messages.

    Returns:
        name -> detached tensor on the model's tensor's device and dtype.

    Raises:
        ValueError: ``direction`` is not a non-empty dict of finite floating-point tensors
            naming the model's parameters or floating buffers with their shapes.
    """
    if not isinstance(direction, Mapping):
        raise ValueError(f"{argname} must be a dict from parameter name to tensor, "
                         f"got {type(direction).__name__}")
    if not direction:
        raise ValueError(f"{argname} is empty: it must name at least one parameter")
    targets = named_targets(model)
    unknown = [k for k in direction if k not in targets]
    if unknown:
        known = list(dict(model.named_parameters()))[:5]
        raise ValueError(f"{argname} has keys that are not parameters or floating buffers of the "
                         f"model: {unknown[:5]}; model parameters: {known}...")
    out = {}
    for name, t in direction.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{argname}[{name!r}] must be a floating-point tensor")
        if t.shape != targets[name].shape:
            raise ValueError(f"{argname}[{name!r}] has shape {tuple(t.shape)}, but the model's "
                             f"tensor has shape {tuple(targets[name].shape)}")
        if not _finite(t):  # the same verdict on every rank
            raise ValueError(f"{argname}[{name!r}] must be finite (it holds NaN or inf)")
        # on a fully_shard model: a DTensor placed like the parameter (a full tensor is sharded)
        out[name] = as_sharded(t, targets[name]) if is_dtensor(targets[name]) else \
            t.detach().to(targets[name])
    return out


def _finite(t: Tensor) -> bool:
    """:func:`all_finite` of a tensor, or of a DTensor's shards on all ranks (one all-reduce)."""
    if not is_dtensor(t):
        return all_finite(t)
    bad = torch.tensor([0.0 if all_finite(t.detach().to_local()) else 1.0])
    all_reduce_max_([bad])
    return not bad.item()


def normalize_(direction: Tensor, weight: Tensor, normalization: str,
               space: Any = None) -> Tensor:
    r"""Rescale ``direction`` in place to the scale of ``weight`` (Li et al. 2018, Sec. 4).

    "filter": each slice along dim 0 (a conv filter, a Linear row) gets the norm of the matching
    slice of ``weight`` (filter-wise normalisation, Li et al. 2018, Sec. 4):

    $$d_{i,j} \leftarrow \frac{d_{i,j}}{\|d_{i,j}\|} \, \|w_{i,j}\|,$$

    with $d_{i,j}$, $w_{i,j}$ the $j$-th filter of tensor $i$; 1-D tensors are one filter.
    "layer": the whole tensor gets the norm of ``weight``,
    $d_i \leftarrow d_i \|w_i\| / \|d_i\|$. "none": unchanged. A zero slice of ``direction``
    stays zero.

    On a model sharded with ``fully_shard``, ``direction`` and ``weight`` may be a rank's local
    shards (``Shard(0)``: whole filters) with ``space`` the tensor's
    :func:`analysis.sharded.sharded_space`, which all-reduces the whole-tensor norms.

    Args:
        direction: the direction's tensor, rescaled in place.
        weight: the model's tensor of the same shape.
        normalization: "filter", "layer" or "none".
        space: None (whole tensors), or the ``analysis.core.space.ShardedSpace`` of the local
            shards given.

    Returns:
        ``direction``.
    """
    if normalization == "none":
        return direction
    if normalization == "filter" and direction.dim() > 1:
        if direction.numel():  # (an empty shard has no filter)
            d, w = direction.view(len(direction), -1), weight.reshape(len(weight), -1)
            dn, wn = d.norm(dim=1, keepdim=True), w.norm(dim=1, keepdim=True)
            d.mul_(torch.where(dn > 0, wn / dn.clamp_min(torch.finfo(dn.dtype).tiny), 0.0))
        return direction
    if space is None:
        dn, wn = direction.norm(), weight.norm()
    else:
        dn, wn = space.norm(direction), space.norm(weight)
    return direction.mul_(wn / dn if dn > 0 else 0.0)


def random_direction(model: nn.Module, normalization: str = "filter", ignore_bias_bn: bool = True,
                     seed: int = 0, *, params: ParamSelection = None) -> Direction:
    r"""A Gaussian direction over the parameters, normalised to the weights' scale.

    With filter normalisation (Li et al. 2018, Sec. 4), each filter (a convolution's output
    channel, a Linear row) of the Gaussian draw $d$ gets the norm of the model's filter:

    $$d_{i,j} \leftarrow \frac{d_{i,j}}{\|d_{i,j}\|} \, \|w_{i,j}\|,$$

    so a plot along $d$ is comparable between models whose weights differ in scale.

    On a model sharded with ``fully_shard`` each rank draws its shard's slice of the
    one-process draw and normalises it on the shard (filters are never split; a whole-tensor
    norm is all-reduced): the direction is the one-process direction, as DTensors placed like
    the parameters, and no rank holds a whole parameter.

    Args:
        model: the model (only read).
        normalization: "filter" (each filter/row of d rescaled to the norm of the matching
            filter/row of w, see :func:`normalize_`), "layer" (whole tensor), or "none" (plain
            N(0, 1) entries).
        ignore_bias_bn: 1-D parameters (biases, BatchNorm weights) get a zero direction, as in
            Li et al.'s plots. (:func:`landscape.pca_directions` keeps ``False`` as its
            default; see there why.)
        seed: draws come from a private generator on the CPU (same on every device and rank).
        params: which parameters get a direction (default: all with requires_grad).

    Returns:
        The :class:`Direction`; its ``info`` holds the seed and the options.

    Raises:
        ValueError: ``normalization`` is not one of ``NORMALIZATIONS``.
        ArgumentTypeError: ``ignore_bias_bn`` is not a bool.
    """
    check_choice("normalization", normalization, NORMALIZATIONS)
    ignore_bias_bn = check_bool("ignore_bias_bn", ignore_bias_bn)
    gen = make_generator(seed)
    names, tensors = select_params(model, params)
    out = {}
    for name, p in zip(names, tensors):
        # a fully_shard model's parameter: its local shard, drawn and normalised on the shard
        space = sharded_space([p]) if is_dtensor(p) else None
        w = p.detach().to_local() if space is not None else p.detach()
        d = randn(w.shape, gen, like=w) if space is None else \
            space.randn(1, gen, like=w)[0].view(w.shape)
        if ignore_bias_bn and p.dim() <= 1:
            d.zero_()
        d = normalize_(d, w, normalization, space)
        out[name] = local_like(d, p) if space is not None else d
    return Direction(out, {"kind": "random", "seed": seed, "normalization": normalization,
                           "ignore_bias_bn": ignore_bias_bn})


def load_state(source: Mapping[str, Tensor] | str | os.PathLike) -> Mapping[str, Tensor]:
    """A state_dict, given directly or as a checkpoint path (``torch.load(weights_only=True)``).

    A checkpoint holding ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped.

    Args:
        source: a state_dict (any mapping of tensors) or the path of a checkpoint.

    Returns:
        The state_dict.

    Raises:
        ValueError: ``source`` (or the loaded checkpoint) is not a mapping.
    """
    if isinstance(source, (str, os.PathLike)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(source, Mapping):
        raise ValueError(f"expected a state_dict or a checkpoint path, got {type(source).__name__}")
    for key in ("state_dict", "model"):
        if key in source and isinstance(source[key], Mapping):
            return source[key]
    return source


def state_tensors(model: nn.Module, source, names: list[str], argname: str = "checkpoint"
                  ) -> dict[str, Tensor]:
    """The tensors ``names`` of a state_dict or checkpoint, on the model's device and dtype.

    Args:
        model: the model whose tensors they replace.
        source: a state_dict or a checkpoint path (:func:`load_state`).
        names: the tensors to read.
        argname: the source's name in the error messages.

    Returns:
        name -> tensor, validated by :func:`check_direction`.

    Raises:
        ValueError: the source lacks one of ``names`` or holds a tensor of another shape.
    """
    state = load_state(source)
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"{argname} lacks tensors of the model: {missing[:5]}")
    return check_direction(model, {n: state[n] for n in names}, argname)


def update_direction(start, end, model: nn.Module, *, params: ParamSelection = None,
                     buffers: bool = False) -> Direction:
    """``end - start`` over the model's parameters: the update between two checkpoints.

    Args:
        start: the first checkpoint, a state_dict or a checkpoint path.
        end: the second checkpoint, the same.
        model: a model of their architecture (only read).
        params: the parameters the direction covers (default: all with requires_grad).
        buffers: also include floating buffers (BatchNorm running statistics), as Li et al.'s
            ``dir_type="states"`` does.

    Returns:
        The :class:`Direction` ``end - start``.

    Raises:
        ValueError: a checkpoint lacks a tensor or holds one of another shape.
    """
    names, _ = select_params(model, params)
    if check_bool("buffers", buffers):
        names += state_buffers(model)
    a, b = state_tensors(model, start, names, "start"), state_tensors(model, end, names, "end")
    return Direction({n: b[n] - a[n] for n in names}, {"kind": "update", "buffers": buffers})


@guarded(sharded=True)
def eigenvector_directions(model: nn.Module, loss_fn: LossFn, data, k: int = 2, *,
                           params: ParamSelection = None, model_mode: str = "eval",
                           batch_size_fn: BatchSizeFn | None = None, seed: int = 0,
                           progress: bool = True, which: str = "LA", tol: float = 1e-6,
                           max_hvp: int | None = None, check_deterministic: bool = True
                           ) -> list[Direction]:
    """Unit directions along the top-``k`` Hessian eigenvectors (``analysis.top_eigenvalues``).

    Each Direction's ``info`` holds its eigenvalue (so the second difference of ``line``
    along it at 0 is that eigenvalue); ``info["converged"]`` says whether the eigenpairs met
    ``tol``.

    Args:
        model: the model (left as found).
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: the iterable of batches.
        k: the number of directions.
        params: the parameters the directions cover (default: all with requires_grad).
        model_mode: "eval" or "train", the mode during the products.
        batch_size_fn: the sample count of a batch (default: the leading dimension).
        seed: the seed of the eigensolver's start vectors.
        progress: show a progress bar.
        which: "LA" (largest algebraic) or another mode of ``top_eigenvalues``.
        tol: the eigensolver's tolerance.
        max_hvp: the most Hessian-vector products (``top_eigenvalues``'s budget; None: its
            default).
        check_deterministic: first check that two passes over ``data`` agree.

    Returns:
        ``k`` :class:`Direction` dicts of unit norm over the selected parameters.

    Raises:
        ValueError: as :func:`analysis.top_eigenvalues`.
    """
    res = top_eigenvalues(model, loss_fn, data, k, which, tol, max_hvp, params=params,
                          model_mode=model_mode, batch_size_fn=batch_size_fn, seed=seed,
                          progress=progress)
    named = dict(model.named_parameters())
    like = [named[n].detach() for n in res.names]
    out = []
    for i, (value, row) in enumerate(zip(res.eigenvalues, res.eigenvectors)):
        # a fully_shard model's eigenvectors are DTensors placed like the parameters already
        chunks = row if isinstance(row, list) else unflatten(row.detach(), like)
        out.append(Direction({n: c.to(t) for n, c, t in zip(res.names, chunks, like)},
                             {"kind": "hessian_eigenvector", "index": i, "eigenvalue": float(value),
                              "which": which,
                              "converged": bool(res.converged)}))
    return out
