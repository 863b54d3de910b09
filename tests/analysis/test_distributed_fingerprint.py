"""The rank fingerprint covers the model's structure (activations, also functional ones), the
exact values of its parameters and buffers, and tensor arguments such as ``v0``: models or
vectors that differ only by a permutation, a BatchNorm statistic or an activation raise on
every rank, naming what differs (two gloo ranks on CPU)."""
import copy
import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from analysis import top_eigenvalues
from analysis.core import collective_timeout, fingerprint, set_collective_timeout
from tests.oracles import classification_data, cnn_bn, mlp, SmallCNN, uneven_batches
from tests.ranks import spawn


class TanhCNN(SmallCNN):
    """SmallCNN with tanh for relu in ``forward``: the same repr, parameters and buffers."""

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x.unsqueeze(1))))
        return self.fc(h.flatten(1))


TanhCNN.__name__ = TanhCNN.__qualname__ = "SmallCNN"
TanhCNN.__module__ = SmallCNN.__module__


def variants() -> dict:
    """The model and ``v0`` of rank 0, and models and vectors that differ from them subtly."""
    model = cnn_bn(12)
    n = sum(p.numel() for p in model.parameters())
    v0 = torch.linspace(-1.0, 2.0, n, dtype=torch.float64)
    permuted, buffers = copy.deepcopy(model), copy.deepcopy(model)
    tanh = TanhCNN(12).to(torch.float64)
    with torch.no_grad():
        permuted.fc.weight.copy_(permuted.fc.weight[[1, 0, 2]])  # same sums, sums of squares
        buffers.bn.running_mean.copy_(buffers.bn.running_mean.flip(0))
        tanh.load_state_dict(model.state_dict())
    return {"model": model, "v0": v0, "permuted": permuted, "buffers": buffers,
            "activation": tanh, "permuted_v0": v0.flip(0)}


def test_fingerprint_sees_values_buffers_and_structure():
    cases = variants()
    same = fingerprint(cases["model"])
    assert fingerprint(copy.deepcopy(cases["model"])) == same
    for key in ("permuted", "buffers", "activation"):
        assert fingerprint(cases[key]) != same, key
    assert fingerprint(cases["permuted_v0"]) != fingerprint(cases["v0"])
    assert fingerprint(mlp(act=nn.ReLU)) != fingerprint(mlp(act=nn.Tanh))  # same parameters


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=20))
    set_collective_timeout(10)
    try:
        data = uneven_batches(*classification_data(n=23, d=12), (7, 3, 9, 4))
        shard = data[:3] if rank == 0 else data[3:]
        cases, errors = variants(), {}
        for key in ("permuted", "buffers", "activation", "permuted_v0"):
            model = cases[key] if rank == 1 and key != "permuted_v0" else cases["model"]
            v0 = cases["permuted_v0"] if rank == 1 and key == "permuted_v0" else cases["v0"]
            try:
                top_eigenvalues(model, ce, shard, v0=v0, max_hvp=3, progress=False)
                errors[key] = ""
            except ValueError as err:
                errors[key] = str(err)
        with open(os.path.join(out, f"errors{rank}.json"), "w") as fh:
            json.dump(errors, fh)
    finally:
        dist.destroy_process_group()


def test_models_and_vectors_that_differ_subtly_raise_on_every_rank(tmp_path):
    spawn(_worker, (2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)))
    errors = [json.loads((tmp_path / f"errors{r}.json").read_text()) for r in range(2)]
    assert errors[0] == errors[1]
    expected = {"permuted": "model's parameter values must be the same on every rank",
                "buffers": "model's buffers (e.g. BatchNorm statistics) must be the same",
                "activation": "model's structure (layers, activations, forward code) must be",
                "permuted_v0": "v0 must be the same on every rank"}
    for key, start in expected.items():
        assert errors[0][key].startswith(start), (key, errors[0][key])


PROBE = """
import pytest
import torch
from torch import nn
from analysis.core import fingerprint

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x) if "relu" in {"relu", "gelu", "tanh", "silu", "elu"} else x

torch.manual_seed(0)
print(fingerprint(M()))
"""


def test_fingerprint_does_not_depend_on_the_string_hash_seed():
    """Each rank is a process with its own hash seed (sets in ``forward``'s constants)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    prints = {subprocess.run([sys.executable, "-c", PROBE], cwd=root, check=True, text=True,
                             capture_output=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout
              for seed in ("1", "2")}
    assert len(prints) == 1, prints


def test_collective_timeout_setting():
    assert set_collective_timeout(2.5) is None
    assert collective_timeout() == 2.5
    for bad in (0, -1.0, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ValueError, match="seconds must be None or a positive"):
            set_collective_timeout(bad)
    assert set_collective_timeout(None) == 2.5 and collective_timeout() is None
