"""Running many training runs.

Worker processes with one progress line per run (and the job's overall progress and time left),
grid searches on validation accuracy, and the compared configurations of a reproduction over its
seeds.
"""
from __future__ import annotations

import bisect
import itertools
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import harness
from .harness import Job, Size, job


def _worker_init(threads: int = 1) -> None:
    torch.set_num_threads(threads)


def parallel_share(workers: int, cores: int, others: float) -> float:
    """How many CPU seconds per wall second ``workers`` processes get.

    Each runnable process gets ``cores / (others + workers)`` of a core when the machine is
    oversubscribed, at most one.

    Args:
        workers: Our processes.
        cores: The machine's cores.
        others: Runnable processes of other programs (the load they add).

    Returns:
        CPU seconds per wall second, over all our processes.
    """
    return workers * min(1.0, cores / max(others + workers, 1e-9))


AUTOGROUP = Path("/proc/sys/kernel/sched_autogroup_enabled")


def autogrouped(flag: Path = AUTOGROUP) -> bool:
    """Whether Linux schedules each session as one group (``sched_autogroup``).

    Args:
        flag: The kernel's switch.

    Returns:
        True where the switch reads 1 (False where there is none).
    """
    try:
        return flag.read_text().strip() == "1"
    except OSError:
        return False


def session_share(workers: int, cores: int, others: float, one: float, grouped: bool,
                  average: float = 0.0) -> float:
    r"""CPU seconds per wall second of ``workers`` processes of this session.

    Without scheduler groups each process competes alone (:func:`parallel_share`). Under
    ``sched_autogroup`` the scheduler shares the CPU between sessions first, and then within
    each: a session that did not get a whole core for one process (``one`` < 0.9, other
    sessions busy) gets no more for several, which then split that share (measured here: two
    workers together 0.41-0.48 CPU seconds per second where one process got 0.42-0.70, and
    :func:`parallel_share` predicted 0.69-1.04; the estimate was 2.2-3.1x short). Where one
    process got its core while the load average shows other runnable processes (``average``
    at least 1 beyond ours), the session's share lies between one core (the others' sessions
    take the rest) and ``min(workers, cores)``: their geometric mean, at most
    $\sqrt{\min(workers, cores)}$ off either way (``--tiny`` at a load of 7: 2.00 cores
    predicted, 0.3 min expected for 0.6 min taken). Otherwise :func:`parallel_share` stands.

    Args:
        workers: Our processes.
        cores: The machine's cores.
        others: Runnable processes of other programs (:func:`other_load`).
        one: The share of a core one of our processes got (the calibration's).
        grouped: Whether the scheduler groups sessions (:func:`autogrouped`).
        average: The 1-minute load average less ourselves (runnable processes of others).

    Returns:
        CPU seconds per wall second, over all our processes.
    """
    if grouped and one < 0.9:
        return min(one, parallel_share(workers, cores, others))
    if grouped and average >= 1.0:
        return min(math.sqrt(min(workers, cores)), parallel_share(workers, cores, others))
    return parallel_share(workers, cores, others)


TRUSTED_WALL = 1.0   # seconds of calibration after which its measured CPU share is trusted


def other_load(cpu: float, wall: float, cores: int | None = None,
               average: float | None = None, trusted: float = TRUSTED_WALL) -> float:
    """The runnable processes of other programs, from one of ours measured alone.

    A process that got ``cpu / wall`` of a core shares the cores with about
    ``cores * wall / cpu - 1`` others (0 when it got 90 % of a core or more). That share is
    what the scheduler actually gave us, priorities included: processes at a lower priority
    (``nice``) take little from ours, though the load average counts each of them as a whole
    competitor (4 ``nice -n 19`` burners on 2 cores: load average 5, and the calibration got its
    whole core). So a measurement at least ``trusted`` wall seconds long is used alone; a
    shorter one is a few time slices of the scheduler (its period is 6 ms x (1 + log2 cores)
    at most, or 0.75 ms x (1 + log2 cores) per runnable process beyond 8; at a load of 20 on 2
    cores about 15 ms), which a single wake-up of another process can halve, and then the
    1-minute load average (less ourselves) is used too, whichever is larger. At 1 s the
    measurement spans 40 or more such periods (a share off by a few percent).

    One process's share cannot see competitors that leave it a core of its own: the others
    then read 0, and ``workers`` processes on all the cores (:func:`parallel_share`) may get
    less than that predicts, by at most ``(cores + workers - 1) / cores`` when the others are
    at our priority (1.5x for 2 workers on 2 cores).

    Args:
        cpu: CPU seconds of our process over the measurement.
        wall: Wall seconds of the measurement.
        cores: The cores (default: ``os.cpu_count()``).
        average: The 1-minute load average (default: ``os.getloadavg()``; 0 where there is
            none; not read when the measurement is trusted).
        trusted: Wall seconds from which the measurement is used alone.

    Returns:
        The load of other programs (>= 0).
    """
    cores = cores or os.cpu_count() or 1
    share = cpu / wall if wall > 0 else 1.0
    measured = cores / share - 1 if share < 0.9 else 0.0
    if wall >= trusted:
        return max(0.0, measured)
    if average is None:
        try:
            average = os.getloadavg()[0]
        except OSError:
            average = 0.0
    return max(0.0, measured, average - 1)


# -- the cost model of the estimate -----------------------------------------------------------
# Runs that stop at a training accuracy (``Job.stop_acc``): the steps they take, per
# (optimizer, loss), at a reference learning rate; a run at lr is expected to take
# steps * reference lr / lr, at most its cap. Measured on the quick run of adaptive_eos in
# figures/results (full batch, 5,000 samples, seeds 0-1: 6,288-6,735, 820-975 and 672-704 steps).
STOP_STEPS = {("SGD", "square"): (6800.0, 0.3), ("Adam", "square"): (1000.0, 1e-3),
              ("SGD", "cross_entropy"): (720.0, 1.0)}
# Optimizers whose step takes two gradients (an ascent step, then the update).
TWO_GRADIENTS = {"SAM", "WSAM", "AdaSAM", "SALA"}
# Optimizers whose runs the Tracker measures twice per record (lambda_max of H and P^-1 H).
PRECONDITIONED = {"Adam", "AMSGrad", "AdaSAM", "NDAdam"}


@dataclass(frozen=True)
class Units:
    """CPU seconds of the calibration units, measured on this machine at the start of a job.

    Args:
        run: One plain training run at the job's size (SGD, minibatches, no tracking).
        step: ``samples -> CPU seconds`` of one full-batch gradient step on that many samples.
        hvp: ``samples -> CPU seconds`` of one Hessian-vector product on that many samples.
        other: CPU seconds a reproduction spends besides its runs (rule, figure, files).
    """
    run: float
    step: dict = field(default_factory=dict)
    hvp: dict = field(default_factory=dict)
    other: float = 0.0


def stop_steps(jb: Job) -> float:
    """The steps a run is expected to take: its cap, or fewer when it stops at an accuracy.

    Args:
        jb: The job (``steps`` set).

    Returns:
        The expected steps (:data:`STOP_STEPS`; the cap when no reference is known).
    """
    lr = jb.params.get("lr")
    ref = STOP_STEPS.get((jb.opt, jb.loss))
    if jb.stop_acc is None or ref is None or not lr:
        return float(jb.steps)
    return min(float(jb.steps), ref[0] * ref[1] / lr)


def full_batch_cpu(jb: Job, size: Size, units: Units) -> float:
    """Predicted CPU seconds of a full-batch run (``batch_size`` = ``subset``, ``steps`` set).

    Its expected steps (:func:`stop_steps`) at ``units.step`` each (two gradients for a
    SAM-type optimizer), and at each Tracker record (every ``every`` steps, and at the start)
    one warm-started Lanczos run of at most ``size.lanczos_max_hvp`` products on ``curvature``
    samples per tracked sharpness (two for a preconditioned optimizer), at ``units.hvp`` each.

    Args:
        jb: The job.
        size: The ``Size``.
        units: The calibration (``step[batch_size]`` and ``hvp[curvature]`` measured).

    Returns:
        CPU seconds.
    """
    steps = stop_steps(jb)
    cpu = steps * units.step[jb.batch_size] * (2 if jb.opt in TWO_GRADIENTS else 1)
    if "lambda_max" in jb.track:
        records = steps // (jb.every or 1) + 1
        per_record = size.lanczos_max_hvp * (2 if jb.opt in PRECONDITIONED else 1)
        cpu += records * per_record * units.hvp[jb.curvature or size.curvature_samples]
    return cpu


@dataclass
class Plan:
    """A reproduction's predicted work, in training runs and CPU seconds on this machine.

    Args:
        name: The reproduction.
        runs: Its training runs (an upper bound where grids may grow).
        cpu: CPU seconds of those runs.
        other: CPU seconds it spends besides its runs (analyses, rule, figure, files), in
            this process.
        weigh: ``Job -> CPU seconds`` of one of its runs, where they differ (default: the
            mean, ``cpu / runs``).
    """
    name: str
    runs: float
    cpu: float
    other: float = 0.0
    weigh: Callable[[Job], float] | None = None

    def weight(self, jb: Job | None) -> float:
        """CPU seconds predicted for the run ``jb`` (the mean run's without one)."""
        if self.weigh is not None and jb is not None:
            return self.weigh(jb)
        return self.cpu / max(self.runs, 1.0)



def job_runs(jb: Job, size: Size) -> float:
    """A minibatch run in plain training runs (the factors the reproductions' ``cost`` uses).

    Its share of an epoch-length run (``steps`` x batch over the epochs' samples, when
    ``steps`` is set), twice for a SAM-type optimizer; plus 1.5 for lambda_max tracking, 0.5
    per other tracked curve and 1 per measurement at the solution.

    Args:
        jb: The job.
        size: The ``Size``.

    Returns:
        Plain runs.
    """
    length = 1.0
    if jb.steps:
        length = jb.steps * (jb.batch_size or size.batch_size) / (
            size.epochs * (size.n_train - size.n_val))
    extra = 1.5 * ("lambda_max" in jb.track) + 0.5 * len(set(jb.track) - {"lambda_max",
                                                                          "trajectory"})
    return length * (2 if jb.opt in TWO_GRADIENTS else 1) + extra + len(jb.measure)


def full_batch(jb: Job) -> bool:
    """Whether ``jb`` trains at full batch for a number of steps (:func:`full_batch_cpu`)."""
    return bool(jb.steps and jb.subset and jb.batch_size and jb.batch_size >= jb.subset)


def job_cpu(jb: Job, size: Size, units: Units) -> float:
    """Predicted CPU seconds of the run ``jb``.

    :func:`full_batch_cpu` where ``units`` has its step and product timed, else
    :func:`job_runs` plain runs.

    Args:
        jb: The job.
        size: The ``Size``.
        units: The calibration.

    Returns:
        CPU seconds.
    """
    timed = jb.batch_size in units.step and (
        "lambda_max" not in jb.track or (jb.curvature or size.curvature_samples) in units.hvp)
    if full_batch(jb) and timed:
        return full_batch_cpu(jb, size, units)
    return units.run * job_runs(jb, size)


def adaptive_eos_work(module, size: Size) -> tuple[list[Job], dict[int, float]]:
    """The runs of ``figures.adaptive_eos`` and its products besides them.

    Args:
        module: The module.
        size: The ``Size``.

    Returns:
        Its jobs, and ``samples -> Hessian-vector products`` besides them (the initial
        lambda_max of each loss and seed, at most ``size.final_max_hvp`` products each).
    """
    sz = module.SIZE[size.name]
    jobs = [module._job(label, lr, s, sz) for label, r in module.RUNS.items()
            for lr in r["lrs"][size.name] for s in range(sz["seeds"])]
    losses = {r["loss"] for r in module.RUNS.values()}
    return jobs, {sz["samples"]: len(losses) * sz["seeds"] * size.final_max_hvp}


# Reproductions planned run by run from their job list (reproduction name -> ``(module, size)
# -> (jobs, {samples: products})``); the others by their module's ``cost(size)`` in plain runs.
JOB_LISTS: dict[str, Callable] = {"adaptive_eos": adaptive_eos_work}


def full_batch_samples(modules: dict, size: Size) -> set[int]:
    """The sample counts whose full-batch step and product the plans of ``modules`` need."""
    samples: set[int] = set()
    for name, module in modules.items():
        if name in JOB_LISTS:
            jobs, products = JOB_LISTS[name](module, size)
            samples |= set(products) | {jb.batch_size for jb in jobs if full_batch(jb)} | {
                jb.curvature for jb in jobs if full_batch(jb) and "lambda_max" in jb.track}
    return samples


def time_full_batch(size: Size, samples: int, steps: int = 5, products: int = 6
                    ) -> tuple[float, float]:
    """CPU seconds of one full-batch gradient step, and of one Hessian-vector product.

    On the first ``samples`` samples (``harness.subset_split``), the reproductions' MLP; the
    product inside a Lanczos run as the Tracker makes it.

    Args:
        size: The ``Size`` (the model's width).
        samples: The batch.
        steps: Steps timed (after one untimed).
        products: Products of the timed Lanczos run.

    Returns:
        ``(step, product)`` CPU seconds.
    """
    import warnings

    from analysis import top_eigenvalues

    data = harness.subset_split(size, samples)
    batch = (data.x, data.y)
    model = harness.mlp(size, 0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for i in range(steps + 1):
        if i == 1:
            began = time.process_time()
        opt.zero_grad()
        harness.CROSS_ENTROPY(model, batch).backward()
        opt.step()
    step = (time.process_time() - began) / steps
    began = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = top_eigenvalues(model, harness.CROSS_ENTROPY, [batch], k=1, tol=1e-12,
                              max_hvp=products, seed=0, progress=False)
    return step, (time.process_time() - began) / max(int(res.n_hvp), 1)


def plan(name: str, module, size: Size, units: Units) -> Plan:
    """The predicted work of one reproduction (:class:`Plan`) in this machine's CPU seconds.

    Args:
        name: The reproduction.
        module: Its module.
        size: The ``Size``.
        units: The calibration (:class:`Units`).

    Returns:
        Its plan: from its job list (:data:`JOB_LISTS`), else from ``module.cost(size)``.
    """
    def weigh(jb: Job) -> float:
        return job_cpu(jb, size, units)

    if name in JOB_LISTS:
        jobs, products = JOB_LISTS[name](module, size)
        other = units.other + sum(k * units.hvp[n] for n, k in products.items())
        return Plan(name, len(jobs), sum(map(weigh, jobs)), other, weigh)
    runs = float(module.cost(size))
    return Plan(name, runs, runs * units.run, units.other, weigh)


class Progress:
    """Overall progress of a job in training runs, and its time left.

    The plan is each reproduction's :class:`Plan`: its runs and their CPU seconds, calibrated
    on this machine (CPU time, which the load does not inflate), and its work besides them.
    The predicted wall time is CPU time over the CPU share our processes get: ``share`` for
    the runs (all worker processes), ``share1`` for this process's own work; plus
    ``startup``, the worker processes' start. As runs finish, the ratio of the measured wall
    time to the predicted wall time of the recent half of the work done (the load actually
    seen, and any error of the cost model) scales what is left, blended in over the first runs.

    Args:
        plans: The reproductions to do, in order.
        share: CPU seconds per wall second of our worker processes together.
        share1: CPU seconds per wall second of this process alone (default: ``share``).
        startup: Predicted wall seconds of the worker processes' start.
        clock: The wall clock (``time.perf_counter``); it starts at construction.
    """

    def __init__(self, plans: Sequence[Plan], share: float, share1: float | None = None,
                 startup: float = 0.0, clock=time.perf_counter):
        self.plans, self.clock = list(plans), clock
        self.share, self.share1 = max(share, 1e-9), max(share1 or share, 1e-9)
        self.startup, self.began = startup, clock()
        self.done = 0                     # runs finished
        self.current = 0                  # index of the reproduction in progress
        self.current_runs, self.current_cpu = 0, 0.0
        self.finished_wall = 0.0          # predicted wall seconds of the work finished
        self._marks = [(0.0, self.began)]  # (finished_wall, clock) after each piece of work

    @property
    def total(self) -> float:
        """Runs of the job: those done, and those planned for the reproductions left."""
        left = self.plans[self.current:]
        ahead = max(left[0].runs - self.current_runs, 0.0) + sum(p.runs for p in left[1:]) \
            if left else 0.0
        return self.done + ahead

    def planned_seconds(self) -> float:
        """Predicted wall seconds of the work left at the load measured at the start."""
        left = self.plans[self.current:]
        cpu = sum(p.cpu for p in left) - self.current_cpu
        return (max(cpu, 0.0) / self.share + sum(p.other for p in left) / self.share1
                + (self.startup if self.done == 0 else 0.0))

    def breakdown(self) -> list[tuple[str, float]]:
        """Each reproduction left and its predicted wall seconds at the load at the start."""
        return [(p.name, p.cpu / self.share + p.other / self.share1)
                for p in self.plans[self.current:]]

    def add(self, jb: Job | None = None) -> None:
        """Count one finished run (``jb``, its predicted CPU time from the plan)."""
        cpu = self.plans[self.current].weight(jb) if self.current < len(self.plans) else 0.0
        if self.done == 0:
            self.finished_wall += self.startup
        self.done += 1
        self.current_runs += 1
        self.current_cpu += cpu
        self.finished_wall += cpu / self.share
        self._marks.append((self.finished_wall, self.clock()))

    def reproduction_done(self) -> None:
        """Count the reproduction in progress finished (its other work; unused runs dropped)."""
        if self.current < len(self.plans):
            self.finished_wall += self.plans[self.current].other / self.share1
            self._marks.append((self.finished_wall, self.clock()))
        self.current += 1
        self.current_runs, self.current_cpu = 0, 0.0

    def scale(self) -> float:
        """Measured over predicted wall time of the recent work, blended in as runs finish.

        Measured over the second half of the work done so far (predicted wall time), so that
        a change of the load shows within about as much work again as before it.
        """
        if self.finished_wall <= 0:
            return 1.0
        half = bisect.bisect_right([m[0] for m in self._marks], self.finished_wall / 2) - 1
        since, at = self._marks[half]
        measured = (self.clock() - at) / max(self.finished_wall - since, 1e-12)
        trust = self.done / (self.done + 3.0)
        return trust * measured + (1 - trust)

    def seconds_left(self) -> float:
        """The wall seconds left: the plan left, scaled by the load seen so far."""
        return self.planned_seconds() * self.scale()

    def line(self) -> str:
        """``"k of n runs, about m min left"``."""
        return (f"{self.done} of {max(self.total, self.done):.0f} runs, about "
                f"{self.seconds_left() / 60:.1f} min left")


class Runner:
    """Runs jobs, one printed line per finished run, each result kept.

    Jobs run in ``workers`` processes when > 1; a job asked for twice (a search, then the
    comparison) runs once. With a :class:`Progress` in ``progress``, each line ends with the
    job's overall progress and the time left.

    Args:
        size: The ``Size`` of every run.
        workers: Processes.
    """

    def __init__(self, size: Size, workers: int = 1, threads: int = 1):
        self.size, self.workers, self.threads = size, workers, threads
        self.done: dict[Job, dict] = {}
        self.progress: Progress | None = None
        self.pool = (ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                         initializer=_worker_init, initargs=(threads,))
                     if workers > 1 else None)

    def close(self) -> None:
        """Shut the worker processes down."""
        if self.pool is not None:
            self.pool.shutdown()

    def run(self, jobs: Sequence[Job]) -> list[dict]:
        """The results of ``jobs`` (in order), running those not run yet."""
        todo = list(dict.fromkeys(j for j in jobs if j not in self.done))
        for i, (jb, result) in enumerate(self._results(todo), 1):
            self.done[jb] = result
            overall = ""
            if self.progress is not None:
                self.progress.add(jb)
                overall = f" | {self.progress.line()}"
            print(f"  [{i}/{len(todo)}] {jb.group}: {jb.label}, seed {jb.seed}: val "
                  f"{result['final_val_acc']:.3f}, test {result['final_test_acc']:.3f} "
                  f"({result['seconds']:.1f} s){overall}", flush=True)
        return [self.done[j] for j in jobs]

    def _results(self, todo: list[Job]):
        if self.pool is None:
            for jb in todo:
                yield jb, harness.execute(jb, self.size)
            return
        futures = {self.pool.submit(harness.execute, jb, self.size): jb for jb in todo}
        for future in as_completed(futures):
            yield futures[future], future.result()


# -- grid searches on validation --------------------------------------------------------------
@dataclass
class Search:
    """A grid search on validation accuracy.

    The (final) axes, the mean final validation accuracy of every point, the best point and
    whether it is interior on every axis.
    """
    axes: dict[str, list[float]]
    scores: list[tuple[dict, float]]
    best: dict
    interior: dict[str, bool]
    extended: int = 0

    def summary(self) -> dict:
        """The search as JSON: axes, best point, interiority, extensions, every score."""
        return {"axes": self.axes, "best": self.best, "interior": self.interior,
                "extended": self.extended,
                "val_acc": [{**p, "val_acc": s} for p, s in self.scores]}


def search(runner: Runner, axes: dict[str, Sequence[float]], make: Callable[[dict, int], Job],
           fixed: Sequence[dict] = (), extend: int | None = None) -> Search:
    """Evaluate every point of the grid ``axes`` (plus the extra points ``fixed``).

    Each on ``select_seeds`` seeds; while the best grid point sits on an edge of an axis, that
    axis is extended geometrically by one value (at most ``extend`` times, default
    ``size.extend``).
    """
    axes = {k: sorted(float(v) for v in vs) for k, vs in axes.items()}
    seeds = range(runner.size.select_seeds)
    extended = 0
    while True:
        grid = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
        points = grid + [dict(p) for p in fixed]
        results = runner.run([make(p, s) for p in points for s in seeds])
        n = len(seeds)
        scores = [(p, float(np.mean([r["final_val_acc"] for r in results[i * n:(i + 1) * n]])))
                  for i, p in enumerate(points)]
        best = max(scores, key=lambda ps: ps[1])[0]
        # the best grid point decides the extension (an extra point is never on an edge)
        top = max(scores[:len(grid)], key=lambda ps: ps[1])[0]
        edges = {k: len(vs) > 1 and top[k] in (vs[0], vs[-1]) for k, vs in axes.items()}
        limit = runner.size.extend if extend is None else extend
        if not any(edges.values()) or extended >= limit:
            return Search(axes, scores, best, {k: not e for k, e in edges.items()}, extended)
        for k, vs in axes.items():
            if edges[k]:
                axes[k] = ([vs[0] ** 2 / vs[1]] + vs) if top[k] == vs[0] else \
                    (vs + [vs[-1] ** 2 / vs[-2]])
        extended += 1




# -- compared configurations ------------------------------------------------------------------
SCALARS = ("final_val_acc", "final_test_acc", "best_epoch_test_acc", "test_acc_at_best_val",
           "passes_per_step", "lambda_max", "trace", "worst_case_sharpness", "seconds")


def compact(result: dict, history: Sequence[str] = ()) -> dict:
    """The JSON part of a result.

    Its scalars, per-epoch curves and the ``history`` curves (keys, or prefixes ending in "/")
    that the figure or the rule reads.
    """
    keep = {k: v for k, v in result["history"].items()
            if k in history or any(h.endswith("/") and k.startswith(h) for h in history)}
    return {"seed": result["seed"], "curves": result["curves"], "history": keep,
            **{k: result[k] for k in SCALARS + ("arrays", "extra") if k in result}}


def trials(runner: Runner, group: str, configs: dict[str, tuple], *,
           history: Sequence[str] = (), **options) -> dict[str, list[dict]]:
    """Every configuration ``label -> (optimizer, hp[, job options])``, compacted.

    On seeds 0 .. size.seeds - 1 (the same initialisation and batches for every configuration
    within a seed).
    """
    jobs = {label: [job(group, label, c[0], s, c[1], **{**options, **(c[2:] or [{}])[0]})
                    for s in range(runner.size.seeds)] for label, c in configs.items()}
    results = runner.run([j for js in jobs.values() for j in js])
    n = runner.size.seeds
    return {label: [compact(r, history) for r in results[i * n:(i + 1) * n]]
            for i, label in enumerate(jobs)}


def pop_arrays(runs: dict[str, list[dict]]) -> dict[str, np.ndarray]:
    """Move the measured arrays out of ``runs`` into arrays named ``LABEL__seedS__KEY``."""
    return {f"{label}__seed{r['seed']}__{k}": v for label, rs in runs.items() for r in rs
            for k, v in r.pop("arrays", {}).items()}


def per_seed(runs: list[dict], key: str) -> list[float]:
    """The value of ``key`` in each run."""
    return [float(r[key]) for r in runs]


ACCURACIES = ("final_test_acc", "best_epoch_test_acc", "test_acc_at_best_val")


def means(runs: dict[str, list[dict]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """``key -> label -> mean over seeds`` for every configuration of ``runs``."""
    return {k: {label: float(np.mean(per_seed(rs, k))) for label, rs in runs.items()}
            for k in keys}


def slashed(values: dict[str, float], names: Sequence[str], fmt: str) -> str:
    """``values`` of ``names`` formatted with ``fmt`` and joined by " / " (a headline entry)."""
    return " / ".join(format(values[n], fmt) for n in names)
