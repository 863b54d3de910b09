"""The one calling convention of ``analysis`` and ``landscape``, read off the signatures.

Rule: every public routine taking ``(model, loss_fn, data, ...)`` (``interpolate``:
``(model_a, model_b, loss_fn, data, ...)``) is
``f(model, loss_fn, data, <its own leading arguments>, *, params=None, model_mode="eval",
batch_size_fn=None, seed=0, progress=True, ...)``:

* the leading arguments are exactly those of the API contract, positional-or-keyword;
* everything after them is keyword-only, and no public function takes ``*args``/``**kwargs``;
* the five common keywords are present with these defaults; ``seed`` is left out exactly by
  the deterministic routines (no random draw), and present in every other one;
* ``check_deterministic=True`` is present exactly in the routines that pass over ``data`` more
  than once, and every routine runs the guards of ``analysis.core.guards``.
"""
import inspect

import analysis
import analysis.sharded
import landscape
from analysis.core import is_guarded

COMMON = {"params": None, "model_mode": "eval", "batch_size_fn": None, "progress": True}
SEED = 0

# the routine's own leading arguments (api.md where it lists them), in order
LEADING = {
    "CurvatureOperator": [], "EmpiricalFisherOperator": [],
    "HessianOperator": [], "GGNOperator": [], "FisherOperator": ["kind"], "hvp": ["v"],
    "mean_loss": [], "evaluate": [], "full_grad_norm": [],
    "top_eigenvalues": ["k", "which", "tol", "max_hvp"],
    "hessian_trace": ["n_hvp", "method"],
    "spectral_density": ["n_lanczos", "n_vectors"],
    "layerwise": ["groups"],
    "worst_case_sharpness": ["rho", "norm", "adaptive", "steps"],
    "average_sharpness": ["sigma", "adaptive", "n_samples"],
    "sharpness_vs_curvature": ["rhos"],
    "keskar_sharpness": ["eps", "subspace_dim"],
    "pac_bayes_sigma": ["target"],
    "eigenvector_directions": ["k"],
    "line": ["direction", "alphas"],
    "plane": ["d1", "d2", "xs", "ys"],
    "interpolate": ["alphas"],
}
# no random draw: seed would be dead
DETERMINISTIC = {"CurvatureOperator", "EmpiricalFisherOperator", "HessianOperator", "GGNOperator",
                 "hvp", "mean_loss", "evaluate", "full_grad_norm", "line",
                 "plane", "interpolate"}
# one pass over data: nothing to compare, so check_deterministic would be dead
SINGLE_PASS = {"hvp", "mean_loss", "evaluate", "full_grad_norm"}
# a state-changing helper, not an analysis routine: it always runs BatchNorm in train mode
# over all of the model and leaves the new statistics in place
EXEMPT = {"recalibrate_bn"}


def public():
    for pkg in (analysis, landscape):
        for name in pkg.__all__:
            obj = getattr(pkg, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield pkg.__name__, name, obj


def signature(obj) -> inspect.Signature:
    return inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)


def data_routines():
    out = {}
    for pkg, name, obj in public():
        names = [p for p in signature(obj).parameters if p != "self"]
        head = (["model_a", "model_b", "loss_fn", "data"] if names[:2] == ["model_a", "model_b"]
                else ["model", "loss_fn", "data"])
        if names[:len(head)] == head and name not in EXEMPT:
            out[name] = (pkg, obj, len(head))
    return out


def test_every_data_routine_is_listed():
    assert set(data_routines()) == set(LEADING)


def test_leading_arguments_then_keyword_only():
    for name, (pkg, obj, n_head) in data_routines().items():
        params = [p for p in signature(obj).parameters.values() if p.name != "self"]
        lead = params[n_head:n_head + len(LEADING[name])]
        assert [p.name for p in lead] == LEADING[name], f"{pkg}.{name}"
        assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:n_head + len(lead)]), name
        rest = params[n_head + len(lead):]
        assert all(p.kind is p.KEYWORD_ONLY for p in rest), f"{pkg}.{name}: {rest}"


def test_common_keywords_and_defaults():
    for name, (pkg, obj, _) in data_routines().items():
        params = signature(obj).parameters
        for key, default in COMMON.items():
            assert key in params, f"{pkg}.{name} lacks {key}="
            assert params[key].default == default, f"{pkg}.{name}: {key}={params[key].default!r}"
        if name in DETERMINISTIC:
            assert "seed" not in params, f"{pkg}.{name} draws nothing: seed= would be dead"
        else:
            assert params["seed"].default == SEED, f"{pkg}.{name} is stochastic: needs seed=0"


def test_check_deterministic_where_data_is_passed_over_repeatedly_and_every_routine_guarded():
    for name, (pkg, obj, _) in data_routines().items():
        params = signature(obj).parameters
        assert is_guarded(obj), f"{pkg}.{name} does not run analysis.core.guards"
        if name in SINGLE_PASS:
            assert "check_deterministic" not in params, f"{pkg}.{name} passes over data once"
        else:
            key = params.get("check_deterministic")
            assert key is not None and key.default is True and key.kind is key.KEYWORD_ONLY, \
                f"{pkg}.{name} passes over data repeatedly: needs check_deterministic=True"


def test_no_var_arguments_in_public_functions():
    for pkg, name, obj in public():
        try:
            params = signature(obj).parameters.values()
        except (TypeError, ValueError):
            continue
        kinds = {p.kind for p in params}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, f"{pkg}.{name} takes **kwargs"
        assert inspect.Parameter.VAR_POSITIONAL not in kinds, f"{pkg}.{name} takes *args"


# analysis's public modules: the package, its documented core, and the FSDP2 module
PUBLIC_MODULES = {"analysis": analysis, "analysis.core": analysis.core,
                  "analysis.sharded": analysis.sharded}


def test_landscape_imports_only_public_names_of_analysis():
    import ast
    import pathlib

    root = pathlib.Path(landscape.__file__).parent
    for path in [*root.glob("*.py"), *(root.parent / "figures").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("analysis"):
                assert node.module in PUBLIC_MODULES, f"{path.name}: {node.module}"
                for alias in node.names:
                    assert not alias.name.startswith("_"), f"{path.name}: {alias.name}"
                    module = PUBLIC_MODULES[node.module]
                    assert alias.name in module.__all__, f"{path.name}: {alias.name}"
