r"""Cross-entropy over a large vocabulary in bounded memory: chunks of output rows.

A causal LM's logits $Z \in \mathbb{R}^{M \times V}$ ($M$ tokens, a vocabulary of $V$) are
the largest tensor of a curvature product: autograd's cross-entropy keeps its log-softmax, and
the double backward of a Hessian-vector product materialises several more $[M, V]$ tensors
(about 8-10 times the logits' bytes at $V = 50{,}257$). Here every $[M, V]$ intermediate is
computed per chunk of rows (at most :data:`CHUNK_BYTES` each) from the closed forms of the
softmax cross-entropy, $\ell_r = \mathrm{logsumexp}(Z_r) - Z_{r y_r}$:

$$\nabla_{Z_r} \ell = p_r - e_{y_r}, \qquad
\nabla^2_{Z_r} \ell \, u = p_r \odot u - p_r \langle p_r, u \rangle, \qquad
p_r = \mathrm{softmax}(Z_r)$$

(the Hessian $\mathrm{diag}(p) - p p^\top$; Martens 2020, JMLR 21(146), sec. 9.2). Values equal
autograd's to rounding.

* :func:`softmax_hessian_product`: $s\, m_r (p_r \odot u_r - p_r \langle p_r, u_r \rangle)$ per
  row, written in place (the GGN and the exact Fisher of :mod:`analysis.curvature`).
* :func:`linear_head_product`: $J^\top M J$ of a linear head $Z = h W^\top + b$ for an
  output-space $M$ block-diagonal over the rows, chunk by chunk from $h$, $W$, $b$ (the GGN
  and the exact Fisher of a language model, whose head :class:`LinearRecorder` recognises):
  no $[M, V]$ tensor is kept, not even the logits.
* :class:`ChunkedCrossEntropy`, a ``TorchFunctionMode`` entered by
  :func:`analysis.derivatives.curvature_ops`: where ``F.cross_entropy`` is called on (a view
  of) the output of the last ``F.linear`` (a language model's head, $Z = h W^\top + b$) and
  the logits exceed one chunk, the loss is computed from $h$, $W$, $b$ by
  :class:`_LinearCrossEntropy`, whose gradient and second derivatives are formed chunk by
  chunk: a Hessian-vector product then never holds an $[M, V]$ tensor beyond the logits the
  model's forward returned.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

CHUNK_BYTES = 4 * 2**20
"""Bytes of one chunk of rows of an output-space temporary (``[rows, V]``)."""


def row_slices(rows: int, row_bytes: int) -> list[slice]:
    """Consecutive slices of ``rows`` rows, each at most :data:`CHUNK_BYTES` (one row at least).

    Args:
        rows: The number of rows.
        row_bytes: The bytes of one row.

    Returns:
        The slices, covering ``range(rows)`` in order.
    """
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def softmax_hessian_product(logits: Tensor, u: Tensor, scale: float,
                            mask: Tensor | None = None) -> Tensor:
    r"""$s\, m_r (p_r \odot u_r - p_r \langle p_r, u_r \rangle)$, into ``u``, chunk by chunk.

    The cross-entropy's Hessian w.r.t. the logits (module docstring) applied to ``u``, with
    classes on dim 1 and the chunks over dim 0.

    Args:
        logits: ``[N, C, ...]``.
        u: Shaped like ``logits``; overwritten with the product.
        scale: $s$, the criterion's normalisation (one over the number of observations).
        mask: ``[N, 1, ...]`` 0/1 observations (None: all).

    Returns:
        ``u``.
    """
    row_bytes = logits[:1].numel() * logits.element_size()
    for rows in row_slices(logits.shape[0], row_bytes):
        p = torch.softmax(logits[rows], dim=1)
        w = u[rows]
        dot = (p * w).sum(1, keepdim=True)
        w.sub_(dot).mul_(p).mul_(scale)
        if mask is not None:
            w.mul_(mask[rows])
    return u


def _rows(h: Tensor, weight: Tensor, bias: Tensor | None, rows: slice) -> Tensor:
    r"""The logits of ``rows``, $h W^\top + b$."""
    return F.linear(h[rows], weight, bias)


class _LinearCrossEntropy(torch.autograd.Function):
    r"""$s \sum_r m_r \ell_r(h W^\top + b)$ from ``h``, ``W``, ``b``, chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                mask: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(h, weight, bias, target, mask)
        ctx.scale = scale
        total = h.new_zeros((), dtype=torch.float64)
        for rows in row_slices(h.shape[0], weight.shape[0] * h.element_size()):
            z = _rows(h, weight, bias, rows)
            picked = z.gather(1, target[rows].clamp(min=0).unsqueeze(1)).squeeze(1)
            total += ((torch.logsumexp(z, 1) - picked) * mask[rows]).sum().double()
        return (total * scale).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        h, weight, bias, target, mask = ctx.saved_tensors
        gh, gw, gb = _LinearCrossEntropyGrad.apply(h, weight, bias, target, mask, ctx.scale, grad)
        return gh, gw, gb, None, None, None


def _output_gradient(p: Tensor, target: Tensor, mask: Tensor, scale: float) -> Tensor:
    r"""$s\, m_r (p_r - e_{y_r})$ for one chunk's softmax ``p`` (a new tensor)."""
    g = p.clone()
    g.scatter_add_(1, target.clamp(min=0).unsqueeze(1), -torch.ones_like(g[:, :1]))
    return g.mul_((mask * scale).unsqueeze(1))


def _softmax(h: Tensor, weight: Tensor, bias: Tensor | None, rows: slice) -> Tensor:
    """The softmax of the logits of ``rows``."""
    return torch.softmax(_rows(h, weight, bias, rows), 1)


class _LinearCrossEntropyGrad(torch.autograd.Function):
    r"""``c`` times the gradient of :class:`_LinearCrossEntropy` w.r.t. ``h``, ``W``, ``b``.

    Its backward is the second derivative, formed per chunk of rows (module docstring): with
    $G = s\, m (P - Y)$ and $U = A_h W^\top + h A_W^\top + A_b$ for the incoming
    $(A_h, A_W, A_b)$, $Q = c\, s\, m (P \odot U - P \langle P, U \rangle)$, the
    derivatives are $Q W + c G A_W$ (``h``), $Q^\top h + c G^\top A_h$ (``W``),
    $\sum_r Q_r$ (``b``) and $\sum_r \langle G_r, U_r \rangle$ (``c``).
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                mask: Tensor, scale: float, c: Tensor) -> tuple:
        ctx.save_for_backward(h, weight, bias, target, mask, c)
        ctx.scale = scale
        gh, gw = torch.zeros_like(h), torch.zeros_like(weight)
        gb = None if bias is None else torch.zeros_like(bias)
        for rows in row_slices(h.shape[0], weight.shape[0] * h.element_size()):
            g = _output_gradient(_softmax(h, weight, bias, rows), target[rows], mask[rows],
                                 scale).mul_(c)
            gh[rows] = g @ weight
            gw.addmm_(g.T, h[rows])
            if gb is not None:
                gb += g.sum(0)
        return gh, gw, gb

    @staticmethod
    def backward(ctx: Any, ah: Tensor | None, aw: Tensor | None, ab: Tensor | None) -> tuple:
        h, weight, bias, target, mask, c = ctx.saved_tensors
        dh, dw = torch.zeros_like(h), torch.zeros_like(weight)
        db = None if bias is None else torch.zeros_like(bias)
        dc = torch.zeros((), dtype=torch.float64, device=h.device)
        for rows in row_slices(h.shape[0], weight.shape[0] * h.element_size()):
            u = _direction(h[rows], weight, ah, aw, ab, rows)
            if u is None:
                continue
            p = _softmax(h, weight, bias, rows)
            g = _output_gradient(p, target[rows], mask[rows], ctx.scale)
            dc += (g * u).sum().double()
            dot = (p * u).sum(1, keepdim=True)
            q = u.sub_(dot).mul_(p).mul_((mask[rows] * (ctx.scale * c)).unsqueeze(1))
            del p
            dh[rows] = q @ weight
            dw.addmm_(q.T, h[rows])
            if db is not None:
                db += q.sum(0)
            g.mul_(c)
            if aw is not None:
                dh[rows] += g @ aw
            if ah is not None:
                dw.addmm_(g.T, ah[rows])
        return dh, dw, db, None, None, None, dc.to(c.dtype).reshape(c.shape)


def _direction(h: Tensor, weight: Tensor, ah: Tensor | None, aw: Tensor | None,
               ab: Tensor | None, rows: slice) -> Tensor | None:
    r"""$U = A_h W^\top + h A_W^\top + A_b$ for one chunk (None when all three are None)."""
    u = None
    if ah is not None:
        u = ah[rows] @ weight.T
    if aw is not None:
        u = h @ aw.T if u is None else u.addmm_(h, aw.T)
    if ab is not None:
        u = ab.expand(h.shape[0], -1).clone() if u is None else u.add_(ab)
    return u


def linear_head_product(h: Tensor, weight: Tensor, bias: Tensor | None, directions: tuple,
                        product: Callable[[slice, Tensor, Tensor], Tensor], grads: tuple) -> None:
    r"""$J^\top M J$ of a linear head $Z = h W^\top + b$, chunk by chunk over the rows.

    For a direction $(A_h, A_W, A_b)$ of the head's operands, per chunk of rows $r$:
    $U_r = A_{h,r} W^\top + h_r A_W^\top + A_b$ (the head's $J v$), $Q_r = M_r U_r$ (an
    output-space matrix block-diagonal over the rows, from the chunk's logits) and its
    pullback $G_h \mathrel{+}= Q W$, $G_W \mathrel{+}= Q^\top h$, $G_b \mathrel{+}= \sum_r Q_r$.
    No ``[rows, V]`` tensor beyond one chunk (:data:`CHUNK_BYTES`) is formed.

    Args:
        h: ``[M, d]``, the head's input.
        weight: ``[V, d]``.
        bias: ``[V]`` or None.
        directions: ``(A_h, A_W, A_b)``, each shaped like its operand, or None for zero.
        product: ``(rows, z, u) -> M_r u`` for the logits ``z`` of ``rows``; may overwrite
            ``u``.
        grads: ``(G_h, G_W, G_b)``, buffers shaped like the operands that the pullback is
            added into, or None where it is not wanted (computed without a graph).
    """
    ah, aw, ab = directions
    gh, gw, gb = grads
    with torch.no_grad():
        for rows in row_slices(h.shape[0], weight.shape[0] * h.element_size()):
            u = _direction(h[rows], weight, ah, aw, ab, rows)
            if u is None:  # a zero direction: a zero product
                return
            q = product(rows, _rows(h, weight, bias, rows), u)
            if gh is not None:
                gh[rows].addmm_(q, weight)
            if gw is not None:
                gw.addmm_(q.T, h[rows])
            if gb is not None:
                gb.add_(q.sum(0))


CROSS_ENTROPY_ARGS = ("input", "target", "weight", "size_average", "ignore_index", "reduce",
                      "reduction", "label_smoothing")
"""``F.cross_entropy``'s parameters, in order (to bind a call's positional arguments)."""


class LinearRecorder(TorchFunctionMode):
    """Record the last ``F.linear`` call, to recognise a language model's head.

    :meth:`head` answers whether a tensor is that call's output (or a contiguous view of it:
    ``.view(-1, V)``, ``.flatten(0, 1)``), unchanged since, and if so returns the call's
    operands. Every call runs unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: tuple | None = None

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        """Run ``func``; record it when it is ``F.linear``."""
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear and isinstance(out, Tensor):
            self._record(out, dict(zip(("input", "weight", "bias"), args), **kwargs))
        return out

    def _record(self, out: Tensor, bound: dict) -> None:
        """Keep the linear's output (weakly, with its place and version) and its operands."""
        self._last = None
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return  # torch.func's wrapped tensors have no storage of their own: never routed
        try:
            ptr = out.data_ptr()
        except RuntimeError:  # a tensor without storage
            return
        root = out if out._base is None else out._base  # (a 3-D linear returns a view)
        operands = (bound["input"], bound["weight"], bound.get("bias"))
        if not all(t is None or isinstance(t, Tensor) for t in operands):
            return
        self._last = (weakref.ref(root), ptr, out.numel(), out.is_contiguous() and out._version,
                      operands, _versions(operands))

    def head(self, z: Tensor) -> tuple | None:
        r"""``(h, W, b)`` of the last ``F.linear`` when ``z`` is its output, else None.

        ``z`` must be the output's memory, row-major (a contiguous view), never written in
        place since, nor its operands (version counters), all of one dtype ($Z = h W^\top + b$
        then holds for ``z.reshape(-1, V)`` and ``h.reshape(-1, d)``, row by row).

        Args:
            z: A tensor.

        Returns:
            The operands ``(h, W, b)`` (``b`` may be None), or None when ``z`` is not
            recognised as the last linear's output.
        """
        if self._last is None or not isinstance(z, Tensor):
            return None
        ref, ptr, numel, version, operands, versions = self._last
        root, (h, weight, bias) = ref(), operands
        base = z if z._base is None else z._base
        if (root is None or base is not root or version is False or not z.is_contiguous()
                or z._version != version or _versions(operands) != versions):
            return None
        try:
            same = z.data_ptr() == ptr
        except RuntimeError:  # a tensor without storage (a torch.func wrapper): not routed
            return None
        if (not same or z.numel() != numel or weight.dim() != 2 or z.shape[-1] != weight.shape[0]
                or any(t is not None and t.dtype != z.dtype for t in operands)):
            return None
        return h, weight, bias


def _versions(tensors: tuple) -> tuple:
    """The version counters of ``tensors`` (None for None)."""
    return tuple(None if t is None else t._version for t in tensors)


class ChunkedCrossEntropy(LinearRecorder):
    """Route a language model's head and cross-entropy through :class:`_LinearCrossEntropy`.

    Records the last ``F.linear`` call (:class:`LinearRecorder`); a later ``F.cross_entropy``
    on its output (or a contiguous view of it: ``.view(-1, V)``, ``.flatten(0, 1)``) with
    class-index targets, no class weights or label smoothing, ``reduction`` "mean" or "sum",
    logits larger than one chunk (:data:`CHUNK_BYTES`) and outside ``torch.func`` transforms
    is computed from the head's input and weights chunk by chunk (module docstring). Every
    other call runs unchanged.
    """

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        """Record ``F.linear``; route a matching ``F.cross_entropy``; run the rest unchanged."""
        if func is F.cross_entropy:
            routed = self._route(dict(zip(CROSS_ENTROPY_ARGS, args), **(kwargs or {})))
            if routed is not None:
                return routed
        return super().__torch_function__(func, types, args, kwargs)

    def _route(self, call: dict) -> Tensor | None:
        """The chunked loss for a matching call (class docstring), else None."""
        z, target = call["input"], call["target"]
        reduction = call.get("reduction", "mean")
        plain = (call.get("weight") is None and not call.get("label_smoothing", 0.0)
                 and call.get("size_average") is None and call.get("reduce") is None
                 and reduction in ("mean", "sum"))
        if (not plain or torch._C._functorch.peek_interpreter_stack() is not None
                or not torch.is_grad_enabled() or not isinstance(target, Tensor)
                or z.dim() != 2 or target.dim() != 1 or target.dtype != torch.long
                or z.numel() * z.element_size() <= CHUNK_BYTES):
            return None
        head = self.head(z)
        if head is None:
            return None
        h, weight, bias = head
        mask = (target != call.get("ignore_index", -100)).to(h.dtype)
        count = float(mask.sum())
        if reduction == "mean" and count == 0:
            return None  # autograd's NaN, as F.cross_entropy gives it
        scale = 1.0 / count if reduction == "mean" else 1.0
        flat = h.reshape(-1, h.shape[-1])
        return _LinearCrossEntropy.apply(flat, weight, bias, target, mask, scale)


__all__ = ["CHUNK_BYTES", "CROSS_ENTROPY_ARGS", "ChunkedCrossEntropy", "LinearRecorder",
           "linear_head_product", "row_slices", "softmax_hessian_product"]
