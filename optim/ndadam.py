"""ND-Adam: normalized direction-preserving Adam (Zhang, Ma, Li, Wu, 2017; arXiv 1709.04546).

With the paper's softmax logit regularisers (its regularized-softmax section).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._fused import FusedKernel, fusable, scalars_tensor
from ._diagnostics import stepped, to_host
from ._workspace import Scratch, scratch
from ._validation import (ArgumentTypeError, check_adam_group, check_bool, check_int,
                          check_nonnegative, check_positive)
from ._base import CheckedState, check_in_dtype, closure_loss, real, state_dtype, use_foreach
from ._sharded import (check_grad, like_param, local, splits_vectors, sum_over,
                       vector_state)


def _vector_dims(w: Tensor) -> tuple[int, ...]:
    return tuple(range(1, w.dim()))


def _rowdot(a: Tensor, b: Tensor, work: Tensor | None = None, like: Tensor | None = None
            ) -> Tensor:
    """Dot products of matching slices along dim 0, shaped [n, 1, ..., 1] to broadcast.

    The elementwise products go to ``work`` when given. ``a`` and ``b`` are local pieces of the
    parameter ``like``'s tensors; when its vectors are split over ranks, the pieces' dot
    products are summed over them.
    """
    return sum_over(torch.mul(a, b, out=work).sum(_vector_dims(a), keepdim=True), like,
                    "vectors")


def _row_norms(w: Tensor, like: Tensor | None = None) -> Tensor:
    """The norms of the slices along dim 0 (over all their pieces: see ``_rowdot``)."""
    if like is None or not splits_vectors(like):
        return torch.linalg.vector_norm(w, dim=_vector_dims(w), keepdim=True)
    return _rowdot(w, w, like=like).sqrt_()


@torch.no_grad()
def normalize_vectors_(params: Iterable[Tensor]) -> None:
    """Scale every slice along dim 0 of each tensor with ndim >= 2 to unit norm, in place.

    Norms are computed in float32 or better; an all-zero slice stays zero. A ``DTensor``
    (FSDP2, tensor parallel) is normalised over all the pieces of each slice.

    Args:
        params: The tensors (1-d tensors are left as they are).
    """
    for p in params:
        if p.dim() >= 2:
            norms = _row_norms(local(p).to(state_dtype(p)), p)
            local(p).div_(norms.clamp_min_(torch.finfo(norms.dtype).tiny))


class NDAdam(CheckedState):
    r"""ND-Adam, the paper's Algorithm 1 (Zhang et al. 2017).

    For each weight vector $w$ (one slice along dim 0: a row of a linear weight, an output
    channel of a conv kernel), kept at unit norm, with $\hat m, \hat v$ bias corrected:

    $$
    \begin{aligned}
    \bar g_t &= g_t - (g_t \cdot w_{t-1})\, w_{t-1}
      \qquad\text{(tangent projection of the gradient)}\\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) \bar g_t, \qquad
      v_t = \beta_2 v_{t-1} + (1 - \beta_2) \lVert \bar g_t \rVert_2^2
      \qquad\text{(one scalar } v \text{ per vector)}\\
    \bar w_t &= w_{t-1} - \alpha\, \hat m_t / (\sqrt{\hat v_t} + \epsilon), \qquad
      w_t = \bar w_t / \lVert \bar w_t \rVert_2
    \end{aligned}
    $$

    $\epsilon$ is added to $\sqrt{\hat v}$, as in the TF reference (the PyTorch port adds it to
    $\sqrt{v}$).

    Param-group key ``nd``: True: unit weight vectors; False: plain Adam, written as
    ``torch.optim.Adam`` does it, with the L2 ``weight_decay`` added to (a copy of) the gradient
    (weight decay never applies to unit vectors); None (default): True for tensors with
    ndim >= 2, except complex tensors (plain Adam over their ``view_as_real``, as
    ``torch.optim.Adam`` treats them; ``nd=True`` refuses them). The paper's runs use a larger
    lr for the vectors ($\alpha_v = 50 \alpha_s$): give them their own param group.
    float16/bfloat16 parameters keep float32 state, also through ``load_state_dict``.

    Start on the sphere: when a vector parameter gets its state (its first step), each vector
    is normalised in place before the first projection. The first gradient was taken at the
    unnormalised weights; normalise the model beforehand (``normalize_vectors_``) to have it
    taken on the sphere too.

    Diagnostics (the angular step the paper discusses), kept per vector parameter as 0-d device
    tensors and synchronised only when read: ``angular_step()`` (mean over the vectors of
    $\arccos(w_t \cdot w_{t-1})$, radians) and ``update_cosine()`` (cosine between the step
    $-\alpha \hat m/(\sqrt{\hat v} + \epsilon)$, before renormalisation, and $-\bar g$ over the
    whole tensor). The angle is computed as $\mathrm{atan2}(\alpha |u_\perp|, 1 - \alpha\,
    w \cdot u)$ with $u = \hat m/(\sqrt{\hat v} + \epsilon)$, equal to the arccos for unit $w$
    but accurate for small angles.

    Args:
        params: Parameters or param-group dicts (a group may set ``nd``).
        lr: The learning rate $\alpha \ge 0$.
        betas: $(\beta_1, \beta_2)$, each in [0, 1).
        eps: $\epsilon \ge 0$.
        weight_decay: L2 weight decay of the plain-Adam tensors, $\ge 0$.
        foreach: The multi-tensor path; None: automatic (off the CPU).
        fused: Compile a param group's update into one kernel call (``torch.compile``; the
            eager path if that fails, with a warning); None (default) means False for now.

    Raises:
        ArgumentTypeError: an argument of the wrong kind.
        ValueError: an argument outside its range, or ``nd=True`` on a tensor with ndim < 2.
    """

    _state_keys = frozenset({"step", "exp_avg", "exp_avg_sq", "angle", "update_cosine"})
    _wide_keys = frozenset({"exp_avg", "exp_avg_sq", "angle", "update_cosine"})

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            nd=None,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group, its hyperparameters checked.

        Args:
            param_group: As for ``torch.optim.Optimizer.add_param_group``, with an optional
                ``nd`` (True, False or None).

        Raises:
            ArgumentTypeError: a hyperparameter of the wrong kind.
            ValueError: a hyperparameter outside its range, or ``nd=True`` on a tensor with
                ndim < 2.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_adam_group(group, "eps", check_nonnegative)
        for key in ("lr", "eps", "weight_decay"):
            check_in_dtype(key, group[key], group["params"])
        nd = group["nd"]
        if nd is not None and not isinstance(nd, bool) and type(nd).__module__ != "numpy":
            raise ArgumentTypeError(f"nd must be True, False or None (automatic), got {nd!r}")
        if nd is not None:
            group["nd"] = check_bool("nd", nd)
        if group["nd"] and any(p.dim() < 2 for p in group["params"]):
            shapes = [tuple(p.shape) for p in group["params"] if p.dim() < 2]
            raise ValueError("nd must be False or None for parameters with ndim < 2 (nd=True "
                             f"needs one unit vector per slice along dim 0), got nd=True for "
                             f"shapes {shapes}")
        if group["nd"] and any(p.is_complex() for p in group["params"]):
            raise ValueError("nd must be False or None for complex parameters (the unit-vector "
                             "update is defined for real weight vectors; nd=False updates them "
                             "as Adam does, over view_as_real), got nd=True")

    def _required_state(self, index: int, entry: dict, state_dict: dict) -> frozenset[str]:
        """A stepped parameter needs its moments; a unit-vector one its diagnostics too."""
        if not entry:
            return frozenset()
        group, p = [(g, p) for g in self.param_groups for p in g["params"]][index]
        keys = {"step", "exp_avg", "exp_avg_sq"}
        return frozenset(keys | {"angle", "update_cosine"} if self._is_nd(group, p) else keys)

    @staticmethod
    def _is_nd(group: dict, p: Tensor) -> bool:
        return p.dim() >= 2 and not p.is_complex() if group["nd"] is None else group["nd"]

    def _init_group(self, group: dict) -> tuple[list[Tensor], list[Tensor]]:
        """Create state where missing (normalising new vectors) and advance the steps.

        Returns:
            The unit-vector params and the plain-Adam params of ``group`` with a gradient.
        """
        vectors, scalars = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("NDAdam does not support sparse gradients")
            check_grad("NDAdam", p)
            nd = self._is_nd(group, p)
            state = self.state[p]
            if not state:
                dtype = state_dtype(p)
                norms = _row_norms(local(p).to(dtype), p) if nd else None
                # a host sync, once per parameter (its first step)
                if nd and p.device.type != "meta" and _any_zero(norms, p):
                    raise ValueError(
                        "NDAdam: a weight vector (slice along dim 0) is all zeros; give it a "
                        "nonzero init or put the parameter in a group with nd=False"
                    )
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(
                    p, dtype=dtype, memory_format=torch.preserve_format
                )
                if nd:
                    local(p).div_(norms)
                    state["exp_avg_sq"] = vector_state(p, dtype)
                    state["angle"] = local(p).new_zeros((), dtype=dtype)
                    state["update_cosine"] = local(p).new_zeros((), dtype=dtype)
                else:
                    state["exp_avg_sq"] = torch.zeros_like(
                        p, dtype=dtype, memory_format=torch.preserve_format
                    )
            state["step"] += 1
            (vectors if nd else scalars).append(p)
        return vectors, scalars

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One ND-Adam step with the gradients in ``p.grad``.

        Args:
            closure: Optional; clears the gradients, computes the loss, calls ``backward()`` and
                returns the loss (called once, under grad mode).

        Returns:
            The closure's loss, or None without a closure.

        Raises:
            RuntimeError: a gradient is sparse.
            ValueError: a DTensor parameter's gradient is placed otherwise than the parameter.
        """
        loss = closure_loss(closure)
        for group in self.param_groups:
            vectors, scalars = self._init_group(group)
            if group[
                "fused"
            ]:  # what the compiled kernel cannot take goes on to the eager paths below
                vectors, scalars = _fused_step(self.state, group, vectors, scalars)
            foreach = use_foreach(group["foreach"], vectors + scalars)
            for fns, params in ((_VECTOR_FNS, vectors), (_ADAM_FNS, scalars)):
                # the multi-tensor path for parameters with state in their own dtype;
                # the others one by one
                own = [foreach and self.state[p]["exp_avg"].dtype == p.dtype for p in params]
                multi = [p for p, o in zip(params, own) if o]
                for fn, ps in (
                    (fns[1], multi),
                    (fns[0], [p for p, o in zip(params, own) if not o]),
                ):
                    if ps:
                        fn(
                            ps,
                            [self.state[p] for p in ps],
                            _bias_corrections(group, [self.state[p] for p in ps]),
                            beta1=group["betas"][0],
                            beta2=group["betas"][1],
                            eps=group["eps"],
                            weight_decay=group["weight_decay"],
                            work=scratch(self),
                        )
        return loss

    def _vector_diagnostic(self, key: str) -> dict[int, float]:
        index, keys, values = 0, [], []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and key in state:
                    keys.append(index)
                    values.append(state[key])
                index += 1
        return dict(zip(keys, to_host(values)))

    def angular_step(self) -> dict[int, float]:
        r"""The effective angular learning rate of the last step.

        Returns:
            Per vector parameter (index in ``param_groups`` order), the mean angle
            $\arccos(w_t \cdot w_{t-1})$ of its vectors in their last step, in radians.
        """
        return self._vector_diagnostic("angle")

    def update_cosine(self) -> dict[int, float]:
        """The alignment of the last update with the projected gradient.

        Returns:
            Per vector parameter (index in ``param_groups`` order), the cosine between the last
            update direction and the projected negative gradient.
        """
        return self._vector_diagnostic("update_cosine")

    @torch.no_grad()
    def preconditioner(self) -> dict[Tensor, Tensor]:
        r"""The diagonal preconditioner $P = \sqrt{\hat v} + \epsilon$ of the last step.

        Returns:
            Per stepped parameter (keyed like ``state``), $P$ in the parameter's shape (a unit
            vector's scalar $\hat v$ repeated over its elements).
        """
        out = {}
        for _, group, p, state in stepped(self):
            ((_, bc2_sqrt),) = _bias_corrections(group, [state])
            v = local(state["exp_avg_sq"])
            out[p] = like_param((v.sqrt() / bc2_sqrt + group["eps"]).expand_as(local(p)).clone(),
                                p)
        return out


def _bias_corrections(group: dict, states: list[dict]) -> list[tuple[float, float]]:
    """(α / (1 - β1^t), sqrt(1 - β2^t)) in float64, per parameter."""
    beta1, beta2 = group["betas"]
    return [
        (group["lr"] / (1.0 - beta1 ** s["step"]), math.sqrt(1.0 - beta2 ** s["step"]))
        for s in states
    ]


def _record_diagnostics(
    state: dict,
    like: Tensor,
    w: Tensor,
    exp_avg: Tensor,
    denom: Tensor,
    tangent: Tensor,
    tangent_sq: Tensor,
    step_size: float,
    work: Tensor | None = None,
) -> None:
    """Record the diagnostics of w_{t+1} = normalise(w_t - step_size·u), u = m/denom, on the device.

    The angle atan2(step_size·|u_perp|, 1 - step_size·(w_t·u)) averaged over the vectors, and
    cos(u, ḡ). ``w``, ``exp_avg`` (m), ``tangent`` (ḡ) are the local pieces of parameter
    ``like``'s tensors.
    """
    along = _rowdot(w, exp_avg, work, like) / denom  # w·u per vector (|w| = 1)
    update_sq = _row_norms(exp_avg, like).square_() / denom.square()  # |u|² per vector
    across = (update_sq - along * along).clamp_min_(0.0).sqrt_()
    angles = torch.atan2(step_size * across, 1.0 - step_size * along)
    dots = _rowdot(exp_avg, tangent, work, like) / denom
    _finish_diagnostics(state, like, torch.stack(
        [angles.sum(), dots.sum(), update_sq.sum(), tangent_sq.sum()]))


def _finish_diagnostics(state: dict, like: Tensor, sums: Tensor) -> None:
    """The mean angle and the cosine from the sums over the vectors (of all ranks).

    Args:
        state: The parameter's state, which receives ``angle`` and ``update_cosine``.
        like: The parameter.
        sums: Over this rank's vectors: the angles, u·ḡ, |u|² and |ḡ|².
    """
    angle, dot, update_sq, tangent_sq = sum_over(sums, like, "rows").unbind()
    state["angle"] = angle / like.shape[0]
    norms = (update_sq * tangent_sq).sqrt().clamp_min_(torch.finfo(sums.dtype).tiny)
    state["update_cosine"] = dot / norms


def _any_zero(norms: Tensor, p: Tensor) -> bool:
    """Whether any weight vector of ``p`` has norm 0 (on any rank)."""
    return bool(sum_over(torch.count_nonzero(norms == 0), p, "rows"))


def _vector_denominator(exp_avg_sq: Tensor, bc2_sqrt: float, eps: float) -> Tensor:
    """sqrt(v̂) + ε per vector, never 0 (a vector whose tangent gradients were all 0 has m = 0)."""
    return (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps).clamp_min_(torch.finfo(exp_avg_sq.dtype).tiny)


def _single_tensor_vectors(
    params: list[Tensor],
    states: list[dict],
    scalars: list[tuple[float, float]],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    work: Scratch,
) -> None:
    """ND-Adam's vector update one tensor at a time, in the state's dtype; temporaries in work."""
    for p, state, (step_size, bc2_sqrt) in zip(params, states, scalars):
        own, exp_avg, exp_avg_sq = local(p), local(state["exp_avg"]), local(state["exp_avg_sq"])
        acc = exp_avg.dtype
        # the tensors themselves unless p is float16/bfloat16
        w, grad = own.to(acc), local(p.grad).to(acc)
        product = work.like(w, 1)
        tangent = torch.addcmul(
            grad, _rowdot(grad, w, product, p), w, value=-1.0, out=work.like(w, 0)
        )  # ḡ
        tangent_sq = _row_norms(tangent, p).square_()  # |ḡ|² per vector
        exp_avg.lerp_(tangent, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).add_(tangent_sq, alpha=1.0 - beta2)
        denom = _vector_denominator(exp_avg_sq, bc2_sqrt, eps)
        _record_diagnostics(state, p, w, exp_avg, denom, tangent, tangent_sq, step_size, product)
        w.addcdiv_(exp_avg, denom, value=-step_size)
        w.div_(_row_norms(w, p))
        if w is not own:
            own.copy_(w)


def _multi_tensor_vectors(
    params: list[Tensor],
    states: list[dict],
    scalars: list[tuple[float, float]],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    work: Scratch,
) -> None:
    """The same update with ``torch._foreach_*`` (state in the parameters' dtype)."""
    grads, exp_avgs, exp_avg_sqs = _gather(params, states)
    ws = [local(p) for p in params]
    tangents = torch._foreach_addcmul(
        grads, [_rowdot(g, w, like=p) for g, w, p in zip(grads, ws, params)], ws, value=-1.0
    )
    tangent_sqs = torch._foreach_pow([_row_norms(x, p) for x, p in zip(tangents, params)], 2)
    torch._foreach_lerp_(exp_avgs, tangents, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_add_(exp_avg_sqs, tangent_sqs, alpha=1.0 - beta2)
    denoms = [
        _vector_denominator(v, bc2_sqrt, eps) for v, (_, bc2_sqrt) in zip(exp_avg_sqs, scalars)
    ]
    for p, w, m, state, d, x, sq, (step_size, _) in zip(
        params, ws, exp_avgs, states, denoms, tangents, tangent_sqs, scalars
    ):
        _record_diagnostics(state, p, w, m, d, x, sq, step_size)
    torch._foreach_addcdiv_(ws, exp_avgs, denoms, [-step_size for step_size, _ in scalars])
    torch._foreach_div_(ws, [_row_norms(w, p) for w, p in zip(ws, params)])


def _single_tensor_adam(
    params: list[Tensor],
    states: list[dict],
    scalars: list[tuple[float, float]],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    work: Scratch,
) -> None:
    """Adam as ``torch.optim.Adam`` writes it (L2 on a copy of the gradient), one at a time.

    Complex tensors are updated as their ``view_as_real``.
    """
    for p, state, (step_size, bc2_sqrt) in zip(params, states, scalars):
        exp_avg, exp_avg_sq, own = real(state["exp_avg"]), real(state["exp_avg_sq"]), real(p)
        w, grad = own.to(exp_avg.dtype), real(p.grad).to(exp_avg.dtype)
        grad = grad if weight_decay == 0 else grad.add(w, alpha=weight_decay)
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
        w.addcdiv_(exp_avg, denom, value=-step_size)
        if w is not own:
            own.copy_(w)


def _multi_tensor_adam(
    params: list[Tensor],
    states: list[dict],
    scalars: list[tuple[float, float]],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    work: Scratch,
) -> None:
    grads, exp_avgs, exp_avg_sqs = ([real(t) for t in ts] for ts in _gather(params, states))
    params = [real(p) for p in params]   # complex: as view_as_real
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [bc2_sqrt for _, bc2_sqrt in scalars])
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, [-step_size for step_size, _ in scalars])


def _gather(
    params: list[Tensor], states: list[dict]
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The local pieces of the gradients and moments."""
    return (
        [local(p.grad) for p in params],
        [local(s["exp_avg"]) for s in states],
        [local(s["exp_avg_sq"]) for s in states],
    )


def _vector_kernel(w: Tensor, g: Tensor, m: Tensor, v: Tensor, c: Tensor) -> Tensor:
    """``_single_tensor_vectors`` for one tensor, written for ``torch.compile``.

    Every per-vector quantity is expanded into six dot products of the inputs (g·w, w·w, g·g,
    w·m, m·m, m·g), so the kernel reads w, g and m once to reduce and once to write m and w,
    instead of once per dependent reduction (ḡ, then |ḡ|², then the norm of w̄). The per-vector
    factors of the write, the step a = α/(sqrt(v̂) + ε) and 1/|w - a m_t|, are computed once per
    vector, so the elementwise pass is w <- (w - a m_t)/|w - a m_t| with
    m_t = m + (1 - β1)(g - (g·w) w - m): no division or square root per element. The expansions
    agree with the eager path to rounding unless g is almost radial (|ḡ|² is then a difference
    of nearly equal numbers).

    Returns:
        The sums over the vectors that ``_finish_diagnostics`` takes (angles, u·ḡ, |u|², |ḡ|²).
    """
    beta1, beta2, eps, step_size, bc2_sqrt, tiny = c.to(m.dtype).unbind()
    rows = (w.shape[0], -1)
    wa, ga, ma = w.to(m.dtype).view(rows), g.to(m.dtype).view(rows), m.view(rows)

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum(1, keepdim=True)

    gw, ww, gg, wm, mm, mg = (
        dot(ga, wa),
        dot(wa, wa),
        dot(ga, ga),
        dot(wa, ma),
        dot(ma, ma),
        dot(ma, ga),
    )
    tangent_sq = (gg - gw * gw * (2.0 - ww)).clamp_min(0.0)  # |ḡ|², ḡ = g - (g·w) w
    m_tangent = mg - gw * wm  # m·ḡ
    v_new = beta2 * v.view(-1, 1) + (1.0 - beta2) * tangent_sq
    inv_denom = 1.0 / torch.maximum(v_new.sqrt() / bc2_sqrt + eps, tiny)
    step = step_size * inv_denom  # a
    along = beta1 * wm + (1.0 - beta1) * gw * (1.0 - ww)  # w·m_t
    m_sq = (
        beta1 * beta1 * mm
        + 2.0 * beta1 * (1.0 - beta1) * m_tangent
        + (1.0 - beta1) ** 2 * tangent_sq
    )  # |m_t|²
    inv_norm = 1.0 / (ww - 2.0 * step * along + step * step * m_sq).sqrt()  # 1/|w - a m_t|
    angles = torch.atan2(
        step * (m_sq - along * along).clamp_min(0.0).sqrt() * inv_norm,  # sin, cos of (w_t, w_t+1)
        (1.0 - step * along) * inv_norm,
    )
    sums = torch.stack([
        angles.sum(),
        (inv_denom * (beta1 * m_tangent + (1.0 - beta1) * tangent_sq)).sum(),   # Σu·ḡ
        (inv_denom * inv_denom * m_sq).sum(),   # Σ|u|²
        tangent_sq.sum(),   # Σ|ḡ|²
    ])
    m_new = ma + (1.0 - beta1) * (ga - gw * wa - ma)
    m.copy_(m_new.view_as(m))
    v.copy_(v_new.view_as(v))
    w.copy_(((wa - step * m_new) * inv_norm).view_as(w))
    return sums


def _adam_kernel(w: Tensor, g: Tensor, m: Tensor, v: Tensor, c: Tensor, *, coupled: bool) -> None:
    """``_single_tensor_adam`` for one tensor, written for ``torch.compile``."""
    beta1, beta2, eps, step_size, bc2_sqrt, weight_decay = c.to(m.dtype).unbind()
    wa, ga = w.to(m.dtype), g.to(m.dtype)
    if coupled:
        ga = ga + weight_decay * wa
    m_new = m + (1.0 - beta1) * (ga - m)
    v_new = beta2 * v + (1.0 - beta2) * ga * ga
    m.copy_(m_new)
    v.copy_(v_new)
    w.copy_(wa - step_size * m_new / (v_new.sqrt() / bc2_sqrt + eps))


def _ndadam_group(
    vectors: list[tuple[Tensor, ...]],
    others: list[tuple[Tensor, ...]],
    scalars: Tensor,
    *,
    coupled: bool,
) -> list[Tensor]:
    """A param group's update: the unit vectors (scalar rows first), then the plain-Adam tensors."""
    for i, ts in enumerate(others):
        _adam_kernel(*ts, scalars[len(vectors) + i], coupled=coupled)
    return [_vector_kernel(*ts, scalars[i]) for i, ts in enumerate(vectors)]


_NDADAM_KERNEL = FusedKernel(_ndadam_group, "NDAdam")


def _fused_step(
    state: dict, group: dict, vectors: list[Tensor], others: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """Update the group's dense, contiguous parameters in one compiled call.

    Returns:
        The (vectors, others) left for the eager paths (all of them when no kernel is available).
    """
    fused_vectors, fused_others = (
        [p for p in ps if fusable(*(local(t) for t in (p, p.grad, state[p]["exp_avg"])))]
        for ps in (vectors, others)
    )
    # vectors split over ranks need their dot products summed over them: the eager path
    fused_vectors = [p for p in fused_vectors if not splits_vectors(p)]
    if not fused_vectors and not fused_others:
        return vectors, others
    beta1, beta2 = group["betas"]
    states = [state[p] for p in fused_vectors + fused_others]
    last = [torch.finfo(s["exp_avg"].dtype).tiny for s in states[: len(fused_vectors)]] + [
        group["weight_decay"]
    ] * len(fused_others)
    rows = scalars_tensor(
        [
            (beta1, beta2, group["eps"], step_size, bc2_sqrt, x)
            for (step_size, bc2_sqrt), x in zip(_bias_corrections(group, states), last)
        ]
    )
    tensors = [
        (real(p), real(p.grad), real(s["exp_avg"]), real(s["exp_avg_sq"]))
        for p, s in zip(fused_vectors + fused_others, states)
    ]
    done, diagnostics = _NDADAM_KERNEL(
        tensors[: len(fused_vectors)],
        tensors[len(fused_vectors) :],
        rows,
        coupled=group["weight_decay"] != 0,
    )
    if not done:
        return vectors, others
    for p, s, sums in zip(
        fused_vectors, states[: len(fused_vectors)], diagnostics, strict=True
    ):  # unit vectors only
        _finish_diagnostics(s, p, sums)
    taken = {id(p) for p in fused_vectors + fused_others}
    return [p for p in vectors if id(p) not in taken], [p for p in others if id(p) not in taken]


#: (per-tensor, multi-tensor) update functions of the two kinds of parameter
_VECTOR_FNS = (_single_tensor_vectors, _multi_tensor_vectors)
_ADAM_FNS = (_single_tensor_adam, _multi_tensor_adam)


class BNSoftmax(nn.Module):
    r"""The paper's batch-normalised softmax input (its regularized softmax; Zhang et al. 2017).

    Each class logit is batch-normalised over the batch (running statistics in eval mode),
    multiplied by the constant ``scale`` and shifted by a learned offset:
    $z'_c = s\, \mathrm{BN}(z_c) + b_c$. Feed the output to the cross-entropy.

    Args:
        num_classes: The number of logits per example, >= 1.
        scale: The constant $s > 0$ (2.5 for CIFAR-10, 1.0 for CIFAR-100).
        momentum: BatchNorm's momentum.
        eps: BatchNorm's eps.

    Raises:
        ArgumentTypeError: an argument of the wrong kind.
        ValueError: an argument outside its range.
    """

    def __init__(
        self, num_classes: int, scale: float = 2.5, momentum: float = 0.1, eps: float = 1e-3
    ):
        super().__init__()
        num_classes = check_int("num_classes", num_classes, low=1)
        self.scale = check_positive("scale", scale)
        self.norm = nn.BatchNorm1d(num_classes, eps=eps, momentum=momentum, affine=False)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, logits: Tensor) -> Tensor:
        """The normalised, scaled and shifted logits.

        Args:
            logits: [batch, classes].

        Returns:
            A tensor shaped as ``logits``.

        Raises:
            ValueError: ``logits`` is not 2-d.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must have shape [batch, classes], got {tuple(logits.shape)}")
        return self.scale * self.norm(logits) + self.bias

    def extra_repr(self) -> str:
        """The scale, for ``repr``."""
        return f"scale={self.scale}"


def logit_penalty(logits: Tensor, weight: float = 1e-3) -> Tensor:
    r"""The L2 logit penalty of the reference PyTorch code of Zhang et al. (2017).

    $\lambda \cdot \tfrac12 \cdot \frac1N \sum_{i=1}^N \sum_c z_{ic}^2$.

    Args:
        logits: [batch, classes].
        weight: $\lambda \ge 0$.

    Returns:
        The penalty, a 0-d tensor.

    Raises:
        ValueError: ``weight`` < 0 or ``logits`` not 2-d.
    """
    check_nonnegative("weight", weight)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [batch, classes], got {tuple(logits.shape)}")
    return weight * 0.5 * logits.square().sum(dim=1).mean()


def regularized_cross_entropy(logits: Tensor, target: Tensor, weight: float = 1e-3) -> Tensor:
    """Cross-entropy plus ``logit_penalty`` (the reference code's training loss).

    Args:
        logits: [batch, classes].
        target: Class indices, [batch].
        weight: The penalty's weight, >= 0.

    Returns:
        The loss, a 0-d tensor.
    """
    return F.cross_entropy(logits, target) + logit_penalty(logits, weight)
