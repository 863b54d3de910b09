"""Curvature benchmark: sharpscape vs PyHessian on an MNIST-1D MLP (CPU, one process).

    python3 benchmarks/curvature.py [--out FILE.json] [--quick] [--no-memory] [--ggn-only]
                                    [--memory-only] [--device cuda]

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
4. GGN and Fisher rows (``--ggn-only`` runs just these):
   product / gradient time of our GGN, Fisher and empirical Fisher beside the Hessian's and
   the peers' GGN products; top-5 eigenvalues of the GGN (= the Fisher here) and of the
   empirical Fisher against explicit matrices (:func:`exact_ggn_spectra`): relative error,
   products and time, ours (Lanczos) vs curvlinops (``GGNLinearOperator``/``EFLinearOperator``
   + ARPACK ``eigsh``) and hessian-eigenthings 1.0a5 (``GGNOperator``/``EmpiricalFisherOperator``
   + its ``lanczos``), at their defaults.
5. Peak memory of one HVP on an 11M-parameter float32 MLP, beyond the model and data: the
   kernel's resident-set high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs``
   just before the product, minus the resident set (``VmRSS``) at that moment; the same with
   glibc's mmap threshold fixed at 1 MiB (``MALLOC_MMAP_THRESHOLD_``, so freed blocks leave the
   resident set); and the peak of live torch allocations (profiler allocation events).
6. Peak memory of ``top_eigenvalues(k=1)`` and ``k=10`` (float32 MLPs of 1M, 10M and 50M
   parameters, one batch of 64, a budget of products that fills the basis and restarts it)
   in parameter-sized vectors, measured the same three ways (``--memory-only`` runs 5 and 6
   alone, each case in fresh processes).

7. ``--device cuda`` runs only the GPU checks: section 2 with
   the model and data on the GPU (PyHessian with ``cuda=True``; the exact spectrum from the
   explicit Hessian built on the GPU), and ``top_eigenvalues(k=5)`` of a 50M-parameter float32
   MLP with its basis on the GPU and with ``basis_device="cpu"`` (the memory benchmark's budget of
   products): eigenvalues, products, time and the peak GPU memory beyond the model and data
   (``torch.cuda.max_memory_allocated``) in parameter-sized vectors.

Timings use one intra-op thread (``torch.set_num_threads(1)``) for ours and PyHessian alike:
on the shared 2-core machine, two threads per process oversubscribe the cores and inflate
every time by up to 100x, drowning the ratios.

``--out FILE.json`` writes the figures with the configuration and the environment; the exact
spectra are kept in ``benchmarks/out/curvature_*exact*.npz`` and reused by later runs. ``--quick``
runs every section on a tiny setting (200 samples, an MLP 40-20-20-10, one repeat and seed, one
trace budget, one tiny memory case): a smoke test, not figures.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import scipy
from scipy.sparse.linalg import eigsh
import torch
from torch import nn
from torch.func import functional_call, jacrev

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from analysis import (FisherOperator, GGNOperator, HessianOperator,  # noqa: E402
                      hessian_trace, mnist1d, supervised, top_eigenvalues)
from analysis.lanczos import default_max_basis  # noqa: E402
from harness import (CACHE, Clock, Recorder, best_wall, fresh_process, interleaved, parse,  # noqa: E402
                     parser, rss_peak, timed, torch_peak)

CRITERION = nn.CrossEntropyLoss()
LOSS = supervised(CRITERION)


def trained_mlp(x: torch.Tensor, y: torch.Tensor, steps: int = 300, width: int = 100) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (100,), generator=gen)
        opt.zero_grad()
        CRITERION(model(x[idx]), y[idx]).backward()
        opt.step()
    return model


def flat_model(model: nn.Module) -> tuple[torch.Tensor, Callable]:
    """The model's parameters as one flat vector theta, and f(theta, x): the model's output at
    them."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def f(theta, xb):
        return functional_call(model, {n: t.view(s) for n, t, s in
                                       zip(names, torch.split(theta, sizes), shapes)}, (xb,))

    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), f


def exact_spectrum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, path: Path) -> dict:
    """Top-5 eigenvalues and the trace of the explicit Hessian (torch.func, float64)."""
    if path.exists():
        return dict(np.load(path))
    theta, f = flat_model(model)

    def loss(th):
        return CRITERION(f(th, x), y)

    t0 = time.perf_counter()
    H = jacrev(jacrev(loss), chunk_size=128)(theta).cpu().numpy()
    # ARPACK on the explicit matrix, to machine precision (a full eigh of 15k x 15k takes
    # tens of minutes on the shared 2-core machine); independent of our Lanczos and HVPs
    top = np.sort(eigsh(H, k=5, which="LA", tol=0, ncv=40)[0])[::-1].copy()
    out = {"top5": top, "trace": np.trace(H), "seconds": time.perf_counter() - t0}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


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
    return round_robin_ratios(candidates, reused, v[0], repeat)


def round_robin_ratios(candidates: dict, reused, v: torch.Tensor, repeat: int) -> dict:
    """Best-of-``repeat`` time of each candidate over the ``"gradient"``'s, per vector for the
    ``matmat8`` ones, inside ``with reused:`` after a first product has built its graph."""
    with reused:
        reused.matvec(v)  # builds the graph once
        best = best_wall(interleaved(candidates, repeat))
    out = {"gradient_s": best.pop("gradient")}
    for name, seconds in best.items():
        out[name] = seconds / out["gradient_s"] / (8 if "matmat8" in name else 1)
    return out


def pyhessian_eigs(pyhessian, model, top_n: int = 5, max_iter: int = 100, cuda: bool = False,
                   **data):
    """PyHessian's top eigenvalues (power iteration, tol 1e-3) and the products it spent."""
    torch.manual_seed(0)
    peer = pyhessian.hessian(copy.deepcopy(model), CRITERION, cuda=cuda, **data)
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


def max_rel_error(values, reference: np.ndarray) -> float:
    """The largest relative error of ``values``, sorted in decreasing order, to ``reference``."""
    return float(np.max(np.abs(np.sort(values)[::-1] - reference) / reference))


def five_batches(x: torch.Tensor, y: torch.Tensor) -> list:
    """The data as 5 batches (of 200 for the 1000 samples)."""
    size = len(y) // 5
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def eigen_comparison(model, x, y, exact: dict, pyhessian) -> dict:
    """Top-5 eigenvalues, ours against PyHessian's, on the device of ``model`` and the data."""
    loader = five_batches(x, y)
    cuda = x.device.type == "cuda"
    rows = {}
    for label, ours_data, theirs in (
            (f"5 batches of {len(y) // 5}", loader, {"dataloader": loader}),
            (f"one batch of {len(y)}", [(x, y)], {"data": (x, y)})):
        (values, n_hvp), t_theirs = timed(
            lambda: pyhessian_eigs(pyhessian, model, cuda=cuda, **theirs))
        ours, t_ours = timed(lambda: top_eigenvalues(model, LOSS, ours_data, k=5, progress=False))
        rel = partial(max_rel_error, reference=exact["top5"])
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
        row["pyhessian"] = {"mean_rel_error": float(np.mean(errs)),
                            "max_rel_error": float(np.max(errs))}
        out[str(budget)] = row
    torch.manual_seed(0)
    samples = peer.trace()  # defaults: maxIter=100, tol=1e-3 (early stop)
    out["pyhessian_default"] = {"n_hvp": len(samples),
                                "rel_error": abs(np.mean(samples) - exact_trace) / abs(exact_trace)}
    return out


def peak_hvp_memory(hvp_method: str, dtype=torch.float32) -> dict:
    """Peak memory of one HVP beyond the model, the data and the input vector."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 2000), nn.Tanh(), nn.Linear(2000, 3000), nn.Tanh(),
                          nn.Linear(3000, 1000), nn.Tanh(), nn.Linear(1000, 10)).to(dtype)
    x, y = torch.randn(64, 1000, dtype=dtype), torch.randint(0, 10, (64,))
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, dtype=dtype)
    op = HessianOperator(model, LOSS, [(x, y)], progress=False, hvp_method=hvp_method)
    op.matvec(v)  # warm-up: one-time allocations of the libraries
    peak = rss_peak(lambda: op.matvec(v))
    param_bytes = n * torch.finfo(dtype).bits // 8
    return {"n_params": n, "param_mb": param_bytes / 2**20, "peak_mb": peak / 2**20,
            "peak_over_params": peak / param_bytes,
            "torch_over_params": torch_peak(lambda: op.matvec(v)) / param_bytes}


MEMORY_CASES = {"reverse-float32": ("reverse", torch.float32),
                "forward-float32": ("forward", torch.float32),
                "reverse-float64": ("reverse", torch.float64)}


def tanh_mlp(n_params: int) -> nn.Module:
    """An MLP 1000-w-w-10 (Tanh) of about ``n_params`` parameters, seeded."""
    torch.manual_seed(0)
    width = int((-1010 + (1010 ** 2 + 4 * n_params) ** 0.5) / 2)  # w^2 + 1010 w = n
    return nn.Sequential(nn.Linear(1000, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 10))


def peak_lanczos_memory(n_params: int, k: int) -> dict:
    """Peak memory of ``top_eigenvalues`` beyond the model and data, in vectors of ``n_params``
    float32 elements, on an MLP 1000-w-w-10 (Tanh) of about ``n_params``: the process's
    resident high-water mark on the first call, the torch allocations' peak on a second. One
    HVP of the model and one ``top_eigenvalues`` of a small model come first, so that one-time
    costs (code pages faulted in, library workspaces) are not counted."""
    model = tanh_mlp(n_params)
    x, y = torch.randn(64, 1000), torch.randint(0, 10, (64,))
    n = sum(p.numel() for p in model.parameters())
    HessianOperator(model, LOSS, [(x, y)], progress=False).matvec(torch.randn(n))  # warm-up
    max_basis = default_max_basis(n, k, 1, torch.float32)
    small = nn.Sequential(nn.Linear(1000, 8), nn.Tanh(), nn.Linear(8, 10))  # faults the code in
    small_basis = default_max_basis(sum(p.numel() for p in small.parameters()), k, 1, torch.float32)
    top_eigenvalues(small, LOSS, [(x, y)], k=k, tol=1e-12, max_hvp=small_basis + 8, progress=False)
    runs = []

    def call():
        runs.append(top_eigenvalues(model, LOSS, [(x, y)], k=k, tol=1e-12, max_hvp=max_basis + 8,
                                    progress=False))
        return runs[-1]

    rss = rss_peak(call)
    runs.clear()
    exact = torch_peak(call)
    return {"n_params": n, "k": k, "max_basis": max_basis, "n_hvp": runs[0].n_hvp,
            "peak_vectors": rss / (4 * n), "torch_vectors": exact / (4 * n),
            "target_vectors": max_basis + 4}


def basis_device_check(device: torch.device, n_params: int, k: int = 5) -> dict:
    """``top_eigenvalues`` of a float32 MLP 1000-w-w-10 of about ``n_params`` on ``device``, its
    basis there and with ``basis_device="cpu"`` (``peak_lanczos_memory``'s budget of products):
    eigenvalues, products, seconds and, on a GPU, the peak GPU memory beyond the model and data
    in parameter-sized vectors."""
    cuda = device.type == "cuda"
    model = tanh_mlp(n_params).float().to(device)
    x = torch.randn(64, 1000, dtype=torch.float32).to(device)
    y = torch.randint(0, 10, (64,)).to(device)
    n = sum(p.numel() for p in model.parameters())
    HessianOperator(model, LOSS, [(x, y)], progress=False).matvec(
        torch.randn(n, device=device))  # warm-up
    max_basis = default_max_basis(n, k, 1, torch.float32)
    out = {"n_params": n, "k": k, "max_basis": max_basis}
    for label, where in (("basis_on_device", None), ("basis_on_cpu", "cpu")):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        with Clock.for_device(device) as clock:
            r = top_eigenvalues(model, LOSS, [(x, y)], k=k, tol=1e-12, max_hvp=max_basis + 8,
                                basis_device=where, progress=False)
        out[label] = {"eigenvalues": np.asarray(r.eigenvalues).tolist(), "n_hvp": r.n_hvp,
                      "seconds": clock.wall,
                      "peak_gpu_vectors": ((torch.cuda.max_memory_allocated() - base) / (4 * n)
                                           if cuda else None)}
        del r
    a, b = (np.asarray(out[key]["eigenvalues"]) for key in ("basis_on_device", "basis_on_cpu"))
    out["max_rel_diff"] = float(np.max(np.abs(a - b) / np.abs(a)))
    return out


def device_section(args, pyhessian, device: torch.device) -> dict:
    """The GPU checks (``--device cuda``): the top-5 comparison on ``device`` and the basis
    placement."""
    x, y = mnist_data(args.samples)
    model = trained_mlp(x, y, args.train_steps, args.width).to(device)  # the CPU rows' model
    x, y = x.to(device), y.to(device)
    exact = exact_spectrum(model, x, y, cache_file("exact", args, device))
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
               "torch": torch.__version__, "exact_top5": exact["top5"].tolist(),
               "top5": eigen_comparison(model, x, y, exact, pyhessian)}
    print("top-5:", json.dumps(results["top5"], indent=1), flush=True)
    torch.set_default_dtype(torch.float32)
    results["basis_device"] = basis_device_check(device, args.basis_params)
    print("basis placement:", json.dumps(results["basis_device"], indent=1))
    return results


LANCZOS_CASES = {f"{n // 10 ** 6}M-k{k}": (n, k)
                 for n in (10 ** 6, 10 ** 7, 5 * 10 ** 7) for k in (1, 10)}
SMOKE_CASES = {"10k-k1": (10 ** 4, 1)}  # --quick: the memory code path on a tiny model
# glibc's mmap threshold, fixed: blocks of 1 MiB and more are mapped and unmapped on free, instead
# of the default dynamic threshold that moves up to 32 MiB and keeps such freed blocks resident
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 20)}


def memory_in_fresh_process(case: str, env: dict | None = None) -> dict:
    """:func:`peak_hvp_memory` or :func:`peak_lanczos_memory` in a new interpreter (with ``env``
    added to the environment)."""
    return fresh_process(__file__, ["--memory", case], env)


def memory_section(cases: list[str], repeats: int = 3) -> dict:
    """Every memory case in fresh processes, with glibc's default and with a fixed mmap
    threshold: ``repeats`` processes each (one for the 50M cases), median and range."""
    out = {}
    for case in cases:
        hvp = case in MEMORY_CASES
        key = "peak_over_params" if hvp else "peak_vectors"
        runs = 1 if case.startswith("50M") else repeats
        default = [memory_in_fresh_process(case) for _ in range(runs)]
        fixed = [memory_in_fresh_process(case, FIXED_MMAP)[key] for _ in range(runs)]
        r = {**default[0], key: [d[key] for d in default], "fixed_mmap": fixed}
        out[case] = r
        limit = 4 if hvp else r["target_vectors"]
        figures = [np.median(r[key]), np.median(fixed),
                   r["torch_over_params" if hvp else "torch_vectors"]]
        spread = [f"{min(v):.2f}-{max(v):.2f}" for v in (r[key], fixed)]
        marks = ["met" if f <= limit else "NOT met" for f in figures]
        what = (f"HVP {case}, x the parameter bytes" if hvp else
                f"top_eigenvalues {case} ({r['n_params']} parameters, max_basis {r['max_basis']}, "
                f"{r['n_hvp']} HVPs), parameter-sized vectors")
        print(f"{what}: high-water mark {figures[0]:.2f} ({spread[0]}, {marks[0]}), fixed mmap "
              f"threshold {figures[1]:.2f} ({spread[1]}, {marks[1]}), torch allocations "
              f"{figures[2]:.2f} ({marks[2]}); target <= {limit}; median of {runs}", flush=True)
    return out


# -- GGN and Fisher rows ------------------------------------------------------------------------
def exact_ggn_spectra(model: nn.Module, x: torch.Tensor, y: torch.Tensor, path: Path) -> dict:
    """Top-5 eigenvalues of the GGN and of the empirical Fisher, from explicit matrices.

    GGN = A^T A with A_i = S_i J_i per sample (J_i by ``jacrev``, S_i the symmetric root of the
    cross-entropy's output Hessian (diag(p) - p p^T) / N), so ARPACK runs at machine precision on
    the dense [10 N, n] matrix A; the empirical Fisher's eigenvalues are the squared singular
    values of the [N, n] per-sample gradients (a plain autograd loop) over sqrt(N).
    """
    if path.exists():
        return dict(np.load(path))
    theta, f = flat_model(model)
    t0 = time.perf_counter()
    rows = []
    for i in range(0, len(y), 100):
        xb = x[i:i + 100]
        J = jacrev(f)(theta, xb)                                  # [100, 10, n]
        p = torch.softmax(f(theta, xb), dim=1).detach()
        H = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / len(y)
        w, U = torch.linalg.eigh(H)
        S = U @ torch.diag_embed(w.clamp_min(0).sqrt()) @ U.transpose(1, 2)
        rows.append((S @ J).reshape(-1, len(theta)).numpy())
    A = np.concatenate(rows)
    gram = scipy.sparse.linalg.LinearOperator((A.shape[1],) * 2, matvec=lambda v: A.T @ (A @ v),
                                              dtype=np.float64)
    ggn = np.sort(eigsh(gram, k=5, which="LA", tol=0, ncv=40)[0])[::-1].copy()
    A = rows = None  # free the Jacobian rows before the per-sample gradients (gram holds A)
    params = list(model.parameters())
    G = np.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        CRITERION(model(x[i:i + 1]), y[i:i + 1]), params)]).numpy() for i in range(len(y))])
    ef = (np.linalg.svd(G, compute_uv=False)[:5] ** 2 / len(y)).copy()
    out = {"ggn_top5": ggn, "ef_top5": ef, "seconds": time.perf_counter() - t0}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


class Counted:
    """``fn`` counting its calls (products of a peer, which does not report them)."""

    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *args):
        self.n += 1
        return self.fn(*args)


def peer_operators(model: nn.Module, loader: list) -> dict:
    """curvlinops' and hessian-eigenthings' GGN and empirical Fisher on ``loader``."""
    import curvlinops
    import hessian_eigenthings as he

    params = [p for p in model.parameters()]
    return {
        ("ggn", "curvlinops"): curvlinops.GGNLinearOperator(model, CRITERION, params, loader),
        ("empirical_fisher", "curvlinops"): curvlinops.EFLinearOperator(model, CRITERION,
                                                                        params, loader),
        ("ggn", "hessian-eigenthings"): he.GGNOperator(
            model, loader, he.supervised_forward, he.supervised_loss_of_output(CRITERION)),
        ("empirical_fisher", "hessian-eigenthings"): he.EmpiricalFisherOperator(
            model, loader, he.supervised_per_sample_loss(
                nn.CrossEntropyLoss(reduction="none"))),
    }


def peer_top5(name: str, op, max_iter: int | None = None) -> tuple[np.ndarray, int]:
    """Top-5 by each peer's documented route at its defaults: curvlinops' ``to_scipy()`` with
    ARPACK ``eigsh(k=5, which="LA")`` (tol 0), hessian-eigenthings' ``lanczos(k=5, which="LA")``
    (``max_iter`` Lanczos steps, default 2k)."""
    if name == "curvlinops":
        scipy_op = op.to_scipy()
        counted = Counted(scipy_op.matvec)
        wrapped = scipy.sparse.linalg.LinearOperator(scipy_op.shape, matvec=counted,
                                                     dtype=scipy_op.dtype)
        return np.sort(eigsh(wrapped, k=5, which="LA")[0])[::-1], counted.n
    import hessian_eigenthings as he

    counted = Counted(type(op).matvec.__get__(op))
    op.matvec = counted
    res = he.lanczos(op, k=5, which="LA", seed=0, max_iter=max_iter)
    return np.sort(res.eigenvalues.numpy())[::-1], counted.n


def ggn_fisher_top5(model, x, y, exact: dict) -> dict:
    """Top-5 eigenvalues of the GGN (= the Fisher for cross-entropy) and of the empirical Fisher:
    relative error, products and time, ours against both peers, on 5 batches of 200."""
    loader = five_batches(x, y)
    peers = peer_operators(model, loader)
    rows = {}
    for curvature, ref in (("ggn", exact["ggn_top5"]), ("fisher", exact["ggn_top5"]),
                           ("empirical_fisher", exact["ef_top5"])):
        rel = partial(max_rel_error, reference=ref)
        ours, t_ours = timed(lambda: top_eigenvalues(model, LOSS, loader, k=5, progress=False,
                                                     curvature=curvature))
        row = {"ours": {"rel_error": rel(ours.eigenvalues), "n_products": ours.n_hvp,
                        "seconds": t_ours, "converged": ours.converged}}
        runs = (("curvlinops", None), ("hessian-eigenthings", None),
                ("hessian-eigenthings", ours.n_hvp))  # the last: as many products as ours
        for peer, max_iter in runs:
            key = ("ggn" if curvature == "fisher" else curvature, peer)
            (values, n), t = timed(lambda: peer_top5(peer, peers[key], max_iter))
            label = peer if max_iter is None else f"{peer}_max_iter_{max_iter}"
            row[label] = {"rel_error": rel(values), "n_products": n, "seconds": t}
            row[f"time_ratio_ours_over_{label}"] = t_ours / t
        rows[curvature] = row
    return rows


def ggn_product_cost(model, x, y, repeat: int) -> dict:
    """Time of one product over 1000 samples / time of one gradient, round-robin, best of
    ``repeat``: our GGN, Fisher and empirical Fisher (one vector, a block of 8, the reused
    one-batch graph), the Hessian's double backward for reference, and the peers' GGN."""
    one = [(x, y)]
    params = list(model.parameters())
    v = torch.randn(8, sum(p.numel() for p in params), dtype=torch.float64)
    ops = {"hessian": HessianOperator(model, LOSS, one), "ggn": GGNOperator(model, LOSS, one),
           "fisher": FisherOperator(model, LOSS, one),
           "empirical_fisher": FisherOperator(model, LOSS, one, kind="empirical")}
    reused = GGNOperator(model, LOSS, one)
    peers = peer_operators(model, one)
    curvlinops_ggn = peers[("ggn", "curvlinops")].to_scipy()
    he_ggn = peers[("ggn", "hessian-eigenthings")]
    v0 = v[0].numpy()
    candidates = {
        "gradient": lambda: torch.autograd.grad(LOSS(model, one[0]), params),
        **{f"{k}_matvec": (lambda op=op: op.matvec(v[0])) for k, op in ops.items()},
        **{f"{k}_matmat8_per_vector": (lambda op=op: op.matmat(v)) for k, op in ops.items()},
        "ggn_reused_graph_matvec": lambda: reused.matvec(v[0]),
        "curvlinops_ggn_matvec": lambda: curvlinops_ggn.matvec(v0),
        "hessian_eigenthings_ggn_matvec": lambda: he_ggn.matvec(v[0]),
    }
    return round_robin_ratios(candidates, reused, v[0], repeat)


def ggn_section(model, x, y, args) -> dict:
    exact = exact_ggn_spectra(model, x, y, cache_file("ggn_exact", args))
    print(f"exact GGN top-5 {exact['ggn_top5']}, empirical Fisher top-5 {exact['ef_top5']}")
    return {"exact": {k: exact[k].tolist() for k in ("ggn_top5", "ef_top5")},
            "product_over_gradient_time": ggn_product_cost(model, x, y, 4 * args.repeat),
            "top5": ggn_fisher_top5(model, x, y, exact)}


def mnist_data(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = mnist1d(dtype=torch.float64)
    return ds.x[:samples], ds.y[:samples]


def cache_file(kind: str, args, device: torch.device | None = None) -> Path:
    """Where a reference spectrum of this model and data is kept between runs."""
    where = "" if device is None or device.type == "cpu" else f"_{device.type}"
    return CACHE / (f"curvature_{kind}{where}_{args.samples}-{args.width}-{args.train_steps}"
                    ".npz")


def cpu_section(args, pyhessian) -> dict:
    """Sections 1-6 (or 4 alone with ``--ggn-only``) on the CPU."""
    x, y = mnist_data(args.samples)
    model = trained_mlp(x, y, args.train_steps, args.width)
    if args.ggn_only:
        ggn = ggn_section(model, x, y, args)
        print("GGN / Fisher:", json.dumps(ggn, indent=1, default=float))
        return ggn
    exact = exact_spectrum(model, x, y, cache_file("exact", args))
    print(f"exact top-5 {exact['top5']}, trace {float(exact['trace']):.6g}")
    results = {"config": {"model": f"MLP 40-{args.width}-{args.width}-10 ReLU float64",
                          "samples": args.samples, "train_steps": args.train_steps,
                          "seeds": args.seeds, "repeat": args.repeat},
               "exact": {"top5": exact["top5"].tolist(), "trace": float(exact["trace"])}}
    results["hvp_over_gradient_time"] = hvp_ratios(model, x, y, 4 * args.repeat)
    print("HVP / gradient time:", json.dumps(results["hvp_over_gradient_time"], indent=1))
    results["top5"] = eigen_comparison(model, x, y, exact, pyhessian)
    print("top-5:", json.dumps(results["top5"], indent=1))
    results["trace"] = trace_budget(model, x, y, float(exact["trace"]), pyhessian,
                                    args.budgets, args.seeds)
    print("trace:", json.dumps(results["trace"], indent=1))
    results["ggn"] = ggn_section(model, x, y, args)
    print("GGN / Fisher:", json.dumps(results["ggn"], indent=1, default=float))
    return results


QUICK = {"samples": 200, "width": 20, "train_steps": 30, "repeat": 1, "seeds": 1,
         "budgets": [12], "basis_params": 10 ** 4, "memory_cases": list(SMOKE_CASES),
         "memory_repeats": 1}


def main() -> None:
    p = parser(__doc__, device=True)
    p.add_argument("--ggn-only", action="store_true", help="only the GGN / Fisher rows")
    p.add_argument("--memory", choices=[*MEMORY_CASES, *LANCZOS_CASES, *SMOKE_CASES],
                   help="only print the peak memory of this case (JSON)")
    p.add_argument("--memory-only", action="store_true",
                   help="only the memory figures (each in a fresh process)")
    p.add_argument("--no-memory", action="store_true",
                   help="everything but the memory figures (they take about 25 min)")
    p.add_argument("--samples", type=int, default=1000, help="MNIST-1D training samples")
    p.add_argument("--width", type=int, default=100, help="hidden width of the MLP")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--repeat", type=int, default=5, help="4x this many rounds per product time")
    p.add_argument("--seeds", type=int, default=10, help="seeds per trace budget")
    p.add_argument("--budgets", type=int, nargs="+", default=[12, 33, 99, 300],
                   help="HVP budgets of the trace estimators")
    p.add_argument("--basis-params", type=int, default=5 * 10 ** 7,
                   help="--device cuda: parameters of the basis-placement MLP")
    p.add_argument("--memory-cases", nargs="+", default=[*MEMORY_CASES, *LANCZOS_CASES],
                   choices=[*MEMORY_CASES, *LANCZOS_CASES, *SMOKE_CASES])
    p.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per case")
    args = parse(p, quick=QUICK)
    if args.memory:
        cases = {**LANCZOS_CASES, **SMOKE_CASES}
        print(json.dumps(peak_hvp_memory(*MEMORY_CASES[args.memory]) if args.memory in MEMORY_CASES
                         else peak_lanczos_memory(*cases[args.memory])))
        return
    torch.set_num_threads(1)  # stable timings on a shared machine (no thread oversubscription)
    run = Recorder("curvature", args)
    if args.memory_only:
        run.write({"memory": memory_section(args.memory_cases, args.memory_repeats)})
        return
    import pyhessian
    torch.set_default_dtype(torch.float64)  # PyHessian draws its vectors in the default dtype
    if args.device == "cuda":
        run.write(device_section(args, pyhessian, torch.device("cuda")))
        return
    results = cpu_section(args, pyhessian)
    if not (args.no_memory or args.ggn_only):
        results["memory"] = memory_section(args.memory_cases, args.memory_repeats)
    run.write(results)


if __name__ == "__main__":
    main()
