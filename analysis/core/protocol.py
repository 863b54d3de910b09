"""The loss/data protocol shared by ``analysis`` and ``landscape``.

* ``loss_fn(model, batch) -> Tensor``: a scalar, the mean loss over the batch, or its sum when
  ``loss_fn.reduction == "sum"`` (``supervised`` copies ``criterion.reduction``).
* ``data``: a deterministic re-iterable of batches (a DataLoader, a list of batches).
* Full-data quantities weight each batch by its sample count, so they equal the quantity of
  the mean loss over all samples, whatever the batch sizes, and (under ``torch.distributed``)
  over all ranks' shards. For a sum-reduced ``loss_fn`` they are those of the total loss
  ``sum_b L_b`` (unweighted, not divided by the sample count).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from tqdm.auto import tqdm

from .distributed import all_reduce_sum_, failures_shared, is_distributed, rank
from .precision import accumulable
from .progress import batch_done
from .validation import check_choice

LossFn = Callable[[nn.Module, Any], Tensor]
BatchSizeFn = Callable[[Any], int]
REDUCTIONS = ("mean", "sum")
LIKELIHOODS = ("categorical", "gaussian", "bernoulli")


def to_device(x: Any, device: torch.device | None) -> Any:
    """A tensor ``x`` on ``device`` (anything else, or ``device=None``, as it is).

    Copies to an accelerator do not block (they are ordered on its stream); copies to the CPU
    do, since a non-blocking device-to-host copy may be read before it has landed.

    Args:
        x: A tensor, or anything else (returned unchanged).
        device: The target device (None: unchanged).

    Returns:
        ``x`` on ``device``.
    """
    if not isinstance(x, Tensor) or device is None:
        return x
    return x.to(device, non_blocking=torch.device(device).type != "cpu")


def model_device(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter or buffer.

    Args:
        model: A module.

    Returns:
        The device, or None when the module has neither parameters nor buffers.
    """
    anchor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return None if anchor is None else anchor.device


def split_loss(forward: Callable[[nn.Module, Any], Any],
               criterion: Callable[[Any, Any], Tensor], *,
               likelihood: str | None = None) -> LossFn:
    """``loss_fn(model, batch) = criterion(forward(model, batch), batch)``, declaring the split.

    The generalised Gauss-Newton and the Fisher (:mod:`analysis.curvature`) need the model
    output and the criterion separately: they read ``loss_fn.split = (forward, criterion)``,
    which this sets. Any ``loss_fn`` may carry such an attribute.

    Args:
        forward: ``forward(model, batch)``, the output tensor.
        criterion: ``criterion(outputs, batch)``, the mean loss over the batch.
        likelihood: The likelihood whose negative log ``criterion`` is, for the exact and
            Monte-Carlo Fisher (``curvature="fisher"`` in every routine, ``FisherOperator``)
            and the empirical Fisher's observations: ``"categorical"``, ``"gaussian"`` or
            ``"bernoulli"`` (:mod:`analysis.curvature`). Set as ``loss_fn.likelihood``; None
            (default) declares nothing.

    Returns:
        The ``loss_fn``, with ``.split`` and ``.likelihood`` set.

    Raises:
        ValueError: ``likelihood`` is not one of ``LIKELIHOODS``.
    """
    if likelihood is not None:
        check_choice("likelihood", likelihood, LIKELIHOODS)

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        return criterion(forward(model, batch), batch)

    loss_fn.split = (forward, criterion)
    loss_fn.likelihood = likelihood
    return loss_fn


class LikelihoodError(ValueError):
    """The exact or Monte-Carlo Fisher cannot tell the likelihood of ``loss_fn``'s criterion."""


def likelihood_error(criterion: Any, curvature: str | None = None) -> LikelihoodError:
    """The refusal of a Fisher whose likelihood is unknown, naming the ways out that exist.

    A routine's ``curvature=`` takes no ``likelihood=``: there, the loss declares it
    (:func:`split_loss`); ``FisherOperator`` also takes the keyword.

    Args:
        criterion: What ``loss_fn.criterion`` holds (None when nothing).
        curvature: The routine's ``curvature=`` name, or None for ``FisherOperator``.

    Returns:
        The :class:`LikelihoodError` to raise.
    """
    declare = "analysis.split_loss(forward, criterion, likelihood=...)"
    if curvature is None:
        what, ways = ("the Fisher (kind='exact' or 'mc')",
                      f"FisherOperator(..., likelihood=...) or {declare}")
        other = "use GGNOperator or FisherOperator(..., kind='empirical')"
    else:
        what, ways = f"curvature={curvature!r}", declare
        other = "use curvature='ggn' or curvature='empirical_fisher'"
    return LikelihoodError(
        f"{what} needs the likelihood: loss_fn.criterion must be nn.CrossEntropyLoss (no "
        "weight, no label smoothing), nn.MSELoss or nn.BCEWithLogitsLoss (no weights) with "
        f"reduction='mean', got {criterion!r}; declare it with {ways} (one of {LIKELIHOODS}; "
        f"or set loss_fn.likelihood), or {other}")


def loss_reduction(loss_fn: Callable) -> str:
    """How ``loss_fn`` reduces a batch.

    Args:
        loss_fn: A ``loss_fn(model, batch)``.

    Returns:
        Its ``reduction`` attribute, "mean" (default) or "sum".

    Raises:
        ValueError: ``loss_fn.reduction`` is another value.
    """
    return check_choice("loss_fn.reduction", getattr(loss_fn, "reduction", "mean"), REDUCTIONS)


class Supervised:
    """``loss_fn(model, batch) = criterion(model(batch[0]), batch[1])``: a supervised loss.

    Made by :func:`supervised`; code that needs the criterion (the stacked landscape path, the
    Fisher's likelihood) recognises it with ``isinstance(loss_fn, Supervised)`` and reads
    ``loss_fn.criterion``.

    Attributes:
        criterion: the ``criterion(outputs, targets)`` it wraps.
        reduction: ``criterion.reduction`` ("mean" when absent), "mean" or "sum".
        split: ``(forward, criterion)`` as :func:`split_loss` declares them: ``forward(model,
            batch)`` returns the model's output, and the criterion moves the targets to the
            output's device.
    """

    def __init__(self, criterion: Callable[[Tensor, Tensor], Tensor]):
        """Wrap ``criterion``; see :func:`supervised` for the arguments and errors."""
        reduction = getattr(criterion, "reduction", "mean")
        if reduction not in REDUCTIONS:
            raise ValueError(f"criterion.reduction must be one of 'mean', 'sum' (loss_fn returns "
                             f"a scalar), got {reduction!r}")
        self.criterion = criterion
        self.reduction = reduction
        self.split = (self.outputs, self.on_targets)

    @staticmethod
    def _moved(model: nn.Module, x: Any) -> Any:
        return to_device(x, model_device(model))

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        """The criterion on ``model``'s outputs for ``batch[0]`` and the targets ``batch[1]``.

        Args:
            model: the model; the batch's tensors are moved to its device.
            batch: ``(inputs, targets, ...)``.

        Returns:
            The criterion's value (a scalar for a "mean" or "sum" reduction).
        """
        return self.criterion(model(self._moved(model, batch[0])), self._moved(model, batch[1]))

    def outputs(self, model: nn.Module, batch: Any) -> Tensor:
        """``model(batch[0])``, the inputs moved to the model's device (``split[0]``)."""
        return model(self._moved(model, batch[0]))

    def on_targets(self, outputs: Tensor, batch: Any) -> Tensor:
        """The criterion on ``outputs`` and ``batch[1]`` moved to their device (``split[1]``)."""
        return self.criterion(outputs, to_device(batch[1], outputs.device))

    def __repr__(self) -> str:
        """``supervised(<criterion>)``."""
        return f"supervised({self.criterion!r})"


def supervised(criterion: Callable[[Tensor, Tensor], Tensor]) -> Supervised:
    """Adapt ``criterion(outputs, targets)`` to the ``loss_fn(model, batch)`` protocol.

    ``batch`` is ``(inputs, targets, ...)``; tensors are moved to the model's device. The
    result, a :class:`Supervised`, carries ``.criterion``, ``.reduction`` and the ``.split`` of
    :func:`split_loss` (whose criterion moves the targets to the output's device). With
    ``reduction="sum"``, e.g. ``nn.CrossEntropyLoss(reduction="sum")``, every routine computes
    the quantities of the total loss.

    Args:
        criterion: ``criterion(outputs, targets) -> Tensor``, e.g. ``nn.CrossEntropyLoss()``;
            its ``reduction`` attribute ("mean" when absent) is the loss's.

    Returns:
        The loss function ``loss_fn(model, batch) = criterion(model(batch[0]), batch[1])``.

    Raises:
        ValueError: ``criterion.reduction`` is neither "mean" nor "sum" ("none" is refused:
            the protocol needs a scalar).
    """
    return Supervised(criterion)


def _tensors(batch: Any) -> Iterator[Tensor]:
    """The tensors of ``batch``, depth first through tuples, lists and dicts."""
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, (tuple, list, Mapping)):
        for item in batch.values() if isinstance(batch, Mapping) else batch:
            yield from _tensors(item)


def default_batch_size(batch: Any) -> int:
    """The number of samples in ``batch``.

    Args:
        batch: A tensor, or tuples, lists and dicts of tensors.

    Returns:
        The leading dimension of its tensors, found depth first (0-d tensors aside).

    Raises:
        ValueError: The batch holds no such tensor, or their leading dimensions differ (the
            message asks for ``batch_size_fn``).
    """
    dims = [len(t) for t in _tensors(batch) if t.dim() > 0]
    if not dims:
        raise ValueError(f"cannot infer the sample count of a {type(batch).__name__} batch that "
                         "holds no tensor with a leading dimension; pass batch_size_fn=")
    if len(set(dims)) > 1:
        raise ValueError("cannot infer the sample count of a batch whose tensors have different "
                         f"leading dimensions {sorted(set(dims))}; pass batch_size_fn=")
    return dims[0]


def _single_batch(data: Any) -> str | None:
    """What ``data`` is if it is one batch rather than an iterable of batches.

    A tensor or array, a dict, or a tuple of tensors or arrays (``(X, Y)``); a list of tensors
    is a list of batches.
    """
    arrays = (Tensor, np.ndarray)
    if isinstance(data, arrays):
        return f"a {type(data).__name__}"
    if isinstance(data, Mapping):
        return "a dict"
    if isinstance(data, tuple) and data and all(isinstance(x, arrays) for x in data):
        return "a tuple of tensors"
    return None


def check_data(data: Iterable) -> None:
    """Reject what cannot be the iterable of batches analysis passes over many times.

    Args:
        data: The ``data=`` argument.

    Raises:
        ValueError: ``data`` is None, a one-shot iterator, a single batch (a tensor, a dict,
            a tuple of tensors) or a map-style Dataset (it yields samples, not batches).
    """
    if data is None:
        raise ValueError("data must be an iterable of batches (pass a single batch as [batch])")
    single = _single_batch(data)
    if single is not None:
        raise ValueError(f"data must be an iterable of batches, got {single}, which is one batch: "
                         "pass [batch] (a list of batches; a tuple of tensors is read as one "
                         "batch (inputs, targets, ...), a list of tensors as batches)")
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        raise ValueError(f"data must be an iterable of batches, got a {type(data).__name__} "
                         "(a Dataset yields samples): pass DataLoader(dataset, batch_size=...)")
    if getattr(type(data), "__iter__", None) is DataLoader.__iter__:
        return  # a fresh iterator per pass; asking for one here would start its workers
    if iter(data) is data:
        raise ValueError("data must be re-iterable (a DataLoader or a list of batches), "
                         "not a one-shot iterator or generator")


def check_loss_fn(loss_fn: Any) -> None:
    """Refuse a criterion passed where ``loss_fn(model, batch)`` is expected.

    ``nn.CrossEntropyLoss()`` (any ``torch.nn`` loss module) or a ``torch.nn.functional`` loss
    takes ``(outputs, targets)``; called as ``loss_fn(model, batch)`` it fails deep inside torch
    with a TypeError that does not say what to do. :func:`supervised` adapts it.

    Args:
        loss_fn: The routine's ``loss_fn``.

    Raises:
        TypeError: ``loss_fn`` is a criterion (the message names ``supervised(criterion)``), or
            is not callable.
    """
    functional = getattr(loss_fn, "__module__", None) == "torch.nn.functional"
    if isinstance(loss_fn, nn.modules.loss._Loss) or functional:
        name = (f"{type(loss_fn).__name__}()" if isinstance(loss_fn, nn.Module)
                else f"F.{getattr(loss_fn, '__name__', 'loss')}")
        raise TypeError(f"loss_fn must be loss_fn(model, batch) -> Tensor, got the criterion "
                        f"{name} (which takes outputs and targets); wrap it: "
                        f"loss_fn=supervised(criterion), e.g. "
                        f"analysis.supervised(nn.CrossEntropyLoss())")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), "
                        f"got {type(loss_fn).__name__}")


def check_loss(loss: Any, where: str = "") -> Tensor:
    """The loss as a 0-d tensor.

    Args:
        loss: What ``loss_fn`` returned.
        where: Appended to the message of a non-finite loss (where it was computed).

    Returns:
        The loss reshaped to 0-d.

    Raises:
        ValueError: ``loss`` is not a tensor with one element, or not finite.
    """
    if not isinstance(loss, Tensor):
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor (the mean loss over the batch), "
                         f"got shape {tuple(loss.shape)}")
    loss = loss.reshape(())
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"loss_fn returned a non-finite loss ({loss.item()}){where}")
    return loss


def scalar_zeros(count: int) -> Callable[[], list[Tensor]]:
    """The ``zeros=`` of :func:`data_mean` when ``per_batch`` returns ``count`` scalars.

    Args:
        count: The scalars per batch.

    Returns:
        A function returning ``count`` float64 zeros.
    """
    return lambda: [torch.zeros((), dtype=torch.float64) for _ in range(count)]


def _length(data: Iterable) -> int | None:
    """``len(data)``, or None where it has none (an IterableDataset's DataLoader)."""
    try:
        return len(data)
    except (TypeError, NotImplementedError):
        return None


@dataclass
class DataMean:
    """Sample-weighted means of per-batch tensors over all data (and ranks).

    Attributes:
        values: The means (sums for a sum reduction), one per tensor of ``per_batch``.
        n_samples: The samples over all ranks.
        n_batches: The batches with samples on this rank.
    """
    values: list[Tensor]
    n_samples: float
    n_batches: int


def data_mean(data: Iterable, per_batch: Callable[[Any], Sequence[Tensor]],
              batch_size_fn: BatchSizeFn | None = None, *, reduction: str = "mean",
              zeros: Callable[[], Sequence[Tensor]] | None = None,
              progress: bool = False) -> DataMean:
    r"""The sample-weighted mean of each tensor returned by ``per_batch(batch)``.

    $$\bar f = \frac{\sum_b n_b f(b)}{\sum_b n_b},$$

    the one sample-weighted reduction of the package: since ``loss_fn`` returns the batch
    mean, weighting by $n_b$ gives the quantity of the mean loss over all samples.
    bfloat16/float16 tensors are accumulated (and returned) in float32. Under
    ``torch.distributed`` the sums and counts are all-reduced together, so the result is that
    of the union of the shards.

    Args:
        data: A deterministic re-iterable of batches.
        per_batch: ``batch -> sequence of tensors``.
        batch_size_fn: ``batch -> int`` sample count (default: :func:`default_batch_size`).
        reduction: "mean", or "sum" (``loss_reduction(loss_fn)`` of a sum-reduced
            ``loss_fn``) for $\sum_b f(b)$, the quantity of the total loss.
        zeros: ``() -> tensors`` shaped like ``per_batch``'s: the share of a rank whose shard
            is empty (needed under ``torch.distributed``).
        progress: Show a bar over the batches (rank 0). Whatever it is, each batch reports
            its share of the pass to an enclosing
            :func:`analysis.core.progress.batch_progress` (the bars of the solvers).

    Returns:
        A :class:`DataMean`.

    Raises:
        ValueError: ``data`` is not an iterable of batches, or yields no sample (on this rank
            without ``zeros``, or on every rank).
    """
    check_data(data)
    check_choice("reduction", reduction, REDUCTIONS)
    size = batch_size_fn or default_batch_size
    first: list[Tensor] | None = None   # the first batch's tensors, weight w_first, uncopied
    sums: list[Tensor] | None = None    # running weighted sums, from the second batch on
    total, w_first, n_batches, length = 0, 0, 0, _length(data)
    # one iterator per pass: given ``data`` itself, tqdm.auto's bar would ask it for two
    with failures_shared():  # an error of this rank is raised on every rank, never a hang
        for batch in tqdm(iter(data), total=length, desc="data", leave=False,
                          disable=not progress or rank() != 0):
            n = size(batch)
            if n <= 0:
                continue
            w = n if reduction == "mean" else 1
            out = [accumulable(t.detach()) for t in per_batch(batch)]
            if length:
                batch_done(1 / length)   # an outer bar moves during the pass
            if first is None:
                first, w_first = out, w
            else:
                if sums is None:
                    sums = [f * w_first for f in first]
                for s, t in zip(sums, out):
                    s.add_(t, alpha=w)
            total += n
            n_batches += 1
        if first is None and (zeros is None or not is_distributed()):
            raise ValueError("data is empty: it yielded no batch with samples"
                             + (" on this rank (pass zeros= to data_mean)" if is_distributed()
                                else ""))
    if sums is None and not is_distributed():
        # One batch: its tensors are the result (no copy, which keeps the peak memory of a
        # one-batch Hessian-vector product at the product itself).
        return DataMean(first, float(total), n_batches)
    if sums is None:
        sums = [t.detach().clone() for t in zeros()] if first is None else \
            [f * w_first for f in first]
    count = torch.tensor([float(total)], dtype=torch.float64, device=sums[0].device)
    all_reduce_sum_([*sums, count])
    n_total = float(count.item())
    if n_total == 0:
        raise ValueError("data is empty: it yielded no batch with samples on any rank")
    if reduction == "mean":
        for s in sums:
            s.div_(n_total)
    return DataMean(sums, n_total, n_batches)
