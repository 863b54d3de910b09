"""The common keywords behave the same wherever the convention added them: ``params`` restricts
the analysed parameters, ``model_mode`` the mode; and a shadowing ``analysis.py`` is named."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from analysis import evaluate, full_grad_norm, layerwise, mean_loss, supervised
from landscape import interpolate, line, random_direction
from tests.oracles import (assert_unchanged, classification_data, cnn_bn, exact_grad, mlp, snapshot,
                     uneven_batches)

CE = supervised(nn.CrossEntropyLoss())
QUIET = dict(progress=False)


def problem():
    x, y = classification_data(n=23, d=6)
    return mlp((6, 5, 3)), uneven_batches(x, y)


def test_full_grad_norm_of_the_selected_parameters():
    model, data = problem()
    names = ["2.weight", "0.bias"]
    g = exact_grad(model, CE, data, names)
    assert full_grad_norm(model, CE, data, params=names, **QUIET) == pytest.approx(
        float(torch.linalg.vector_norm(g)), rel=1e-12)


def test_mean_loss_and_evaluate_in_either_mode_leave_the_model_as_found():
    x, y = classification_data(n=23, d=12)
    model, data = cnn_bn(), uneven_batches(x, y)
    snap = snapshot(model)
    train = mean_loss(model, CE, data, model_mode="train", **QUIET)
    ev = mean_loss(model, CE, data, **QUIET)
    assert train != pytest.approx(ev)  # BatchNorm: batch statistics vs running statistics
    loss, _ = evaluate(model, CE, data, model_mode="train", **QUIET)
    assert loss == pytest.approx(train, rel=1e-12)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="model_mode must be one of"):
        mean_loss(model, CE, data, model_mode="test")


def test_line_moves_only_the_selected_parameters():
    model, data = problem()
    d = random_direction(model, seed=3, ignore_bias_bn=False)
    names = ["0.weight"]
    by_params = line(model, CE, data, d, [-0.5, 0.25], params=names, **QUIET)
    by_hand = line(model, CE, data, {n: d[n] for n in names}, [-0.5, 0.25], **QUIET)
    np.testing.assert_array_equal(by_params.losses, by_hand.losses)
    with pytest.raises(ValueError, match="moves none"):
        line(model, CE, data, {"0.bias": d["0.bias"]}, [0.0], params=names, **QUIET)


def test_interpolate_moves_only_the_selected_parameters():
    model, data = problem()
    other = mlp((6, 5, 3), seed=1)
    res = interpolate(model, other, CE, data, [0.5], params=["2.weight"], **QUIET)
    mid = mlp((6, 5, 3))
    with torch.no_grad():
        mid[2].weight.copy_(0.5 * model[2].weight + 0.5 * other[2].weight)
    assert res.losses[0] == pytest.approx(mean_loss(mid, CE, data, **QUIET), rel=1e-12)


def test_layerwise_keeps_only_the_selected_parameters():
    model, data = problem()
    res = layerwise(model, CE, data, params=["0.weight", "2.bias"], n_hvp_trace=6, **QUIET)
    assert res.blocks == ["0", "2"] and res.params == {"0": ["0.weight"], "2": ["2.bias"]}
    with pytest.raises(ValueError, match="no parameter"):
        layerwise(model, CE, data, groups={"first": ["0.weight"]}, params=["2.bias"], **QUIET)


def test_a_shadowing_analysis_module_is_named(tmp_path):
    (tmp_path / "analysis.py").write_text("x = 1\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    for package in ("landscape", "figures"):
        run = subprocess.run([sys.executable, "-c", f"import {package}"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
        assert run.returncode != 0
        assert str(tmp_path / "analysis.py") in run.stderr and "rename" in run.stderr
