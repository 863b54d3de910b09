"""Saved results and the report of the reproductions.

Each reproduction's data (``NAME.json`` + ``NAME.npz``), the key that says whether its config
changed, the checks that a reproduction's files are the complete ones summary.json recorded, and
the claim-versus-measured table of a summary.json.

Every file is written by ``analysis.core``'s one atomic writer (a unique temporary in the output
folder, fsync, ``os.replace``): a killed run leaves each file either its old or its new complete
version, and a symbolic link at a file's path is replaced by the file, never written through.
``NAME.json`` records the configuration's key and the SHA-256 of ``NAME.npz``; each summary.json
entry records the SHA-256 of the reproduction's three files. A file that is missing, unreadable,
a symbolic link, or not the one recorded (changed, or left by an interrupted run) is
:class:`Damaged` and never read as a result.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from analysis.core import file_sha256, read_regular, write_json, write_npz

from .verdict import clean

SCHEMA = 2
SUMMARY = "summary.json"
ENTRY = ("claim", "measured", "verdict", "checks", "figure")
_PNG = (b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82")   # a PNG's first and last bytes


class Damaged(Exception):
    """A file of the output folder that cannot be taken as a result.

    It is missing, unreadable, a symbolic link, or not the file recorded for it.

    Args:
        path: The file.
        why: What is wrong with it, as the rest of a sentence that starts with the path.
    """

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path} {why}")
        self.path = Path(path)


def versions() -> dict:
    """The versions of python, torch, numpy, scipy and matplotlib (for ``NAME.json``)."""
    import matplotlib
    import scipy
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__,
            "matplotlib": matplotlib.__version__}


def config_key(module, size) -> str:
    """A hash of the size, the reproduction's CONFIG and CLAIM.

    A rerun skips an entry whose key is unchanged (and whose files are intact).

    Args:
        module: The reproduction's module.
        size: The ``Size`` it runs at.

    Returns:
        16 hexadecimal digits.
    """
    text = json.dumps({"schema": SCHEMA, "size": asdict(size), "config": module.CONFIG,
                       "claim": module.CLAIM}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def files_of(name: str) -> tuple[str, str, str]:
    """The files of reproduction ``name`` in the output folder: its data, arrays and figure.

    Args:
        name: The reproduction.

    Returns:
        ``(NAME.json, NAME.npz, NAME.png)``.
    """
    return f"{name}.json", f"{name}.npz", f"{name}.png"


def save(out: Path, name: str, data: dict, arrays: dict, config: dict, size, *,
         key: str | None = None, seconds: float | None = None,
         environment: dict | None = None) -> None:
    """Write ``NAME.npz`` (arrays), then ``NAME.json``, each atomically.

    ``NAME.json`` holds the data, config, size, versions, the key, the training time and the
    SHA-256 of ``NAME.npz``.

    Args:
        out: The output folder.
        name: The reproduction.
        data: Its JSON data (cleaned: 6 significant digits, non-finite numbers as None).
        arrays: Its arrays by name.
        config: The reproduction's CONFIG.
        size: The ``Size`` it ran at.
        key: Its ``config_key``, so that a rebuilt summary knows whether it is up to date.
        seconds: The experiment's wall time.
        environment: The machine and settings that computed it (CPU, ATen capability, jobs,
            threads, versions).
    """
    npz = out / f"{name}.npz"
    write_npz(npz, arrays)
    meta = {"seed": 0, "key": key, "seconds": seconds, "environment": environment,
            "config": config, "size": asdict(size),
            "versions": versions(), "arrays": sorted(arrays), "npz_sha256": file_sha256(npz),
            "data": clean(data)}
    write_json(out / f"{name}.json", meta, indent=1, default=str)


@dataclass
class Saved:
    """The saved data of one reproduction as read back by :func:`read_saved`.

    Attributes:
        meta: The document of ``NAME.json`` (its ``data`` is what the rule reads).
        arrays: The arrays of ``NAME.npz``.
        digests: The SHA-256 of the bytes read, by file name.
    """
    meta: dict
    arrays: dict[str, np.ndarray]
    digests: dict[str, str]


def read_file(path: Path) -> bytes:
    """The bytes of a regular file of the output folder, never through a symbolic link.

    Args:
        path: The file.

    Returns:
        Its content.

    Raises:
        Damaged: It is missing, a symbolic link, not a regular file or unreadable.
    """
    try:
        return read_regular(path)
    except FileNotFoundError:
        raise Damaged(path, "is missing") from None
    except OSError as err:
        raise Damaged(path, f"cannot be read ({err.strerror or err})") from None


def _json(path: Path) -> tuple[object, str]:
    raw = read_file(path)
    try:
        return json.loads(raw), hashlib.sha256(raw).hexdigest()
    except (ValueError, RecursionError) as err:
        raise Damaged(path, f"is not a complete JSON document ({err})") from None


def read_saved(out: Path, name: str) -> Saved:
    """The saved data of ``name``, checked to be complete.

    ``NAME.json`` must be a complete document of a saved reproduction, and ``NAME.npz`` the file
    it was saved with (its recorded SHA-256; files saved before checksums were recorded: it
    reads, and holds the arrays ``NAME.json`` lists).

    Args:
        out: The output folder.
        name: The reproduction.

    Returns:
        The data, arrays and checksums.

    Raises:
        Damaged: Either file is missing, unreadable, a symbolic link, or they do not belong
            together (e.g. a run was killed between writing them).
    """
    jpath, npath = (out / f for f in files_of(name)[:2])
    meta, json_digest = _json(jpath)
    if not (isinstance(meta, dict) and isinstance(meta.get("data"), dict)
            and isinstance(meta.get("arrays"), list)):
        raise Damaged(jpath, "is not the saved data of a reproduction")
    blob = read_file(npath)
    digest = hashlib.sha256(blob).hexdigest()
    if meta.get("npz_sha256") not in (None, digest):
        raise Damaged(npath, f"is not the file {jpath.name} was saved with (changed, or left by "
                             "an interrupted run)")
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError, OSError) as err:
        raise Damaged(npath, f"cannot be read ({type(err).__name__}: {err})") from None
    if sorted(arrays) != sorted(meta["arrays"]):
        raise Damaged(npath, f"holds other arrays than {jpath.name} lists")
    return Saved(meta, arrays, {jpath.name: json_digest, npath.name: digest})


def load(out: Path, name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The data and arrays written by ``save`` (numbers as JSON gave them back).

    Args:
        out: The output folder.
        name: The reproduction.

    Returns:
        ``(data, arrays)``.

    Raises:
        Damaged: As :func:`read_saved`.
    """
    saved = read_saved(out, name)
    return saved.meta["data"], saved.arrays


def read_summary(out: Path) -> dict:
    """The summary.json of ``out`` ({} when there is none), checked to be a complete summary.

    Args:
        out: The output folder.

    Returns:
        Reproduction name -> entry.

    Raises:
        Damaged: It is unreadable, a symbolic link, not a complete JSON document, or an entry
            lacks one of the keys every entry has.
    """
    path = out / SUMMARY
    if not os.path.lexists(path):
        return {}
    summary, _ = _json(path)
    if not isinstance(summary, dict):
        raise Damaged(path, "is not a summary written by python -m figures")
    for name, e in summary.items():
        if not name.startswith("_") and not (isinstance(e, dict) and set(ENTRY) <= set(e)
                                             and isinstance(e["checks"], dict)
                                             and isinstance(e["measured"], dict)):
            raise Damaged(path, f"has a malformed entry {name!r}")
    return summary


def write_summary(out: Path, summary: dict) -> None:
    """Write ``summary`` to ``out/summary.json`` atomically.

    Args:
        out: The output folder.
        summary: Reproduction name -> entry.
    """
    write_json(out / SUMMARY, summary, indent=1)


def check_entry(out: Path, name: str, entry: dict) -> None:
    """Check that the files of ``name`` are the ones its summary entry recorded.

    Each file's SHA-256 must be the recorded one; for an entry written before checksums were
    recorded, the files must read completely.

    Args:
        out: The output folder.
        name: The reproduction.
        entry: Its summary.json entry.

    Raises:
        Damaged: A file is missing, unreadable, a symbolic link, or not the recorded one.
    """
    recorded = entry.get("files")
    if not isinstance(recorded, dict):
        read_saved(out, name)
        png = out / files_of(name)[2]
        content = read_file(png)
        if not (content.startswith(_PNG[0]) and content.endswith(_PNG[1])):
            raise Damaged(png, "is not a complete PNG")
        return
    for file in files_of(name):
        if hashlib.sha256(read_file(out / file)).hexdigest() != recorded.get(file):
            raise Damaged(out / file, f"is not the file {SUMMARY} recorded (changed, or left by "
                                      "an interrupted run)")


def _num(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def check_text(name: str, check: dict, markdown: bool) -> str:
    """``name: verdict (mean m, 95% CI [lo, hi], n seeds, margin)``."""
    verdict = check["verdict"]
    verdict = f"**{verdict}**" if markdown and verdict == "refuted" else verdict
    lo, hi = check["interval"]
    margin = f", margin {check['margin']:g}" if check.get("margin") else ""
    seeds = (f"{check['seeds_passed']}/{check['n_seeds']} seeds pass"
             if check["kind"] == "every seed" else f"n={check['n_seeds']}")
    name = f"{name} [sanity check]" if check.get("sanity") else name
    return (f"{name}: {verdict} (mean {_num(check['mean'])}, 95% CI [{_num(lo)}, {_num(hi)}], "
            f"{seeds}{margin})")


def table(summary: dict, figure_dir: str = "", markdown: bool = True) -> str:
    """The claim-versus-measured table of ``summary``.

    One row per reproduction: the claim, headline numbers, every check with its interval, and
    the verdict; figure links are prefixed with ``figure_dir``.

    Args:
        summary: Reproduction name -> entry.
        figure_dir: The prefix of the figure links.
        markdown: Markdown (bold refutations, figure links) rather than plain text.

    Returns:
        The table's lines.
    """
    prefix = f"{figure_dir.rstrip('/')}/" if figure_dir else ""
    sep = "<br>" if markdown else "; "
    rows = ["| reproduction | claim (the rule) | measured | checks | verdict |",
            "|---|---|---|---|---|"]
    for name, e in summary.items():
        if name.startswith("_"):
            continue
        head = e["measured"].get("headline", {})
        numbers = sep.join(f"{k}: {v}" for k, v in head.items())
        checks = sep.join(check_text(k, c, markdown) for k, c in e["checks"].items())
        link = f" ([figure]({prefix}{e['figure']}))" if markdown else ""
        rows.append(f"| `{name}`{link} | {e['claim']} | {numbers} | {checks} | "
                    f"{e['verdict']} |")
    return "\n".join(rows)
