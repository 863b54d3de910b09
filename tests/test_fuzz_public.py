"""Fuzzing the numeric, flag and choice arguments of the public analysis/landscape routines.

Property (issue 13): whatever a keyword is given (numbers of all kinds: nan, inf, negative,
bool, float-for-int, numpy scalars; strings; None), the call either returns a result without
NaN or raises ValueError/TypeError; the model is never changed (parameters, buffers, grads,
training and requires_grad flags); and a value outside the keyword's accepted range (the
``SPEC`` below, written from the docstrings, independently of the validation code) is always
refused. Small model (29 parameters), few examples (derandomized, so CI is reproducible).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import analysis as A
import landscape as L
from tests.oracles import assert_unchanged, snapshot

CE = A.supervised(nn.CrossEntropyLoss())
FEW = settings(max_examples=30, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow])


def small_model() -> nn.Module:
    """Linear-BatchNorm-Tanh-Linear (29 parameters, one frozen), in train mode, with grads and
    non-trivial BatchNorm statistics: everything a careless routine could change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        model(torch.randn(16, 4, dtype=torch.float64))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[1].bias.requires_grad_(False)
    return model


gen = torch.Generator().manual_seed(1)
X = torch.randn(10, 4, generator=gen, dtype=torch.float64)
Y = torch.randint(0, 2, (10,), generator=gen)
DATA = [(X[:6], Y[:6]), (X[6:], Y[6:])]
N = 26  # parameters with requires_grad (the default selection)
ONES = torch.ones(N, dtype=torch.float64)


@dataclasses.dataclass(frozen=True)
class Arg:
    """The accepted range of a keyword."""
    kind: str                      # "int", "real", "bool" or "choice"
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    none: bool = False             # None accepted
    choices: tuple = ()
    listed: bool = False           # passed as the one entry of a list (coordinates, radii)


def refused(arg: Arg, v: Any) -> bool:
    """Must ``v`` be refused for ``arg``?"""
    if v is None:
        return not arg.none
    if arg.kind == "bool":
        return not isinstance(v, (bool, np.bool_))
    if arg.kind == "choice":  # numpy bools count as bools; 0 or 1.0 never as False or True
        v = bool(v) if isinstance(v, np.bool_) else v
        return not any(type(v) is type(c) and v == c for c in arg.choices)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return True
    if arg.kind == "int" and not isinstance(v, numbers.Integral):
        return True
    f = float(v)
    if not math.isfinite(f):
        return True
    if arg.low is not None and (f < arg.low or (arg.low_open and f == arg.low)):
        return True
    return arg.high is not None and f > arg.high


def I(low, high=None, none=False):  # noqa: E743
    return Arg("int", low, high=high, none=none)


def R(low=0, none=False, listed=False):
    return Arg("real", low, low_open=True, none=none, listed=listed)


def C(*choices, none=False):
    return Arg("choice", choices=choices, none=none)


B = Arg("bool")
CURVATURE = C("hessian", "ggn", "fisher", "empirical_fisher")
SEED = I(0)
MODE = C("eval", "train")
ADAPTIVE = C(False, True, "elementwise", "filter", none=True)  # None: plain, as False
COORDINATE = Arg("real", listed=True)
SURFACE = {"chunk_size": I(1, none=True), "max_memory": R(), "model_mode": MODE,
           "vectorize": C("auto", True, False), "distribute": C("data", "grid")}
DIR = {"0.weight": torch.ones(3, 4, dtype=torch.float64)}
DIR2 = {"3.weight": torch.ones(2, 3, dtype=torch.float64)}
TRAJECTORY = [{n: t + 0.1 * k ** (1 + i % 3) if t.is_floating_point() else t
               for i, (n, t) in enumerate(small_model().state_dict().items())} for k in range(4)]

GRID = np.linspace(-1.0, 1.0, 5)
BOWL = L.PlaneResult(GRID, GRID, 1.0 + GRID[None, :] ** 2 + GRID[:, None] ** 2)
LEVELS = Arg("int", 2)


def drawn(ax) -> None:
    """A plot call's result: nothing to check but that it did not raise."""
    assert ax.figure is not None


# routine -> (call with the fuzzed keyword, {keyword: accepted range})
SPEC: dict[str, tuple[Callable[..., Any], dict[str, Arg]]] = {
    "top_eigenvalues": (lambda m, **kw: A.top_eigenvalues(m, CE, DATA, progress=False, **kw), {
        "k": I(1, N), "tol": R(), "max_hvp": I(1, none=True), "block_size": I(1),
        "max_basis": I(1, none=True), "seed": SEED, "which": C("LA", "SA", "LM"),
        "method": C("lanczos", "power"), "model_mode": MODE, "curvature": CURVATURE}),
    "hessian_trace": (lambda m, **kw: A.hessian_trace(m, CE, DATA, progress=False, **kw), {
        "n_hvp": I(4), "chunk": I(1), "seed": SEED, "method": C("hutch++", "hutchinson", "xtrace"),
        "curvature": CURVATURE}),
    "spectral_density": (lambda m, **kw: A.spectral_density(m, CE, DATA, n_lanczos=6, n_vectors=2,
                                                            n_grid=50, progress=False, **kw), {
        "n_lanczos": I(1), "n_vectors": I(1), "sigma": R(none=True), "n_grid": I(2), "seed": SEED,
        "log_scale": B, "curvature": CURVATURE}),
    "layerwise": (lambda m, **kw: A.layerwise(m, CE, DATA, n_hvp_trace=12, progress=False, **kw), {
        "tol": R(), "n_hvp_trace": I(4), "seed": SEED,
        "trace_method": C("hutch++", "hutchinson", "xtrace")}),
    "worst_case_sharpness": (lambda m, **kw: A.worst_case_sharpness(m, CE, DATA, steps=3,
                                                                    progress=False, **kw), {
        "rho": R(), "steps": I(1), "m": I(1, 10, none=True), "restarts": I(1), "seed": SEED,
        "norm": C("l2", "linf"), "adaptive": ADAPTIVE}),
    "average_sharpness": (lambda m, **kw: A.average_sharpness(m, CE, DATA, n_samples=4,
                                                              progress=False, **kw), {
        "sigma": R(), "n_samples": I(2), "seed": SEED, "antithetic": B, "norm": C("l2", "linf"),
        "adaptive": ADAPTIVE}),
    "sharpness_vs_curvature": (lambda m, rhos=(0.01,), **kw: A.sharpness_vs_curvature(
        m, CE, DATA, rhos, steps=2, progress=False, **kw), {
        "rhos": R(listed=True), "steps": I(1), "restarts": I(1), "tol": R(),
        "max_hvp": I(1, none=True), "seed": SEED}),
    "keskar_sharpness": (lambda m, **kw: A.keskar_sharpness(m, CE, DATA, max_iter=2,
                                                            progress=False, **kw), {
        "eps": R(), "subspace_dim": I(1, N, none=True), "max_iter": I(1), "seed": SEED}),
    "pac_bayes_sigma": (lambda m, **kw: A.pac_bayes_sigma(m, CE, DATA, n_samples=2, max_iter=3,
                                                          progress=False, **kw), {
        "target": R(), "magnitude_eps": R(), "n_samples": I(1), "max_iter": I(1), "tol": R(),
        "sigma_max": R(), "seed": SEED, "magnitude_aware": B, "metric": C("loss", "error")}),
    "mean_loss": (lambda m, **kw: A.mean_loss(m, CE, DATA, progress=False, **kw),
                  {"model_mode": MODE}),
    "evaluate": (lambda m, **kw: A.evaluate(m, CE, DATA, progress=False, **kw),
                 {"model_mode": MODE}),
    "full_grad_norm": (lambda m, **kw: A.full_grad_norm(m, CE, DATA, progress=False, **kw),
                       {"model_mode": MODE}),
    "hvp": (lambda m, **kw: A.hvp(m, CE, DATA, ONES, progress=False, **kw),
            {"model_mode": MODE, "hvp_method": C("reverse", "forward")}),
    "GGNOperator": (lambda m, **kw: A.GGNOperator(m, CE, DATA, progress=False, **kw).matvec(ONES),
                    {"model_mode": MODE, "reuse_graph": B}),
    "FisherOperator": (lambda m, **kw: A.FisherOperator(m, CE, DATA, progress=False,
                                                        **kw).matvec(ONES), {
        "kind": C("exact", "mc", "empirical"), "mc_samples": I(1), "seed": SEED,
        "likelihood": C("categorical", "gaussian", none=True), "reuse_graph": B}),
    "line": (lambda m, alphas=(-1.0, 0.0, 1.0), **kw: L.line(m, CE, DATA, DIR, alphas,
                                                              progress=False, **kw),
             {**SURFACE, "alphas": COORDINATE}),
    "plane": (lambda m, xs=(0.0, 1.0), ys=(-1.0, 0.0), **kw: L.plane(
        m, CE, DATA, DIR, DIR2, xs, ys, progress=False, **kw),
        {**SURFACE, "xs": COORDINATE, "ys": COORDINATE}),
    "interpolate": (lambda m, alphas=(0.5,), **kw: L.interpolate(m, TRAJECTORY[3], CE, DATA,
                                                                 alphas, progress=False, **kw),
                    {**SURFACE, "buffers": B, "alphas": COORDINATE}),
    "random_direction": (lambda m, **kw: L.random_direction(m, **kw), {
        "seed": SEED, "normalization": C("filter", "layer", "none"), "ignore_bias_bn": B}),
    "eigenvector_directions": (lambda m, **kw: L.eigenvector_directions(m, CE, DATA,
                                                                        progress=False, **kw), {
        "k": I(1, N), "tol": R(), "max_hvp": I(1, none=True), "seed": SEED}),
    "pca_directions": (lambda m, **kw: L.pca_directions(TRAJECTORY, m, **kw), {
        "n": I(1, 3), "method": C("auto", "svd", "gram"), "ignore_bias_bn": B}),
    "plot_contour": (lambda m, **kw: drawn(L.plot_contour(BOWL, **kw)), {
        "levels": LEVELS, "log": B, "filled": B, "colorbar": B}),
    "plot_spectral_density": (lambda m, **kw: drawn(L.plot_spectral_density(
        A.DensityResult(GRID, np.exp(-GRID ** 2), GRID[None], np.ones((1, 5)) / 5, 0.1, False, 5),
        **kw)), {"log": B, "floor": R()}),
    "Tracker": (lambda m, **kw: A.Tracker(m, CE, curvature_data=DATA, **kw).log(), {
        "every": I(1), "lanczos_tol": R(), "lanczos_max_hvp": I(1), "trace_n_hvp": I(4),
        "seed": SEED, "model_mode": MODE, "lambda_max": B, "trace": B, "grad_norm": B,
        "layers": B}),
}

SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 0.5, 2.0, 3.0, -1.0, True, False,
           None, np.float32(0.5), np.float64(2.0), np.float64(math.nan), np.float32(math.inf),
           np.int64(3), np.int32(0), np.int64(-2), np.bool_(True), "", "1", "eval", "LA", "l2",
           "auto", "bogus"]
VALUES = st.one_of(st.sampled_from(SPECIAL), st.integers(-3, 12),
                   st.integers(-3, 12).map(float), st.floats(-50, 50), st.text(max_size=2))


def has_nan(value: Any) -> bool:
    """Does a result (dataclass, dict, list, array, tensor, number) hold a NaN anywhere?"""
    if isinstance(value, (tuple, list)):
        return any(has_nan(v) for v in value)
    if isinstance(value, dict):
        return any(has_nan(v) for v in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(has_nan(getattr(value, f.name)) for f in dataclasses.fields(value)
                   if f.name != "metadata")
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and bool(torch.isnan(value).any())
    if isinstance(value, (np.ndarray, np.generic)):
        return value.dtype.kind in "fc" and bool(np.isnan(value).any())
    return isinstance(value, float) and math.isnan(value)


def check(name: str, keyword: str, value: Any) -> None:
    call, spec = SPEC[name]
    model = small_model()
    snap = snapshot(model)
    try:
        result = call(model, **{keyword: [value] if spec[keyword].listed else value})
    except (ValueError, TypeError):
        result, raised = None, True
    else:
        raised = False
    assert_unchanged(model, snap)
    if refused(spec[keyword], value):
        assert raised, f"{name}({keyword}={value!r}) was accepted"
    if not raised:
        assert not has_nan(result), f"{name}({keyword}={value!r}) returned NaN"


@pytest.mark.parametrize("name", sorted(SPEC))
@FEW
@given(data=st.data())
def test_any_argument_gives_a_finite_result_or_a_clear_error(name, data):
    keyword = data.draw(st.sampled_from(sorted(SPEC[name][1])), label="keyword")
    check(name, keyword, data.draw(VALUES, label="value"))


@pytest.mark.parametrize("name", sorted(SPEC))
def test_every_keyword_refuses_the_typical_mistakes(name):
    """Deterministic companion: nan, inf, a bool, a string and None on every keyword."""
    failures = []
    for keyword in sorted(SPEC[name][1]):
        for value in (math.nan, math.inf, True, "bogus", None, -1, 1.5, np.float64(2.0)):
            try:
                check(name, keyword, value)
            except Exception as err:  # collect them all, to name every unguarded keyword
                failures.append(f"{type(err).__name__}: {str(err).splitlines()[0]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_the_unfuzzed_calls_succeed(name):
    """Without this, a base call that always raised would make the properties vacuous."""
    model = small_model()
    snap = snapshot(model)
    assert not has_nan(SPEC[name][0](model))
    assert_unchanged(model, snap)


def test_non_finite_vectors_and_directions_are_refused():
    model = small_model()
    snap = snapshot(model)
    bad = torch.full((N,), math.nan, dtype=torch.float64)
    with pytest.raises(ValueError, match="vectors must be finite"):
        A.hvp(model, CE, DATA, bad, progress=False)
    with pytest.raises(ValueError, match="v0 must be finite"):
        A.top_eigenvalues(model, CE, DATA, v0=bad, progress=False)
    with pytest.raises(ValueError, match="must be finite"):
        L.line(model, CE, DATA, {"0.weight": torch.full((3, 4), math.inf, dtype=torch.float64)},
               [0.0, 1.0], progress=False)
    with pytest.raises(TypeError, match="groups must be a dict"):
        A.layerwise(model, CE, DATA, groups="0.weight", progress=False)
    with pytest.raises(TypeError, match="reuse_graph must be True or False"):
        A.HessianOperator(model, CE, DATA, reuse_graph="no")
    with pytest.raises(TypeError, match="buffers must be True or False"):
        L.update_direction(TRAJECTORY[0], TRAJECTORY[1], model, buffers="no")
    assert_unchanged(model, snap)
