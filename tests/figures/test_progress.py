"""``python -m figures``: overall progress, the time left calibrated on CPU time, where the
outputs are; bar charts on an axis that shows the compared differences."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from figures import adaptive_eos, plotting, sala_overhead
from figures.__main__ import main
from figures.harness import SIZES, job
from figures.runner import (Plan, Progress, Units, adaptive_eos_work, full_batch, job_cpu,
                            autogrouped, job_runs, other_load, parallel_share, plan,
                            session_share, stop_steps)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def eos_like() -> list[tuple[str, list[float], float]]:
    """A job shaped like the quick size: five reproductions of many equal cheap runs, and one
    of six runs of 135, 65 and 28 CPU seconds (adaptive_eos's full-batch runs to 99%)."""
    cheap = [(f"cheap{i}", [1.2] * 60, 3.0) for i in range(5)]
    return cheap + [("eos", [135.0, 135.0, 65.0, 65.0, 28.0, 28.0], 15.0)]


def simulate(work, share: float, truth, startup: float = 0.0, weighed: bool = True):
    """Ratios (estimate / truth) of the time left at the start and after each run.

    ``work``: (name, the CPU seconds of each run, CPU seconds besides the runs) per
    reproduction; ``share``: the CPU share at the calibration; ``truth(cpu, k) -> wall``: the
    wall seconds the k-th piece of work of ``cpu`` CPU seconds really takes (this process's own
    work, at half the share of the workers', counts twice)."""
    clock = Clock()
    plans = []
    for name, runs, other in work:
        weights = dict(enumerate(runs))
        plans.append(Plan(name, len(runs), sum(runs), other,
                          (lambda jb, w=weights: w[jb]) if weighed else None))
    progress = Progress(plans, share, share1=share / 2, startup=startup, clock=clock)
    pieces = []
    for name, runs, other in work:
        pieces += [("run", i, cpu) for i, cpu in enumerate(runs)] + [("other", None, other)]
    walls = [truth(cpu * (1 if kind == "run" else 2), k)
             for k, (kind, _, cpu) in enumerate(pieces)]
    walls[0] += startup * truth(1.0, 0) * share       # the workers' start, at the true load
    ratios = [progress.seconds_left() / sum(walls)]
    for k, (kind, index, _) in enumerate(pieces):
        clock.now += walls[k]
        progress.add(index) if kind == "run" else progress.reproduction_done()
        left = sum(walls[k + 1:])
        if left > 0 and kind == "run":
            ratios.append(progress.seconds_left() / left)
    assert progress.seconds_left() == 0 and progress.total == progress.done
    return ratios


@pytest.mark.parametrize("others", [0.0, 3.0, 14.0])
def test_time_left_within_2x_idle_and_loaded(others):
    # the calibration saw the load: within 2x from the start, the expensive runs included
    share = parallel_share(2, 2, others)
    ratios = simulate(eos_like(), share, lambda cpu, k: cpu / share, startup=5.0)
    assert all(0.5 <= r <= 2 for r in ratios), ratios
    # the load tripled after the calibration: within 2x once a few runs are in
    late = parallel_share(2, 2, 3 * others + 2)
    ratios = simulate(eos_like(), share, lambda cpu, k: cpu / late)
    assert all(0.5 <= r <= 2 for r in ratios[6:]), ratios


def test_a_load_change_midway_is_followed():
    """Six times the load after run 100: within 2x once the measured half of the work is
    mostly after the change (a ratio over all the work done would still be 0.44x then)."""
    share, later = parallel_share(2, 2, 0.0), parallel_share(2, 2, 10.0)
    work = [("a", [1.0] * 200, 0.0)]
    ratios = simulate(work, share, lambda cpu, k: cpu / (share if k < 100 else later))
    assert all(0.5 <= r <= 2 for r in ratios[150:]), ratios[150:]


def test_runs_are_weighed_by_their_own_cost():
    """The expensive runs finish first: with the mean run's weight the measured load would
    be read 2-3x too high and the time left overestimated beyond 2x."""
    work = [("eos", [135.0, 135.0, 65.0, 65.0, 28.0, 28.0], 0.0)]
    ratios = simulate(work, 1.0, lambda cpu, k: cpu)
    assert all(0.5 <= r <= 2 for r in ratios), ratios
    unweighed = simulate(work, 1.0, lambda cpu, k: cpu, weighed=False)
    assert max(unweighed) > 2


def test_a_short_calibration_falls_back_to_the_load_average_and_cores():
    # the calibration got its whole core over 0.5 s (a few time slices, not trusted); the
    # load average says 7 others on 2 cores
    others = other_load(0.5, 0.5, cores=2, average=8.0)
    share = parallel_share(2, 2, others)
    progress = Progress([Plan("a", 10, 100.0)], share, clock=Clock())
    assert progress.seconds_left() == pytest.approx(100.0 / (2 * 2 / 9))
    idle = Progress([Plan("a", 10, 100.0)], parallel_share(2, 2, 0.0), clock=Clock())
    assert idle.seconds_left() == pytest.approx(50.0)


def test_low_priority_jobs_do_not_inflate_a_trusted_calibration():
    """Four ``nice -n 19`` burners on 2 cores: load average 5, yet the calibration got its
    whole core for 2 s. The rule before took the load average (4 others: 3x the time, 150 s
    instead of 50 s); the measured share is trusted and the estimate is the idle one."""
    others = other_load(2.0, 2.0, cores=2, average=5.0)
    assert others == 0.0
    progress = Progress([Plan("a", 10, 100.0)], parallel_share(2, 2, others), clock=Clock())
    assert progress.seconds_left() == pytest.approx(50.0)
    # a calibration that got half a core over 2 s reads 3 others, whatever the average says
    assert other_load(1.0, 2.0, cores=2, average=0.0) == pytest.approx(3.0)
    assert other_load(1.0, 2.0, cores=2, average=9.0) == pytest.approx(3.0)
    assert other_load(1.0, 2.0, cores=2, average=9.0, trusted=3.0) == pytest.approx(8.0)


def test_a_grouped_session_gets_no_more_than_one_process_got(tmp_path):
    """Under sched_autogroup the workers of a session split the share one process got when it
    was below a core (0.42: two workers 0.41-0.48 measured; parallel_share said 0.69); with a
    core to itself, or without groups, each worker counts."""
    others = other_load(0.84, 2.0, cores=2, average=0.0)          # 0.42 of a core
    assert session_share(2, 2, others, 0.42, grouped=True) == pytest.approx(0.42)
    assert session_share(2, 2, others, 0.42, grouped=False) == pytest.approx(
        parallel_share(2, 2, others)) == pytest.approx(2 * 2 / (others + 2))
    assert session_share(2, 2, 0.0, 1.0, grouped=True) == 2.0       # idle
    # a whole core for one process, yet 5 others runnable: between 1 and 2 cores
    assert session_share(2, 2, 0.0, 1.0, grouped=True, average=5.0) == pytest.approx(2 ** 0.5)
    assert session_share(2, 2, 0.0, 1.0, grouped=False, average=5.0) == 2.0
    flag = tmp_path / "sched_autogroup_enabled"
    assert not autogrouped(flag)
    flag.write_text("1\n")
    assert autogrouped(flag)
    flag.write_text("0\n")
    assert not autogrouped(flag)


def test_the_load_is_read_from_cpu_over_wall_time():
    # a process that got a quarter of a core on 2 cores shares them with 7 others
    assert other_load(1.0, 4.0, cores=2, average=0.0) == pytest.approx(7.0)
    assert other_load(0.5, 0.5, cores=2, average=0.5) == 0.0          # idle
    assert other_load(0.5, 0.5, cores=2, average=5.0) == pytest.approx(4.0)   # short: average
    assert parallel_share(2, 2, 0.0) == 2.0 and parallel_share(2, 2, 7.0) == pytest.approx(4 / 9)


def test_the_workers_start_is_planned_then_spent():
    """The old run at the tiny size: workers took ~38 s to start, then 0.3 s per run."""
    clock = Clock()
    progress = Progress([Plan("a", 60, 60 * 0.3)], 2.0, startup=38.0, clock=clock)
    assert 0.5 <= progress.seconds_left() / (38.0 + 60 * 0.3 / 2) <= 2
    clock.now = 38.0
    for done in range(60):
        clock.now += 0.15
        progress.add()
        left = (59 - done) * 0.15
        if left:
            assert 0.5 <= progress.seconds_left() / left <= 2, (done, progress.seconds_left())


def test_a_finished_reproduction_drops_its_unused_runs():
    clock = Clock()
    progress = Progress([Plan("a", 20, 20.0, 5.0), Plan("b", 10, 10.0, 5.0)], 1.0, clock=clock)
    assert progress.total == 30
    for _ in range(8):                 # the first reproduction, planned for 20, did 8
        clock.now += 1.0
        progress.add()
    clock.now += 5.0
    progress.reproduction_done()
    assert progress.total == 18 and "8 of 18 runs" in progress.line()
    assert progress.seconds_left() == pytest.approx(10 + 5.0)   # b's runs and other work
    assert progress.breakdown() == [("b", 15.0)]


def test_full_batch_runs_are_planned_from_their_steps_and_products():
    """adaptive_eos at the quick size, in made-up calibration units (no timing)."""
    size = SIZES["quick"]
    units = Units(run=1.0, step={5000: 0.01}, hvp={5000: 0.03}, other=2.0)
    jobs, products = adaptive_eos_work(adaptive_eos, size)
    assert len(jobs) == 6 and products == {5000: 2 * 2 * size.final_max_hvp}
    gd = next(jb for jb in jobs if jb.loss == "square" and jb.opt == "SGD")
    adam = next(jb for jb in jobs if jb.opt == "Adam")
    assert full_batch(gd) and stop_steps(gd) == 6800 and stop_steps(adam) == 1000
    # 6,800 steps, and 20 products at each of 6800 / 100 + 1 records
    assert job_cpu(gd, size, units) == pytest.approx(6800 * 0.01 + 69 * 20 * 0.03)
    # Adam's records measure lambda_max of H and of P^-1 H
    assert job_cpu(adam, size, units) == pytest.approx(1000 * 0.01 + 41 * 40 * 0.03)
    p = plan("adaptive_eos", adaptive_eos, size, units)
    assert p.runs == 6 and p.cpu == pytest.approx(sum(job_cpu(jb, size, units) for jb in jobs))
    assert p.other == pytest.approx(2.0 + 400 * 0.03)
    ce = next(jb for jb in jobs if jb.loss == "cross_entropy")
    assert p.weight(gd) > p.weight(adam) > p.weight(ce) == job_cpu(ce, size, units)
    # far more than the plain runs its module's cost counts
    assert p.cpu > 10 * adaptive_eos.cost(size) * units.run
    # a run stops at its cap, and a smaller lr takes proportionally more steps
    assert stop_steps(dataclasses.replace(gd, steps=100)) == 100
    slow = dataclasses.replace(gd, hp=(("lr", 0.15), ("momentum", 0.0)))
    assert stop_steps(slow) == pytest.approx(13600)
    # a full-batch run whose units were not timed counts as plain runs (never a KeyError)
    assert job_cpu(gd, size, Units(run=1.0)) == job_runs(gd, size)


def test_minibatch_runs_count_as_the_modules_cost_declares():
    size = SIZES["quick"]
    units = Units(run=2.0)
    assert job_runs(job("g", "SGD", "SGD", 0, {"lr": 0.1}), size) == 1
    assert job_runs(job("g", "SAM", "SAM", 0, {"lr": 0.1, "rho": 0.05}), size) == 2
    tracked = job("g", "SGD", "SGD", 0, {"lr": 0.1}, track=("lambda_max",))
    assert job_runs(tracked, size) == 2.5                       # sala/ndadam: 2.5
    measured = job("g", "SAM", "SAM", 0, {"lr": 0.1}, measure=("sharpness", "slices"))
    assert job_runs(measured, size) == 4
    short = job("g", "SGD", "SGD", 0, {"lr": 0.1}, steps=125, batch_size=128)
    assert job_runs(short, size) == pytest.approx(125 * 128 / (25 * 3200))
    p = plan("sala_overhead", sala_overhead, size, units)
    assert p.cpu == 2.0 * sala_overhead.cost(size) and p.weight(tracked) == 5.0


def test_main_prints_overall_progress_and_where_outputs_are(tmp_path, capsys):
    main(["--tiny", "--out", str(tmp_path), "--jobs", "1", "sala_overhead"])
    text = capsys.readouterr().out
    assert re.search(r"\| \d+ of \d+ runs, about \d+\.\d min left", text), text
    assert re.search(r"expected about \d+\.\d min \(min each: sala_overhead \d+\.\d; CPU share "
                     r"\d\.\d\d of \d+ cores", text), text
    assert re.search(r"took \d+\.\d min after the calibration, expected \d+\.\d min "
                     r"\(\d+\.\d min in all, \d+\.\d min of CPU time", text), text
    tail = text[text.index("outputs in"):]
    assert str(tmp_path / "summary.json") in tail
    assert f"--table --out {tmp_path}" in tail
    assert (f"sala_overhead: figure {tmp_path / 'sala_overhead.png'}; data "
            f"{tmp_path / 'sala_overhead.npz'}, {tmp_path / 'sala_overhead.json'}") in tail
    for path in (tmp_path / "summary.json", tmp_path / "sala_overhead.png",
                 tmp_path / "sala_overhead.npz", tmp_path / "sala_overhead.json"):
        assert path.is_file(), path


def test_accuracy_bars_show_the_compared_differences():
    fig, axes = plotting.figure(1, 1, 4, 3)
    ax = axes[0, 0]
    plotting.bars(ax, ["SGD", "SAM"], [[0.90, 0.91, 0.905], [0.93, 0.935, 0.94]])
    low, high = ax.get_ylim()
    assert low > 0.8 and high < 1.0       # from zero, a 3-point difference is 3 % of the axis
    assert any(t.get_text() == "axis not from 0" for t in ax.texts)
    plotting.bars(ax, ["SGD", "SAM"], [[0.5, 0.52], [0.6, 0.61]], offset=0.2)
    assert ax.get_ylim()[0] < 0.5 < 0.94 < ax.get_ylim()[1]  # a second series widens it
    fig2, axes2 = plotting.figure(1, 1, 4, 3)
    plotting.bars(axes2[0, 0], ["a", "b"], [[1.0, 1.1], [3.0, 3.3]])   # 0 is close: kept
    assert axes2[0, 0].get_ylim()[0] == 0.0 and not axes2[0, 0].texts


def test_log_axes_of_the_figures_have_plain_ticks():
    fig, axes = plotting.figure(1, 1, 4, 3)
    ax = axes[0, 0]
    values = np.geomspace(0.5, 80, 20)
    ax.plot(values)
    plotting.autoscale(ax, values)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels(which="both") if t.get_text()]
    assert ax.get_yscale() == "log" and labels and not any("$" in t for t in labels), labels
