"""FSDP2 (``fully_shard``) problems shared by the sharded tests: an MLP and a tiny GPT-2 split
into the ranks' data shards, the wrapping, the state an analysis must leave unchanged, and a
runner of a function on two gloo ranks."""
import os
import pickle
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F

from tests.oracles import mlp
from tests.ranks import spawn


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def lm(model, batch):
    """Next-token cross-entropy in float64 (Hugging Face's ``labels=`` loss upcasts to float32
    only, which puts a 1e-5 floor under finite differences)."""
    logits = model(input_ids=batch).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=13, n_positions=8,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                        attn_implementation="eager")
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).to(torch.float64)


def case(name):
    """(model builder, loss, the units to wrap, all data, the ranks' shards)."""
    gen = torch.Generator().manual_seed(3)
    if name == "mlp":
        x = torch.randn(16, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=gen)
        cuts = ((0, 3), (3, 8), (8, 12), (12, 16))  # rank 0: 3 + 5 samples, rank 1: 4 + 4
        batches = [(x[a:b], y[a:b]) for a, b in cuts]
        return (lambda: mlp((5, 7, 6, 3)), ce, lambda m: [m[0], m[2], m[4]], batches,
                (batches[:2], batches[2:]))
    ids = torch.randint(0, 13, (8, 6), generator=gen)
    batches = [ids[i:i + 2] for i in range(0, 8, 2)]
    return gpt2, lm, lambda m: list(m.transformer.h), batches, (batches[:2], batches[2:])


def shard(model, units, reshard):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for unit in units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    return model


def state(model):
    """Everything the analysis must leave unchanged, on this rank."""
    out = {"training": [m.training for m in model.modules()],
           "requires_grad": [p.requires_grad for p in model.parameters()],
           "classes": [type(p).__name__ for p in model.parameters()],
           "ids": [id(p) for p in model.parameters()]}
    for i, p in enumerate(model.parameters()):
        out[f"p{i}"] = p.to_local().clone()
        out[f"g{i}"] = None if p.grad is None else p.grad.to_local().clone()
    for i, (_, m) in enumerate(sorted((n, m) for n, m in model.named_modules()
                                      if hasattr(m, "_get_fsdp_state"))):
        fsdp_state, group = m._get_fsdp_state(), m._get_fsdp_state()._fsdp_param_group
        out[f"fsdp{i}"] = (str(fsdp_state._training_state), group and (
            str(group._training_state), group.is_sharded,
            [str(fp.sharded_state) for fp in group.fsdp_params]))
    return out


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def _ranked(rank, world, init, out_dir, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        out = fn(rank, *args)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(out, f)
        dist.barrier()  # leave together: gloo torn down under a live peer can abort
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, fn, *args, world=2):
    """``fn(rank, *args)`` on ``world`` gloo ranks (a module-level function); its results.

    Returns:
        The per-rank return values (pickled through files), rank order.
    """
    init = f"file://{tmp_path / 'rendezvous'}"
    spawn(_ranked, (world, init, str(tmp_path), fn, args), nprocs=world)
    out = []
    for r in range(world):
        with open(tmp_path / f"rank{r}.pkl", "rb") as f:
            out.append(pickle.load(f))
    return out
