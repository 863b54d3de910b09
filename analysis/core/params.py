"""Parameter selection: the ``params=`` argument of every routine."""
from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn

from .compiled import unwrap_compiled

ParamSelection = None | Sequence[str] | Sequence[nn.Parameter] | Callable[[str, nn.Parameter], bool]


def select_params(model: nn.Module, params: ParamSelection = None
                  ) -> tuple[list[str], list[nn.Parameter]]:
    """Resolve ``params=`` to ``(names, parameters)`` in ``model.named_parameters()`` order.

    Args:
        model: The model (a compiled module is read through the module it wraps).
        params: None (all parameters with requires_grad), a list of names, a list of
            parameters, or a predicate ``f(name, parameter) -> bool``.

    Returns:
        The selected names and parameters.

    Raises:
        ValueError: Unknown names, tensors that are not parameters of the model, another
            kind of value, or a selection of no parameter.
    """
    named = list(unwrap_compiled(model).named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        params = list(params)
        if all(isinstance(x, str) for x in params):
            known = {n for n, _ in named}
            unknown = [x for x in params if x not in known]
            if unknown:
                raise ValueError(f"params names not found in the model: {unknown}; "
                                 f"known names: {sorted(known)}")
            wanted = set(params)
            chosen = [(n, p) for n, p in named if n in wanted]
        elif all(isinstance(x, Tensor) for x in params):
            ids = {id(x) for x in params}
            chosen = [(n, p) for n, p in named if id(p) in ids]
            if len(chosen) != len(ids):
                raise ValueError("params contains tensors that are not parameters of the model")
        else:
            raise ValueError("params must be None, a list of names, a list of parameters, "
                             "or a predicate f(name, parameter) -> bool")
    if not chosen:
        raise ValueError("params selects no parameters")
    return [n for n, _ in chosen], [p for _, p in chosen]
