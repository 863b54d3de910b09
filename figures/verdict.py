"""Three-valued verdicts: each check of a rule is "holds", "refuted" or "undecided".

* ``mean_above``: a claim about the mean over seeds of a per-seed value, decided by the 95%
  t-interval over seeds: it holds when the whole interval is on the claimed side of the
  threshold, is refuted when the whole interval is on the other side, and is undecided
  otherwise (one seed never decides).
* ``paired``: "A is at least B minus a margin" on paired per-seed differences A - B (the same
  initialisation and batches within a seed): ``mean_above`` of the differences at -margin.
* ``every_seed``: an exact threshold applied to each seed: holds when every seed passes, refuted
  when none does, undecided when the seeds disagree; the spread over seeds is reported.

An entry's verdict is "refuted" if any check is refuted, "holds" if every check holds, else
"undecided".
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

VERDICTS = ("holds", "refuted", "undecided")
LEVEL = 0.95


def interval(values: Sequence[float]) -> tuple[float, float]:
    """The two-sided 95% t-interval of the mean of ``values`` ((-inf, inf) for one value)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return -math.inf, math.inf
    half = stats.t.ppf(0.5 + LEVEL / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def _spread(values: Sequence[float]) -> dict:
    x = np.asarray(values, dtype=float)
    f = x[np.isfinite(x)]
    return {"n_seeds": len(x), "mean": float(f.mean()) if len(f) else math.nan,
            "sd": float(f.std(ddof=1)) if len(f) > 1 else None,
            "min": float(f.min()) if len(f) else math.nan,
            "max": float(f.max()) if len(f) else math.nan, "per_seed": [float(v) for v in x]}


def mean_above(statement: str, values: Sequence[float], threshold: float, *,
               margin: float = 0.0, below: bool = False) -> dict:
    """Check "mean of ``values`` > ``threshold``" (< with ``below``).

    ``threshold`` already includes ``margin``, which is recorded with the check.
    """
    lo, hi = interval(values)
    if below:
        verdict = "holds" if hi < threshold else "refuted" if lo > threshold else "undecided"
    else:
        verdict = "holds" if lo > threshold else "refuted" if hi < threshold else "undecided"
    return {"kind": "interval", "statement": statement, "verdict": verdict,
            "interval": [lo, hi], "threshold": threshold, "margin": margin, **_spread(values)}


def paired(statement: str, a: Sequence[float], b: Sequence[float], margin: float) -> dict:
    """Check "A >= B - margin" on the per-seed differences A - B."""
    if len(a) != len(b):
        raise ValueError(f"paired samples must have one value per seed, got {len(a)} and {len(b)}")
    return mean_above(statement, np.subtract(a, b), -margin, margin=margin)


def every_seed(statement: str, values: Sequence[float], passed: Sequence[bool], *,
               refutable: bool = True, sanity: bool = False) -> dict:
    """Check an exact threshold on each seed's ``values`` (``passed`` per seed).

    Args:
        statement: what the check states.
        values: the per-seed values (NaN where a seed has none).
        passed: whether each seed passes.
        refutable: False where no seed passing cannot refute the claim (e.g. a run that ends,
            by the protocol's stopping rule, before the claimed behaviour can appear): the
            verdict is then "undecided" instead of "refuted".
        sanity: the check follows from the definitions or the protocol (a precondition), not
            from the claim; it is labelled so.

    Returns:
        The check: kind, statement, verdict, seeds passed, interval, margin and spread.
    """
    n = sum(bool(p) for p in passed)
    verdict = ("holds" if n == len(passed) else "refuted" if n == 0 and refutable
               else "undecided")
    return {"kind": "every seed", "statement": statement, "verdict": verdict, "sanity": sanity,
            "seeds_passed": n, "margin": 0.0,
            "interval": list(interval([v for v in values if math.isfinite(v)])),
            **_spread(values)}


def combine(checks: dict[str, dict]) -> str:
    """The entry's verdict: refuted if any check is, holds if all do, else undecided."""
    verdicts = [c["verdict"] for c in checks.values()]
    return ("refuted" if "refuted" in verdicts else
            "holds" if all(v == "holds" for v in verdicts) else "undecided")


def clean(obj):
    """JSON-friendly values (6 significant digits, non-finite numbers as None)."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [clean(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(f"{float(obj):.6g}")
    return obj


def entry(claim: str, measured: dict, checks: dict[str, dict], figure: str) -> dict:
    """A summary.json entry.

    Claim, measured, verdict, checks (each with its interval, number of seeds and margin) and
    figure.
    """
    return clean({"claim": claim, "measured": measured, "verdict": combine(checks),
                  "checks": checks, "figure": figure})
