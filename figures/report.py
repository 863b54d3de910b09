"""The claim-versus-measured table of a ``summary.json`` as Markdown (``python -m figures --table``)."""
from __future__ import annotations

HEADLINE = {"agd_switching": ("mean_sgd_fraction", "test_acc"),
            "wsam_sharpness": ("lambda_max", "test_acc", "gamma_lambda_max_spearman"),
            "ndadam_direction": ("test_acc", "mean_update_neg_grad_cosine"),
            "adasam_convergence": ("test_acc", "avg_sq_grad_norm_ratio_to_smallest_batch",
                                   "predicted_ratio_1/sqrt(b)"),
            "sala_overhead": ("passes_per_step", "test_acc", "lambda_max"),
            "landscape_gallery": ("lambda_max", "density_top_node", "test_acc")}


def _fmt(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def holds_text(entry: dict) -> str:
    if entry["holds"] is None:
        return f"not measured ({entry.get('reason', '')})"
    return "yes" if entry["holds"] else "**no**"


def table(summary: dict, figure_dir: str = "") -> str:
    """One row per reproduction: the claim (with its rule), headline numbers, each check, holds;
    figure links are prefixed with ``figure_dir``."""
    prefix = f"{figure_dir.rstrip('/')}/" if figure_dir else ""
    rows = ["| reproduction | claim (the rule) | measured | checks | holds |",
            "|---|---|---|---|---|"]
    for name, entry in summary.items():
        if name.startswith("_"):
            continue
        measured = entry.get("measured", {})
        numbers = "<br>".join(f"{key}: {_fmt(measured[key])}"
                              for key in HEADLINE.get(name, ()) if key in measured)
        checks = "<br>".join(f"{k}: {'pass' if v else '**fail**'}"
                             for k, v in measured.get("checks", {}).items())
        rows.append(f"| `{name}` ([figure]({prefix}{entry.get('figure')})) | {entry['claim']} | "
                    f"{numbers} | {checks} | {holds_text(entry)} |")
    return "\n".join(rows)
