"""Every public result is a registered dataclass with its cost and metadata, and survives
``save_result`` / ``load_result`` (npz + JSON, no pickle) with all fields equal."""
import dataclasses
import os

import numpy as np
import pytest
import torch
from torch import nn

import analysis
import landscape
from analysis import supervised
from analysis.core import results as core_results
from tests.oracles import classification_data, mlp, uneven_batches

CE = supervised(nn.CrossEntropyLoss())
QUIET = dict(progress=False)


def same(a, b, where="result"):
    """Exact equality of two stored values, types and dtypes included."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
        if hasattr(a, "info"):
            same(a.info, b.info, f"{where}.info")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def results():
    x, y = classification_data(n=17, d=6)
    model, data = mlp((6, 5, 3)), uneven_batches(x, y, sizes=(7, 10))
    other = mlp((6, 5, 3), seed=1)
    d1, d2 = landscape.random_direction(model, seed=1), landscape.random_direction(model, seed=2)
    trajectory = [mlp((6, 5, 3), seed=s).state_dict() for s in range(4)]
    return [
        analysis.top_eigenvalues(model, CE, data, k=2, **QUIET),
        analysis.hessian_trace(model, CE, data, n_hvp=4, **QUIET),
        analysis.spectral_density(model, CE, data, n_lanczos=5, n_vectors=1, n_grid=11, **QUIET),
        analysis.layerwise(model, CE, data, n_hvp_trace=6, **QUIET),
        analysis.average_sharpness(model, CE, data, n_samples=4, **QUIET),
        analysis.worst_case_sharpness(model, CE, data, steps=2, **QUIET),
        analysis.sharpness_vs_curvature(model, CE, data, rhos=(0.01,), steps=2, **QUIET),
        analysis.keskar_sharpness(model, CE, data, subspace_dim=3, max_iter=2, **QUIET),
        analysis.pac_bayes_sigma(model, CE, data, n_samples=2, max_iter=2, **QUIET),
        landscape.line(model, CE, data, d1, [-0.5, 0.0, 0.5], **QUIET),
        landscape.plane(model, CE, data, d1, d2, [-0.5, 0.5], [0.0, 0.2, 0.4], **QUIET),
        landscape.interpolate(model, other, CE, data, [0.5], **QUIET),
        landscape.pca_directions(trajectory, model),
    ]


def test_every_public_result_type_is_covered(results):
    public = {getattr(pkg, n) for pkg in (analysis, landscape) for n in pkg.__all__}
    public = {obj for obj in public if isinstance(obj, type) and dataclasses.is_dataclass(obj)}
    assert public == {type(r) for r in results}
    assert public <= set(core_results._TYPES.values())


def test_cost_and_metadata(results):
    for r in results:
        names = {f.name for f in dataclasses.fields(r)}
        assert names & {"n_hvp", "n_forward"}, type(r).__name__
        assert {"seed", "config", "versions"} <= set(r.metadata), type(r).__name__
        assert r.metadata["versions"]["torch"] == torch.__version__


def test_seed_and_config_are_recorded():
    x, y = classification_data(n=9, d=6)
    r = analysis.hessian_trace(mlp((6, 5, 3)), CE, [(x, y)], n_hvp=4, seed=7, **QUIET)
    assert r.metadata["seed"] == 7
    assert r.metadata["config"]["n_hvp"] == 4 and r.metadata["config"]["method"] == "hutch++"


def test_round_trip_every_result(results, tmp_path):
    for i, r in enumerate(results):
        path = tmp_path / f"r{i}.npz"
        analysis.save_result(r, path)
        same(r, landscape.load_result(path), type(r).__name__)


def test_tensors_keep_their_dtype_and_no_pickle(tmp_path):
    r = analysis.EigenResult(np.array([1.0]), torch.ones(1, 3, dtype=torch.bfloat16),
                             np.array([0.0]), 3, True, ["w"], {"seed": 0})
    analysis.save_result(r, tmp_path / "e.npz")
    back = analysis.load_result(tmp_path / "e.npz")
    assert back.eigenvectors.dtype == torch.bfloat16
    same(r, back)
    with np.load(tmp_path / "e.npz", allow_pickle=False) as f:
        assert all(f[k].dtype != object for k in f.files)


def test_one_save_and_load_for_both_packages():
    assert landscape.save_result is analysis.save_result
    assert landscape.load_result is analysis.load_result


def test_unknown_files_and_types_are_refused(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not a sharpscape result"):
        analysis.load_result(tmp_path / "other.npz")

    @dataclasses.dataclass
    class Mine:
        value: float

    with pytest.raises(TypeError, match="registered"):
        analysis.save_result(Mine(1.0), tmp_path / "mine.npz")


def test_save_result_errors_leave_no_file_and_name_the_cause(tmp_path):
    result = analysis.TraceResult(1.0, 0.1, 4, "hutch++", np.zeros(2))
    with pytest.raises(FileNotFoundError):
        analysis.save_result(result, tmp_path / "missing" / "r.npz")
    analysis.save_result(result, tmp_path / "r.npz")
    assert os.listdir(tmp_path) == ["r.npz"]
    assert (os.stat(tmp_path / "r.npz").st_mode & 0o777) == 0o666 & ~current_umask()
    for content in (b"", b"PK\x03\x04junk", b"\x93NUMPY"):
        (tmp_path / "bad.npz").write_bytes(content)
        with pytest.raises(ValueError, match="bad.npz is not a sharpscape result file"):
            analysis.load_result(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        analysis.load_result(tmp_path / "absent.npz")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FORMER_TAGS = {  # type tags of files saved before the sharpness measures moved (issue 22)
    "WorstCaseSharpness": "analysis.sharpness:WorstCaseSharpness",
    "AverageSharpness": "analysis.sharpness:AverageSharpness",
    "SharpnessVsCurvature": "analysis.sharpness:SharpnessVsCurvature",
    "KeskarSharpness": "analysis.flatness:KeskarSharpness",
    "PacBayesSigma": "analysis.flatness:PacBayesSigma",
}


def _retag(path, old_tag):
    """Rewrite a saved file as a version before the move wrote it: the type under its old tag."""
    import json

    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    doc = json.loads(str(arrays["__result__"]))
    new_tag = doc["result"]["__type__"]
    doc["result"]["__type__"] = old_tag
    arrays["__result__"] = np.array(json.dumps(doc, sort_keys=True))
    np.savez(path, **arrays)
    return new_tag


def test_files_saved_before_the_moves_still_load(results, tmp_path):
    moved = [r for r in results if type(r).__name__ in FORMER_TAGS]
    assert len(moved) == len(FORMER_TAGS)
    for r in moved:
        path = tmp_path / f"{type(r).__name__}.npz"
        analysis.save_result(r, path)
        new_tag = _retag(path, FORMER_TAGS[type(r).__name__])
        assert new_tag != FORMER_TAGS[type(r).__name__]   # the file now holds only the old tag
        back = analysis.load_result(path)
        same(r, back, type(r).__name__)
        analysis.save_result(back, path)                  # written again under the new tag
        with np.load(path, allow_pickle=False) as f:
            assert new_tag in str(f["__result__"])


def test_a_former_tag_cannot_name_two_types():
    @dataclasses.dataclass
    class Other:
        metadata: dict = dataclasses.field(default_factory=dict)

    with pytest.raises(ValueError, match="already names"):
        core_results.register_result(formerly=("analysis.flatness:KeskarSharpness",))(Other)
    assert core_results._TYPES["analysis.flatness:KeskarSharpness"] is analysis.KeskarSharpness


def test_repr_is_short_with_numbers_and_shapes(results):
    for r in results:
        text = repr(r)
        name = type(r).__name__
        assert text.startswith(name + "(") and len(text) < 400, (name, len(text))
        assert "metadata" not in text and "versions" not in text and "tensor([" not in text, text
    eig, tr = results[0], results[1]
    assert f"eigenvectors=tensor{list(eig.eigenvectors.shape)}" in repr(eig)
    assert f"estimate={tr.estimate:.4g}" in repr(tr) and f"n_hvp={tr.n_hvp}" in repr(tr)
    direction = landscape.random_direction(mlp((6, 5, 3)), seed=1)
    assert "'0.weight': tensor[5, 6]" in repr(direction) and "tensor([" not in repr(direction)


def test_a_misspelt_field_suggests_the_right_one(results):
    eig, tr = results[0], results[1]
    with pytest.raises(AttributeError, match=r"did you mean 'estimate'\?.*Its fields: estimate"):
        tr.trace
    with pytest.raises(AttributeError, match="did you mean 'eigenvalues'"):
        eig.eigenvalue
    with pytest.raises(AttributeError, match="did you mean 'n_hvp'"):
        tr.n_hvps
    assert not hasattr(tr, "no_such_field_at_all")
    assert results[6].ratio.shape == results[6].rhos.shape   # properties still work


def test_reading_keeps_equality_copies_and_files(results, tmp_path):
    import copy
    import pickle
    tr = results[1]
    assert tr == dataclasses.replace(tr) and tr != dataclasses.replace(tr, n_hvp=tr.n_hvp + 1)
    for twin in (copy.deepcopy(tr), pickle.loads(pickle.dumps(tr))):
        same(tr, twin)
    analysis.save_result(tr, tmp_path / "t.npz")
    assert repr(analysis.load_result(tmp_path / "t.npz")) == repr(tr)


def test_every_result_field_is_documented():
    for cls in set(core_results._TYPES.values()):
        if not dataclasses.is_dataclass(cls):
            continue
        doc = cls.__doc__.split("Attributes:")[-1]
        for f in dataclasses.fields(cls):
            assert f"\n        {f.name}:" in doc, f"{cls.__name__}.{f.name} is not documented"
