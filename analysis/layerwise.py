"""Per-block curvature: the top eigenvalue and the trace of each diagonal Hessian block."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
from torch import Tensor, nn
from tqdm.auto import tqdm

from .lanczos import top_eigenvalues
from .core import (ArgumentTypeError, BatchSizeFn, guarded, LossFn, ParamSelection,
                   records_metadata, register_result, select_params, unflatten)
from .preconditioning import Preconditioner, per_parameter
from .trace import hessian_trace

Groups = dict[str, list[str] | Callable[[str, nn.Parameter], bool]]


@register_result
@dataclass
class LayerwiseResult:
    """One entry per block, in block order. ``trace`` sums to the full trace (diagonal
    blocks); ``top_eigenvalue`` is that of the block alone."""
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
        return {b: {"top_eigenvalue": float(e), "trace": float(t), "trace_stderr": float(s),
                    "n_params": int(p)}
                for b, e, t, s, p in zip(self.blocks, self.top_eigenvalue, self.trace,
                                         self.trace_stderr, self.n_params)}
    metadata: dict = field(default_factory=dict)


def default_groups(model: nn.Module) -> dict[str, list[str]]:
    """One block per module: parameters grouped by their name without the last component
    (``"0.weight"`` and ``"0.bias"`` form block ``"0"``), trainable parameters only."""
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return groups


@records_metadata
@guarded
def layerwise(model: nn.Module, loss_fn: LossFn, data: Iterable, groups: Groups | None = None, *,
              params: ParamSelection = None, model_mode: str = "eval",
              batch_size_fn: BatchSizeFn | None = None, seed: int = 0, progress: bool = True,
              tol: float = 1e-6, n_hvp_trace: int = 99, trace_method: str = "hutch++",
              hvp_method: str = "reverse", curvature: str = "hessian",
              preconditioner: Preconditioner = None, check_deterministic: bool = True
              ) -> LayerwiseResult:
    """Top eigenvalue (Lanczos, ``tol``) and trace (``trace_method`` with ``n_hvp_trace``
    products; exact, with ``2 * size`` products, for blocks of at most ``n_hvp_trace // 3``
    parameters) of each block.

    groups: ``{block name: parameter names or predicate}``; default :func:`default_groups`.
    params: the parameters analysed (default all with requires_grad); blocks keep only these,
        and blocks left empty are dropped.
    curvature, preconditioner: as in :func:`analysis.top_eigenvalues`, each block using its
        part of ``P`` (a flat ``P`` runs over the parameters ``params`` selects).
    check_deterministic: check once that two passes over ``data`` agree (two forward passes).
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
    rows, n_hvp = [], 0
    common = dict(seed=seed, model_mode=model_mode, batch_size_fn=batch_size_fn,
                  progress=False, hvp_method=hvp_method, curvature=curvature,
                  preconditioner=named)
    for block, names in tqdm(resolved.items(), desc="layerwise", disable=not progress,
                             leave=False):
        size = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
        eig = top_eigenvalues(model, loss_fn, data, k=1, tol=tol, params=names, **common)
        tr = hessian_trace(model, loss_fn, data, n_hvp=n_hvp_trace,
                           method=trace_method, params=names, **common)
        rows.append((size, eig.eigenvalues[0], tr.estimate, tr.stderr, eig.converged))
        n_hvp += eig.n_hvp + tr.n_hvp
    size, top, trace, stderr, ok = (np.array(c) for c in zip(*rows))
    return LayerwiseResult(list(resolved), resolved, size, top, trace, stderr, ok, n_hvp,
                           curvature=eig.curvature, preconditioned=eig.preconditioned)
