r"""The base of every curvature matrix, and the registry behind ``curvature=``.

A curvature matrix here is the sample-weighted mean over the batches of ``data`` of a per-batch
matrix $A_b$, the curvature of the batch's mean loss $L_b$ w.r.t. the selected parameters
$\theta$:

$$A = \frac{1}{N} \sum_b n_b A_b, \qquad N = \sum_b n_b,$$

($A = \sum_b A_b$ for a sum-reduced ``loss_fn``). :class:`CurvatureOperator` owns everything but
$A_b$: the sample-weighted reduction (:func:`analysis.core.data_mean`, all-reduced over the
ranks' shards under ``torch.distributed``), the restoration of the model
(:func:`analysis.core.preserved`), the optional diagonal preconditioning
$P^{-1/2} A P^{-1/2}$, and the products ``matvec`` / ``matmat`` / ``to_scipy``. A subclass
implements one method, :meth:`CurvatureOperator.batch_product` ($A_b V$), and
:func:`register_curvature` makes it available as ``curvature=name`` in
:func:`analysis.top_eigenvalues`, :func:`analysis.hessian_trace`,
:func:`analysis.spectral_density` and :func:`analysis.layerwise`.

The built-ins are registered the same way: ``"hessian"`` (:class:`analysis.HessianOperator`),
``"ggn"``, ``"fisher"`` (the exact Fisher) and ``"empirical_fisher"``
(:mod:`analysis.curvature`).
"""
from __future__ import annotations

import abc
import inspect
from typing import Any, Callable, Iterable

import numpy as np
import torch
from contextlib import nullcontext
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn
from torch.nn.utils.parametrize import is_parametrized, ParametrizationList
from torch.overrides import TorchFunctionMode

from .core import (all_finite, ArgumentTypeError, BatchSizeFn, check_bool, check_choice,
                   check_data, check_model_mode, data_mean, guarded, likelihood_error,
                   LikelihoodError, loss_reduction, LossFn, numel, ParamSelection, preserved,
                   select_params, unwrap_compiled, working_dtype)
from .derivatives import curvature_ops
from .finite_difference import check_fd_options
from .preconditioning import Preconditioner, inverse_sqrt
from .sharded import (is_sharded, refuse_sharded, REFUSAL, ShardedCurvatureOperator,
                      ShardedOperator)

_REGISTRY: dict[str, type["CurvatureOperator"]] = {}


class CurvatureOperator(abc.ABC):
    r"""The curvature matrix $A = \frac{1}{N}\sum_b n_b A_b$ of the mean loss over ``data``.

    The public base of every curvature (module docstring). A subclass implements
    :meth:`batch_product`; everything else is here. Vectors are flat, in
    ``model.named_parameters()`` order of the selected parameters (``.names``). Every call
    restores the model (mode, grads, buffers, requires_grad) before returning; inside
    ``with operator:`` the model stays in analysis mode until the block exits, which saves the
    per-call snapshot and lets :meth:`cached` keep a one-batch ``data``'s graph between
    products.

    Args:
        model: The model; a ``torch.compile``'d one is analysed through its original module.
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the batch's mean loss (or its sum, with
            ``loss_fn.reduction == "sum"``: the operator is then that of the total loss).
        data: An iterable of batches, passed over once per product.
        params: ``None`` (all with requires_grad), names, parameters or a predicate
            ``f(name, parameter)``; the operator is the matching block of the full matrix.
        model_mode: ``"eval"`` or ``"train"``, the mode during the products.
        batch_size_fn: Sample count of a batch (default
            :func:`analysis.core.default_batch_size`, the leading dimension of its first
            tensor).
        progress: Show a bar over the batches of each product.
        reuse_graph: Let :meth:`cached` keep a one-batch ``data``'s per-batch state (e.g. its
            gradient graph) inside ``with`` blocks.
        preconditioner: A diagonal $P$ (see :mod:`analysis.preconditioning`); the operator is
            then $P^{-1/2} A P^{-1/2}$, read from an optimizer once, at construction.
        check_deterministic: First check that two passes over ``data`` give the same sample
            counts and loss (``analysis.core.guards``), and that the first products are
            symmetric ($\langle v, A w \rangle = \langle w, A v \rangle$ on the first block of
            two or more vectors, free); False skips both.

    Raises:
        ValueError: For a bad ``data``, ``model_mode``, ``params`` or ``preconditioner``.
        TypeError: For a non-bool ``progress`` or ``reuse_graph``.

    Attributes:
        names, params: The selected parameters.
        shape: ``(n, n)`` with ``n`` their number of elements.
        like: A 0-d tensor of the products' dtype and device (float32 for bfloat16/float16
            models).
        n_hvp: Products computed so far (one per vector).
        curvature: The registered name (set by the routines; a class attribute by default).
    """

    curvature: str = ""

    @guarded
    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Iterable, *,
                 params: ParamSelection = None, model_mode: str = "eval",
                 batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
                 reuse_graph: bool = True, preconditioner: Preconditioner = None,
                 check_deterministic: bool = True):
        model = unwrap_compiled(model)
        refuse_sharded(model, f"{type(self).__name__} (use the routines' curvature=, "
                              "analysis.curvature.curvature_operator or analysis.sharded)")
        check_data(data)
        check_model_mode(model_mode)
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.reduction = loss_reduction(loss_fn)
        self.model_mode, self.batch_size_fn = model_mode, batch_size_fn
        self.progress = check_bool("progress", progress)
        self.names, self.params = select_params(model, params)
        n = numel(self.params)
        self.shape = (n, n)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.scale = inverse_sqrt(preconditioner, model, self.names, self.params)
        # products come back in the working precision (float32 for bfloat16/float16 models)
        self.like = torch.empty((), dtype=working_dtype(self.dtype), device=self.device)
        self.n_hvp = 0
        self._reuse = (check_bool("reuse_graph", reuse_graph) and isinstance(data, (list, tuple))
                       and len(data) == 1)
        self._graph: Any = None  # the per-batch state kept by `cached`
        self._context = None
        self._depth = 0
        # the first product, for the symmetry probe (then False); off when the user lets the
        # products vary (check_deterministic=False: shuffled data, stochastic layers)
        self._probe: Any = None if check_deterministic else False
        self._weight_norm = uses_weight_norm(model)

    @abc.abstractmethod
    def batch_product(self, batch: Any, V: Tensor) -> Tensor:
        r"""One batch's curvature $A_b$ (of its mean loss) times ``V``: $A_b V$.

        Called by :meth:`matmat` once per batch, with gradients enabled, the model in
        ``model_mode`` and the parameters ``self.params`` requiring grad. The base averages
        the results over the batches (weighted by their sample counts), all-reduces them
        under ``torch.distributed`` and applies the preconditioner.

        Args:
            batch: One batch of ``data``.
            V: ``[n, k]``, ``k >= 1`` vectors as columns, flat over the selected parameters
                (``analysis.core.unflatten(V[:, j], self.params)`` splits one per parameter).
                In :meth:`matmat` it is the transpose of a contiguous ``[k, n]`` tensor, so
                ``V.T`` is contiguous.

        Returns:
            ``[n, k]``: $A_b V$ in ``V``'s dtype.
        """

    @property
    def preconditioned(self) -> bool:
        r"""Whether the operator is $P^{-1/2} A P^{-1/2}$ (a ``preconditioner`` was given)."""
        return self.scale is not None

    # -- model restoration -------------------------------------------------------------
    def __enter__(self) -> "CurvatureOperator":
        if self._depth == 0:
            self._context = preserved(self.model, self.model_mode, weights=False,
                                      trainable=self.params)
            self._context.__enter__()
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._graph = None
            context, self._context = self._context, None
            context.__exit__(*exc)

    def cached(self, build: Callable[[], Any]) -> Any:
        """``build()``, kept for the rest of a ``with`` block when ``data`` is one batch.

        For :meth:`batch_product`: per-batch state that does not depend on the vectors (a
        gradient graph, a linearisation) is then built once per ``with`` block instead of once
        per product (PyHessian's trick), when ``reuse_graph`` is on.

        Args:
            build: Computes the state from the current batch.

        Returns:
            The state: the kept one when there is one, else ``build()``.
        """
        if self._reuse and self._graph is not None:
            return self._graph
        value = build()
        if self._reuse and self._depth > 1:  # inside a user's or a routine's `with` block
            self._graph = value
        return value

    # -- products ----------------------------------------------------------------------
    def matvec(self, v: Tensor) -> Tensor:
        """The product with one vector.

        Args:
            v: A 1-D tensor of length ``shape[0]``.

        Returns:
            ``A v``, 1-D, in the working dtype (:attr:`like`).

        Raises:
            ValueError: When ``v`` is not a 1-D tensor of that length, or not finite.
        """
        if not isinstance(v, Tensor) or v.dim() != 1:
            raise ValueError(f"v must be a 1-D tensor of length {self.shape[0]}")
        return self.matmat(v.unsqueeze(0))[0]

    def matmat(self, vs: Tensor) -> Tensor:
        """The product with each row of ``vs``, in one pass over the data.

        Args:
            vs: ``[b, n]``, one vector per row; with ``b = 0`` nothing is computed.

        Returns:
            ``[b, n]``: ``A v`` for each row ``v``, in the working dtype (:attr:`like`).

        Raises:
            ValueError: When ``vs`` is not ``[b, n]`` or not finite, and when
                :meth:`batch_product` returns a wrong shape.
            RuntimeError: When the first products are not symmetric (an op with a wrong
                second derivative; the message names the parameters and modules).
        """
        if not isinstance(vs, Tensor) or vs.dim() != 2 or vs.shape[1] != self.shape[0]:
            shape = tuple(vs.shape) if isinstance(vs, Tensor) else type(vs).__name__
            raise ValueError(f"vectors must have shape [b, {self.shape[0]}] (the number of "
                             f"selected parameter elements), got {shape}")
        if not all_finite(vs):
            raise ValueError("vectors must be finite (they hold NaN or inf)")
        if not len(vs):  # no vector (e.g. Hutch++ whose sketch spans everything): no pass
            return torch.zeros_like(vs, dtype=self.like.dtype, device=self.device)
        vs = given = vs.to(self.device, self.dtype)
        if self.scale is not None:
            vs = vs * self.scale
        out = self.reduced_product(vs)
        self.n_hvp += vs.shape[0]
        out = out if self.scale is None else out.mul_(self.scale)
        if self._probe is None:
            self._check_symmetry(given, out)
        return out

    def _check_symmetry(self, vs: Tensor, out: Tensor) -> None:
        r"""The symmetry probe $\langle v, A w \rangle = \langle w, A v \rangle$, first products.

        Free: on the first ``matmat`` of two or more vectors (Hutch++, XTrace, block
        products), its first two rows; single-vector products (Lanczos) are not probed, as the
        probe would need a third vector in memory. A curvature matrix is symmetric; an op
        whose second derivative PyTorch gets wrong makes the products asymmetric, which no
        spectrum or trace would reveal. Products that vary from call to call (shuffled data,
        stochastic layers) are left to the determinism guards.

        Raises:
            RuntimeError: When the two inner products differ beyond the working precision,
                naming the parameters (and their modules) where the asymmetry concentrates.
        """
        if len(vs) < 2:
            return
        self._probe = False
        count = self.n_hvp
        (v, av), (w, aw) = (vs[0], out[0]), (vs[1], out[1])
        tol = 30 * torch.finfo(out.dtype).eps ** 0.5
        v, w = v.to(out.dtype), w.to(out.dtype)  # no copy unless the dtypes differ
        gap = abs(float(torch.dot(v, aw) - torch.dot(w, av)))
        bound = float(v.norm() * aw.norm() + w.norm() * av.norm()) / 2
        if gap <= tol * bound or bound == 0:
            self.n_hvp = count
            return
        again = self.matmat(w.unsqueeze(0).to(vs.dtype))[0]
        self.n_hvp = count
        if not torch.allclose(again, aw, rtol=tol, atol=tol * float(aw.abs().max())):
            return  # the products vary (shuffled data, stochastic layers): the guards' concern
        raise RuntimeError(_asymmetry_message(self, v * aw - w * av, gap / bound))

    def reduced_product(self, vs: Tensor) -> Tensor:
        """The full-data product of the rows of ``vs`` (validated, preconditioner applied).

        The sample-weighted mean of :meth:`batch_product` over ``data`` (all-reduced over
        ranks). A subclass whose products do not split by batch (finite differences, whose
        error estimate is that of the full-data product) overrides this instead.

        Args:
            vs: ``[b, n]`` in the model's dtype and device, ``b >= 1``.

        Returns:
            ``[b, n]``, the products.
        """
        routed = CompositeWeightNorm() if self._weight_norm else nullcontext()
        with self, torch.enable_grad(), curvature_ops(), routed:
            return data_mean(self.data, lambda batch: [self._rows_product(batch, vs)],
                             self.batch_size_fn, reduction=self.reduction,
                             zeros=lambda: [torch.zeros_like(vs)],
                             progress=self.progress).values[0]

    def product_metadata(self) -> dict:
        """What the products so far used, for the result's ``metadata`` (empty by default).

        Returns:
            A JSON-representable dict (e.g. the finite-difference step and error estimate).
        """
        return {}

    def _rows_product(self, batch: Any, vs: Tensor) -> Tensor:
        """:meth:`batch_product` on the rows of ``vs`` (``[b, n]``), its result as rows."""
        out = self.batch_product(batch, vs.T)
        if not isinstance(out, Tensor) or tuple(out.shape) != tuple(vs.shape[::-1]):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{type(self).__name__}.batch_product must return a tensor of "
                             f"shape {tuple(vs.shape[::-1])} ([n, k], like V), got {got}")
        return out.T.contiguous()  # no copy for the built-ins, whose rows are contiguous

    def to_scipy(self) -> LinearOperator:
        """A scipy ``LinearOperator`` (float64 numpy in and out) for ``eigsh``, CG and friends.

        Returns:
            The operator; ``matvec``, ``matmat`` and ``rmatvec`` all call :meth:`matmat`.
        """
        def apply(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, dtype=np.float64)
            vs = torch.from_numpy(x.reshape(self.shape[0], -1).T.copy())
            return self.matmat(vs).to(torch.float64).cpu().numpy().T.reshape(x.shape)

        return LinearOperator(self.shape, matvec=apply, matmat=apply, rmatvec=apply,
                              dtype=np.float64)


def _asymmetry_message(op: CurvatureOperator, parts: Tensor, gap: float) -> str:
    """The symmetry probe's error: the size, the parameters and modules to blame, the way out."""
    sums = [float(t.sum()) for t in torch.split(parts, [p.numel() for p in op.params])]
    worst = sorted(range(len(sums)), key=lambda i: -abs(sums[i]))[:2]
    owners = dict(_owners(op.model))
    blamed = ", ".join(f"{op.names[i]} ({owners.get(op.names[i], 'module')})" for i in worst)
    return (f"the {op.curvature or type(op).__name__} products are not symmetric: "
            f"<v, A w> and <w, A v> differ by {gap:.3g} of their size, concentrated in {blamed}. "
            "An op there has a wrong or missing second derivative in PyTorch (or the products "
            "are not deterministic): the eigenvalues and traces would be wrong. Replace the op "
            "by plain differentiable ops, leave those parameters out with params=, or use "
            "hvp_method=\"reverse\" if it was \"forward\"")


def _owners(model: nn.Module) -> Iterable[tuple[str, str]]:
    """``(parameter name, owning module's class name and op)`` for every parameter."""
    for prefix, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, ParametrizationList):  # name the parametrisations themselves
            kind = "parametrised by " + ", ".join(type(f).__name__ for f in module)
        for name, _ in module.named_parameters(recurse=False):
            yield (f"{prefix}.{name}" if prefix else name), kind


def uses_weight_norm(model: nn.Module) -> bool:
    """Whether ``model`` holds a weight-normalised module (either PyTorch API).

    Args:
        model: The model.

    Returns:
        True for a ``torch.nn.utils.parametrizations.weight_norm`` parametrisation or a
        ``torch.nn.utils.weight_norm`` pre-hook anywhere in ``model``.
    """
    for module in model.modules():
        if is_parametrized(module) and any(
                type(f).__name__ == "_WeightNorm"
                for plist in module.parametrizations.values() for f in plist):
            return True
        if any(type(h).__name__ == "WeightNorm" for h in module._forward_pre_hooks.values()):
            return True
    return False


class CompositeWeightNorm(TorchFunctionMode):
    r"""``torch._weight_norm`` computed as $v \, g / \lVert v \rVert$ from plain ops.

    PyTorch's fused weight-norm kernel (``_weight_norm_interface``, which both weight-norm APIs
    reach on CPU) has a wrong second derivative: Hessians through it are asymmetric by 0.07-0.96
    and their eigenvalues and traces wrong (issue 31). Inside this mode the same function is
    built from ``torch.linalg.vector_norm``, whose derivatives are exact (``norm_except_dim``'s
    forward-mode derivative has the wrong shape for the whole-tensor norm of
    ``nn.utils.weight_norm(dim=None)``); values agree to rounding.
    :meth:`CurvatureOperator.matmat` enters it for models that use weight norm
    (:func:`uses_weight_norm`).
    """

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        """Route ``torch._weight_norm``; every other function runs unchanged."""
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g = args[0], args[1]
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            dim = None if dim is None or dim == -1 else dim % v.dim()
            others = [d for d in range(v.dim()) if d != dim]  # dim -1: the whole tensor
            norm = (v.abs() if not others  # a 1-D v normed along its only dim: elementwise
                    else torch.linalg.vector_norm(v, dim=others, keepdim=dim is not None))
            return v * (g / norm)
        return func(*args, **kwargs)


def register_curvature(name: str, cls: type, *, override: bool = False) -> type:
    """Make ``curvature=name`` build ``cls`` in every routine that takes ``curvature=``.

    The routines construct ``cls(model, loss_fn, data, params=..., model_mode=...,
    batch_size_fn=..., progress=False, preconditioner=...)`` (plus ``hvp_method=`` when it is
    not ``"reverse"`` and ``cls`` takes it), so a subclass of :class:`CurvatureOperator` that
    keeps the base's constructor keywords works as it is. Registering the same class under
    its own name again does nothing.

    Args:
        name: The name, a non-empty string.
        cls: A concrete subclass of :class:`CurvatureOperator` (implementing
            :meth:`~CurvatureOperator.batch_product`).
        override: Replace a class already registered under ``name``.

    Returns:
        ``cls`` (so it can be used as ``register_curvature(name, cls)`` in an expression).

    Raises:
        TypeError: When ``name`` is not a non-empty string, ``cls`` is not a subclass of
            :class:`CurvatureOperator`, or does not implement ``batch_product``.
        ValueError: When ``name`` is registered to another class and ``override`` is False.
    """
    if not isinstance(name, str) or not name:
        raise ArgumentTypeError(f"name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, CurvatureOperator)):
        raise ArgumentTypeError(f"cls must be a subclass of analysis.CurvatureOperator, got "
                                f"{cls!r}")
    if inspect.isabstract(cls):
        raise ArgumentTypeError(f"cls must implement batch_product(batch, V): {cls.__name__} "
                                "is abstract")
    check_bool("override", override)
    old = _REGISTRY.get(name)
    if old is not None and old is not cls and not override:
        raise ValueError(f"curvature {name!r} is already registered to "
                         f"{old.__module__}.{old.__qualname__}; pass override=True to replace it")
    _REGISTRY[name] = cls
    return cls


def registered_curvatures() -> tuple[str, ...]:
    """The names ``curvature=`` accepts, in registration order.

    Returns:
        The registered names (the built-ins first).
    """
    return tuple(_REGISTRY)


def curvature_operator(curvature: str, model: nn.Module, loss_fn: LossFn, data: Iterable, *,
                       params: ParamSelection = None, model_mode: str = "eval",
                       batch_size_fn: BatchSizeFn | None = None, progress: bool = True,
                       hvp_method: str = "reverse", preconditioner: Preconditioner = None,
                       options: dict[str, Any] | None = None,
                       fd_richardson: bool = False) -> CurvatureOperator:
    """The operator of a registered ``curvature=`` name, as the routines build it.

    On a model sharded with FSDP2's ``fully_shard`` (:mod:`analysis.sharded`): the Hessian
    without a preconditioner is a :class:`analysis.sharded.ShardedOperator`; the Hessian with
    one, and the curvatures of an output-space matrix (:class:`analysis.GGNOperator`,
    :class:`analysis.FisherOperator`, :class:`analysis.EmpiricalFisherOperator` and their
    subclasses) are a :class:`analysis.sharded.ShardedCurvatureOperator`; other registered
    classes (a ``batch_product`` on full parameters) are refused.

    Args:
        curvature: A registered name (:func:`registered_curvatures`).
        model: As :class:`CurvatureOperator`.
        loss_fn: As :class:`CurvatureOperator`.
        data: As :class:`CurvatureOperator`.
        params: As :class:`CurvatureOperator`.
        model_mode: As :class:`CurvatureOperator`.
        batch_size_fn: As :class:`CurvatureOperator`.
        progress: As :class:`CurvatureOperator`.
        hvp_method: Passed on when it is not ``"reverse"`` (the default of every operator),
            to a class that takes it (:class:`analysis.HessianOperator`).
        preconditioner: As :class:`CurvatureOperator`.
        options: The class's own keywords, ``{name: value}`` (e.g. ``{"kind": "mc",
            "mc_samples": 4}`` for :class:`analysis.FisherOperator`).
        fd_richardson: With ``hvp_method="finite_difference"``, Richardson-extrapolate each
            product (:mod:`analysis.finite_difference`); passed on when True.

    Returns:
        The operator, its ``curvature`` attribute set to the name.

    Raises:
        ValueError: For a name that is not registered (the message lists those that are),
            for ``hvp_method`` other than ``"reverse"`` with a class that does not take it,
            and for ``fd_richardson=True`` with another ``hvp_method``.
        NotImplementedError: A sharded model with a registered class that has no output side
            (:func:`_sharded_operator`).
    """
    check_choice("curvature", curvature, registered_curvatures())
    cls = _REGISTRY[curvature]
    options = dict(options or {})
    common = dict(params=params, model_mode=model_mode, batch_size_fn=batch_size_fn,
                  progress=progress, preconditioner=preconditioner)
    if hvp_method != "reverse":
        if "hvp_method" not in inspect.signature(cls.__init__).parameters:
            raise ValueError(f'hvp_method={hvp_method!r} applies to curvature="hessian" only '
                             f"(an operator taking hvp_method=), got curvature={curvature!r}")
        common["hvp_method"] = hvp_method
    if check_fd_options(hvp_method, fd_richardson):
        common["fd_richardson"] = True
    try:
        if is_sharded(unwrap_compiled(model)):  # FSDP2: the products on shards
            return _sharded_operator(curvature, cls, model, loss_fn, data, common, options)
        op = cls(model, loss_fn, data, **common, **options)
    except LikelihoodError:  # a routine takes no likelihood=: name the ways out it has
        raise likelihood_error(getattr(loss_fn, "criterion", None), curvature) from None
    op.curvature = curvature
    return op


def _sharded_operator(curvature: str, cls: type, model: nn.Module, loss_fn: LossFn,
                      data: Iterable, common: dict, options: dict) -> Any:
    """The operator of ``curvature`` on a ``fully_shard`` model (:mod:`analysis.sharded`).

    The plain Hessian is a :class:`ShardedOperator`; a preconditioned Hessian and the
    curvatures of an output-space matrix (classes with ``output_side``, which builds their
    $M$ without the model) are a :class:`ShardedCurvatureOperator`.

    Raises:
        NotImplementedError: A class without ``output_side`` other than the Hessian's (its
            ``batch_product`` takes full parameters).
    """
    if curvature == "hessian":  # its own keywords (fd_step, ...) go to the sharded operator
        make = ShardedOperator if common["preconditioner"] is None else ShardedCurvatureOperator
        return make(model, loss_fn, data, **common, **options)
    if not hasattr(cls, "output_side"):
        raise NotImplementedError("model " + REFUSAL.format(
            what=f"curvature={curvature!r} ({cls.__name__}: its batch_product takes the full "
                 "parameters; the Hessian, GGN, Fisher and empirical Fisher and subclasses of "
                 "OutputCurvatureOperator work)"))
    side = cls.output_side(model, loss_fn, common["model_mode"], options)
    return ShardedCurvatureOperator(model, loss_fn, data, output_side=side, curvature=curvature,
                                    **common)
