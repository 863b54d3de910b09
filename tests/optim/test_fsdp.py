"""Every optimizer on an FSDP2 (``fully_shard``) model, gloo ranks on CPU, float64.

Each rank passes its half of every batch; FSDP2 averages the gradients, so every step must equal
one process on the whole batch: 3 steps to 1e-9 (the global norms of SAM, WSAM, AdaSAM and SALA
and ND-Adam's per-vector norms summed over the shards; the layers have rows that do not divide by
the number of ranks, and the first weight is sharded along its vectors, ``Shard(1)``). A resume
from ``state_dict()``/``load_state_dict`` and from ``torch.distributed.checkpoint`` after 3 steps
then 2 more steps equals 5 uninterrupted steps bit for bit. FSDP1 parameters and ``Partial``
DTensors are refused naming ``fully_shard``; tensor-parallel DTensors (``ColwiseParallel``,
``RowwiseParallel``: the second weight split along its vectors) train as one process does.

The ranks are spawned once per world size; the workers loop over the optimizers and write their
results, which the tests compare with the one-process runs made here.
"""
from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

import optim
from tests.optim.reference import ce_closure
from tests import ranks

STEPS, MORE = 3, 2
N, D_IN, CLASSES = 8, 4, 3
TOL = 1e-9


def build(hidden: int = 7) -> nn.Sequential:
    """The float64 MLP: weights [7, 4] and [3, 7], biases [7] and [3] (uneven over 2 ranks).

    Tensor parallelism needs even shards: ``hidden=6`` there.
    """
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, hidden), nn.Tanh(), nn.Linear(hidden, CLASSES)).double()


def batch(i: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``i``'s batch, or this rank's part of it."""
    gen = torch.Generator().manual_seed(100 + i)
    x = torch.randn(N, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N,), generator=gen)
    part = N // world
    return x[rank * part:(rank + 1) * part], y[rank * part:(rank + 1) * part]


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


#: name -> (params, model) -> optimizer; every constructor variant (foreach, fused)
CASES = {
    "AGD": lambda ps, m: optim.AGD(ps, lr=0.02, delta=0.05, weight_decay=0.1, amsgrad=True,
                                   foreach=False),
    "AGD-foreach": lambda ps, m: optim.AGD(ps, lr=0.02, delta=0.05, weight_decouple=False,
                                           weight_decay=0.1, clip=0.7, foreach=True),
    "AGD-fused": lambda ps, m: optim.AGD(ps, lr=0.02, delta=0.05, weight_decay=0.1, fused=True),
    "NDAdam": lambda ps, m: optim.NDAdam(ps, lr=0.05, weight_decay=1e-2, foreach=False),
    "NDAdam-foreach": lambda ps, m: optim.NDAdam(ps, lr=0.05, weight_decay=1e-2, foreach=True),
    "NDAdam-fused": lambda ps, m: optim.NDAdam(ps, lr=0.05, weight_decay=1e-2, fused=True),
    "AdaSAM": lambda ps, m: optim.AdaSAM(ps, lr=0.01, rho=0.2, model=m, foreach=False),
    "AdaSAM-foreach": lambda ps, m: optim.AdaSAM(ps, lr=0.01, rho=0.2, model=m, foreach=True,
                                                 bias_correction=True),
    "AdaSAM-fused": lambda ps, m: optim.AdaSAM(ps, lr=0.01, rho=0.2, model=m, fused=True),
    "SAM": lambda ps, m: optim.SAM(sgd(ps), rho=0.2, model=m),
    "SAM-adaptive-AGD": lambda ps, m: optim.SAM(optim.AGD(ps, lr=0.02, foreach=True), rho=0.5,
                                                adaptive=True, model=m),
    "WSAM": lambda ps, m: optim.WSAM(sgd(ps), rho=0.2, gamma=0.8, max_norm=0.3, model=m),
    "WSAM-coupled": lambda ps, m: optim.WSAM(sgd(ps), rho=0.5, gamma=0.6, adaptive=True,
                                             decouple=False, model=m),
    "SALA": lambda ps, m: optim.SALA(sgd(ps), k=2, alpha=0.5, rho=0.5, model=m),
    "Lookahead": lambda ps, m: optim.Lookahead(optim.AGD(ps, lr=0.02), k=2, alpha=0.5),
    "Lookahead-SGD": lambda ps, m: optim.Lookahead(sgd(ps), k=2, alpha=0.5),
}


def diagnostics(opt) -> dict[str, float]:
    """The optimizer's reductions over all elements, as numbers."""
    base = getattr(opt, "base_optimizer", opt)
    out = {}
    if isinstance(base, optim.AGD):
        out.update({f"sgd_fraction{k}": v for k, v in base.sgd_fraction(per_param=True).items()})
        out["sgd_fraction"] = base.sgd_fraction()
    if isinstance(opt, optim.NDAdam):
        out.update({f"angle{k}": v for k, v in opt.angular_step().items()})
        out.update({f"cosine{k}": v for k, v in opt.update_cosine().items()})
    if isinstance(opt, optim.WSAM):
        out.update(opt.gradient_norms())
    if isinstance(opt, optim.SALA):
        out["distance"] = opt.distance
    return out


def preconditioners(opt, model) -> list[torch.Tensor]:
    """``opt.preconditioner()`` (and AGD's SGD-branch mask) per parameter, unsharded."""
    got = [opt.preconditioner()] if callable(getattr(opt, "preconditioner", None)) else []
    if isinstance(opt, optim.AGD):
        got.append(opt.preconditioner(sgd_mask=True))
    got = [P for P in got if P is not None]
    for P in got:   # sharded like the parameters
        assert all(getattr(P[p], "placements", None) == getattr(p, "placements", None)
                   for p in model.parameters())
    return [full(P[p]).clone() for P in got for p in model.parameters()]


def train(model, opt, steps, rank=0, world=1, first=0) -> list[list[torch.Tensor]]:
    """``steps`` closure steps from batch ``first`` on; the full parameters after each."""
    out = []
    for i in range(first, first + steps):
        x, y = batch(i, rank, world)
        opt.step(ce_closure(opt, model, x, y))
        out.append([full(p).clone() for p in model.parameters()])
    return out


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


def reference(name: str, steps: int = STEPS, hidden: int = 7):
    """One process, the whole batch: the parameters after each step, and the diagnostics."""
    model = build(hidden)
    opt = CASES[name](model.parameters(), model)
    got = train(model, opt, steps)
    return got, diagnostics(opt), preconditioners(opt, model)


# ---------------------------------------------------------------------------- the ranks


def _shard(model, vector_split=True):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    split = (lambda p: Shard(1) if p.dim() == 2 else None) if vector_split else None
    fully_shard(model[0], mesh=mesh, shard_placement_fn=split)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _clone(obj):
    """A deep copy of a state dict whose tensors (DTensors too) are cloned."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _pieces(model):
    return [p.to_local().clone() for p in model.parameters()]


def _resumed(name, rank, world, load) -> list[torch.Tensor]:
    """A fresh model and optimizer, ``load(model, opt)``, then MORE steps: the local pieces."""
    model = _shard(build())
    opt = CASES[name](model.parameters(), model)
    load(model, opt)
    train(model, opt, MORE, rank, world, first=STEPS)
    return _pieces(model)


def _run_case(name, rank, world, ckpt_dir, checkpoints=True) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)

    model = _shard(build())
    opt = CASES[name](model.parameters(), model)
    out = {"params": train(model, opt, STEPS, rank, world), "diagnostics": diagnostics(opt),
           "preconditioner": preconditioners(opt, model)}
    if not checkpoints:
        return out
    saved = {"model": _clone(model.state_dict()), "optim": _clone(opt.state_dict())}
    path = os.path.join(ckpt_dir, name)
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)
    if name in FQN_CASES:
        dcp.save({"model": get_model_state_dict(model),
                  "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path + "_fqn")
    train(model, opt, MORE, rank, world, first=STEPS)
    uninterrupted = _pieces(model)

    def from_memory(model, opt):
        model.load_state_dict(saved["model"])
        opt.load_state_dict(_clone(saved["optim"]))

    def from_dcp(model, opt):
        train(model, opt, 1, rank, world)   # a template: state of the same structure
        state = {"model": model.state_dict(), "optim": opt.state_dict()}
        dcp.load(state, checkpoint_id=path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])

    def from_fqn(model, opt):   # torch's own state-dict API, keyed by parameter names
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model,
                                                                                        opt)}
        dcp.load(state, checkpoint_id=path + "_fqn")
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])

    loads = [("memory", from_memory), ("dcp", from_dcp)]
    if name in FQN_CASES:
        loads.append(("fqn", from_fqn))
    for how, load in loads:
        got = _resumed(name, rank, world, load)
        out[f"resume_{how}"] = all(torch.equal(a, b) for a, b in zip(got, uninterrupted))
    return out


def _refusals() -> dict[str, str]:
    """The error of every optimizer on FSDP1 parameters and on a Partial DTensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor, Partial

    out = {}
    for orig in (False, True):
        model = FullyShardedDataParallel(build(), use_orig_params=orig,
                                         device_id=torch.device("cpu"))
        for name, make in CASES.items():
            try:
                make(model.parameters(), model)
                out[f"fsdp1_{orig}_{name}"] = "accepted"
            except ValueError as exc:
                out[f"fsdp1_{orig}_{name}"] = str(exc)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    partial = nn.Parameter(DTensor.from_local(torch.ones(3, 2, dtype=torch.float64), mesh,
                                              [Partial()]))
    try:
        optim.NDAdam([partial])
        out["partial"] = "accepted"
    except ValueError as exc:
        out["partial"] = str(exc)
    return out


def _tensor_parallel(names, rank) -> dict:
    """Colwise/Rowwise tensor parallelism, the whole batch on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    out = {}
    for name in names:
        model = parallelize_module(build(TP_HIDDEN), mesh, {"0": ColwiseParallel(),
                                                   "2": RowwiseParallel()})
        opt = CASES[name](model.parameters(), model)
        try:
            out[name] = {"params": train(model, opt, STEPS), "diagnostics": diagnostics(opt),
                         "preconditioner": preconditioners(opt, model)}
        except ValueError as exc:
            out[name] = str(exc)
    return out


def _grad_scaler(rank: int, world: int) -> dict:
    """SAM with a ``torch.amp.GradScaler`` on the sharded model: step 2's first pass overflows
    on the last rank only. The overflow flag is all-reduced (on the device the backend takes:
    the CPU for gloo, the gradients' GPU for NCCL), so every rank skips step 2 and backs off."""
    model = _shard(build())
    opt = CASES["SAM"](model.parameters(), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    params, scales = overflow_on_last_rank(model, opt, scaler, rank, world)
    return {"params": params, "scales": scales, "n_steps": opt.n_steps}


def overflow_on_last_rank(model, opt, scaler, rank: int, world: int,
                          device: torch.device = torch.device("cpu")):
    """Two SAM steps with ``scaler``; step 2's first pass overflows on the last rank only.

    Returns:
        ``(params, scales)``: the full parameters (on the CPU) and the scale after each step.
    """
    params, scales = [], []
    for i in range(2):
        x, y = (t.to(device) for t in batch(i, rank, world))

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if i == 1 and rank == world - 1 and opt.phase == "ready":
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            return loss

        opt.step(closure, grad_scaler=scaler)
        scaler.update()
        params.append([full(p).cpu().clone() for p in model.parameters()])
        scales.append(scaler.get_scale())
    return params, scales


def _worker(rank, world, init, out_dir, names, extras):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        out = {name: _run_case(name, rank, world, out_dir, checkpoints=extras) for name in names}
        if extras:
            out["refusals"] = _refusals()
            out["tensor_parallel"] = _tensor_parallel(TP_CASES, rank)
            out["grad_scaler"] = _grad_scaler(rank, world)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: gloo torn down under a live peer can abort
    finally:
        dist.destroy_process_group()


TP_CASES = ("NDAdam", "SAM", "AGD-foreach")
TP_HIDDEN = 6
#: the optimizers whose state dict torch's get/set_optimizer_state_dict carry whole (the
#: others keep counters and a base optimizer's state beside "state" and "param_groups")
FQN_CASES = ("AGD", "AGD-fused", "NDAdam", "NDAdam-foreach")


def spawn(tmp_path, world, names, extras):
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks.spawn(_worker, (world, init, str(tmp_path), names, extras), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn(tmp_path_factory.mktemp("fsdp2"), 2, list(CASES), extras=True)


def assert_equal_runs(got, want):
    """Parameters after each step, the diagnostics and the preconditioners to 1e-9."""
    params, diag, ref_params, ref_diag, ref_pre = got["params"], got["diagnostics"], *want
    assert len(got["preconditioner"]) == len(ref_pre)
    for a, b in zip(got["preconditioner"], ref_pre):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg="preconditioner")
    assert len(params) == len(ref_params)
    for step, (ours, theirs) in enumerate(zip(params, ref_params)):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg=f"step {step + 1}")
    assert diag.keys() == ref_diag.keys()
    for key in diag:
        assert diag[key] == pytest.approx(ref_diag[key], rel=0, abs=TOL), key


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process_on_the_whole_batch(two_ranks, name):
    want = reference(name)
    for got in two_ranks:
        assert_equal_runs(got[name], want)
    moved = [not torch.equal(a, b) for a, b in zip(want[0][-1], build().parameters())]
    assert all(moved)


@pytest.mark.parametrize("name", list(CASES))
def test_resume_is_bit_identical(two_ranks, name):
    for got in two_ranks:
        assert got[name]["resume_memory"], "state_dict/load_state_dict"
        assert got[name]["resume_dcp"], "torch.distributed.checkpoint"
        if name in FQN_CASES:
            assert got[name]["resume_fqn"], "get/set_optimizer_state_dict"


def test_diagnostics_are_global(two_ranks):
    """The diagnostics reduce over the shards: nontrivial values, equal to one process's."""
    for got in two_ranks:
        assert 0 < got["AGD"]["diagnostics"]["sgd_fraction"] < 1
        # clipped to max_norm by the global norm (a rank's own norm would clip to less)
        assert got["WSAM"]["diagnostics"]["grad"] == pytest.approx(0.3, abs=1e-5)
        assert got["SALA"]["diagnostics"]["distance"] > 0


def test_fsdp1_and_partial_placements_are_refused(two_ranks):
    for got in two_ranks:
        for key, message in got["refusals"].items():
            assert "fully_shard" in message, (key, message)


def test_grad_scaler_overflow_on_one_rank_skips_the_step_on_every_rank(two_ranks):
    want = reference("SAM", steps=1)[0][0]
    for got in two_ranks:
        got = got["grad_scaler"]
        for a, b in zip(got["params"][0], want):   # the scale 2^10 unscales exactly
            torch.testing.assert_close(a, b, rtol=0, atol=TOL)
        assert all(torch.equal(a, b) for a, b in zip(*got["params"]))
        assert got["scales"] == [2.0 ** 10, 2.0 ** 9] and got["n_steps"] == 1


def test_the_collective_device_follows_the_backend(monkeypatch):
    """NCCL reduces CUDA tensors only: the overflow flag goes to the gradients' device there
    (meta stands in for a GPU here); gloo and a cpu:gloo pair take the CPU."""
    from optim._sam_base import collective_device

    grads = [torch.zeros(2), torch.zeros(2, device="meta")]
    for backend, want in (("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("nccl", "meta")):
        monkeypatch.setattr(dist, "get_backend", lambda *a, b=backend, **k: b)
        assert collective_device(grads).type == want, backend
    assert collective_device(grads[:1]).type in ("cpu", "cuda")   # nccl without a GPU grad


@pytest.mark.parametrize("name", TP_CASES)
def test_tensor_parallel_equals_one_process(two_ranks, name):
    want = reference(name, hidden=TP_HIDDEN)
    for got in two_ranks:
        result = got["tensor_parallel"][name]
        assert not isinstance(result, str), result
        assert_equal_runs(result, want)


def test_four_ranks(tmp_path):
    """4 ranks: the [3, 7] weight and [3] bias leave one rank an empty piece."""
    names = ["NDAdam", "WSAM"]
    for got in spawn(tmp_path, 4, names, extras=False):
        for name in names:
            assert_equal_runs(got[name], reference(name))
