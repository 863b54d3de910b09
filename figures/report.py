"""Saved results and the report: each reproduction's data (``NAME.json`` + ``NAME.npz``), the key
that says whether its config changed, and the claim-versus-measured table of a summary.json."""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .verdict import clean

SCHEMA = 2


def versions() -> dict:
    import matplotlib
    import scipy
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__,
            "matplotlib": matplotlib.__version__}


def config_key(module, size) -> str:
    """A hash of the size, the reproduction's CONFIG and CLAIM: a rerun skips an entry whose
    key is unchanged."""
    text = json.dumps({"schema": SCHEMA, "size": asdict(size), "config": module.CONFIG,
                       "claim": module.CLAIM}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save(out: Path, name: str, data: dict, arrays: dict, config: dict, size) -> None:
    """``NAME.json`` (data, config, size, versions) and ``NAME.npz`` (arrays) for re-plotting."""
    np.savez(out / f"{name}.npz", **{k: np.asarray(v) for k, v in arrays.items()})
    meta = {"seed": 0, "config": config, "size": asdict(size), "versions": versions(),
            "arrays": sorted(arrays), "data": clean(data)}
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1, default=str))


def load(out: Path, name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The data and arrays written by ``save`` (numbers as JSON gave them back)."""
    meta = json.loads((out / f"{name}.json").read_text())
    with np.load(out / f"{name}.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return meta["data"], arrays


def saved(out: Path, name: str) -> bool:
    return all((out / f"{name}{ext}").exists() for ext in (".json", ".npz", ".png"))


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
    """One row per reproduction: the claim, headline numbers, every check with its interval,
    and the verdict; figure links are prefixed with ``figure_dir``."""
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
