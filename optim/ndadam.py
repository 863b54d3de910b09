"""ND-Adam: normalized direction-preserving Adam (Zhang, Ma, Li, Wu, arXiv 1709.04546), and the paper's
softmax logit regularisers.

For each weight vector w (one slice along dim 0: a row of a linear weight, an output channel of a conv
kernel), kept at unit norm, with step t (spec §3.2, the paper's Algorithm 1):

    ḡ = g - (g·w) w                              tangent projection of the gradient
    m <- β1 m + (1 - β1) ḡ,   v <- β2 v + (1 - β2) ||ḡ||²   (one scalar v per vector)
    w̄ = w - α m̂ / (sqrt(v̂) + ε),   w <- w̄ / ||w̄||    (m̂, v̂ bias corrected)

ε is added to sqrt(v̂), as in the spec and the TF reference (the PyTorch port adds it to sqrt(v)).

Parameters of a group with ``nd=False`` (default: those with ndim < 2, i.e. biases and norm offsets) take plain
Adam, written as ``torch.optim.Adam`` does it, with the L2 ``weight_decay`` added to (a copy of) the gradient;
weight decay never applies to unit vectors, whose norm is fixed. The reference code uses a larger lr for the
vectors (α_v = 50 α_s in the paper's runs): give them their own param group.

Start on the sphere: when a vector parameter gets its state (its first step), each vector is normalised
in place before the first projection, so that the projection is exactly onto the tangent space at a unit
vector. The first gradient was taken at the unnormalised weights; normalise the model beforehand
(``normalize_vectors_``) to have it taken on the sphere too.

Diagnostics (spec §3.5), kept per vector parameter as 0-d device tensors and synchronised only when read:
``angular_step()`` (mean over the vectors of arccos(w_t · w_{t-1}), radians) and ``update_cosine()`` (cosine
between the step -α m̂/(sqrt(v̂) + ε), before renormalisation, and -ḡ over the whole tensor). The angle is
computed as atan2(α|u_⊥|, 1 - α w·u) with u = m̂/(sqrt(v̂) + ε), equal to the arccos for unit w but accurate
for small angles, where the arccos of a float32 dot product is not.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from ._checks import check_betas, check_nonnegative, check_positive
from ._host import to_host
from ._scratch import scratch


def _vector_dims(w: Tensor) -> tuple[int, ...]:
    return tuple(range(1, w.dim()))


def _rowdot(a: Tensor, b: Tensor, work: Tensor | None = None) -> Tensor:
    """Dot products of matching slices along dim 0, shaped [n, 1, ..., 1] to broadcast against a and b;
    the elementwise products go to ``work`` when given."""
    return torch.mul(a, b, out=work).sum(_vector_dims(a), keepdim=True)


def _row_norms(w: Tensor) -> Tensor:
    return torch.linalg.vector_norm(w, dim=_vector_dims(w), keepdim=True)


def _foreach_denominators(exp_avg_sqs: list[Tensor], scalars: list[tuple[float, float]],
                          eps: float) -> list[Tensor]:
    """Adam's ``sqrt(v_t) / sqrt(1 - beta2^t) + eps`` for each tensor (new tensors)."""
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [bc2_sqrt for _, bc2_sqrt in scalars])
    torch._foreach_add_(denoms, eps)
    return denoms


@torch.no_grad()
def normalize_vectors_(params: Iterable[Tensor]) -> None:
    """Scale every slice along dim 0 of each tensor with ndim >= 2 to unit norm, in place."""
    for p in params:
        if p.dim() >= 2:
            p.div_(_row_norms(p))


class NDAdam(Optimizer):
    """ND-Adam (spec §3). Param-group key ``nd``: True -> unit weight vectors; False -> plain Adam;
    None (default) -> True for tensors with ndim >= 2. ``foreach=None`` uses the multi-tensor path off the CPU."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, foreach: bool | None = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, nd=None, foreach=foreach)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_nonnegative("lr", group["lr"])
        check_betas(group["betas"])
        check_nonnegative("eps", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        if group["nd"] not in (None, True, False):
            raise ValueError(f"nd must be True, False or None (automatic), got {group['nd']!r}")
        if group["nd"] and any(p.dim() < 2 for p in group["params"]):
            raise ValueError("nd=True needs parameters with ndim >= 2 (one unit vector per slice along dim 0)")

    @staticmethod
    def _is_nd(group: dict, p: Tensor) -> bool:
        return p.dim() >= 2 if group["nd"] is None else group["nd"]

    def _init_group(self, group: dict) -> tuple[list[Tensor], list[Tensor]]:
        """Create state where missing (normalising new vectors), advance the steps; (vectors, scalars)."""
        vectors, scalars = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("NDAdam does not support sparse gradients")
            nd = self._is_nd(group, p)
            state = self.state[p]
            if not state:
                norms = _row_norms(p) if nd else None
                if nd and not bool((norms > 0).all()):   # a host sync, once per parameter (its first step)
                    raise ValueError("NDAdam: a weight vector (slice along dim 0) is all zeros; give it a "
                                     "nonzero init or put the parameter in a group with nd=False")
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if nd:
                    p.div_(norms)
                    state["exp_avg_sq"] = p.new_zeros((len(p),) + (1,) * (p.dim() - 1))
                    state["angle"] = p.new_zeros(())
                    state["update_cosine"] = p.new_zeros(())
                else:
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            (vectors if nd else scalars).append(p)
        return vectors, scalars

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One ND-Adam step; with ``closure`` (called under grad mode) returns its loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            vectors, scalars = self._init_group(group)
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.device.type != "cpu" for p in vectors + scalars)
            if foreach:
                self._foreach_vectors(group, vectors)
                self._foreach_adam(group, scalars)
            else:
                for p in vectors:
                    self._single_vector(group, p)
                for p in scalars:
                    self._single_adam(group, p)
        return loss

    def _bias_corrections(self, group: dict, p: Tensor) -> tuple[float, float]:
        """(α / (1 - β1^t), sqrt(1 - β2^t)) in float64."""
        beta1, beta2 = group["betas"]
        t = self.state[p]["step"]
        return group["lr"] / (1.0 - beta1 ** t), math.sqrt(1.0 - beta2 ** t)

    def _foreach_gather(self, group: dict, ps: list[Tensor]) -> tuple[list, list, list, list]:
        """Bias corrections, grads, first and second moments of ``ps`` for a multi-tensor step."""
        states = [self.state[p] for p in ps]
        return ([self._bias_corrections(group, p) for p in ps], [p.grad for p in ps],
                [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states])

    def _record_diagnostics(self, p: Tensor, denom: Tensor, tangent: Tensor, tangent_sq: Tensor,
                            step_size: float, work: Tensor | None = None) -> None:
        """On the device, for the step w_{t+1} = normalise(w_t - step_size·u) with u = m/denom:
        the angle atan2(step_size·|u_perp|, 1 - step_size·(w_t·u)) averaged over the vectors, and cos(u, ḡ)."""
        state = self.state[p]
        exp_avg = state["exp_avg"]
        along = _rowdot(p, exp_avg, work) / denom                      # w·u per vector (|w| = 1)
        update_sq = _row_norms(exp_avg).square_() / denom.square()     # |u|² per vector
        across = (update_sq - along * along).clamp_min_(0.0).sqrt_()
        state["angle"] = torch.atan2(step_size * across, 1.0 - step_size * along).mean()
        norms = (update_sq.sum() * tangent_sq.sum()).sqrt().clamp_min_(torch.finfo(p.dtype).tiny)
        state["update_cosine"] = (_rowdot(exp_avg, tangent, work) / denom).sum() / norms

    def _single_vector(self, group: dict, p: Tensor) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[p]
        step_size, bc2_sqrt = self._bias_corrections(group, p)
        work = scratch(self)
        product = work.like(p, 1)
        tangent = torch.addcmul(p.grad, _rowdot(p.grad, p, product), p, value=-1.0, out=work.like(p, 0))  # ḡ
        tangent_sq = _row_norms(tangent).square_()                            # |ḡ|² per vector
        state["exp_avg"].lerp_(tangent, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).add_(tangent_sq, alpha=1.0 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / bc2_sqrt).add_(group["eps"])   # per vector
        self._record_diagnostics(p, denom, tangent, tangent_sq, step_size, product)
        p.addcdiv_(state["exp_avg"], denom, value=-step_size)
        p.div_(_row_norms(p))

    def _foreach_vectors(self, group: dict, ps: list[Tensor]) -> None:
        if not ps:
            return
        beta1, beta2 = group["betas"]
        scalars, grads, exp_avgs, exp_avg_sqs = self._foreach_gather(group, ps)
        tangents = torch._foreach_addcmul(grads, [_rowdot(g, p) for g, p in zip(grads, ps)], ps, value=-1.0)
        tangent_sqs = torch._foreach_pow([_row_norms(x) for x in tangents], 2)
        torch._foreach_lerp_(exp_avgs, tangents, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_add_(exp_avg_sqs, tangent_sqs, alpha=1.0 - beta2)
        denoms = _foreach_denominators(exp_avg_sqs, scalars, group["eps"])
        for p, d, x, sq, (step_size, _) in zip(ps, denoms, tangents, tangent_sqs, scalars):
            self._record_diagnostics(p, d, x, sq, step_size)
        torch._foreach_addcdiv_(ps, exp_avgs, denoms, [-step_size for step_size, _ in scalars])
        torch._foreach_div_(ps, [_row_norms(p) for p in ps])

    def _single_adam(self, group: dict, p: Tensor) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[p]
        step_size, bc2_sqrt = self._bias_corrections(group, p)
        grad = p.grad if group["weight_decay"] == 0 else p.grad.add(p, alpha=group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / bc2_sqrt).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-step_size)

    def _foreach_adam(self, group: dict, ps: list[Tensor]) -> None:
        if not ps:
            return
        beta1, beta2 = group["betas"]
        scalars, grads, exp_avgs, exp_avg_sqs = self._foreach_gather(group, ps)
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, ps, alpha=group["weight_decay"])
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denoms = _foreach_denominators(exp_avg_sqs, scalars, group["eps"])
        torch._foreach_addcdiv_(ps, exp_avgs, denoms, [-step_size for step_size, _ in scalars])

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
        """Per vector parameter (index in ``param_groups`` order): mean angle arccos(w_t·w_{t-1}) of its
        vectors in their last step, in radians (the effective angular learning rate)."""
        return self._vector_diagnostic("angle")

    def update_cosine(self) -> dict[int, float]:
        """Per vector parameter: cosine between the last update direction and the projected -gradient."""
        return self._vector_diagnostic("update_cosine")

    @torch.no_grad()
    def preconditioner(self) -> dict[Tensor, Tensor]:
        """Per stepped parameter (keyed like ``state``), the diagonal P = sqrt(v̂) + ε of the step, in the
        parameter's shape (a unit vector's scalar v̂ repeated over its elements)."""
        out = {}
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and state["step"] > 0:
                    _, bc2_sqrt = self._bias_corrections(group, p)
                    out[p] = (state["exp_avg_sq"].sqrt() / bc2_sqrt + group["eps"]).expand_as(p).clone()
        return out


class BNSoftmax(nn.Module):
    """The paper's batch-normalised softmax input (spec §3.4): each class logit is batch-normalised over the
    batch (eps 1e-3; running statistics in eval mode), multiplied by the constant ``scale`` and shifted by
    a learned offset. Feed the output to the cross-entropy. ``scale`` 2.5 for CIFAR-10, 1.0 for CIFAR-100."""

    def __init__(self, num_classes: int, scale: float = 2.5, momentum: float = 0.1, eps: float = 1e-3):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        check_positive("scale", scale)
        self.scale = float(scale)
        self.norm = nn.BatchNorm1d(int(num_classes), eps=eps, momentum=momentum, affine=False)
        self.bias = nn.Parameter(torch.zeros(int(num_classes)))

    def forward(self, logits: Tensor) -> Tensor:
        if logits.dim() != 2:
            raise ValueError(f"logits must have shape [batch, classes], got {tuple(logits.shape)}")
        return self.scale * self.norm(logits) + self.bias

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def logit_penalty(logits: Tensor, weight: float = 1e-3) -> Tensor:
    """The L2 logit penalty of the reference PyTorch code: weight · ½ · mean over the batch of Σ_c z_c²."""
    check_nonnegative("weight", weight)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [batch, classes], got {tuple(logits.shape)}")
    return weight * 0.5 * logits.square().sum(dim=1).mean()


def regularized_cross_entropy(logits: Tensor, target: Tensor, weight: float = 1e-3) -> Tensor:
    """Cross-entropy plus ``logit_penalty`` (the reference code's training loss)."""
    return F.cross_entropy(logits, target) + logit_penalty(logits, weight)
