"""The default evaluation on sequence outputs (issue 31).

A declared ``loss_fn.criterion`` was applied to raw ``[N, T, V]`` logits ("Expected target
size [3, 16], got [3, 5]" on T5, DistilBERT, Mistral). Tiny configs, random weights.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis import Tracker
from analysis.metrics import evaluate_metrics

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
V = 16


class TokenLoss:
    """A user's loss declaring its criterion: the token-mean cross-entropy."""

    criterion = nn.CrossEntropyLoss()
    reduction = "mean"

    def __call__(self, model, batch):
        if isinstance(batch, dict):
            return model(**batch).loss
        logits = model(batch[0]).logits
        return self.criterion(logits.flatten(0, 1), batch[1].flatten())


def _ids(n, t, seed):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def _weighted(values, sizes):
    return sum(v * n for v, n in zip(values, sizes)) / sum(sizes)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=V, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0)).eval()
    return model, [{"input_ids": _ids(n, 5, n), "labels": _ids(n, 4, 10 + n)} for n in (3, 2)]


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=V, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)).eval()
    return model, [{"input_ids": _ids(n, 5, n), "labels": _ids(n, 5, n)} for n in (3, 2)]


@pytest.mark.parametrize("build", [_t5, _mistral], ids=["t5", "mistral"])
def test_dict_batches_use_the_models_own_loss(build):
    model, data = build()
    tracker = Tracker(model, TokenLoss(), every=1, eval_data=data, layers=False)
    record = tracker.log()
    with torch.no_grad():
        want = _weighted([float(model(**b).loss) for b in data], [3, 2])
    assert record["train_loss"] == pytest.approx(want, rel=1e-6)
    assert math.isnan(record["train_acc"])


def test_sequence_logits_are_scored_per_token():
    from transformers import DistilBertConfig, DistilBertForMaskedLM
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(
        vocab_size=V, dim=8, n_layers=1, n_heads=2, hidden_dim=16,
        max_position_embeddings=8)).eval()
    data = [(_ids(n, 5, n), _ids(n, 5, 10 + n)) for n in (3, 2)]
    data[0][1][0, :2] = -100  # ignored tokens
    got = evaluate_metrics(model, TokenLoss(), data, progress=False)
    with torch.no_grad():
        losses = [float(TokenLoss()(model, b)) for b in data]
        logits = [model(b[0]).logits for b in data]
    assert got["loss"] == pytest.approx(_weighted(losses, [3, 2]), rel=1e-6)
    accs = [float((lg.argmax(-1) == y)[y != -100].float().mean()) for lg, (_, y) in
            zip(logits, data)]
    assert got["acc"] == pytest.approx(_weighted(accs, [3, 2]), rel=1e-6)


class Causal(nn.Module):
    """Logits [N, T, V] from ``input_ids``; ``labels`` accepted and ignored (no ``.loss``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.out = nn.Embedding(V, 8), nn.Linear(8, V)

    def forward(self, input_ids, labels=None):
        return self.out(torch.tanh(self.embed(input_ids)))


def test_causal_labels_are_shifted():
    model, ids = Causal(), _ids(3, 6, 0)
    loss_fn = TokenLoss()
    got = evaluate_metrics(model, loss_fn, [{"input_ids": ids, "labels": ids}], progress=False)
    with torch.no_grad():
        want = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert got["loss"] == pytest.approx(float(want), rel=1e-6)


def test_a_criterion_refusing_the_shapes_asks_for_eval_fn():
    model = Causal()
    data = [(_ids(3, 6, 0), torch.zeros(3, dtype=torch.long))]  # one target per sequence
    with pytest.raises(ValueError, match=r"logits \[3, 6, 16\].*targets \[3\].*eval_fn"):
        evaluate_metrics(model, TokenLoss(), data, progress=False)
