"""Peak memory of one curvature product of a causal LM at GPT-2's vocabulary, against the peers.

A GPT-2-shaped model (``transformers`` ``GPT2Config``: vocabulary 50,257, width ``--width``,
``--layers`` blocks, eager attention, float32, random weights, tied embeddings) on ``--seqs`` x
``--tokens`` tokens; its output is the logits flattened to ``[N T, V]`` and the loss the mean
cross-entropy of the next token (the last position of each sequence ignored, ``-100``). One
product from scratch (forward included) per fresh interpreter, for

* ours: ``HessianOperator`` (double backward), ``GGNOperator`` and ``FisherOperator`` (exact),
  each ``.matvec(v)``;
* curvlinops: ``HessianLinearOperator``, ``GGNLinearOperator``, ``FisherMCLinearOperator``
  (one sample), each ``@ v``;
* hessian-eigenthings: ``HessianOperator``, ``GGNOperator``, each ``.matvec(v)``.

The operator is built (and its checks run) before the measurement. Two figures per product, in
multiples of the logits' bytes ($N T V \times 4$): the process's resident high-water mark
beyond what was resident before (model, data, vector; ``harness.rss_peak``) and the peak of live
torch allocations during a second product (``harness.torch_peak``). ``--repeats`` processes per
case, the median taken.

    PYTHONPATH=/tmp/peers python benchmarks/lm_memory.py [--repeats 3] [--out FILE.json]

``--quick``: a small vocabulary and sequence, one process per case: a smoke test, not figures.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from analysis import FisherOperator, GGNOperator, HessianOperator, supervised  # noqa: E402
from harness import Recorder, fresh_process, parse, parser, rss_peak, torch_peak  # noqa: E402

CASES = ("ours-hessian", "ours-ggn", "ours-fisher", "curvlinops-hessian", "curvlinops-ggn",
         "curvlinops-fisher", "eigenthings-hessian", "eigenthings-ggn")


class FlatLM(nn.Module):
    """The causal LM's logits, ``[N T, V]``."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits.flatten(0, 1)


def problem(args) -> tuple[nn.Module, list, int]:
    """The model, one batch ``(ids, next-token labels)`` and the logits' bytes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.tokens, n_embd=args.width,
                     n_layer=args.layers, n_head=max(1, args.width // 64),
                     attn_implementation="eager")
    model = FlatLM(GPT2LMHeadModel(cfg).eval())
    ids = torch.randint(0, args.vocab, (args.seqs, args.tokens))
    labels = torch.cat([ids[:, 1:], torch.full((args.seqs, 1), -100)], 1).flatten()
    return model, [(ids, labels)], args.seqs * args.tokens * args.vocab * 4


def product(case: str, model: nn.Module, data: list):
    """The call that computes one product of ``case`` (its operator built here)."""
    params = [p for p in model.parameters() if p.requires_grad]
    v = torch.randn(sum(p.numel() for p in params))
    lib, kind = case.split("-")
    if lib == "ours":
        cls = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": FisherOperator}[kind]
        op = cls(model, supervised(nn.CrossEntropyLoss()), data, progress=False,
                 batch_size_fn=lambda batch: len(batch[0]))
        return lambda: op.matvec(v)
    if lib == "curvlinops":
        import curvlinops
        cls = {"hessian": curvlinops.HessianLinearOperator, "ggn": curvlinops.GGNLinearOperator,
               "fisher": curvlinops.FisherMCLinearOperator}[kind]
        op = cls(model, nn.CrossEntropyLoss(), params, data, check_deterministic=False)
        return lambda: op @ v
    import hessian_eigenthings as he
    criterion = nn.CrossEntropyLoss()
    if kind == "hessian":
        op = he.HessianOperator(model, data, he.supervised_loss(criterion))
    else:
        op = he.GGNOperator(model, data, he.supervised_forward,
                            he.supervised_loss_of_output(criterion))
    return lambda: op.matvec(v)


def measure(case: str, args) -> dict:
    """In this (fresh) process: the high-water mark of one product, then the torch peak."""
    model, data, logits = problem(args)
    call = product(case, model, data)
    rss = rss_peak(call)
    live = torch_peak(call)
    return {"rss": rss / logits, "torch": live / logits, "logits_bytes": logits}


def main() -> None:
    """Each case in ``--repeats`` fresh processes; print the table."""
    p = parser(__doc__)
    p.add_argument("--case", choices=CASES, default=None, help="(internal) measure one case")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seqs", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128)
    args = parse(p, quick={"vocab": 1000, "tokens": 16, "repeats": 1})
    torch.set_num_threads(1)
    if args.case:
        print(json.dumps(measure(args.case, args)))
        return
    run = Recorder("lm_memory", args)
    shape = ["--vocab", str(args.vocab), "--width", str(args.width), "--layers",
             str(args.layers), "--seqs", str(args.seqs), "--tokens", str(args.tokens)]
    results = {}
    for case in args.cases:
        runs = [fresh_process(__file__, ["--case", case, *shape]) for _ in range(args.repeats)]
        results[case] = {k: statistics.median(r[k] for r in runs) for k in ("rss", "torch")}
        results[case]["runs"] = runs
        print(f"{case:22s} high-water mark {results[case]['rss']:6.2f}x  "
              f"torch {results[case]['torch']:6.2f}x of the logits "
              f"({runs[0]['logits_bytes'] / 2**20:.1f} MiB)", flush=True)
    run.write(results)


if __name__ == "__main__":
    main()
