"""A low-overhead training callback that logs curvature and optimizer diagnostics.

Usage::

    tracker = Tracker(model, loss_fn, every=20, test_data=test, curvature_data=[batch],
                      lambda_max=True)
    for batch in loader:
        def closure():
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            return loss
        loss = opt.step(tracker.count(closure))   # counts forward-backward passes
        tracker.step(opt, loss)                    # logs every `every` steps
    tracker.save("run")                            # run.json + run.csv
    tracker.plot("run.png")                        # the figure, saved as run.png

Every record is a flat dict. Keys with a ``/`` are per layer (``"angle/fc.weight"``).

* ``loss`` (mean of the step losses since the last record), ``train_loss``/``train_acc`` on
  ``eval_data``, ``test_loss``/``test_acc`` on ``test_data`` (eval mode; any batch structure,
  see :mod:`analysis.metrics`), or ``train_<key>``/``test_<key>`` for the keys of
  ``eval_fn(model, batch) -> dict``.
* ``lambda_max`` of the Hessian on ``curvature_data`` by Lanczos, warm-started from the last
  top eigenvector, and ``eos_ratio`` = lambda_max / (2 / lr): gradient descent with step lr is
  stable on a quadratic only while this is <= 1 (the edge of stability, Cohen et al. 2021).
* With ``lambda_max`` on and an optimizer exposing a preconditioner P (``preconditioner()``, or
  a torch Adam/AdamW that has stepped): ``preconditioned_lambda_max`` = lambda_max(P^-1 H),
  warm-started likewise, and ``preconditioned_eos_ratio`` = it over the threshold
  (2 + 2 beta1) / ((1 - beta1) lr) of adaptive methods with EMA momentum (Cohen et al. 2022).
* ``trace`` of the Hessian (Hutch++).
* ``grad_norm``: the norm of the full gradient on ``curvature_data`` (``grad_norm=True``).
* ``sgd_fraction`` (global and per layer) from an optimizer with ``sgd_fraction()`` (AGD).
* ``stage`` and ``distance`` from an optimizer exposing them (SALA); ``opt_closure_calls``
  from one counting its closure calls (``n_closure_calls``).
* Per layer, for every optimizer: ``wnorm`` (Frobenius norm), ``rownorm`` (mean norm of the
  weight vectors, i.e. slices along dim 0, for tensors with ndim >= 2), ``angle`` (mean angle in
  radians between each weight vector before and after the step: the angular step of ND-Adam's
  Sec. 3) and ``cos`` (cosine between the step w_t - w_{t-1} and the negative gradient that the
  last closure call left in ``.grad``; NaN when either is zero). Angles and cosines need the
  weights before the step, which are kept only for the step before each record.
* The zero-argument methods named in ``optimizer_methods`` that the optimizer has (default:
  ND-Adam's ``angular_step`` and ``update_cosine``): a float under ``opt_<method>``, or a dict
  from parameter index to float under ``opt_<method>/<parameter name>``.
* ``passes`` (forward-backward passes so far, counted by ``count``), ``time`` (wall time of
  training so far, excluding the tracker's own work) and ``overhead`` (the tracker's time).

The optimizer is read by duck typing only; this module never imports ``optim``.
"""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .core import (ArgumentTypeError, BatchSizeFn, LossFn, check_bool, check_data, check_int,
                   check_choice, check_loss_fn, check_model_mode, check_positive, make_generator,
                   save_figure, unwrap_compiled)
from .core.distributed import all_reduce_sum_
from .core.sharding import is_dtensor, is_sharded
from .metrics import EvalFn, evaluate_metrics, full_grad_norm
from .operator import registered_curvatures
from .preconditioning import optimizer_preconditioner, stability_threshold

Record = dict[str, float]


def _row_angles(a: Tensor, b: Tensor) -> Tensor:
    r"""The angle between matching rows (slices along dim 0) of ``a`` and ``b``, in radians.

    $2 \arcsin(\|a/\|a\| - b/\|b\|\| / 2)$: accurate for the tiny angles of one step,
    unlike $\arccos$.
    """
    a, b = a.flatten(1), b.flatten(1)  # (a shard may hold no row)
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-30)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return 2.0 * torch.asin((a - b).norm(dim=1).mul(0.5).clamp(max=1.0))


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard, detached (a plain tensor as it is)."""
    return t.detach().to_local() if is_dtensor(t) else t.detach()


def _layer_stats(named: Sequence[tuple[str, Tensor]], previous: dict[str, Tensor] | None,
                 sharded: bool) -> Record:
    """``wnorm``, ``rownorm``, ``angle`` and ``cos`` per parameter (module docstring).

    Every statistic is a sum over rows (slices along dim 0) divided by the row count, in
    float64. FSDP2 shards every parameter along dim 0, so with ``sharded`` each rank holds
    whole rows: the row norms and row angles are local, and the sums over the shards are
    all-reduced in one call.
    """
    keys: list[tuple[str, str]] = []
    sums: list[Tensor] = []

    def add(kind: str, name: str, value: Tensor) -> None:
        keys.append((kind, name))
        sums.append(value.reshape(-1))

    for name, p in named:
        w = _local(p).double()
        add("wnorm", name, w.pow(2).sum())
        if p.dim() >= 2:
            add("rownorm", name, w.flatten(1).norm(dim=1).sum())
        before = None if previous is None else previous.get(name)
        if before is None:
            continue
        b = _local(before).double()
        if p.dim() >= 2:
            add("angle", name, _row_angles(w, b).sum())
        if p.grad is not None:
            step, g = w - b, -_local(p.grad).double()
            add("cos", name, torch.stack([(step * g).sum(), step.pow(2).sum(), g.pow(2).sum()]))
    flat = torch.cat([t.cpu() for t in sums]) if sums else torch.zeros(0, dtype=torch.float64)
    if sharded:
        all_reduce_sum_([flat])
    out: Record = {}
    offset, rows = 0, {name: p.shape[0] if p.dim() else 1 for name, p in named}
    for kind, name in keys:
        width = 3 if kind == "cos" else 1
        v = flat[offset:offset + width].tolist()
        offset += width
        if kind == "wnorm":
            out[f"wnorm/{name}"] = math.sqrt(v[0])
        elif kind == "cos":
            denom = math.sqrt(v[1] * v[2])
            out[f"cos/{name}"] = v[0] / denom if denom > 0 else float("nan")
        else:
            out[f"{kind}/{name}"] = v[0] / rows[name]
    return out


class Tracker:
    r"""Training callback that records curvature and optimizer diagnostics.

    Call ``step(optimizer, loss)`` after every optimizer step (and, optionally, wrap the
    closure in ``count`` to count forward-backward passes); every ``every`` steps a record
    (a flat dict, module docstring) is appended to ``records``. Only the quantities switched
    on are measured; the defaults record the step loss, the learning rate, the per-layer
    statistics and the optimizer's own diagnostics, which cost no data pass.

    Args:
        model: The trained model (a ``torch.compile``'d module is unwrapped).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the ``analysis`` protocol.
        every: Record every ``every`` optimizer steps (>= 1; default 10), and whenever
            ``log`` is called.
        eval_data: Batches recorded as ``train_<metric>`` (default None: not recorded), in
            eval mode, sample-weighted over the batches.
        test_data: Batches recorded as ``test_<metric>`` (default None), likewise.
        eval_fn: ``eval_fn(model, batch) -> dict`` of metrics for ``eval_data`` and
            ``test_data`` (default None: loss and accuracy, ``acc``, of
            :func:`analysis.metrics.default_metrics`: ``(inputs, targets)`` tuples, dict
            batches with ``"labels"``, outputs that are tensors or have ``.loss``/``.logits``;
            sequence outputs ``[N, T, V]`` scored per token, the rule in
            :mod:`analysis.metrics`).
        batch_size_fn: ``batch -> int`` sample count of the evaluation batches (default None:
            :func:`analysis.core.default_batch_size`).
        curvature_data: The batches on which ``lambda_max``, ``trace`` and ``grad_norm`` are
            computed (required when any of them is on; default None). Its determinism check
            (two forward passes) runs at the first curvature record only: the batches are the
            same at every record.
        lambda_max: Record ``lambda_max``, the top Hessian eigenvalue on ``curvature_data`` by
            Lanczos warm-started from the last top eigenvector, its ``lanczos_hvp`` and
            ``eos_ratio`` $= \lambda_{\max} \eta / 2$ (gradient descent with step $\eta$ is
            stable on a quadratic only while this is <= 1, Cohen et al. 2021). With an
            optimizer exposing a diagonal preconditioner $P$ also
            ``preconditioned_lambda_max`` $= \lambda_{\max}(P^{-1} H)$,
            ``preconditioned_lanczos_hvp`` and ``preconditioned_eos_ratio`` (over the
            threshold $(2 + 2\beta_1) / ((1 - \beta_1) \eta)$, Cohen et al. 2022). Default
            False.
        trace: Record ``trace``, the Hessian trace on ``curvature_data`` by Hutch++ (default
            False).
        grad_norm: Record ``grad_norm``, the norm of the gradient of the mean loss over
            ``curvature_data`` (default False).
        curvature: The curvature whose ``lambda_max`` and ``trace`` are recorded: any name
            registered with :func:`analysis.register_curvature` (default ``"hessian"``; the
            built-ins are ``"hessian"``, ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``). The
            record keys stay ``lambda_max`` / ``trace`` whatever the curvature.
        lanczos_tol: Convergence tolerance of each warm-started Lanczos run (> 0; default
            1e-3).
        lanczos_max_hvp: Hessian-vector product budget of each Lanczos run (>= 1; default
            50).
        trace_n_hvp: Hessian-vector products per trace estimate (>= 4, what Hutch++ needs;
            default 30).
        layers: Record the per-layer quantities ``wnorm/<name>``, ``rownorm/<name>``,
            ``angle/<name>``, ``cos/<name>`` and ``sgd_fraction/<name>`` (default True).
        seed: Seed of the stochastic estimators, the same at every record so the curves are
            smooth (default 0).
        model_mode: The mode the curvature quantities are computed in, "eval" or "train"
            (default "eval"; the model's own mode is restored).
        optimizer_methods: Zero-argument optimizer methods recorded under ``opt_<method>``
            (or ``opt_<method>/<name>`` when they return a dict per parameter index) where the
            optimizer has them (default: ND-Adam's ``("angular_step", "update_cosine")``).

    Attributes:
        records: The records, in order.
        n_steps: Optimizer steps accounted so far.
        passes: Forward-backward passes counted by ``count``.
        n_hvp: Hessian-vector products spent by the tracker.
        train_time: Wall time of training so far, excluding the tracker's own work.
        overhead: The tracker's own wall time.

    Raises:
        ValueError: An option outside its range, ``curvature_data`` missing while a curvature
            quantity is on, or data that is not an iterable of batches.
        ArgumentTypeError: ``optimizer_methods`` is not a sequence of method names.
    A model sharded with FSDP2's ``fully_shard`` (each rank passing its shards of
    ``eval_data``, ``test_data`` and ``curvature_data``, the same number of batches on every
    rank): every recorded quantity is that of the unsharded model on all the data, on every
    rank (the metrics and curvatures computed on a hook-free copy of the model at the
    precision of its stored shards, whatever the mixed-precision policy; the per-layer
    statistics from local sums over the shards, one all-reduce; the preconditioned spectra
    with the optimizer's sharded state as $P$). The model is only read: a training step after
    a record equals one without the tracker. ``loss`` is the mean of the losses passed to
    :meth:`step`, as each rank passes them.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, every: int = 10,
                 eval_data: Iterable | None = None, test_data: Iterable | None = None,
                 eval_fn: EvalFn | None = None, batch_size_fn: BatchSizeFn | None = None,
                 curvature_data: Iterable | None = None, lambda_max: bool = False,
                 trace: bool = False, grad_norm: bool = False, lanczos_tol: float = 1e-3,
                 lanczos_max_hvp: int = 50, trace_n_hvp: int = 30, curvature: str = "hessian",
                 layers: bool = True,
                 seed: int = 0, model_mode: str = "eval",
                 optimizer_methods: Sequence[str] = ("angular_step", "update_cosine")):
        every = check_int("every", every, 1)
        lambda_max, trace, grad_norm, layers = (check_bool(k, v) for k, v in (
            ("lambda_max", lambda_max), ("trace", trace), ("grad_norm", grad_norm),
            ("layers", layers)))
        if (lambda_max or trace or grad_norm) and curvature_data is None:
            raise ValueError("curvature_data is required when lambda_max, trace or grad_norm "
                             "is on")
        for name, value in (("eval_data", eval_data), ("test_data", test_data),
                            ("curvature_data", curvature_data)):
            try:
                if value is not None:
                    check_data(value)
            except ValueError as err:
                raise type(err)(f"{name}: {err}") from None
        lanczos_tol = check_positive("lanczos_tol", lanczos_tol)
        lanczos_max_hvp = check_int("lanczos_max_hvp", lanczos_max_hvp, 1)
        trace_n_hvp = check_int("trace_n_hvp", trace_n_hvp, 4)   # Hutch++ needs 4 products
        self.curvature = check_choice("curvature", curvature, registered_curvatures())
        seed = make_generator(seed).initial_seed()
        check_model_mode(model_mode)
        check_loss_fn(loss_fn)
        if isinstance(optimizer_methods, str) or not all(
                isinstance(m, str) for m in optimizer_methods):
            raise ArgumentTypeError("optimizer_methods must be a sequence of method names, "
                                    f"got {optimizer_methods!r}")
        self.model, self.loss_fn, self.every = unwrap_compiled(model), loss_fn, every
        self.eval_fn, self.batch_size_fn = eval_fn, batch_size_fn
        self.eval_data, self.test_data, self.curvature_data = eval_data, test_data, curvature_data
        self.lambda_max, self.trace, self.grad_norm = lambda_max, trace, grad_norm
        self.layers = layers
        self.lanczos_tol, self.lanczos_max_hvp, self.trace_n_hvp = (
            lanczos_tol, lanczos_max_hvp, trace_n_hvp)
        self.seed, self.model_mode = seed, model_mode
        self.optimizer_methods = tuple(optimizer_methods)
        self.records: list[Record] = []
        self.n_steps = 0
        self.passes = 0
        self.train_time = 0.0
        self.overhead = 0.0
        self.n_hvp = 0
        self._losses: list[Tensor | float] = []
        self._v0: dict[bool, Tensor] = {}   # warm starts, keyed by preconditioned or not
        self._previous: tuple[int, dict[str, Tensor]] | None = None   # (step, weights)
        self._clock: float | None = None
        self._checked = False   # curvature_data passed the determinism check (first record)

    # -- hooks called by the training loop ------------------------------------------------
    def count(self, closure: Callable[[], Tensor]) -> Callable[[], Tensor]:
        """Count the forward-backward passes of an optimizer's closure.

        Args:
            closure: The closure passed to ``optimizer.step``.

        Returns:
            ``closure`` wrapped so that each call adds one to ``passes``.
        """
        def counted():
            self.passes += 1
            return closure()
        return counted

    def start(self) -> None:
        """Start the training clock (``step`` starts it at the first call otherwise)."""
        self._keep_weights()
        self._clock = time.perf_counter()

    def _keep_weights(self) -> None:
        """Before a step that will be recorded, keep the weights (for angles and cosines)."""
        if self.layers and (self.n_steps + 1) % self.every == 0:
            self._previous = (self.n_steps, {n: p.detach().clone()
                                             for n, p in self.model.named_parameters()})

    def step(self, optimizer: Any, loss: Tensor | float | None = None) -> Record | None:
        """Account one optimizer step; record every ``every`` steps.

        Args:
            optimizer: The optimizer (read by duck typing: ``param_groups``, preconditioner,
                ``sgd_fraction``, ``stage``, ``distance``, the ``optimizer_methods``).
            loss: The step's loss (kept on its device until the next record), or None.

        Returns:
            The record made at this step, or None.
        """
        now = self._stop_clock()
        self.n_steps += 1
        if loss is not None:             # kept on its device: no host sync between records
            self._losses.append(loss.detach() if isinstance(loss, Tensor) else float(loss))
        record = self._record(optimizer, now) if self.n_steps % self.every == 0 else None
        self._keep_weights()
        self._restart_clock(now)
        return record

    def log(self, optimizer: Any = None) -> Record:
        """Measure everything now and append the record (outside of ``step``, e.g. at the end).

        Args:
            optimizer: The optimizer, or None (no optimizer quantities).

        Returns:
            The record.
        """
        now = self._stop_clock()
        record = self._record(optimizer, now)
        self._restart_clock(now)
        return record

    def _stop_clock(self) -> float:
        now = time.perf_counter()
        if self._clock is not None:
            self.train_time += now - self._clock
        return now

    def _restart_clock(self, stopped: float) -> None:
        self._clock = time.perf_counter()
        self.overhead += self._clock - stopped

    # -- the record -------------------------------------------------------------------------
    def _record(self, optimizer: Any, began: float) -> Record:
        rec: Record = {"step": float(self.n_steps), "passes": float(self.passes)}
        if self._losses:
            rec["loss"] = sum(float(v) for v in self._losses) / len(self._losses)
            self._losses = []
        lr = self._lr(optimizer)
        if lr is not None:
            rec["lr"] = lr
        for prefix, data in (("train", self.eval_data), ("test", self.test_data)):
            if data is not None:
                found = evaluate_metrics(self.model, self.loss_fn, data, eval_fn=self.eval_fn,
                                         batch_size_fn=self.batch_size_fn, progress=False)
                rec.update({f"{prefix}_{key}": value for key, value in found.items()})
        if self.lambda_max:
            rec.update(self._lambda_max(lr))
            named = self._preconditioner(optimizer)
            if named:  # an optimizer with a diagonal preconditioner, after its first step
                rec.update(self._lambda_max(lr, named, stability_threshold(optimizer)))
        if self.trace:
            rec.update(self._trace())
        if self.grad_norm:
            rec["grad_norm"] = full_grad_norm(self.model, self.loss_fn, self.curvature_data,
                                              model_mode=self.model_mode, progress=False)
        if self.layers:
            rec.update(self._layer_stats())
        if optimizer is not None:
            rec.update(self._optimizer_stats(optimizer))
        rec["n_hvp"] = float(self.n_hvp)
        rec["time"] = self.train_time
        rec["overhead"] = self.overhead + (time.perf_counter() - began)
        self.records.append(rec)
        return rec

    @staticmethod
    def _lr(optimizer: Any) -> float | None:
        groups = getattr(optimizer, "param_groups", None)
        if not groups or "lr" not in groups[0]:
            return None
        return float(groups[0]["lr"])

    def _lambda_max(self, lr: float | None, preconditioner: dict[str, Tensor] | None = None,
                    threshold: float | None = None) -> Record:
        """lambda_max of H, or of P^-1 H with the optimizer's ``preconditioner``."""
        from .lanczos import top_eigenvalues

        key = preconditioner is not None
        res = top_eigenvalues(self.model, self.loss_fn, self.curvature_data, k=1, which="LA",
                              tol=self.lanczos_tol, max_hvp=self.lanczos_max_hvp, seed=self.seed,
                              v0=self._v0.get(key), model_mode=self.model_mode, progress=False,
                              preconditioner=preconditioner, curvature=self.curvature,
                              check_deterministic=not self._checked)
        self._checked = True
        self.n_hvp += int(res.n_hvp)
        top = res.eigenvectors[0]  # a fully_shard model's: a list of DTensors (its shards)
        self._v0[key] = [[t.detach().clone() for t in top]] if isinstance(top, list) else \
            top.detach().clone()
        lam = float(res.eigenvalues[0])
        if key:
            out = {"preconditioned_lambda_max": lam, "preconditioned_lanczos_hvp": float(res.n_hvp)}
            if threshold is not None:
                out["preconditioned_eos_ratio"] = lam / threshold
            return out
        out = {"lambda_max": lam, "lanczos_hvp": float(res.n_hvp)}
        if lr is not None:
            out["eos_ratio"] = lam * lr / 2.0
        return out

    def _preconditioner(self, optimizer: Any) -> dict[str, Tensor] | None:
        """The optimizer's diagonal preconditioner by name (DTensors on a sharded model)."""
        return optimizer_preconditioner(optimizer, self.model)

    def _trace(self) -> Record:
        from .trace import hessian_trace

        res = hessian_trace(self.model, self.loss_fn, self.curvature_data, n_hvp=self.trace_n_hvp,
                            seed=self.seed, model_mode=self.model_mode, progress=False,
                            curvature=self.curvature, check_deterministic=not self._checked)
        self._checked = True
        self.n_hvp += int(res.n_hvp)
        return {"trace": float(res.estimate)}

    def _layer_stats(self) -> Record:
        # the weights before this step, if they were kept (only for the step before a record)
        kept = self._previous
        previous = kept[1] if kept is not None and kept[0] == self.n_steps - 1 else None
        with torch.no_grad():
            out = _layer_stats(list(self.model.named_parameters()), previous,
                               is_sharded(self.model))
        self._previous = None
        return out

    def _optimizer_stats(self, optimizer: Any) -> Record:
        out: Record = {}
        names = self._param_names(optimizer)
        if callable(getattr(optimizer, "sgd_fraction", None)):
            out["sgd_fraction"] = float(optimizer.sgd_fraction())
            if self.layers:
                for index, frac in optimizer.sgd_fraction(per_param=True).items():
                    out[f"sgd_fraction/{names.get(index, index)}"] = float(frac)
        if isinstance(getattr(optimizer, "n_closure_calls", None), int):
            out["opt_closure_calls"] = float(optimizer.n_closure_calls)
        for attr in ("stage", "distance"):
            value = getattr(optimizer, attr, None)
            if isinstance(value, (int, float)) or (isinstance(value, Tensor)
                                                   and value.numel() == 1):
                out[attr] = float(value)
        for method in self.optimizer_methods:
            fn = getattr(optimizer, method, None)
            if not callable(fn):
                continue
            value = fn()
            if isinstance(value, dict):
                for key, v in value.items():
                    out[f"opt_{method}/{names.get(key, key)}"] = float(v)
            else:
                out[f"opt_{method}"] = float(value)
        return out

    def _param_names(self, optimizer: Any) -> dict[int, str]:
        """Parameter index in ``param_groups`` order -> name in the model."""
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        params = [p for g in getattr(optimizer, "param_groups", []) for p in g["params"]]
        return {i: by_id.get(id(p), str(i)) for i, p in enumerate(params)}

    # -- output -----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """All record keys, in first-seen order.

        Returns:
            The keys.
        """
        seen: dict[str, None] = {}
        for rec in self.records:
            seen.update(dict.fromkeys(rec))
        return list(seen)

    def history(self, key: str) -> tuple[list[float], list[float]]:
        """The history of one quantity.

        Args:
            key: A record key.

        Returns:
            ``(steps, values)`` over the records that have ``key``.
        """
        pairs = [(r["step"], r[key]) for r in self.records if key in r]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def save(self, stem: str | Path, meta: dict | None = None) -> tuple[Path, Path]:
        """Write ``stem.json`` (records plus ``meta``) and ``stem.csv``.

        The suffixes are appended to the whole name (``"run_lr0.1"`` gives ``run_lr0.1.json``);
        a name ending in ``.json`` or ``.csv`` has that ending replaced.

        Args:
            stem: The path without suffix (its folder is created).
            meta: Stored beside the records in the JSON file.

        Returns:
            The paths of the JSON and the CSV file.
        """
        stem = Path(stem)
        if stem.suffix.lower() in (".json", ".csv"):
            stem = stem.with_suffix("")
        stem.parent.mkdir(parents=True, exist_ok=True)
        js, cs = (stem.with_name(stem.name + ext) for ext in (".json", ".csv"))
        js.write_text(json.dumps({"meta": meta or {}, "records": self.records}, indent=1,
                                 allow_nan=True))
        keys = self.keys()
        with cs.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys, restval="")
            writer.writeheader()
            writer.writerows(self.records)
        return js, cs

    def _panels(self) -> dict[str, list[str]]:
        """The keys drawn, grouped by panel (per-layer keys and loss/accuracy pairs share)."""
        groups: dict[str, list[str]] = {}
        for key in self.keys():
            if key in ("step", "n_hvp", "lanczos_hvp", "preconditioned_lanczos_hvp"):
                continue
            groups.setdefault(key.split("/")[0], []).append(key)
        for pair in (("train_loss", "loss"), ("test_loss", "loss"), ("train_acc", "test_acc")):
            if pair[0] in groups and pair[1] in groups:
                groups[pair[1]] += groups.pop(pair[0])
        return groups

    def plot(self, path: str | Path | None = None, title: str | None = None, *,
             formats: Sequence[str] | None = None) -> Any:
        """Plot one panel per quantity group (per-layer keys share a panel).

        Saved, given a path, by :func:`analysis.core.save_figure`, the convention of the
        landscape plots too: ``run.png`` writes ``run.png``, ``run`` writes ``run.png`` and
        ``run.pdf``; atomic, with ``bbox_inches="tight"`` (no clipped labels). Drawn on a
        ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, the backend untouched).

        Args:
            path: The file (its folder is created); None only returns the figure.
            title: The figure's title.
            formats: As in :func:`analysis.core.save_figure`.

        Returns:
            The ``matplotlib.figure.Figure``.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        groups = self._panels()
        cols = 3
        rows = max(1, math.ceil(len(groups) / cols))
        fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, (group, keys) in zip(axes.flat, groups.items()):
            for key in keys:
                steps, values = self.history(key)
                ax.plot(steps, values, label=key.split("/", 1)[-1] if "/" in key else key)
            ax.set_xlabel("step")
            ax.set_ylabel(group)
            if len(keys) > 1:
                ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(groups):]:
            ax.axis("off")
        if title:
            fig.suptitle(title)
        if path is not None:
            save_figure(fig, path, formats, dpi=110)
        return fig
