"""Real-model benchmark: Hessian-vector products and the top eigenvalue on a GPT-2-small-shaped
Hugging Face model and a ResNet-18, sharpscape vs PyHessian (CPU, one process, random weights).

    python3 benchmarks/real_models.py [--models gpt2 resnet18] [--layers 12] [--tokens 64]
                                      [--max-hvp 20] [--out FILE.json] [--quick]

* GPT-2 small shape: ``GPT2Config()`` (vocab 50257, width 768, 12 heads, ``--layers`` blocks,
  124M parameters at 12), SDPA attention (the Hugging Face default), a batch of 2 sequences of
  ``--tokens`` tokens; our loss is the model's own ``.loss`` on the dict batch.
* ResNet-18: ``ResNetConfig`` with basic blocks [2, 2, 2, 2] x [64, 128, 256, 512] (11.2M
  parameters, BatchNorm in eval mode), a batch of 16 CIFAR-sized 3x32x32 images, 10 classes.

PyHessian needs ``model(inputs)`` and ``criterion(outputs, targets)``: it gets a wrapper that
returns the (shifted, for GPT-2) logits, and, for GPT-2, runs under the math SDPA backend (the
fused kernels have no double backward: without it, it crashes). Printed as ratios:

1. time of one HVP over the time of one gradient (``round_robin_ratios``): ours (double backward;
   forward-over-reverse; a single batch's graph reused inside ``with op:``) and PyHessian's
   product (graph reused);
2. peak resident memory of one product from scratch, beyond the model and the data (the
   kernel's ``VmHWM`` high-water mark, reset just before, minus the resident set then), over
   the parameter bytes, each in a fresh process;
3. top eigenvalue: our Lanczos (``tol=1e-3`` on the residual) against PyHessian's power
   iteration (its default: relative change below 1e-3), both capped at ``--max-hvp`` products:
   the eigenvalues, products spent and wall-time ratio.

Timings use one intra-op thread, best of ``--repeat`` rounds interleaving the candidates.
``--quick`` (``--tiny`` shapes: GPT-2 of width 64, 2 heads and a vocabulary of 512, one block, 8
tokens; a ResNet of widths 8-64 with one block per stage; 3 products, one round): a smoke test,
not figures.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from analysis import HessianOperator, top_eigenvalues  # noqa: E402
from curvature import CRITERION, pyhessian_eigs, round_robin_ratios  # noqa: E402
from harness import Recorder, fresh_process, parse, parser, rss_peak, timed  # noqa: E402


def hf_loss(model, batch):
    return model(**batch).loss


class Logits(nn.Module):
    """``model(input) -> logits`` for PyHessian (GPT-2: shifted and flattened, matching
    ``targets = ids[:, 1:]``)."""

    def __init__(self, model: nn.Module, key: str, shift: bool):
        super().__init__()
        self.model, self.key, self.shift = model, key, shift

    def forward(self, x):
        logits = self.model(**{self.key: x}).logits
        return logits[:, :-1].flatten(0, 1) if self.shift else logits


def build(name: str, layers: int, tokens: int, tiny: bool = False):
    """(HF model, our dict batch, PyHessian's wrapper, its (inputs, targets)); ``tiny``: the
    smoke test's shapes."""
    from transformers import (GPT2Config, GPT2LMHeadModel, ResNetConfig,
                              ResNetForImageClassification)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "gpt2":
        small = {"n_embd": 64, "n_head": 2, "vocab_size": 512} if tiny else {}
        model = GPT2LMHeadModel(GPT2Config(n_layer=layers, **small)).eval()
        ids = torch.randint(0, model.config.vocab_size, (2, tokens), generator=gen)
        return model, {"input_ids": ids, "labels": ids}, Logits(model, "input_ids", True), \
            (ids, ids[:, 1:].flatten())
    widths, depth = ([8, 16, 32, 64], 1) if tiny else ([64, 128, 256, 512], 2)
    cfg = ResNetConfig(num_channels=3, embedding_size=widths[0], hidden_sizes=widths,
                       depths=[depth] * 4, layer_type="basic", num_labels=10)
    model = ResNetForImageClassification(cfg).eval()
    x, y = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    return model, {"pixel_values": x, "labels": y}, Logits(model, "pixel_values", False), (x, y)


def peer_context(name: str):
    return sdpa_kernel(SDPBackend.MATH) if name == "gpt2" else torch.enable_grad()


def hvp_ratios(name, model, batch, wrapper, data, repeat: int) -> dict:
    import pyhessian
    from pyhessian.utils import hessian_vector_product
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(2))
    ops = {m: HessianOperator(model, hf_loss, [batch], progress=False, hvp_method=m)
           for m in ("reverse", "forward")}
    # own copies: restoring the model's buffers after each call of ours bumps their versions,
    # which autograd refuses in a graph that is kept (reused) across calls
    reused = HessianOperator(copy.deepcopy(model), hf_loss, [batch], progress=False)
    with peer_context(name):
        peer = pyhessian.hessian(copy.deepcopy(wrapper), CRITERION, data=data, cuda=False)
    pieces = [t.view_as(p) for t, p in zip(torch.split(v, [p.numel() for p in params]), params)]
    candidates = {
        "gradient": lambda: torch.autograd.grad(hf_loss(model, batch), params),
        **{f"ours_{m}": (lambda op=op: op.matvec(v)) for m, op in ops.items()},
        "ours_reused_graph": lambda: reused.matvec(v),
        "pyhessian_reused_graph": lambda: hessian_vector_product(peer.gradsH, peer.params, pieces),
    }
    return {"n_params": n, **round_robin_ratios(candidates, reused, v, repeat)}


def top_eigenvalue(name, model, batch, wrapper, data, max_hvp: int) -> dict:
    import pyhessian
    ours, t_ours = timed(lambda: top_eigenvalues(model, hf_loss, [batch], k=1, tol=1e-3,
                                                 max_hvp=max_hvp, progress=False))

    def theirs():
        with peer_context(name):
            return pyhessian_eigs(pyhessian, wrapper, top_n=1, max_iter=max_hvp, data=data)

    (values, n_theirs), t_theirs = timed(theirs)
    return {"ours": {"eigenvalue": float(ours.eigenvalues[0]), "n_hvp": ours.n_hvp,
                     "converged": ours.converged, "rel_residual":
                     float(ours.residuals[0] / abs(ours.eigenvalues[0])), "seconds": t_ours},
            "pyhessian": {"eigenvalue": float(values[0]), "n_hvp": n_theirs, "seconds": t_theirs},
            "time_ratio_ours_over_pyhessian": t_ours / t_theirs}


def peak_memory(name: str, case: str, layers: int, tokens: int, tiny: bool) -> dict:
    """Peak resident memory of one product from scratch beyond model and data (this process)."""
    import pyhessian
    from pyhessian.utils import hessian_vector_product
    model, batch, wrapper, data = build(name, layers, tokens, tiny)
    params = [p for p in model.parameters() if p.requires_grad]
    v = torch.randn(sum(p.numel() for p in params))

    def run():
        if case == "gradient":
            return torch.autograd.grad(hf_loss(model, batch), params)
        if case == "pyhessian":
            with peer_context(name):
                peer = pyhessian.hessian(wrapper, CRITERION, data=data, cuda=False)
                sizes = [p.numel() for p in params]
                pieces = [t.view_as(p) for t, p in zip(torch.split(v, sizes), params)]
                out = hessian_vector_product(peer.gradsH, peer.params, pieces)
            model.zero_grad(set_to_none=True)
            return out
        return HessianOperator(model, hf_loss, [batch], progress=False, hvp_method=case).matvec(v)

    run()  # warm-up: one-time allocations of the libraries
    peak = rss_peak(run)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    return {"peak_mb": peak / 2 ** 20, "peak_over_params": peak / param_bytes}


def memory_in_fresh_process(name: str, case: str, args) -> dict:
    argv = ["--memory", name, case, "--layers", str(args.layers), "--tokens", str(args.tokens)]
    return fresh_process(__file__, argv + (["--tiny"] if args.tiny else []))


QUICK = {"tiny": True, "layers": 1, "tokens": 8, "max_hvp": 3, "repeat": 1}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--models", nargs="+", default=["gpt2", "resnet18"],
                   choices=["gpt2", "resnet18"])
    p.add_argument("--layers", type=int, default=12, help="GPT-2 blocks (12: GPT-2 small)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--max-hvp", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="the smoke test's small shapes")
    p.add_argument("--memory", nargs=2, help=argparse.SUPPRESS)
    args = parse(p, quick=QUICK)
    torch.set_num_threads(1)
    from transformers import logging
    logging.set_verbosity_error()
    if args.memory:
        print(json.dumps(peak_memory(*args.memory, args.layers, args.tokens, args.tiny)))
        return
    run = Recorder("real_models", args)
    results = {}
    for name in args.models:
        model, batch, wrapper, data = build(name, args.layers, args.tokens, args.tiny)
        row = {"hvp": hvp_ratios(name, model, batch, wrapper, data, args.repeat)}
        print(name, "HVP / gradient:", json.dumps(row["hvp"], indent=1), flush=True)
        row["memory"] = {case: memory_in_fresh_process(name, case, args)
                         for case in ("gradient", "reverse", "forward", "pyhessian")}
        print(name, "peak memory:", json.dumps(row["memory"], indent=1), flush=True)
        row["top_eigenvalue"] = top_eigenvalue(name, model, batch, wrapper, data, args.max_hvp)
        print(name, "top eigenvalue:", json.dumps(row["top_eigenvalue"], indent=1), flush=True)
        results[name] = row
    run.write(results)


if __name__ == "__main__":
    main()
