r"""Hessian-vector products by central differences of ordinary gradients.

Where double backward is unavailable or too costly (a model sharded with FSDP2's
``fully_shard``, whose parameters reach autograd only through hooks; a kernel without a second
derivative), the product is the derivative of the gradient along ``v``:

$$ D(h) = \frac{g(w + h v) - g(w - h v)}{2 h} = H v + \frac{h^2}{6} \nabla^3 L[v, v, \cdot]
   + O(h^4), $$

each gradient ``g`` an ordinary ``loss.backward()`` (so every hook a wrapper installs, DDP's or
FSDP's, runs as in training). One Richardson step removes the $h^2$ term
(Richardson 1911; Nocedal & Wright, *Numerical Optimization*, 2006, Sec. 8.1):

$$ R(h) = \frac{4 D(h) - D(2h)}{3} = H v + O(h^4). $$

**Step size.** The error of $D(h)$ is a truncation term $a h^2$ ($a = \tfrac16 \nabla^3
g[v, v, v]$, direction-dependent: measured 10^4 times larger along the top eigenvector of a tiny
GPT-2 than along a random direction) plus rounding noise of norm $\rho / h$, where $\rho$, the
noise of the differenced gradients, does not depend on $v$ (measured: $\rho \approx 2 \epsilon
\|g\|$ on an MLP and a tiny GPT-2 in float32, the gradient's own rounding; a model at a minimum
has $\|g\| \to 0$ but not $\rho$, so $\rho$ is measured, not modelled). Each product
(``adaptive=True``, the default) takes the step in three moves:

1. *pilot*: $D(h_0)$ and $D(2 h_0)$ at the rule of the dtype and the norms (Nocedal & Wright,
   eq. 8.6, for the relative perturbation $h \|v\| / (1 + \|w\|)$, $\|w\|$ the norm of the
   selected parameters, $\epsilon$ the machine epsilon of their dtype),
   $$ h_0 = \epsilon^{1/3} \, \frac{1 + \|w\|}{\|v\|}; $$
2. *truncation*: $\|D(2h_0) - D(h_0)\| \approx 3 \|a\| h_0^2$ gives $\|a\|$ (an upper
   estimate: the pilot's noise is counted as truncation, which never pushes the step up);
   *rounding*: $\rho = \|D(2t) - D(t)\| \, t / \sqrt{5/4}$ from one product at a step $t$
   with $t \|v\| / (1 + \|w\|) = \epsilon^{2/3} / 10$, deep in the rounding regime, measured
   once per weights (4 gradients per call of the routines);
3. *balance*: the step minimising $\|a\|^2 h^4 + \rho^2 / h^2$,
   $$ h^* = \left( \frac{\rho}{\sqrt 2 \, \|a\|} \right)^{1/3}
      \ \text{(central)}, \qquad
      h^* = \left( \frac{1.34 \, \rho}{2 \|b\|} \right)^{1/5}, \ \|b\| = \frac{\|a\|^2}{\|D\|}
      \ \text{(Richardson)}, $$
   rounded to $h_1 = 2^{-k} h_0$ ($-3 \le k \le 12$); the $h^4$ coefficient $b$ of
   Richardson's remainder assumes the Taylor terms share one length scale
   ($a h^2 / \|Hv\| = (h / s)^2$, $b = \|Hv\| / s^4$), and $1.34 = \sqrt{16 + 1/4} / 3$ is
   its noise amplification; its step is capped at 4 times the central one (along the top
   eigenvector of the tiny GPT-2 $b$ is 3x the guess, and the best Richardson step of the
   benchmarks is 3-10x the best central one).

$D(h_1)$ and $D(2 h_1)$ are then formed where the pilot has not formed them already; the
central product is that of whichever of $h_0$ and $h_1$ has the smaller error estimate (below),
Richardson's $R(h_1)$. Cost per product: 4 gradients when $h_1 = h_0$, 6 when
$h_1 = h_0 / 2$ or $2 h_0$, 8 otherwise, plus 4 once per weights for the noise probe (the central
difference without estimate, ``estimate_error=False``, or ``adaptive=False``: 2 or 4 at $h_0$;
``adaptive=False`` with Richardson keeps the former $h_0 = \epsilon^{1/5} (1 + \|w\|) /
\|v\|$). On the tiny GPT-2 of ``benchmarks/fd_error.py`` in float32 this brings the central
difference from 22x the error of the best step of a half-decade grid to 0.8x in a random
direction, and from 8000x to 4x along the top eigenvector (there the pilot step is past the
Taylor regime, and the truncation it measures too small); Richardson from 2500x and 40000x to
1.2x and 3.3x (``benchmarks/README.md``).

**Error estimate.** With ``estimate_error=True`` (always with Richardson) the product is also
formed at the step $2h$, and $\|D(2h) - D(h)\|$ is recorded: about three times the truncation
error of $D(h)$ (it is $3 \|a\| h^2$) and at least its rounding error, a conservative bound
for $D(h)$ and, a fortiori, for $R(h)$ in the truncation regime (measured on an MLP and a tiny
GPT-2 in float64 and float32, random and top-eigenvector directions). Low-precision parameters
(bfloat16, float16) never give better than a few percent: a warning says so.

**Mixed precision.** Under an FSDP2 ``MixedPrecisionPolicy`` that computes or reduces in a
lower precision than the parameters (``param_dtype=torch.bfloat16`` on float32 weights) the
routines refuse ``hvp_method="finite_difference"`` (:func:`check_fd_policy`): the differenced
gradients are bfloat16-rounded, a few percent off at any step (``benchmarks/fd_error.py``).
The exact product ignores the policy and gives the Hessian of the model in its parameters'
dtype, from the master shards.

**Restoration.** The weights are snapshotted once per product and written back from the
snapshot after every perturbation (never by subtracting the step), so they are bit-exactly as
found afterwards, also when a gradient raises.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .core import (BatchSizeFn, check_bool, check_loss, check_positive, data_mean, flatten,
                   LossFn, LOW_PRECISION, unflatten)

Pieces = list[Tensor]
Gradient = Callable[[], Pieces]
Run = Callable[[Sequence[Pieces], Sequence[float], Sequence[int]], list[list[Pieces]]]

ORDER = {False: 1 / 3, True: 1 / 5}  # the step's power of eps: central, Richardson


def _local(t: Tensor) -> Tensor:
    """The local part of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _shard_group(pieces: Sequence[Tensor]):
    """The process group over which DTensor ``pieces`` are sharded (None for plain tensors)."""
    mesh = next((t.device_mesh for t in pieces if hasattr(t, "device_mesh")), None)
    return None if mesh is None else mesh.get_group()


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """``sum_i <a_i, b_i>`` in float64 over parameter-shaped pieces.

    For DTensor pieces (shards) the local sums are all-reduced over their mesh, so every rank
    gets the global value.
    """
    total = torch.zeros((), dtype=torch.float64, device=_local(a[0]).device)
    for x, y in zip(a, b):
        total += (_local(x).detach().double() * _local(y).detach().double()).sum()
    group = _shard_group(a)
    if group is not None:
        dist.all_reduce(total, group=group)
    return float(total)


def fd_step(dtype: torch.dtype, weight_norm: float, vector_norm: float,
            richardson: bool = False) -> float:
    r"""The step $h = \epsilon^{p} (1 + \|w\|) / \|v\|$ of the module docstring.

    Args:
        dtype: the parameters' dtype ($\epsilon$ is its machine epsilon).
        weight_norm: $\|w\|$, the norm of the selected parameters.
        vector_norm: $\|v\|$, positive.
        richardson: $p = 1/5$ if True (the product is Richardson-extrapolated), else $1/3$.

    Returns:
        The step $h$ (the weights are perturbed by $\pm h v$).

    Raises:
        ValueError: ``vector_norm`` is not positive and finite.
    """
    check_positive("vector_norm", vector_norm)
    eps = torch.finfo(dtype).eps
    return eps ** ORDER[bool(richardson)] * (1.0 + weight_norm) / vector_norm


NOISE_PROBE = 2 / 3  # the noise probe's relative step: eps^(2/3) / 10
RICHARDSON_NOISE = math.sqrt(16.25) / 3  # ||4 n_1 / h - n_2 / (2h)|| / 3 over rho / h
RICHARDSON_CAP = 4  # Richardson's step: at most this times the central difference's
SHIFTS = (-3, 12)  # the refined step is 2^-k h_0 with k in this range


def refined_step(pilot: float, gap: float, noise: float, size: float,
                 richardson: bool = False) -> float:
    r"""The balanced step $h_1 = 2^{-k} h_0$ of the module docstring, from a pilot product.

    Args:
        pilot: the pilot step $h_0$.
        gap: $\|D(2 h_0) - D(h_0)\|$.
        noise: $\rho$, the rounding level (the noise of $D(h)$ has norm $\rho / h$).
        size: $\|D(h_0)\|$, the scale of the product (used by Richardson's remainder).
        richardson: balance Richardson's $h^4$ remainder instead of the $h^2$ term.

    Returns:
        $2^{-k} h_0$ with $k$ the integer nearest $\log_2 (h_0 / h^*)$ in ``SHIFTS``; $h_0$
        itself where no truncation is seen (``gap`` zero) or no noise (``noise`` zero).
    """
    if gap <= 0 or noise <= 0 or not math.isfinite(gap):
        return pilot
    a = gap / (3 * pilot ** 2)  # truncation coefficient, ||D(h) - Hv|| ~ a h^2
    best = (noise / (math.sqrt(2) * a)) ** (1 / 3)
    if richardson:  # its own balance, at most RICHARDSON_CAP times the central one
        b = a * a / size if size > 0 else math.inf
        best = min((RICHARDSON_NOISE * noise / (2 * b)) ** 0.2, RICHARDSON_CAP * best)
    k = min(max(round(math.log2(pilot / best)), SHIFTS[0]), SHIFTS[1])
    return pilot * 2.0 ** -k


@contextmanager
def _perturbing(params: Sequence[nn.Parameter]) -> Iterator[Callable[[Pieces, float], None]]:
    """``move(v, h)`` sets the weights to ``w + h v``.

    On exit (also on error) they are copied back from a snapshot taken on entry, bit-exactly.
    """
    snapshot = [p.detach().clone() for p in params]

    def move(v: Pieces, h: float) -> None:
        with torch.no_grad():
            for p, w, d in zip(params, snapshot, v):
                p.copy_(w + h * d.to(w.dtype))

    try:
        yield move
    finally:
        with torch.no_grad():
            for p, w in zip(params, snapshot):
                p.copy_(w)


class FiniteDifference:
    r"""Hessian-vector products of a gradient function by central differences.

    The caller supplies full-data differences through :meth:`products`'s ``run`` (one
    ``.backward()`` per batch reduced over the data, or a gradient over all of it); this class
    perturbs the weights, differences the gradients, chooses the step per product (module
    docstring) and keeps the error estimate. :meth:`differences` and :meth:`combine` remain
    for one batch's part of a product at the pilot step (not recorded).

    Args:
        params: the parameters differentiated (plain tensors or FSDP2 DTensor shards; vectors
            are lists of tensors shaped, and for DTensors placed, like them).
        richardson: extrapolate $R(h) = (4 D(h) - D(2h)) / 3$ (at least four gradients per
            product). Off by default.
        step: a fixed step $h$ (the weights move by $\pm h v$); None chooses it per product
            (module docstring).
        estimate_error: also form $D(2h)$ for the error estimate (forced by ``richardson``);
            False costs two gradients per product at the pilot step $h_0$ and records no
            estimate.
        adaptive: refine the pilot step per product (module docstring); False keeps the rule
            of :func:`fd_step` (its $\epsilon^{1/5}$ with Richardson), 2 or 4 gradients.

    Attributes:
        steps: the steps of the products so far.
        errors: per product, the estimate $\|D(2h) - D(h)\|$ (absolute).
        relative_errors: per product, that estimate over the norm of the product.
        gradients: gradients (each a pass over the data) spent on the recorded products,
            the noise probes included.
        noise: the measured rounding level $\rho$ (None before the first adaptive product).

    Raises:
        ValueError: ``step`` is not positive, or a flag is not a bool.
    """

    def __init__(self, params: Sequence[nn.Parameter], *, richardson: bool = False,
                 step: float | None = None, estimate_error: bool = True,
                 adaptive: bool = True):
        self.params = list(params)
        self.richardson = check_bool("richardson", richardson)
        self.estimate_error = self.richardson or check_bool("estimate_error", estimate_error)
        self.step = None if step is None else check_positive("step", step)
        self.adaptive = check_bool("adaptive", adaptive) and self.step is None \
            and self.estimate_error
        self.dtype = self.params[0].dtype
        if self.dtype in LOW_PRECISION:
            warnings.warn(f"finite-difference Hessian-vector products of {self.dtype} parameters "
                          "are a few percent off at best (rounding of the perturbed weights); "
                          "analyse a float32 copy for accurate numbers", stacklevel=3)
        self.steps: list[float] = []
        self.errors: list[float] = []
        self.relative_errors: list[float] = []
        self.gradients = 0
        self.noise: float | None = None
        self._noise_at: float | None = None  # ||w|| where `noise` was measured

    @property
    def scales(self) -> tuple[int, ...]:
        """The multiples of the step each product is differenced at: (1, 2) or (1,)."""
        return (1, 2) if self.estimate_error else (1,)

    def steps_for(self, vectors: Sequence[Pieces]) -> list[float]:
        """The pilot step of each vector: the fixed ``step``, or :func:`fd_step` of its norm.

        Args:
            vectors: vectors as lists of parameter-shaped pieces.

        Returns:
            One step per vector.

        Raises:
            ValueError: a vector is zero or not finite.
        """
        if self.step is not None:
            return [self.step] * len(vectors)
        w = math.sqrt(dot(self.params, self.params))
        out = []
        for v in vectors:
            norm = math.sqrt(dot(v, v))
            if not 0 < norm < math.inf:
                raise ValueError(f"vectors must be nonzero and finite for a finite-difference "
                                 f"product, got a vector of norm {norm}")
            out.append(fd_step(self.dtype, w, norm, self.richardson and not self.adaptive))
        return out

    def differences(self, gradient: Gradient, vectors: Sequence[Pieces],
                    steps: Sequence[float],
                    scales: Sequence[int] | None = None) -> list[list[Pieces]]:
        """The central differences of ``gradient()`` along each vector.

        Args:
            gradient: the gradient at the current weights, as parameter-shaped pieces.
            vectors: the directions $v$.
            steps: their steps $h$ (:meth:`steps_for`).
            scales: the multiples $s$ of $h$ to difference at (default :attr:`scales`).

        Returns:
            Per vector, ``[D(s h) for s in scales]``.
        """
        out = []
        with _perturbing(self.params) as move:
            for v, h in zip(vectors, steps):
                row = []
                for s in (self.scales if scales is None else scales):
                    move(v, s * h)
                    plus = [g.detach().clone() for g in gradient()]
                    move(v, -s * h)
                    minus = gradient()
                    row.append([(a - b.detach()) / (2 * s * h) for a, b in zip(plus, minus)])
                out.append(row)
        return out

    def products(self, run: Run, vectors: Sequence[Pieces]) -> list[Pieces]:
        """The products along ``vectors``, the step chosen per product; records them.

        Args:
            run: ``run(vectors, steps, scales)`` -> per vector ``[D(s h) for s in scales]``
                of the full-data gradient (e.g. :meth:`differences` of a full gradient, or
                its batches' reduced by :func:`analysis.core.data_mean`).
            vectors: the directions $v$.

        Returns:
            Per vector, $D(h)$, or $R(h)$ with ``richardson``.
        """
        pilots = self.steps_for(vectors)
        if not vectors:
            return []
        if not self.adaptive:
            self.gradients += 2 * len(self.scales) * len(vectors)
            return self.combine(run(vectors, pilots, self.scales), pilots)
        noise = self._noise_level(run, vectors[0], pilots[0])
        known = [{s * h: d for s, d in zip((1, 2), row)}
                 for h, row in zip(pilots, run(vectors, pilots, (1, 2)))]
        self.gradients += 4 * len(vectors)
        chosen = [refined_step(h, _distance(got[2 * h], got[h]), noise,
                               math.sqrt(dot(got[h], got[h])), self.richardson)
                  for h, got in zip(pilots, known)]
        wanted: dict[tuple[float, ...], list[int]] = {}
        for i, h in enumerate(chosen):
            missing = tuple(s for s in (1, 2) if s * h not in known[i])
            if missing:
                wanted.setdefault(missing, []).append(i)
        for missing, rows in wanted.items():
            done = run([vectors[i] for i in rows], [chosen[i] for i in rows], missing)
            for i, row in zip(rows, done):
                known[i].update({s * chosen[i]: d for s, d in zip(missing, row)})
            self.gradients += 2 * len(missing) * len(rows)
        return [self._best(got, (h0, h1)) for got, h0, h1 in zip(known, pilots, chosen)]

    def _noise_level(self, run: Run, v: Pieces, pilot: float) -> float:
        r"""$\rho$ (module docstring), measured along ``v`` once per weights."""
        w = math.sqrt(dot(self.params, self.params))
        if self.noise is None or self._noise_at != w:
            eps = torch.finfo(self.dtype).eps
            t = pilot * eps ** (NOISE_PROBE - ORDER[False]) / 10
            near, far = run([v], [t], (1, 2))[0]
            self.noise, self._noise_at = _distance(near, far) * t / math.sqrt(1.25), w
            self.gradients += 4
        return self.noise

    def _best(self, known: dict[float, Pieces], candidates: Sequence[float]) -> Pieces:
        """The product at the refined step (central: the candidate of smaller estimate)."""
        best = candidates[-1] if self.richardson else \
            min(candidates, key=lambda h: (_distance(known[2 * h], known[h]), h))
        near, far = known[best], known[2 * best]
        product = [(4 * a - b) / 3 for a, b in zip(near, far)] if self.richardson else near
        self._record(best, _distance(far, near), product)
        return product

    def _record(self, h: float, error: float | None, product: Pieces) -> None:
        """Keep the step and (when formed) the error estimate of one product."""
        self.steps.append(float(h))
        if error is not None:
            size = math.sqrt(dot(product, product))
            self.errors.append(error)
            self.relative_errors.append(error / size if size > 0 else
                                        math.inf if error else 0.0)

    def combine(self, differences: Sequence[Sequence[Pieces]], steps: Sequence[float], *,
                record: bool = True) -> list[Pieces]:
        """The products from (reduced) :meth:`differences` at fixed steps.

        Args:
            differences: per vector ``[D(h)]`` or ``[D(h), D(2h)]``.
            steps: the steps they were taken with.
            record: keep the steps and error estimates (False for a part of a product, e.g.
                one batch's, whose estimate is not that of the product).

        Returns:
            Per vector, $D(h)$, or $R(h)$ with ``richardson``.
        """
        out = []
        for row, h in zip(differences, steps):
            product = row[0]
            if self.richardson:
                product = [(4 * a - b) / 3 for a, b in zip(row[0], row[1])]
            if record:
                self._record(h, _distance(row[1], row[0]) if len(row) > 1 else None,
                             product)
            out.append(product)
        return out

    def metadata(self) -> dict:
        r"""What the products so far used: method, rule, steps and the largest error estimates.

        Returns:
            A JSON-representable dict: ``hvp_method``, ``richardson``, ``step_rule``,
            ``step`` (the last step; ``step_min``/``step_max`` over all products),
            ``error_estimate`` and ``relative_error_estimate`` (the largest over the products,
            None without estimates), ``n_products``, ``gradients`` (gradients spent, the
            noise probes included) and ``noise_level`` ($\rho$, None unless adaptive).
        """
        pilot = f"eps^(1/{5 if self.richardson and not self.adaptive else 3}) " \
            "* (1 + ||w||) / ||v||"
        rule = "fixed" if self.step is not None else pilot if not self.adaptive else \
            f"adaptive: pilot {pilot}, then 2^-k times it balancing ||D(2h) - D(h)|| " \
            "against the measured rounding level"
        return {"hvp_method": "finite_difference", "richardson": self.richardson,
                "step_rule": rule, "step": self.steps[-1] if self.steps else None,
                "step_min": min(self.steps, default=None),
                "step_max": max(self.steps, default=None),
                "error_estimate": max(self.errors, default=None),
                "relative_error_estimate": max(self.relative_errors, default=None),
                "n_products": len(self.steps), "gradients": self.gradients,
                "noise_level": self.noise}


def _distance(a: Pieces, b: Pieces) -> float:
    r"""$\|a - b\|$ over parameter-shaped pieces (all-reduced over shards)."""
    gap = [x - y for x, y in zip(a, b)]
    return math.sqrt(dot(gap, gap))


def check_fd_options(hvp_method: str, fd_richardson: bool = False,
                     fd_step: float | None = None) -> bool:
    """Refuse the finite-difference options unless ``hvp_method="finite_difference"``.

    Args:
        hvp_method: the product's method.
        fd_richardson: the Richardson flag (a bool).
        fd_step: a fixed step, or None.

    Returns:
        ``fd_richardson``.

    Raises:
        ValueError: ``fd_richardson=True`` or an ``fd_step`` with another ``hvp_method``, or
            a flag that is not a bool.
    """
    check_bool("fd_richardson", fd_richardson)
    if hvp_method != "finite_difference":
        given = [name for name, on in (("fd_richardson=True", fd_richardson),
                                       (f"fd_step={fd_step!r}", fd_step is not None)) if on]
        if given:
            raise ValueError(f"{' and '.join(given)} applies to hvp_method=\"finite_difference\" "
                             f"only, got hvp_method={hvp_method!r}")
    return fd_richardson


def merge_records(records: Sequence[dict]) -> dict:
    """One ``metadata["hvp"]`` record for several products' (e.g. :func:`analysis.layerwise`'s).

    Args:
        records: :meth:`FiniteDifference.metadata` dicts, at least one.

    Returns:
        The first record's method, flag and rule; the last step; the extreme steps, the
        largest estimates and noise level; the summed products and gradients.
    """
    def pick(key: str, how: Callable) -> Any:
        values = [r[key] for r in records if r.get(key) is not None]
        return how(values) if values else None

    return {**records[0], "step": records[-1]["step"], "step_min": pick("step_min", min),
            "step_max": pick("step_max", max), "error_estimate": pick("error_estimate", max),
            "relative_error_estimate": pick("relative_error_estimate", max),
            "n_products": pick("n_products", sum), "gradients": pick("gradients", sum),
            "noise_level": pick("noise_level", max)}


def cast_policies(model: nn.Module) -> dict[str, torch.dtype]:
    """The dtypes the FSDP2 ``MixedPrecisionPolicy`` of ``model``'s units casts to.

    Args:
        model: any module.

    Returns:
        ``"param_dtype"``, ``"reduce_dtype"``, ``"output_dtype"`` -> the lowest-precision dtype
        any ``fully_shard`` unit's policy names for it (empty without FSDP2 or policy).
    """
    out: dict[str, torch.dtype] = {}
    for m in model.modules():
        policy = getattr(getattr(m, "_get_fsdp_state", lambda: None)(), "_mp_policy", None)
        for key in ("param_dtype", "reduce_dtype", "output_dtype"):
            dtype = getattr(policy, key, None)
            if isinstance(dtype, torch.dtype) and dtype.is_floating_point and (
                    key not in out or torch.finfo(dtype).eps > torch.finfo(out[key]).eps):
                out[key] = dtype
    return out


def check_fd_policy(model: nn.Module, dtype: torch.dtype) -> None:
    r"""Refuse finite differences through an FSDP2 policy that rounds below ``dtype``.

    Under a ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` the forward runs on bfloat16
    copies of the weights: a perturbation $h v$ smaller than their rounding vanishes and the
    differenced gradients carry bfloat16 noise, so the products are at best a few percent off
    at any step (``benchmarks/fd_error.py``; Granziol & Juarev 2026, arXiv 2602.00816, on the
    bf16 noise), and what they estimate, a Hessian of a function rounded to bfloat16, is not
    defined. The exact product (``hvp_method="reverse"``) ignores the policy: it computes the
    Hessian of the model in its parameters' dtype from the master shards.

    Args:
        model: the model analysed.
        dtype: the selected parameters' dtype.

    Raises:
        ValueError: a policy casts the weights, the gradient reduction or the output to a
            dtype of lower precision than ``dtype``.
    """
    eps = torch.finfo(dtype).eps
    lower = {k: d for k, d in cast_policies(model).items() if torch.finfo(d).eps > eps}
    if lower:
        casts = ", ".join(f"{k}={d}" for k, d in lower.items())
        raise ValueError(
            f'hvp_method="finite_difference" cannot differentiate this model: its fully_shard '
            f"MixedPrecisionPolicy ({casts}) rounds the forward or the gradients below the "
            f"parameters' {dtype}, so differenced gradients are a few percent off at any step; "
            'use hvp_method="reverse" (exact: the Hessian of the model in its parameters\' '
            "dtype, computed from the master shards, the policy not applied)")


def no_sync(model: nn.Module):
    """``model.no_sync()`` for DistributedDataParallel, a null context otherwise.

    Under ``no_sync`` DDP's gradients stay local, and the caller reduces them with the data.
    """
    return model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) \
        else nullcontext()


def backward_gradient(model: nn.Module, loss: Callable[[], Tensor],
                      params: Sequence[nn.Parameter]) -> Pieces:
    """The gradient of ``loss()`` w.r.t. ``params`` by one ordinary ``.backward()``.

    The parameters' ``.grad`` are cleared before and after (the caller restores the user's);
    under DistributedDataParallel the backward runs in ``no_sync()``.

    Args:
        model: the model ``loss`` evaluates.
        loss: computes the scalar loss.
        params: the parameters whose gradients are returned (zeros where none arrives).

    Returns:
        The gradients, shaped like ``params``.
    """
    for p in params:
        p.grad = None
    with torch.enable_grad(), no_sync(model):
        loss().backward()
    out = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    for p in params:
        p.grad = None
    return out


def fd_matmat(fd: FiniteDifference, model: nn.Module, loss_fn: LossFn, data: Iterable,
              vs: Tensor, *, batch_size_fn: BatchSizeFn | None = None, reduction: str = "mean",
              progress: bool = False) -> Tensor:
    """``H v`` for each row of ``vs`` (flat over ``fd.params``) of the mean loss over ``data``.

    :meth:`FiniteDifference.products` with one pass over ``data`` per set of steps (two or
    three per product, one more for the noise probe): each batch's differences are reduced
    with :func:`analysis.core.data_mean` (sample-weighted, all-reduced over ranks; DDP's own
    reduction is off through ``no_sync``), so steps and error estimates are those of the
    full-data product. The model must already be in its analysis mode with the user's
    gradients set aside (``analysis.core.preserved``).

    Args:
        fd: the differencer (its parameters are the model's selected parameters).
        model: the model whose weights ``fd.params`` are.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: the iterable of batches (this rank's shard under ``torch.distributed``).
        vs: ``[k, n]`` vectors, flat in the order of ``fd.params``.
        batch_size_fn: sample count of a batch (default: the leading dimension).
        reduction: ``loss_reduction(loss_fn)``.
        progress: a bar over the batches.

    Returns:
        ``[k, n]``, the products.
    """
    params = fd.params

    def run(vectors: Sequence[Pieces], steps: Sequence[float],
            scales: Sequence[int]) -> list[list[Pieces]]:
        def per_batch(batch: Any) -> list[Tensor]:
            def loss() -> Tensor:
                return check_loss(loss_fn(model, batch), " in the finite-difference product")

            rows = fd.differences(lambda: backward_gradient(model, loss, params), vectors,
                                  steps, scales)
            return [torch.stack([torch.stack([flatten(d) for d in row]) for row in rows])]

        shape = (len(vectors), len(scales), vs.shape[1])
        total = data_mean(data, per_batch, batch_size_fn, reduction=reduction,
                          progress=progress, zeros=lambda: [vs.new_zeros(shape)]).values[0]
        return [[unflatten(d, params) for d in row] for row in total.to(vs.dtype)]

    products = fd.products(run, [unflatten(v, params) for v in vs])
    return torch.stack([flatten(p) for p in products]) if products else vs.new_zeros(vs.shape)


__all__ = ["FiniteDifference", "fd_step", "refined_step", "dot", "backward_gradient", "no_sync",
           "fd_matmat", "cast_policies", "check_fd_policy", "check_fd_options",
           "merge_records"]
