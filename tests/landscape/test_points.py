"""The point evaluators (stacked, vmap, loop) agree; chunk planning and the sharing of points
between ranks are pure functions, checked here on numbers worked out by hand."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from analysis import preserved, supervised
from landscape import random_direction, stacked
from landscape.points import (CPU_TENSOR_BYTES, ChunkPlan, Footprint, LoopedPoints,
                              MIN_CPU_CHUNK, StackedPoints, VmappedPoints, owned_points,
                              plan_chunks, point_chunks)
from tests.oracles import assert_unchanged, classification_data, mlp, snapshot

CE = supervised(nn.CrossEntropyLoss())


def test_the_three_evaluators_give_each_points_loss():
    model = mlp()
    x, y = classification_data(n=9)
    d = random_direction(model, seed=3)
    origin = {n: p.detach().clone() for n, p in model.named_parameters()}
    vectors = [origin, d]
    parts = {n: [(j, v[n]) for j, v in enumerate(vectors) if n in v] for n in origin}
    cs = torch.tensor([[1.0, -0.5], [1.0, 0.0], [1.0, 0.25]], dtype=torch.float64)
    want = []
    for a in cs[:, 1].tolist():
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in moved.named_parameters():
                p.add_(a * d[n])
        want.append(CE(moved.eval(), (x, y)).item())
    plan = stacked.sequential_plan(model, CE, parts)
    snap = snapshot(model)
    with preserved(model, "eval"), torch.no_grad():
        for evaluator in (StackedPoints(plan, 2, cs.device), VmappedPoints(model, CE, parts),
                          LoopedPoints(model, CE, vectors, parts)):
            got = evaluator(cs, (x, y))
            assert got.shape == (3,), evaluator.kind
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, err_msg=evaluator.kind)
    assert_unchanged(model, snap)


def test_chunks_hold_what_fits_in_max_memory():
    fp = Footprint(weights=1000, activations=2000, largest=100)
    # three copies of the weights and one forward's activations per point: 50000 // 5000
    assert plan_chunks(100, "vmap", fp, max_memory=50_000) == ChunkPlan(10, 10, "vmap")
    assert plan_chunks(100, "loop", fp, max_memory=50_000, cpu=True) == ChunkPlan(10, 10, "loop")
    assert plan_chunks(3, "vmap", fp, max_memory=50_000) == ChunkPlan(3, 3, "vmap")
    assert plan_chunks(100, "vmap", fp, max_memory=10) == ChunkPlan(1, 1, "vmap")
    # a chunk_size given: nothing sized, also on a CPU
    assert plan_chunks(100, "vmap", None, chunk_size=7, cpu=True) == ChunkPlan(7, 7, "vmap")


def test_stacked_chunks_hold_one_groups_weights():
    big = stacked.GROUP_ACTIVATION_BYTES // 2  # two points' activations per CPU group
    fp = Footprint(weights=1000, activations=2000, largest=big)
    assert plan_chunks(100, "stacked", fp, max_memory=50_000) == ChunkPlan(50, 10, "stacked")
    assert plan_chunks(100, "stacked", fp, max_memory=50_000, cpu=True) == \
        ChunkPlan(50, 2, "stacked")
    assert plan_chunks(30, "stacked", fp, max_memory=50_000) == ChunkPlan(30, 10, "stacked")


def test_cpu_vmap_keeps_each_tensor_small_or_loops():
    fp = Footprint(weights=1, activations=1, largest=CPU_TENSOR_BYTES // MIN_CPU_CHUNK)
    assert plan_chunks(100, "vmap", fp, cpu=True) == ChunkPlan(MIN_CPU_CHUNK, 100, "vmap")
    assert plan_chunks(100, "vmap", fp) == ChunkPlan(100, 100, "vmap")  # not on a CPU
    wide = Footprint(weights=1, activations=1, largest=CPU_TENSOR_BYTES // MIN_CPU_CHUNK + 1)
    assert plan_chunks(100, "vmap", wide, cpu=True).evaluator == "loop"
    assert plan_chunks(MIN_CPU_CHUNK - 1, "vmap", wide, cpu=True) == \
        ChunkPlan(MIN_CPU_CHUNK - 1, MIN_CPU_CHUNK - 1, "vmap")  # all the points fit
    huge = Footprint(weights=1, activations=1, largest=2 * CPU_TENSOR_BYTES)
    assert plan_chunks(100, "vmap", huge, cpu=True, forced=True) == ChunkPlan(1, 100, "vmap")


@pytest.mark.parametrize("share", [1, 2, 3])
def test_ranks_share_every_chunk_point_by_point(share):
    todo = np.arange(3, 13)
    chunks = point_chunks(todo, 2, share)
    assert [len(c) for c in chunks] == [2 * share] * (10 // (2 * share)) + \
        ([10 % (2 * share)] if 10 % (2 * share) else [])
    np.testing.assert_array_equal(np.concatenate(chunks), todo)
    for chunk in chunks:
        masks = np.stack([owned_points(len(chunk), share, me) for me in range(share)])
        assert (masks.sum(0) == 1).all()  # every point on exactly one rank
        assert masks.sum(1).max() - masks.sum(1).min() <= 1
    assert owned_points(6, 3, 1).tolist() == [False, True, False, False, True, False]
