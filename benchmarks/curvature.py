"""Curvature benchmark: sharpscape vs PyHessian on an MNIST-1D MLP (CPU, one process).

    python3 benchmarks/curvature.py [--out benchmarks/out] [--quick]

1. HVP cost: time of one Hessian-vector product over the 1000 training samples divided by
   the time of one gradient, for each product (double backward, forward-over-reverse,
   reused single-batch graph, blocks of 8 vectors).
2. Top-5 eigenvalues of a 40-100-100-10 MLP (15,210 parameters, float64) briefly trained on
   1000 MNIST-1D samples: relative error against the explicit Hessian (torch.func, then
   ARPACK to machine precision on the dense matrix), HVP count and
   wall time, ours (Lanczos) vs PyHessian's defaults (power iteration, tol 1e-3), with the
   data as 5 batches of 200 (``dataloader=``) and as one batch (``data=``, graph reuse).
3. Trace error against the HVP budget: Hutchinson, Hutch++ and XTrace (ours) and
   PyHessian's Hutchinson, over seeds.
4. Peak memory of one HVP on a ~10M-parameter float32 MLP, beyond the model and data: the
   kernel's resident-set high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs``
   just before the product, minus the resident set (``VmRSS``) at that moment.

Timings use one intra-op thread (``torch.set_num_threads(1)``) for ours and PyHessian alike:
on the shared 2-core machine, two threads per process oversubscribe the cores and inflate
every time by up to 100x, drowning the ratios.

Results go to ``<out>/curvature.json`` (figures + config + versions) and
``<out>/curvature_exact.npz`` (the exact spectrum, reused by later runs).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy
from scipy.sparse.linalg import eigsh
import torch
from torch import nn
from torch.func import functional_call, jacrev

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from analysis import HessianOperator, hessian_trace, mnist1d, supervised, top_eigenvalues  # noqa: E402

CRITERION = nn.CrossEntropyLoss()
LOSS = supervised(CRITERION)


def trained_mlp(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                          nn.Linear(100, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (100,), generator=gen)
        opt.zero_grad()
        CRITERION(model(x[idx]), y[idx]).backward()
        opt.step()
    return model


def exact_spectrum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, path: Path) -> dict:
    """Top-5 eigenvalues and the trace of the explicit Hessian (torch.func, float64)."""
    if path.exists():
        return dict(np.load(path))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss(theta):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}
        return CRITERION(functional_call(model, params, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    t0 = time.perf_counter()
    H = jacrev(jacrev(loss), chunk_size=128)(theta).numpy()
    # ARPACK on the explicit matrix, to machine precision (a full eigh of 15k x 15k takes
    # tens of minutes on the shared 2-core machine); independent of our Lanczos and HVPs
    top = np.sort(eigsh(H, k=5, which="LA", tol=0, ncv=40)[0])[::-1].copy()
    out = {"top5": top, "trace": np.trace(H), "seconds": time.perf_counter() - t0}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def timed(fn, repeat: int = 1):
    best, value = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return value, best


def hvp_ratios(model: nn.Module, x, y, repeat: int) -> dict:
    """Best-of-``repeat`` times over one batch of 1000 samples, divided by the gradient's; the
    candidates are timed round-robin so that load changes on the machine hit all alike."""
    one = [(x, y)]
    params = list(model.parameters())
    v = torch.randn(8, sum(p.numel() for p in params), dtype=torch.float64)
    ops = {m: HessianOperator(model, LOSS, one, progress=False, hvp_method=m)
           for m in ("reverse", "forward")}
    reused = HessianOperator(model, LOSS, one, progress=False)
    candidates = {
        "gradient": lambda: torch.autograd.grad(LOSS(model, one[0]), params),
        **{f"{m}_matvec": (lambda op=op: op.matvec(v[0])) for m, op in ops.items()},
        **{f"{m}_matmat8_per_vector": (lambda op=op: op.matmat(v)) for m, op in ops.items()},
        "reverse_reused_graph_matvec": lambda: reused.matvec(v[0]),
    }
    best = dict.fromkeys(candidates, float("inf"))
    with reused:
        reused.matvec(v[0])  # builds the graph once
        for _ in range(repeat):
            for name, fn in candidates.items():
                best[name] = min(best[name], timed(fn)[1])
    out = {"gradient_s": best.pop("gradient")}
    for name, seconds in best.items():
        out[name] = seconds / out["gradient_s"] / (8 if "matmat8" in name else 1)
    return out


def pyhessian_eigs(pyhessian, model, criterion=CRITERION, top_n: int = 5, max_iter: int = 100,
                   **data):
    """PyHessian's top eigenvalues (power iteration, tol 1e-3) and the products it spent."""
    torch.manual_seed(0)
    peer = pyhessian.hessian(copy.deepcopy(model), criterion, cuda=False, **data)
    calls = {"n": 0}
    inner = peer.dataloader_hv_product

    def counting(v):  # count products: PyHessian does not report them
        calls["n"] += 1
        return inner(v)

    peer.dataloader_hv_product = counting
    module = sys.modules["pyhessian.hessian"]  # the name `pyhessian.hessian` is the class
    plain = module.hessian_vector_product

    def counting_plain(*args):
        calls["n"] += 1
        return plain(*args)

    module.hessian_vector_product = counting_plain
    try:
        values, _ = peer.eigenvalues(maxIter=max_iter, top_n=top_n)
    finally:
        module.hessian_vector_product = plain
    return np.array(values), calls["n"]


def eigen_comparison(model, x, y, exact: dict, pyhessian) -> dict:
    loader = [(x[i:i + 200], y[i:i + 200]) for i in range(0, len(y), 200)]
    rows = {}
    for label, ours_data, theirs in (("5 batches of 200", loader, {"dataloader": loader}),
                                     ("one batch of 1000", [(x, y)], {"data": (x, y)})):
        (values, n_hvp), t_theirs = timed(lambda: pyhessian_eigs(pyhessian, model, **theirs))
        ours, t_ours = timed(lambda: top_eigenvalues(model, LOSS, ours_data, k=5, progress=False))
        rel = lambda v: float(np.max(np.abs(np.sort(v)[::-1] - exact["top5"]) / exact["top5"]))
        rows[label] = {
            "ours": {"rel_error": rel(ours.eigenvalues), "n_hvp": ours.n_hvp, "seconds": t_ours,
                     "converged": ours.converged},
            "pyhessian_default": {"rel_error": rel(values), "n_hvp": n_hvp, "seconds": t_theirs},
            "time_ratio_ours_over_pyhessian": t_ours / t_theirs,
        }
    return rows


def trace_budget(model, x, y, exact_trace: float, pyhessian, budgets, seeds) -> dict:
    one = [(x, y)]
    peer = pyhessian.hessian(copy.deepcopy(model), CRITERION, data=(x, y), cuda=False)
    out = {}
    for budget in budgets:
        row = {}
        for method in ("hutchinson", "hutch++", "xtrace"):
            est = [hessian_trace(model, LOSS, one, n_hvp=budget, method=method, seed=s,
                                 progress=False) for s in range(seeds)]
            err = np.array([abs(r.estimate - exact_trace) / abs(exact_trace) for r in est])
            row[method] = {"mean_rel_error": float(err.mean()), "max_rel_error": float(err.max()),
                           "mean_rel_stderr": float(np.mean([r.stderr for r in est])
                                                    / abs(exact_trace))}
        errs = []
        for s in range(seeds):
            torch.manual_seed(s)
            errs.append(abs(np.mean(peer.trace(maxIter=budget, tol=-np.inf)) - exact_trace)
                        / abs(exact_trace))
        row["pyhessian"] = {"mean_rel_error": float(np.mean(errs)), "max_rel_error": float(np.max(errs))}
        out[str(budget)] = row
    torch.manual_seed(0)
    samples = peer.trace()  # defaults: maxIter=100, tol=1e-3 (early stop)
    out["pyhessian_default"] = {"n_hvp": len(samples),
                                "rel_error": abs(np.mean(samples) - exact_trace) / abs(exact_trace)}
    return out


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found")


def peak_hvp_memory(hvp_method: str, dtype=torch.float32) -> dict:
    """Peak resident memory of one HVP beyond the model, the data and the input vector."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 2000), nn.Tanh(), nn.Linear(2000, 3000), nn.Tanh(),
                          nn.Linear(3000, 1000), nn.Tanh(), nn.Linear(1000, 10)).to(dtype)
    x, y = torch.randn(64, 1000, dtype=dtype), torch.randint(0, 10, (64,))
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, dtype=dtype)
    op = HessianOperator(model, LOSS, [(x, y)], progress=False, hvp_method=hvp_method)
    op.matvec(v)  # warm-up: one-time allocations of the libraries
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    base = _status("VmRSS")
    out = op.matvec(v)
    peak = _status("VmHWM") - base
    param_bytes = n * torch.finfo(dtype).bits // 8
    del out
    return {"n_params": n, "param_mb": param_bytes / 2**20, "peak_mb": peak / 2**20,
            "peak_over_params": peak / param_bytes}


MEMORY_CASES = {"reverse-float32": ("reverse", torch.float32),
                "forward-float32": ("forward", torch.float32),
                "reverse-float64": ("reverse", torch.float64)}


def memory_in_fresh_process(case: str) -> dict:
    """Run :func:`peak_hvp_memory` in a new interpreter: in this one, memory freed by earlier
    work stays resident and would hide the peak."""
    done = subprocess.run([sys.executable, __file__, "--memory", case], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--quick", action="store_true", help="fewer seeds and repeats")
    parser.add_argument("--memory", choices=MEMORY_CASES,
                        help="only print the peak HVP memory of this case (JSON)")
    args = parser.parse_args()
    if args.memory:
        method, dtype = MEMORY_CASES[args.memory]
        print(json.dumps(peak_hvp_memory(method, dtype)))
        return
    import pyhessian
    torch.set_num_threads(1)  # stable timings on a shared machine (no thread oversubscription)
    torch.set_default_dtype(torch.float64)  # PyHessian draws its vectors in the default dtype
    out_dir = Path(args.out)
    ds = mnist1d(dtype=torch.float64)
    x, y = ds.x[:1000], ds.y[:1000]
    model = trained_mlp(x, y)
    exact = exact_spectrum(model, x, y, out_dir / "curvature_exact.npz")
    print(f"exact top-5 {exact['top5']}, trace {float(exact['trace']):.6g}")
    repeat, seeds = (2, 3) if args.quick else (5, 10)
    results = {"config": {"model": "MLP 40-100-100-10 ReLU float64", "samples": 1000,
                          "train_steps": 300, "seeds": seeds, "repeat": repeat},
               "versions": {"torch": torch.__version__, "numpy": np.__version__,
                            "scipy": scipy.__version__, "python": platform.python_version()},
               "exact": {"top5": exact["top5"].tolist(), "trace": float(exact["trace"])}}
    results["hvp_over_gradient_time"] = hvp_ratios(model, x, y, 4 * repeat)
    print("HVP / gradient time:", json.dumps(results["hvp_over_gradient_time"], indent=1))
    results["top5"] = eigen_comparison(model, x, y, exact, pyhessian)
    print("top-5:", json.dumps(results["top5"], indent=1))
    results["trace"] = trace_budget(model, x, y, float(exact["trace"]), pyhessian,
                                    (12, 33, 99, 300), seeds)
    print("trace:", json.dumps(results["trace"], indent=1))
    results["hvp_memory"] = {m: memory_in_fresh_process(m) for m in MEMORY_CASES}
    print("memory:", json.dumps(results["hvp_memory"], indent=1))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "curvature.json").write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
