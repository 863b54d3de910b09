r"""Per-block curvature: the top eigenvalue and the trace of each diagonal Hessian block.

For a partition of the parameters into blocks $\theta = (\theta_1, \dots, \theta_B)$, block
$i$ is the diagonal block $A_{ii}$ of the curvature matrix ($\partial^2 L / \partial \theta_i^2$
for the Hessian), so $\sum_i \mathrm{tr}\, A_{ii} = \mathrm{tr}\, A$, while
$\lambda_{\max}(A_{ii}) \le \lambda_{\max}(A)$ (Cauchy interlacing).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
from torch import Tensor, nn
from tqdm.auto import tqdm

from .lanczos import top_eigenvalues
from .core import (ArgumentTypeError, BatchSizeFn, guarded, LossFn, ParamSelection,
                   records_metadata, register_result, select_params, unflatten)
from .finite_difference import merge_records
from .preconditioning import Preconditioner, per_parameter
from .trace import hessian_trace

Groups = dict[str, list[str] | Callable[[str, nn.Parameter], bool]]


@register_result
@dataclass
class LayerwiseResult:
    """Per-block curvature, one entry per block, in block order.

    Attributes:
        blocks: The block names.
        params: ``{block: parameter names}``.
        n_params: Elements per block.
        top_eigenvalue: The largest eigenvalue of the block alone.
        trace: The block's trace estimate; they sum to the full trace (diagonal blocks).
        trace_stderr: Its standard error.
        converged: Whether Lanczos met ``tol`` for the block.
        n_hvp: Products spent over all blocks.
        curvature: The registered name of the matrix (``curvature=``).
        preconditioned: Whether it is $P^{-1/2} A P^{-1/2}$.
        metadata: Seed, configuration and versions (:func:`analysis.core.make_metadata`).
    """
    blocks: list[str]
    params: dict[str, list[str]]
    n_params: np.ndarray
    top_eigenvalue: np.ndarray
    trace: np.ndarray
    trace_stderr: np.ndarray
    converged: np.ndarray
    n_hvp: int
    curvature: str = "hessian"
    preconditioned: bool = False

    def as_dict(self) -> dict[str, dict[str, float]]:
        """The result per block.

        Returns:
            ``{block: {"top_eigenvalue", "trace", "trace_stderr", "n_params"}}``.
        """
        return {b: {"top_eigenvalue": float(e), "trace": float(t), "trace_stderr": float(s),
                    "n_params": int(p)}
                for b, e, t, s, p in zip(self.blocks, self.top_eigenvalue, self.trace,
                                         self.trace_stderr, self.n_params)}
    metadata: dict = field(default_factory=dict)


def default_groups(model: nn.Module) -> dict[str, list[str]]:
    """One block per module, the default ``groups`` of :func:`layerwise`.

    Parameters are grouped by their name without the last component (``"0.weight"`` and
    ``"0.bias"`` form block ``"0"``), trainable parameters only.

    Args:
        model: The model.

    Returns:
        ``{block name: parameter names}``.
    """
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return groups


@records_metadata
@guarded(sharded=True)
def layerwise(model: nn.Module, loss_fn: LossFn, data: Iterable, groups: Groups | None = None, *,
              params: ParamSelection = None, model_mode: str = "eval",
              batch_size_fn: BatchSizeFn | None = None, seed: int = 0, progress: bool = True,
              tol: float = 1e-6, n_hvp_trace: int = 99, trace_method: str = "hutch++",
              hvp_method: str = "reverse", curvature: str = "hessian",
              preconditioner: Preconditioner = None, check_deterministic: bool = True,
              fd_richardson: bool = False) -> LayerwiseResult:
    r"""Top eigenvalue and trace of each diagonal block of the curvature (module docstring).

    Per block, :func:`~analysis.top_eigenvalues` (Lanczos, ``tol``) and
    :func:`~analysis.hessian_trace` (``trace_method`` with ``n_hvp_trace`` products; exact, with
    $2 \cdot size$ products, for blocks of at most ``n_hvp_trace // 3`` parameters). A model
    sharded with FSDP2's ``fully_shard`` is analysed block by block on its shards, as those
    routines analyse it (each rank passing its data shard; every rank gets the one-process
    answer).

    Args:
        model: The model (restored afterwards).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the batch's mean loss.
        data: An iterable of batches.
        groups: ``{block name: parameter names or predicate}``; default
            :func:`default_groups`.
        params: The parameters analysed (default all with requires_grad); blocks keep only
            these, and blocks left empty are dropped.
        model_mode: ``"eval"`` or ``"train"``, the mode during the products.
        batch_size_fn: Sample count of a batch.
        seed: Seed of the Lanczos starts and the trace probes.
        progress: Show a bar over the blocks.
        tol: Lanczos tolerance (as :func:`analysis.top_eigenvalues`).
        n_hvp_trace: Products per block's trace (as ``n_hvp`` of
            :func:`analysis.hessian_trace`).
        trace_method: "hutch++", "hutchinson" or "xtrace".
        hvp_method: ``"reverse"``, ``"forward"`` or ``"finite_difference"`` (the Hessian
            only; as in :func:`analysis.top_eigenvalues`).
        curvature: A registered name (as in :func:`analysis.top_eigenvalues`).
        preconditioner: As in :func:`analysis.top_eigenvalues`, each block using its part of
            $P$ (a flat $P$ runs over the parameters ``params`` selects).
        check_deterministic: Check once that two passes over ``data`` agree (two forward
            passes).
        fd_richardson: With ``hvp_method="finite_difference"``, Richardson-extrapolate each
            product (:mod:`analysis.finite_difference`: a larger step, at most 4 more gradients
            per product); refused with another ``hvp_method``.

    Returns:
        A :class:`LayerwiseResult`; with ``hvp_method="finite_difference"`` its
        ``metadata["hvp"]`` records the products of all blocks as the other routines do
        (:func:`analysis.finite_difference.merge_records`: the largest error estimates, the
        summed products and gradients), and each block's largest relative error estimate
        under ``"per_block"``.

    Raises:
        TypeError: When ``groups`` is not a dict.
        ValueError: For empty ``groups``, a ``params`` that selects no parameter of any block,
            and as :func:`analysis.top_eigenvalues` and :func:`analysis.hessian_trace`.
    """
    groups = default_groups(model) if groups is None else groups
    if not isinstance(groups, Mapping):
        raise ArgumentTypeError("groups must be a dict {block name: parameter names or "
                                f"predicate}}, got {type(groups).__name__}")
    if not groups:
        raise ValueError("groups must name at least one block")
    chosen_names, chosen_params = select_params(model, params)
    chosen = set(chosen_names)
    resolved = {b: select_params(model, sel)[0] for b, sel in groups.items()}
    resolved = {b: [n for n in names if n in chosen] for b, names in resolved.items()}
    resolved = {b: names for b, names in resolved.items() if names}
    if not resolved:
        raise ValueError("params selects no parameter of any block")
    named = per_parameter(preconditioner, model)  # an optimizer is read once, for all blocks
    if isinstance(named, Tensor):
        named = dict(zip(chosen_names, unflatten(named, chosen_params)))
    rows, n_hvp, records = [], 0, {}
    common = dict(seed=seed, model_mode=model_mode, batch_size_fn=batch_size_fn,
                  progress=False, hvp_method=hvp_method, curvature=curvature,
                  preconditioner=named, fd_richardson=fd_richardson)
    for block, names in tqdm(resolved.items(), desc="layerwise", disable=not progress,
                             leave=False):
        size = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
        eig = top_eigenvalues(model, loss_fn, data, k=1, tol=tol, params=names, **common)
        tr = hessian_trace(model, loss_fn, data, n_hvp=n_hvp_trace,
                           method=trace_method, params=names, **common)
        rows.append((size, eig.eigenvalues[0], tr.estimate, tr.stderr, eig.converged))
        n_hvp += eig.n_hvp + tr.n_hvp
        records[block] = [r.metadata["hvp"] for r in (eig, tr) if "hvp" in r.metadata]
    size, top, trace, stderr, ok = (np.array(c) for c in zip(*rows))
    return LayerwiseResult(list(resolved), resolved, size, top, trace, stderr, ok, n_hvp,
                           curvature=eig.curvature, preconditioned=eig.preconditioned,
                           metadata=_product_record(records))


def _product_record(records: dict[str, list[dict]]) -> dict:
    """``{"hvp": ...}``: the blocks' finite-difference records, merged.

    Each block's largest relative error estimate is under ``"per_block"``; empty for the exact
    products.
    """
    if not any(records.values()):
        return {}
    merged = merge_records([r for block in records.values() for r in block])
    merged["per_block"] = {b: merge_records(r)["relative_error_estimate"]
                           for b, r in records.items() if r}
    return {"hvp": merged}
