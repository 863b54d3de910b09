"""Forward passes that write to the weights (issue 31): every routine leaves the model as found.

``nn.Embedding(max_norm=1)`` renormalises the rows it looks up, in place, in every forward;
the determinism check and the curvature routines (no weight snapshot) left them renormalised,
and a Tracker then changed training.
"""
import pytest
import torch
from torch import nn

from analysis import Tracker, hessian_trace, top_eigenvalues, worst_case_sharpness
from analysis.core import mean_loss, supervised
from landscape import plane, random_direction
from tests.oracles import assert_unchanged, snapshot


class Bag(nn.Module):
    """Token ids [N, 4] -> class logits [N, 3] through an Embedding(max_norm=1)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 5, max_norm=1.0, dtype=torch.float64)
        with torch.no_grad():
            self.embed.weight.mul_(3.0)  # every row longer than max_norm
        self.head = nn.Linear(5, 3, dtype=torch.float64)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids).mean(1)))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 16, (6, 4), generator=g), torch.randint(0, 3, (6,), generator=g))
            for _ in range(2)]


LOSS = supervised(nn.CrossEntropyLoss())
ROUTINES = {
    "mean_loss": lambda m: mean_loss(m, LOSS, _data(), progress=False),
    "top_eigenvalues": lambda m: top_eigenvalues(m, LOSS, _data(), progress=False, max_hvp=8),
    "hessian_trace": lambda m: hessian_trace(m, LOSS, _data(), n_hvp=8, progress=False),
    "plane": lambda m: plane(m, LOSS, _data(), random_direction(m, seed=1),
                             random_direction(m, seed=2), [-0.1, 0.1], [0.0], progress=False),
    "worst_case_sharpness": lambda m: worst_case_sharpness(m, LOSS, _data(), steps=2,
                                                           progress=False),
}


@pytest.mark.parametrize("name", sorted(ROUTINES))
def test_renormalising_embedding_left_as_found(name):
    model = Bag()
    snap = snapshot(model)
    ROUTINES[name](model)
    assert_unchanged(model, snap)


def _train(with_tracker: bool) -> dict:
    model = Bag()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = Tracker(model, LOSS, every=1, eval_data=_data(1), curvature_data=_data(2),
                      lambda_max=True, lanczos_max_hvp=6) if with_tracker else None
    for batch in _data(3) * 2:
        optimizer.zero_grad()
        LOSS(model, batch).backward()
        optimizer.step()
        if tracker is not None:
            tracker.step(optimizer)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_tracker_leaves_training_bit_identical():
    plain, tracked = _train(False), _train(True)
    for name in plain:
        assert torch.equal(plain[name], tracked[name]), name
