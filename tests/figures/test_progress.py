"""``python -m figures``: overall progress, the time left calibrated on CPU time, where the
outputs are; bar charts on an axis that shows the compared differences."""
from __future__ import annotations

import re

import numpy as np
import pytest

from figures import plotting
from figures.__main__ import main
from figures.runner import Progress, other_load, parallel_share


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def simulate(total: int, cpu_unit: float, cores: int, workers: int, others: float,
             measured_others: float) -> list[float]:
    """Ratios (estimate / truth) of the time left before each run on a machine with ``others``
    runnable processes besides ours, estimated from a calibration that saw ``measured_others``."""
    clock = Clock()
    share = parallel_share(workers, cores, measured_others)
    progress = Progress(total, cpu_unit, share, clock=clock)
    true_share = parallel_share(workers, cores, others)
    wall_per_run = cpu_unit / true_share
    ratios = []
    for done in range(total):
        ratios.append(progress.seconds_left() / ((total - done) * wall_per_run))
        clock.now += wall_per_run
        progress.add()
    assert "of {} runs".format(total) in progress.line() and progress.seconds_left() == 0
    return ratios


@pytest.mark.parametrize("others", [0.0, 3.0, 14.0])
def test_time_left_within_2x_idle_and_loaded(others):
    # the calibration measured the load: within 2x from the start
    assert all(0.5 <= r <= 2 for r in simulate(40, 2.0, 2, 2, others, others))
    # the load tripled after the calibration: within 2x once a few runs are in
    late = simulate(40, 2.0, 2, 2, 3 * others + 2, others)[4:]
    assert all(0.5 <= r <= 2 for r in late), late


def test_the_load_is_read_from_cpu_over_wall_time():
    # a process that got a quarter of a core on 2 cores shares them with 7 others
    assert other_load(1.0, 4.0, cores=2, average=0.0) == pytest.approx(7.0)
    assert other_load(1.0, 1.0, cores=2, average=0.5) == 0.0          # idle
    assert other_load(1.0, 1.0, cores=2, average=5.0) == pytest.approx(4.0)
    assert parallel_share(2, 2, 0.0) == 2.0 and parallel_share(2, 2, 7.0) == pytest.approx(4 / 9)


def test_main_prints_overall_progress_and_where_outputs_are(tmp_path, capsys):
    main(["--tiny", "--out", str(tmp_path), "--jobs", "1", "sala_overhead"])
    text = capsys.readouterr().out
    assert re.search(r"\| \d+ of \d+ runs, about \d+\.\d min left", text), text
    assert re.search(r"expected about \d+\.\d min", text)
    tail = text[text.index("outputs in"):]
    assert str(tmp_path / "summary.json") in tail
    assert f"sala_overhead: figure {tmp_path / 'sala_overhead.png'}" in tail


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


def test_the_workers_start_is_planned_then_left_out_of_the_rate():
    """The old run at the tiny size: workers took ~38 s to start, then 0.3 s per run."""
    clock = Clock()
    progress = Progress(60, 0.3, 2.0, startup=38.0, clock=clock)
    truth = [38.0 + 60 * 0.3 / 2]
    assert 0.5 <= progress.seconds_left() / truth[0] <= 2
    clock.now = 38.0
    for done in range(60):
        clock.now += 0.15
        progress.add()
        left = (59 - done) * 0.15
        if left:
            assert 0.5 <= progress.seconds_left() / left <= 2, (done, progress.seconds_left())


def test_a_finished_reproduction_drops_its_unused_runs():
    clock = Clock()
    progress = Progress(30, 1.0, 1.0, overhead=5.0, reproductions=2, clock=clock)
    for _ in range(8):                 # the first reproduction, counted for 20, did 8
        clock.now += 1.0
        progress.add()
    progress.reproduction_done(20)
    assert progress.total == 18 and "8 of 18 runs" in progress.line()
    assert progress.seconds_left() == pytest.approx(10 + 5.0)   # 10 runs at 1 s, one overhead
