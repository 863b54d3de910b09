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

Hyperparameters are chosen by ``select``: the best mean validation accuracy, except that points
within one standard error of it are ties, resolved by a declared rule (a preferred point, such as
the paper's value, else the smallest), so that the choice does not flip on rounding.
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


TIE_RULE = ("points whose mean validation accuracy is within one pooled standard error of the "
            "best mean are tied; among them the preferred point (the paper's value) if tied, "
            "else the smallest (first axis first)")


def select(points: Sequence[dict], scores: Sequence[Sequence[float]],
           preferred: dict | None = None) -> tuple[dict, dict]:
    r"""Choose a point of a search by validation accuracy with the declared tie rule.

    The pooled standard error of a point's mean over its $n$ seeds is
    $\mathrm{se} = \sqrt{\overline{s^2} / n}$, with $\overline{s^2}$ the mean over points of
    their seed variances. Every point whose mean is at least the best mean minus se is tied
    with it; the choice among the tied points is ``preferred`` when it is one of them, else
    the smallest (in the order of its values, first axis first). With one seed se is 0 and
    the rule is the plain argmax (ties broken by the smallest).

    Args:
        points: The grid points (axis name -> value), all with the same axes.
        scores: Per point, the validation accuracy of each selection seed (the same count).
        preferred: The point chosen among ties when it is tied (None: the smallest).

    Returns:
        The chosen point, and a record: the rule, se, the argmax, the tied points and the
        chosen one.

    Raises:
        ValueError: ``points`` is empty, or its length differs from that of ``scores``, or
            the seeds per point differ.
    """
    if not points or len(points) != len(scores):
        raise ValueError(f"points and scores must be non-empty and of equal length, got "
                         f"{len(points)} and {len(scores)}")
    if len({len(s) for s in scores}) != 1 or not scores[0]:
        raise ValueError("scores must give every point the same number (>= 1) of seeds")
    values = [np.asarray(s, dtype=float) for s in scores]
    n = len(values[0])
    means = [float(v.mean()) for v in values]
    se = math.sqrt(float(np.mean([v.var(ddof=1) for v in values])) / n) if n > 1 else 0.0
    top = int(np.argmax(means))
    tied = [i for i, m in enumerate(means) if m >= means[top] - se]
    chosen = (next(i for i in tied if points[i] == preferred)
              if preferred is not None and any(points[i] == preferred for i in tied)
              else min(tied, key=lambda i: tuple(points[i].values())))
    record = {"rule": TIE_RULE, "standard_error": se, "argmax": dict(points[top]),
              "tied": [dict(points[i]) for i in tied], "preferred": preferred,
              "chosen": dict(points[chosen])}
    return dict(points[chosen]), record


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


def settle(runner, found, make, preferred: dict | None = None) -> dict:
    """Re-choose the best point of a finished search by ``select``'s tie rule.

    The per-seed validation accuracies are read back from ``runner`` (its runs are cached, so
    nothing is trained again); ``found.best`` becomes the chosen point.

    Args:
        runner: The ``Runner`` that ran the search.
        found: The ``Search`` it returned (its ``scores`` name every point).
        make: The search's job maker, ``make(point, seed) -> Job``.
        preferred: The point chosen among ties when tied (the paper's value), else None.

    Returns:
        ``select``'s record, also stored as ``found.selection``.
    """
    seeds = range(runner.size.select_seeds)
    points = [dict(p) for p, _ in found.scores]
    results = runner.run([make(p, s) for p in points for s in seeds])
    n = len(seeds)
    scores = [[r["final_val_acc"] for r in results[i * n:(i + 1) * n]]
              for i in range(len(points))]
    found.best, record = select(points, scores, preferred)
    found.selection = record
    return record
