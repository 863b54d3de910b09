"""Finite-difference Hessian-vector products against the exact one: relative error vs the step.

Two models with random weights (nothing downloaded): an MLP 16-64-64-4 (tanh, 5,508
parameters, 256 samples, cross-entropy) and a tiny GPT-2 (``transformers.GPT2Config``: 2 layers,
width 32, 4 heads, vocabulary 96, 29,568 parameters; 8 sequences of 32 tokens, next-token
cross-entropy computed in float32 or wider). Two unit directions per model: a seeded random one
and the top eigenvector of the float64 model (``top_eigenvalues``). The reference is the exact
product (double backward) in float64 at the same weights: those of the low-precision copy cast
to float64, so that rounding the weights is not counted as finite-difference error. The
columns:

* ``fp32``: float32 parameters, the central difference $D(h)$, random direction;
* ``fp32 R``: float32, one Richardson step $R(h) = (4 D(h) - D(2h)) / 3$;
* ``bf16``: bfloat16 parameters, $D(h)$;
* ``fp32+MP``: float32 parameters sharded by ``fully_shard`` with
  ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` on a one-rank gloo group (the forward
  runs on bfloat16 all-gathered weights, the gradients reduce in bfloat16), $D(h)$ through
  ``analysis.sharded.sharded_fd_matmat`` (the routines refuse finite differences there);
* ``fp32 top``, ``fp32 R top``: float32 along the top eigenvector, $D(h)$ and $R(h)$.

Rows: the relative perturbation $r = h \\|v\\| / (1 + \\|w\\|)$ on a log grid, the error
$\\|\\hat{Hv} - Hv\\| / \\|Hv\\|$ (the best of each column in bold); then, per column, for the
former rule (``FiniteDifference(adaptive=False)``: ``analysis.finite_difference.fd_step``) and
the adaptive step (the default), the relative step chosen, the error there, our a-posteriori
estimate $\\|D(2h) - D(h)\\| / \\|\\hat{Hv}\\|$ beside it, and the gradients spent (each a pass
over the data; the adaptive rule's include its noise probe, once per call).

    nice -n 15 python benchmarks/fd_error.py [--models mlp gpt2] [--out FILE.json] [--quick]

``--quick``: the MLP, four steps: a smoke test, not figures.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from analysis import HessianOperator, top_eigenvalues  # noqa: E402
from analysis.core import flatten, preserved  # noqa: E402
from analysis.finite_difference import fd_matmat, fd_step, FiniteDifference  # noqa: E402
from analysis.sharded import sharded_fd_matmat, ShardedHessian  # noqa: E402
from harness import Recorder, parse, parser  # noqa: E402



def ce(model, batch):
    """Cross-entropy of the MLP's logits, in float32 or wider."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y)


def lm(model, batch):
    """Next-token cross-entropy of the GPT-2's logits, in float32 or wider."""
    logits = model(input_ids=batch).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           batch[:, 1:].reshape(-1))


def problem(name: str):
    """(float64 model, loss, data) with seeded random weights and data."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                              nn.Linear(64, 4)).double()
        x = torch.randn(256, 16, generator=gen, dtype=torch.float64)
        return model, ce, [(x, torch.randint(0, 4, (256,), generator=gen))]
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                        attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).double()
    return model, lm, [torch.randint(0, 96, (8, 32), generator=gen)]


def cast(model: nn.Module, data: list, dtype: torch.dtype):
    """A copy of ``model`` in ``dtype`` and ``data`` with its float tensors in ``dtype``."""
    import copy

    copied = copy.deepcopy(model).to(dtype)
    moved = [tuple(t.to(dtype) if t.is_floating_point() else t for t in b)
             if isinstance(b, tuple) else b for b in data]
    return copied, moved


def exact(model: nn.Module, loss, data, v: torch.Tensor) -> torch.Tensor:
    """The float64 product at ``model``'s weights and ``data``'s values (as rounded)."""
    model64, data64 = cast(model, data, torch.float64)
    return HessianOperator(model64, loss, data64, progress=False).matmat(v[None])[0]


def plain_product(model, loss, data, v, step, richardson, adaptive=True):
    """(product, metadata) by finite differences of a plain model."""
    params = list(model.parameters())
    fd = FiniteDifference(params, richardson=richardson, step=step, adaptive=adaptive)
    with preserved(model, "eval", weights=False, trainable=params):
        out = fd_matmat(fd, model, loss, data, v[None].to(params[0].dtype))[0]
    return out.double(), fd.metadata()


def policy_model(model: nn.Module):
    """A float32 copy sharded by ``fully_shard`` with a bfloat16 ``MixedPrecisionPolicy``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy

    copied, _ = cast(model, [], torch.float32)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    mesh = init_device_mesh("cpu", (1,))
    units = list(copied.transformer.h) if hasattr(copied, "transformer") else \
        [m for m in copied if isinstance(m, nn.Linear)]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    return fully_shard(copied, mesh=mesh, mp_policy=policy)


def policy_product(model, loss, data, v, step, richardson, adaptive=True):
    """(product, metadata) through the FSDP2 backward under the policy."""
    engine = ShardedHessian(model, loss, data)
    fd = FiniteDifference(engine.params, richardson=richardson, step=step, adaptive=adaptive)
    product = sharded_fd_matmat(fd, model, loss, data, [engine.distribute(v.float())])[0]
    full = torch.cat([p.full_tensor().reshape(-1) for p in product])
    return full.double(), fd.metadata()


def directions(model64: nn.Module, loss, data64) -> dict[str, torch.Tensor]:
    """A seeded random unit vector and the top eigenvector of the float64 model."""
    n = sum(p.numel() for p in model64.parameters())
    v = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    top = top_eigenvalues(model64, loss, data64, k=1, progress=False).eigenvectors[0]
    return {"random": v / v.norm(), "top": top.double() / top.double().norm()}


def ours(product, model, loss, data, v, richardson, adaptive, reference, scale) -> dict:
    """Our step (the former rule or the adaptive one): ratio, error, estimate, gradients."""
    got, meta = product(model, loss, data, v, None, richardson, adaptive)
    # the pilot rule (fd_step) at ||v|| = 1, up to the rounding of v to bfloat16; the adaptive
    # step is a power-of-two multiple of it
    pilot = fd_step(next(model.parameters()).dtype, scale - 1.0, 1.0,
                    richardson and not adaptive)
    shift = math.log2(meta["step"] / pilot)
    assert abs(shift - round(shift)) < 1e-2 and (adaptive or round(shift) == 0), shift
    return {"ratio": meta["step"] / scale,
            "error": float((got - reference).norm() / reference.norm()),
            "estimate": meta["relative_error_estimate"], "gradients": meta["gradients"]}


def sweep(name: str, ratios: list[float]) -> dict:
    """Errors per column on the grid of relative steps, and at our chosen steps."""
    model64, loss, data64 = problem(name)
    n = sum(p.numel() for p in model64.parameters())
    vectors = directions(model64, loss, data64)
    fp32, bf16 = cast(model64, data64, torch.float32), cast(model64, data64, torch.bfloat16)
    setups = {"fp32": (*fp32, plain_product, torch.float32, "random"),
              "fp32 R": (*fp32, plain_product, torch.float32, "random"),
              "bf16": (*bf16, plain_product, torch.bfloat16, "random"),
              "fp32+MP": (policy_model(model64), fp32[1], policy_product, torch.float32,
                          "random"),
              "fp32 top": (*fp32, plain_product, torch.float32, "top"),
              "fp32 R top": (*fp32, plain_product, torch.float32, "top")}
    out = {"n": n, "columns": {}}
    for column, (model, data, product, dtype, direction) in setups.items():
        richardson = " R" in column
        v = vectors[direction]
        low = (bf16 if dtype == torch.bfloat16 else fp32)
        reference = exact(low[0], loss, low[1], v)
        norm = float(flatten([p.detach().double() for p in low[0].parameters()]).norm())
        scale = 1.0 + norm
        errors = []
        for r in ratios:
            got, _ = product(model, loss, data, v, r * scale, richardson)
            errors.append(float((got - reference).norm() / reference.norm()))
        out["columns"][column] = {"errors": errors}
        for adaptive, key in ((False, "before"), (True, "after")):
            out["columns"][column][key] = ours(product, model, loss, data, v, richardson,
                                               adaptive, reference, scale)
        print(f"  {name} {column}: done", flush=True)
    return out


def table(name: str, ratios: list[float], result: dict) -> str:
    """The printed table of one model."""
    cols = result["columns"]
    names = list(cols)
    lines = [f"{name} (n = {result['n']}), relative error ||FD - Hv|| / ||Hv||",
             "| r = h ||v|| / (1 + ||w||) | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for i, r in enumerate(ratios):
        best = {c: min(cols[c]["errors"]) for c in names}
        lines.append(f"| {r:.0e} | " + " | ".join(
            (f"**{cols[c]['errors'][i]:.1e}**" if cols[c]["errors"][i] == best[c] else
             f"{cols[c]['errors'][i]:.1e}") for c in names) + " |")
    for key, label in (("before", "former rule"), ("after", "adaptive")):
        for field, fmt in (("ratio", "{:.1e}"), ("error", "{:.1e}"), ("estimate", "{:.1e}"),
                           ("gradients", "{:d}")):
            lines.append(f"| {label}: {field} | " + " | ".join(
                fmt.format(cols[c][key][field]) for c in names) + " |")
    return "\n".join(lines)


def main() -> None:
    """Run the sweep (a one-rank gloo group for the policy column) and print the tables."""
    p = parser(__doc__, threads=True)
    p.add_argument("--models", nargs="+", default=["mlp", "gpt2"], choices=["mlp", "gpt2"])
    p.add_argument("--ratios", type=float, nargs="+",
                   default=[float(x) for x in 10.0 ** np.arange(-6, 0.1, 0.5)])
    args = parse(p, quick={"models": ["mlp"], "ratios": [1e-5, 1e-3, 1e-2, 1e-1]})
    run = Recorder("fd_error", args)
    warnings.filterwarnings("ignore", message=".*finite-difference Hessian-vector products")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rdv')}",
                                rank=0, world_size=1)
        try:
            results = {}
            for name in args.models:
                results[name] = sweep(name, args.ratios)
                print(table(name, args.ratios, results[name]), flush=True)
        finally:
            dist.destroy_process_group()
    run.write({"ratios": args.ratios, "results": results})


if __name__ == "__main__":
    main()
