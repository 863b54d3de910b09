"""Full-data metrics of a model.

:func:`evaluate` (mean loss and accuracy), :func:`full_grad_norm`, and the sample-weighted
metrics over batches of any structure behind them and the Tracker's ``eval_data``/``test_data``
records (:func:`evaluate_metrics`).

``eval_fn(model, batch) -> dict[str, float | Tensor]`` gives the metrics of one batch; the
default handles

* ``(inputs, targets, ...)`` tuples/lists: ``model(inputs)``;
* dict batches (Hugging Face style): ``model(**batch)``, with the targets under ``"labels"``;

and model outputs that are tensors (the logits) or objects with ``.loss`` / ``.logits``. The loss
is, in this order (one forward where possible):

1. the output's own ``.loss`` for a dict batch (a Hugging Face model given ``labels``; a causal
   LM shifts its labels itself);
2. ``loss_fn.criterion`` (declared by ``supervised``) on the logits and targets: as given, or,
   for sequence outputs (logits ``[N, T, V]`` with targets ``[N, T]``: ``logits.shape[:-1] ==
   targets.shape`` and more than 2 dimensions), on the tokens flattened (``[N T, V]`` and
   ``[N T]``: the token mean, ``ignore_index`` respected). A dict batch whose ``labels`` equal
   its ``input_ids`` wherever they are not -100 follows Hugging Face's causal-LM convention:
   the logits at position $t$ are scored against the label at $t + 1$. A criterion that
   refuses the shapes raises a ``ValueError`` asking for ``eval_fn``;
3. else ``loss_fn(model, batch)``.

The accuracy
(``argmax`` of the logits against integer targets, ignoring targets equal to -100) is reported
where one prediction per target is well defined: for tuples whenever the logits' leading shape
is the targets' shape, for dict batches only for one label per sample (sequence or image
classification; a causal LM's token labels are shifted inside the model, so no accuracy there).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .core import (BatchSizeFn, LossFn, ParamSelection, check_loss, data_mean, default_batch_size,
                   guarded, loss_reduction, preserved, scalar_zeros, select_params,
                   unwrap_compiled)
from .core.protocol import model_device, to_device
from .core.sharding import forward_model, sample_counts
from .derivatives import explained_errors, gradients
from .sharded import is_sharded, norms_squared, ShardedLoss

EvalFn = Callable[[nn.Module, Any], Mapping[str, Any]]
IGNORE_INDEX = -100


def _logits(outputs: Any) -> Tensor | None:
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    return logits if isinstance(logits, Tensor) else None


def _accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    valid = targets != IGNORE_INDEX
    hits = (logits.argmax(dim=-1) == targets) & valid
    return hits.sum().to(torch.float64) / valid.sum().clamp_min(1)


def _causal(batch: Any, targets: Tensor) -> bool:
    """A dict batch whose labels equal its ``input_ids`` wherever set: a causal LM's."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, Tensor) or ids.shape != targets.shape or targets.dim() < 2:
        return False
    kept = targets != IGNORE_INDEX
    return bool(kept.any()) and bool((ids.to(targets.device)[kept] == targets[kept]).all())


def _criterion_loss(criterion: Callable, logits: Tensor, targets: Tensor, causal: bool
                    ) -> Tensor:
    """``criterion`` on the logits and targets, sequence outputs flattened (module docstring).

    Raises:
        ValueError: The criterion refuses the shapes (the message asks for ``eval_fn``).
    """
    given = (tuple(logits.shape), tuple(targets.shape))
    if causal:  # Hugging Face's causal-LM convention: position t predicts label t + 1
        logits, targets = logits[:, :-1], targets[:, 1:]
    if logits.dim() > 2 and logits.shape[:-1] == targets.shape:  # [N, T, V] with [N, T]
        logits, targets = logits.flatten(0, -2), targets.flatten()
    try:
        return criterion(logits, targets)
    except (RuntimeError, ValueError, IndexError) as err:
        raise ValueError(
            f"the default evaluation applies loss_fn.criterion to the model's logits "
            f"{list(given[0])} and the targets {list(given[1])}, and the criterion refused "
            f"them ({err}); pass eval_fn=(model, batch) -> dict of metrics (e.g. "
            "{'loss': loss_fn(model, batch)})") from err


def default_metrics(model: nn.Module, loss_fn: LossFn, batch: Any) -> dict[str, Tensor]:
    """The loss and accuracy of one batch (module docstring).

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor`` (its ``.criterion`` is used when set).
        batch: ``(inputs, targets, ...)`` or a dict batch with ``"labels"``.

    Returns:
        ``{"loss": ..., "acc": ...}``, 0-d tensors; ``acc`` is NaN where undefined.

    Raises:
        ValueError: Another kind of batch, a criterion that refuses the logits' and targets'
            shapes (pass ``eval_fn``), or a loss that is not a finite scalar.
    """
    device = model_device(model)
    if isinstance(batch, Mapping):
        kwargs = {k: to_device(v, device) for k, v in batch.items()}
        outputs, targets = model(**kwargs), kwargs.get("labels")
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        targets = to_device(batch[1], device)
        outputs = model(to_device(batch[0], device))
    else:
        raise ValueError("the default evaluation takes (inputs, targets, ...) tuples or dict "
                         f"batches with \"labels\", got a {type(batch).__name__}; pass "
                         "eval_fn=(model, batch) -> dict of metrics")
    logits, criterion = _logits(outputs), getattr(loss_fn, "criterion", None)
    loss = getattr(outputs, "loss", None)
    if isinstance(batch, Mapping) and isinstance(loss, Tensor):
        pass  # the model's own loss (rule 1)
    elif criterion is not None and logits is not None and isinstance(targets, Tensor):
        loss = _criterion_loss(criterion, logits, targets, _causal(batch, targets))
    elif not isinstance(loss, Tensor):
        loss = loss_fn(model, batch)
    loss = check_loss(loss, " in the evaluation")
    per_sample = not isinstance(batch, Mapping) or (logits is not None and logits.dim() == 2)
    if (per_sample and logits is not None and isinstance(targets, Tensor)
            and not targets.is_floating_point() and logits.shape[:-1] == targets.shape):
        return {"loss": loss, "acc": _accuracy(logits, targets)}
    return {"loss": loss, "acc": torch.tensor(math.nan, dtype=torch.float64)}


def evaluate_metrics(model: nn.Module, loss_fn: LossFn, data: Iterable, *,
                     eval_fn: EvalFn | None = None, model_mode: str = "eval",
                     batch_size_fn: BatchSizeFn | None = None, progress: bool = True
                     ) -> dict[str, float]:
    """Sample-weighted means over ``data`` of the metrics of one batch.

    Computed without grad, in ``model_mode``; the model is left unchanged. For a sum-reduced
    ``loss_fn`` the default loss is the total loss (the accuracy is still a mean). A model
    sharded with FSDP2's ``fully_shard`` is evaluated on its hook-free copy
    (:func:`analysis.sharded.forward_copy`, which ``eval_fn`` then receives), each rank on its
    data shard (the same number of batches on every rank): the metrics of the unsharded model
    on all the data.

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: A re-iterable of batches.
        eval_fn: ``eval_fn(model, batch) -> dict`` of metrics (default
            :func:`default_metrics`); every batch must give the same keys.
        model_mode: "eval" or "train".
        batch_size_fn: ``batch -> int`` sample count (default: the leading dimension).
        progress: Show a progress bar over the batches (rank 0).

    Returns:
        The metrics by name, as floats.

    Raises:
        ValueError: ``eval_fn`` returns no dict, or other keys on another batch, or (sharded
            model) the ranks hold different numbers of batches.
    """
    keys: list[str] = [] if eval_fn is not None else ["loss", "acc"]
    reduction = "mean" if eval_fn is not None else loss_reduction(loss_fn)
    size = batch_size_fn or default_batch_size

    def per_batch(batch: Any) -> list[Tensor]:
        found = eval_fn(forward, batch) if eval_fn is not None else \
            default_metrics(forward, loss_fn, batch)
        if not isinstance(found, Mapping) or not found:
            raise ValueError("eval_fn must return a non-empty dict of metrics, got "
                             f"{type(found).__name__}")
        if not keys:
            keys.extend(found)
        elif list(found) != keys:
            raise ValueError(f"the evaluation must give the same metrics on every batch: "
                             f"{keys} on the first, {list(found)} on another")
        values = [torch.as_tensor(v, dtype=torch.float64).detach().reshape(()) for v in
                  found.values()]
        if reduction == "sum":  # the loss is the batch's total; the accuracy a mean: weight it
            values[1] = values[1] * size(batch)
        return values

    if is_sharded(model):  # every forward gathers weights: the same batches on every rank
        sample_counts(data, batch_size_fn)
    with preserved(model, model_mode, weights=False), torch.no_grad():
        forward = forward_model(model)  # a fully_shard model: its hook-free copy
        out = data_mean(data, per_batch, batch_size_fn, reduction=reduction,
                        zeros=scalar_zeros(len(keys)) if keys else None, progress=progress)
    values = [float(v) for v in out.values]
    if reduction == "sum":
        values[1] /= out.n_samples
    return dict(zip(keys, values))


@guarded(sharded=True)
def evaluate(model: nn.Module, loss_fn: LossFn, data: Iterable, *, params: ParamSelection = None,
             model_mode: str = "eval", batch_size_fn: BatchSizeFn | None = None,
             progress: bool = True) -> tuple[float, float]:
    r"""The mean loss and the accuracy over ``data``; the model is left unchanged.

    $$L = \frac{\sum_b n_b L_b}{\sum_b n_b}, \qquad
    \mathrm{acc} = \frac{\sum_b n_b\, \mathrm{acc}_b}{\sum_b n_b}.$$

    For a sum-reduced ``loss_fn`` the loss is the total loss (the accuracy is still a mean).
    A model sharded with FSDP2's ``fully_shard``: each rank passes its data shard and gets the
    metrics of the unsharded model on all the data (:func:`evaluate_metrics`).

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: A re-iterable of batches.
        params: Validated like everywhere (the metrics do not depend on the selection).
        model_mode: "eval" (default) or "train".
        batch_size_fn: ``batch -> int`` sample count (default: the leading dimension).
        progress: Show a progress bar over the batches (rank 0).

    Returns:
        ``(loss, accuracy)``; the accuracy is NaN where the batches define none (module
        docstring).
    """
    select_params(model, params)
    metrics = evaluate_metrics(model, loss_fn, data, model_mode=model_mode,
                               batch_size_fn=batch_size_fn, progress=progress)
    return metrics["loss"], metrics["acc"]


@guarded(sharded=True)
def full_grad_norm(model: nn.Module, loss_fn: LossFn, data: Iterable, *,
                   params: ParamSelection = None, model_mode: str = "eval",
                   batch_size_fn: BatchSizeFn | None = None, progress: bool = True) -> float:
    r"""The norm $\|\nabla_w L(w)\|_2$ of the gradient of the mean loss over ``data``.

    $L$ is the sample-weighted mean loss (the total loss for a sum-reduced ``loss_fn``), $w$
    the selected parameters; parameters the loss does not use contribute zero. The model is
    left unchanged.

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        data: A re-iterable of batches.
        params: The parameter selection (default: all with requires_grad).
        model_mode: "eval" (default) or "train".
        batch_size_fn: ``batch -> int`` sample count (default: the leading dimension).
        progress: Show a progress bar over the batches (rank 0).

    Returns:
        The gradient norm as a float.
    """
    model = unwrap_compiled(model)
    params = select_params(model, params)[1]
    if is_sharded(model):  # fully_shard: the exact gradient on shards, a global norm
        with preserved(model, model_mode, weights=False):
            grads = ShardedLoss(model, loss_fn, data, params, batch_size_fn=batch_size_fn)(
                None, grad=True)[1]
        return float(torch.sqrt(norms_squared(grads)))
    with preserved(model, model_mode, weights=False):
        def per_batch(batch):
            with explained_errors():
                loss = check_loss(loss_fn(model, batch), " in full_grad_norm")
            return [torch.zeros_like(p) if g is None else g
                    for g, p in zip(gradients(loss, params), params)]
        grads = data_mean(data, per_batch, batch_size_fn, reduction=loss_reduction(loss_fn),
                          zeros=lambda: [torch.zeros_like(p) for p in params],
                          progress=progress).values
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
