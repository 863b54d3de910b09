"""The result convention: small dataclasses with numpy/float fields, their cost and ``metadata``.

Every public result of ``analysis`` and ``landscape`` is a dataclass registered here with
:func:`register_result`. Its fields are numpy arrays, Python floats/ints/strings, lists and
dicts of those, and torch tensors only where a user needs tensors (eigenvectors, directions;
each such field says so in its docstring). It carries its cost (``n_hvp`` for curvature
routines, ``n_forward`` for surfaces and sharpness) and ``metadata``: the seed, the call's
configuration and the torch/numpy/sharpscape versions (:func:`make_metadata`).

:func:`save_result` writes any registered result to one ``.npz`` file: the arrays and tensors as
npz arrays, everything else as one JSON document. :func:`load_result` reads it back without
pickle; tensors come back as (CPU) tensors with their dtype. Writes are atomic
(:func:`analysis.core.files.atomic_write`) and by rank 0 only.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import os
import zipfile
from importlib import metadata as _pkg_metadata
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from .distributed import rank
from .files import atomic_write

FORMAT = 2
_KEY = "__result__"
_PACKAGES = ("analysis", "landscape")   # modules load_result may import to find a result type
_TYPES: dict[str, type] = {}


@functools.lru_cache(maxsize=1)
def _installed_version() -> str:
    """The installed version of sharpscape, read once per process.

    Reading package metadata scans the environment's ``site-packages``.
    """
    try:
        return _pkg_metadata.version("sharpscape")
    except _pkg_metadata.PackageNotFoundError:
        return "unknown (not installed)"


def versions() -> dict[str, str]:
    """The versions of torch, numpy and sharpscape (for ``metadata``).

    Returns:
        ``{"torch": ..., "numpy": ..., "sharpscape": ...}``.
    """
    return {"torch": str(torch.__version__), "numpy": str(np.__version__),
            "sharpscape": _installed_version()}


def make_metadata(seed: Any = None, config: Mapping[str, Any] | None = None, **extra: Any) -> dict:
    """The provenance every result carries.

    Args:
        seed: The call's seed (None for deterministic routines).
        config: The call's configuration.
        **extra: Further entries.

    Returns:
        ``{"seed", "config", "versions", **extra}``.
    """
    return {"seed": seed, "config": dict(config or {}), "versions": versions(), **extra}


def _type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def register_result(cls: type | None = None, *, formerly: tuple[str, ...] = ()) -> Any:
    """Class decorator: make ``cls`` storable by :func:`save_result` / :func:`load_result`.

    Used as ``@register_result``, or as ``@register_result(formerly=(...))`` by a type that
    moved: files store the type tag ``"module:QualName"``, so a type moved to another module
    names its former tags, and files saved before the move still load.

    Args:
        cls: A dataclass, or a ``dict`` subclass with an ``info`` attribute (None when called
            with keywords only).
        formerly: The type tags the class had before it moved (``"analysis.flatness:
            KeskarSharpness"``); files are always written with its current tag.

    Returns:
        ``cls``, or the decorator when ``cls`` is None.

    Raises:
        TypeError: ``cls`` is neither a dataclass nor a dict subclass.
        ValueError: A former tag already names another registered type.
    """
    if cls is None:
        return functools.partial(register_result, formerly=formerly)
    if not (dataclasses.is_dataclass(cls) or issubclass(cls, dict)):
        raise TypeError(f"cls must be a dataclass or a dict subclass, got {cls!r}")
    for tag in formerly:
        if _TYPES.get(tag, cls) is not cls:
            raise ValueError(f"formerly: the tag {tag!r} already names {_TYPES[tag]!r}")
        _TYPES[tag] = cls
    _TYPES[_type_name(cls)] = cls
    return cls


def _jsonable(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_jsonable(v) for v in value)
    return isinstance(value, np.generic) and value.ndim == 0


def records_metadata(fn: Callable) -> Callable:
    """Decorate a public routine so that its result's ``metadata`` records the call.

    The seed and the call's JSON-representable arguments (numbers, strings, flags; not the
    model, loss_fn, data, tensors or callables) fill ``metadata``, unless the routine filled it
    itself (entries a routine adds without ``versions``, e.g. ``metadata["hvp"]``, the
    finite-difference record, are kept beside them).

    Args:
        fn: A routine returning a result with a ``metadata`` field.

    Returns:
        The wrapped routine.
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs)
        if "versions" not in result.metadata:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            config = {k: (v.item() if isinstance(v, np.generic) else v)
                      for k, v in bound.arguments.items() if _jsonable(v)}
            result.metadata = make_metadata(config.pop("seed", None), config,
                                            **result.metadata)
        return result

    return wrapper


class _Encoder:
    """JSON structure of a value, with its arrays and tensors set aside for the npz file."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def _array(self, a: np.ndarray) -> str:
        if a.dtype.hasobject:
            raise TypeError("object arrays cannot be stored without pickle")
        key = f"a{len(self.arrays)}"
        self.arrays[key] = a
        return key

    def __call__(self, v: Any) -> Any:
        if isinstance(v, Tensor):
            t = v.detach().cpu()
            wide = t.to(torch.float32) if t.dtype == torch.bfloat16 else t
            return {"__tensor__": self._array(wide.numpy()), "dtype": str(t.dtype).split(".")[-1]}
        if isinstance(v, np.ndarray):
            return {"__array__": self._array(v)}
        if isinstance(v, np.generic):
            return {"__scalar__": self._array(np.asarray(v))}
        if dataclasses.is_dataclass(v) or (isinstance(v, dict) and type(v) is not dict):
            cls = type(v)
            if _TYPES.get(_type_name(cls)) is not cls:
                raise TypeError(f"{cls.__qualname__} is not a registered result type")
            if isinstance(v, dict):
                fields = {"items": self(dict(v)), "info": self(v.info)}
            else:
                fields = {f.name: self(getattr(v, f.name)) for f in dataclasses.fields(v)}
            return {"__type__": _type_name(cls), "fields": fields}
        if isinstance(v, dict):
            return {"__dict__": [[self(k), self(x)] for k, x in v.items()]}
        if isinstance(v, tuple):
            return {"__tuple__": [self(x) for x in v]}
        if isinstance(v, list):
            return [self(x) for x in v]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise TypeError(f"cannot store a {type(v).__name__} in a result file")


def _import_module(module: str) -> None:
    """Import ``module`` where it still exists (a moved type's former module may not)."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or not (module + ".").startswith(err.name + "."):
            raise   # a module that exists but fails to import: not a moved type


def _result_type(name: str) -> type:
    """The registered type of the tag ``name``, importing the module it names if needed.

    A tag that is not registered once its module is imported may be the former tag of a type
    that moved (:func:`register_result`'s ``formerly``): the package it names is imported,
    which registers every result type of that package under its current and former tags.
    """
    if name not in _TYPES:
        module = name.split(":")[0]
        package = module.split(".")[0]
        if package not in _PACKAGES:
            raise ValueError(f"unknown result type {name!r} (not a sharpscape result)")
        _import_module(module)
        if name not in _TYPES:
            importlib.import_module(package)
    if name not in _TYPES:
        raise ValueError(f"unknown result type {name!r}")
    return _TYPES[name]


def _decode(v: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(v, list):
        return [_decode(x, arrays) for x in v]
    if not isinstance(v, dict):
        return v
    if "__tensor__" in v:
        return torch.from_numpy(np.array(arrays[v["__tensor__"]])).to(getattr(torch, v["dtype"]))
    if "__array__" in v:
        return arrays[v["__array__"]]
    if "__scalar__" in v:
        return arrays[v["__scalar__"]][()]
    if "__tuple__" in v:
        return tuple(_decode(x, arrays) for x in v["__tuple__"])
    if "__dict__" in v:
        return {_decode(k, arrays): _decode(x, arrays) for k, x in v["__dict__"]}
    cls = _result_type(v["__type__"])
    fields = {k: _decode(x, arrays) for k, x in v["fields"].items()}
    return cls(fields["items"], fields["info"]) if issubclass(cls, dict) else cls(**fields)


def save_result(result: Any, path: str | os.PathLike) -> None:
    """Write ``result`` (any registered result type) to ``path`` (.npz + JSON); rank 0 only.

    The file is written atomically (:func:`analysis.core.files.atomic_write`): a process killed
    while saving leaves the previous file (or none), never a truncated one; a symbolic link at
    ``path`` is replaced by the file, not written through.
    """
    if not dataclasses.is_dataclass(result) or isinstance(result, type):
        raise TypeError(f"result must be a result dataclass, got {type(result).__name__}")
    encode = _Encoder()
    doc = {"format": FORMAT, "result": encode(result)}
    if rank() != 0:
        return
    stored = {_KEY: np.array(json.dumps(doc, sort_keys=True)), **encode.arrays}
    # a complete file or none: a unique temporary in the folder, fsynced, then os.replace'd
    atomic_write(path, lambda fh: np.savez(fh, **stored))


def load_result(path: str | os.PathLike) -> Any:
    """The result stored by :func:`save_result` in ``path`` (no pickle).

    A file that is not a readable result file (corrupt, truncated, another format) raises
    ValueError naming it; a missing file raises FileNotFoundError.
    """
    try:
        with np.load(os.fspath(path), allow_pickle=False) as f:
            doc = json.loads(str(f[_KEY]))
            arrays = {k: f[k] for k in f.files if k != _KEY}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, EOFError, KeyError, TypeError, ValueError, OSError) as err:
        raise ValueError(f"{path} is not a sharpscape result file (reading it failed with "
                         f"{type(err).__name__}: {err})") from err
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path} has result format {doc.get('format')!r}; "
                         f"this version reads {FORMAT}")
    return _decode(doc["result"], arrays)
