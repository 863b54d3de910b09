"""Hyperparameter selection with the declared tie rule, and selection under both floating-point
paths (ATen's default scalar kernels and this CPU's vector kernels)."""
from __future__ import annotations

import pytest

from figures.verdict import select

POINTS = [{"lr": 0.0167}, {"lr": 0.05}, {"lr": 0.15}]


def test_a_clear_best_point_is_chosen_whatever_is_preferred():
    """0.15 beats the others by far more than the pooled standard error (0.005)."""
    scores = [[0.60, 0.61], [0.62, 0.63], [0.70, 0.71]]
    chosen, record = select(POINTS, scores, preferred={"lr": 0.05})
    assert chosen == {"lr": 0.15} and record["tied"] == [{"lr": 0.15}]
    assert record["standard_error"] == pytest.approx(0.005)
    assert record["argmax"] == {"lr": 0.15}


def test_a_tie_within_the_standard_error_goes_to_the_preferred_point():
    """0.15's mean is 0.004 above 0.05's, within one pooled standard error (0.01): the paper's
    0.05 is taken; 0.0167 is 0.03 below, not tied."""
    scores = [[0.57, 0.59], [0.62, 0.64], [0.624, 0.644]]
    chosen, record = select(POINTS, scores, preferred={"lr": 0.05})
    assert chosen == {"lr": 0.05} and record["argmax"] == {"lr": 0.15}
    assert record["tied"] == [{"lr": 0.05}, {"lr": 0.15}]


def test_a_tie_without_the_preferred_point_goes_to_the_smallest():
    scores = [[0.50, 0.52], [0.62, 0.64], [0.624, 0.644]]
    assert select(POINTS, scores, preferred={"lr": 0.0167})[0] == {"lr": 0.05}
    assert select(POINTS, scores)[0] == {"lr": 0.05}
    grid = [{"lr": 0.1, "rho": 0.05}, {"lr": 0.05, "rho": 0.2}, {"lr": 0.05, "rho": 0.1}]
    assert select(grid, [[0.6, 0.62], [0.61, 0.63], [0.7, 0.5]])[0] == {"lr": 0.05, "rho": 0.1}


def test_one_seed_is_the_plain_argmax():
    assert select(POINTS, [[0.60], [0.6001], [0.59]], preferred={"lr": 0.0167})[0] == \
        {"lr": 0.05}


@pytest.mark.parametrize("points, scores", [([], []), (POINTS, [[0.5], [0.5]]),
                                            (POINTS, [[0.5], [0.5, 0.6], [0.5]])])
def test_mismatched_scores_are_refused(points, scores):
    with pytest.raises(ValueError, match="scores"):
        select(points, scores)


def test_selection_and_verdicts_agree_on_both_floating_point_paths(float_paths):
    """The same small configuration (sala_overhead at the tiny size: four lr searches, the
    compared runs) under ATEN_CPU_CAPABILITY=default and under the default kernels: the
    environment records differ, the numbers may, the chosen lrs and every verdict do not (the
    runs are ``tests/figures/conftest.py``'s, shared with test_protocol)."""
    scalar, vector = (float_paths[p]["sala_overhead"] for p in ("scalar", "vector"))
    assert scalar["environment"]["aten_cpu_capability"] == "DEFAULT"
    assert vector["environment"]["ATEN_CPU_CAPABILITY"] is None
    assert scalar["measured"]["lr"] == vector["measured"]["lr"]
    assert {k: c["verdict"] for k, c in scalar["checks"].items()} == \
        {k: c["verdict"] for k, c in vector["checks"].items()}
    assert scalar["verdict"] == vector["verdict"]
