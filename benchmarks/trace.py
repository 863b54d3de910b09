"""XTrace's time against curvlinops' ``xtrace`` on the same Hessian, budgets 50 to 800 products.

One operator for both: curvlinops' ``HessianLinearOperator`` of an MLP 16-32-20-5 (1,309
parameters, tanh, float64, 256 samples in one batch), so the products are identical and only
the estimators' linear algebra differs; ours gets all probes in one call (``chunk`` = the
budget), as curvlinops does. Per budget the two are interleaved over ``--rounds`` rounds and the
minimum wall time is taken. *overhead* is our estimator alone on a dense float64 matrix of the
same size (products then nearly free): its growth with the budget is the cost beyond the
products (target: at most quadratic).

    PYTHONPATH=/tmp/peers python benchmarks/trace.py [--rounds 5] [--out FILE.json] [--quick]

``--quick``: budgets 50 and 100, one round: a smoke test, not figures.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from analysis.trace import trace_estimate  # noqa: E402
from harness import Recorder, best_wall, interleaved, parse, parser  # noqa: E402


def main() -> None:
    """Run the comparison and print one row per budget."""
    p = parser(__doc__, threads=True)
    p.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 200, 400, 800])
    p.add_argument("--rounds", type=int, default=5)
    args = parse(p, quick={"budgets": [50, 100], "rounds": 1})
    run = Recorder("trace", args)
    from curvlinops import HessianLinearOperator
    from curvlinops.trace.epperly2024xtrace import xtrace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 20), nn.Tanh(),
                          nn.Linear(20, 5)).double()
    data = [(torch.randn(256, 16, dtype=torch.float64), torch.randint(0, 5, (256,)))]
    params = [q for q in model.parameters()]
    op = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, data)
    n = op.shape[0]
    like = torch.zeros(1, dtype=torch.float64)
    dense = op @ torch.eye(n, dtype=torch.float64)
    dense = (dense + dense.T) / 2
    rows = []
    print(f"n = {n}; seconds (min of {args.rounds}), ratio ours / curvlinops")
    for b in args.budgets:
        times = best_wall(interleaved({
            "ours": lambda: trace_estimate(lambda V: (op @ V.T).T, n, b, method="xtrace",
                                           like=like, chunk=b),
            "curvlinops": lambda: xtrace(op, b),
            "overhead": lambda: trace_estimate(lambda V: V @ dense, n, b, method="xtrace",
                                               like=like, chunk=b),
        }, rounds=args.rounds))
        rows.append({"budget": b, **times, "ratio": times["ours"] / times["curvlinops"]})
        print(f"{b:5d}  ours {times['ours']:.4f}  curvlinops {times['curvlinops']:.4f}  "
              f"ratio {rows[-1]['ratio']:.2f}  overhead {times['overhead']:.4f}", flush=True)
    if len(rows) > 1:
        slope = np.polyfit(np.log([r["budget"] for r in rows]),
                           np.log([r["overhead"] for r in rows]), 1)[0]
        print(f"overhead ~ budget^{slope:.2f}")
    run.write({"n": n, "rows": rows})


if __name__ == "__main__":
    main()
