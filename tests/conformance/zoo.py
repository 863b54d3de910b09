"""The held-out model zoo: tiny float64 models of architectures the project was not tuned on.

Each entry builds ``Case(model, loss_fn, data, model_mode, reference)`` from a seed: random
weights, nothing downloaded (Hugging Face models from configs). The models hold a few hundred
parameters so that dense float64 references are cheap. ``reference`` says how the dense
Hessian of a case is computed by the tests: ``"func"`` (``torch.func.hessian`` on the flat
parameters) or ``"fd"`` (central differences of autograd gradients) where torch.func cannot
transform the model or its own derivative is not trusted (PyTorch's fused weight norm).
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import pack_padded_sequence

from analysis import split_loss, supervised

DT = torch.float64


@dataclass
class Case:
    """One zoo entry.

    Attributes:
        model: The model, float64.
        loss_fn: ``loss_fn(model, batch)``, declaring its split (GGN, empirical Fisher).
        data: Two uneven batches.
        model_mode: The mode the routines are run in.
        reference: ``"func"`` or ``"fd"`` (module docstring).
        positions: Observations per datum of the criterion (sequence positions; 1 for [N, C]).
    """

    model: nn.Module
    loss_fn: Callable
    data: list
    model_mode: str = "eval"
    reference: str = "func"
    positions: int = 1


def _gen(seed: int = 100) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sequence_ce(outputs, batch):
    """Cross-entropy of ``[N, V, T]`` logits against ``[N, T]`` labels."""
    return F.cross_entropy(outputs, batch["labels"])


# -- Hugging Face ------------------------------------------------------------------------
def _rms_norm(self, h):
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _top_k_router(self, h):
    logits = F.linear(h.reshape(-1, self.hidden_dim), self.weight)
    top, index = logits.softmax(-1).topk(self.top_k, dim=-1)
    return logits, top / top.sum(-1, keepdim=True), index


def in_float64(model: nn.Module) -> nn.Module:
    """The model with its float32 islands computed in its own dtype.

    Hugging Face's RMSNorm (T5LayerNorm) and Mixtral's router take their statistics and
    softmax in float32 whatever the model's dtype, so a "float64" model is smooth only to
    float32 rounding and no float64 reference can be checked against it to more than about
    1e-7 (finite differences not at all). The same functions, in the model's dtype.
    """
    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm") or kind == "T5LayerNorm":
            module.forward = types.MethodType(_rms_norm, module)
        elif kind.endswith("TopKRouter"):
            module.forward = types.MethodType(_top_k_router, module)
    return model


def _transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers


def t5() -> Case:
    """Encoder-decoder: T5 (relative position buckets, tied output layer, cross-attention)."""
    _transformers()
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=6, d_model=4, d_kv=2, d_ff=4, num_layers=1, num_decoder_layers=1,
                   num_heads=1, relative_attention_num_buckets=4,
                   relative_attention_max_distance=8, dropout_rate=0.0,
                   feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0)
    model = in_float64(T5ForConditionalGeneration(cfg).to(DT).eval())
    gen = _gen()
    data = [{"input_ids": torch.randint(1, 6, (n, 4), generator=gen),
             "decoder_input_ids": torch.randint(1, 6, (n, 3), generator=gen),
             "labels": torch.randint(1, 6, (n, 3), generator=gen)} for n in (2, 1)]

    def forward(model, batch):
        return model(input_ids=batch["input_ids"],
                     decoder_input_ids=batch["decoder_input_ids"]).logits.transpose(1, 2)

    return Case(model, split_loss(forward, _sequence_ce, likelihood="categorical"), data,
                reference="fd", positions=3)


def _causal_lm(model: nn.Module, length: int = 5) -> Case:
    gen = _gen()
    data = []
    for n in (2, 1):
        ids = torch.randint(0, 6, (n, length), generator=gen)
        data.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})

    def forward(model, batch):
        return model(input_ids=batch["input_ids"]).logits.transpose(1, 2)

    return Case(model, split_loss(forward, _sequence_ce, likelihood="categorical"), data,
                reference="fd", positions=length - 1)


def mistral() -> Case:
    """Sliding-window attention: Mistral with a window of 2 on sequences of 4."""
    _transformers()
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=6, hidden_size=4, intermediate_size=4, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=2,
                        max_position_embeddings=16, sliding_window=2, attention_dropout=0.0,
                        tie_word_embeddings=False)
    return _causal_lm(in_float64(MistralForCausalLM(cfg).to(DT).eval()))


def mixtral() -> Case:
    """MoE routing: Mixtral, top-2 of 3 experts per token."""
    _transformers()
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=6, hidden_size=4, intermediate_size=3, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=2,
                        max_position_embeddings=16, num_local_experts=3,
                        num_experts_per_tok=2, router_jitter_noise=0.0, attention_dropout=0.0,
                        tie_word_embeddings=False, experts_implementation="eager")
    return _causal_lm(in_float64(MixtralForCausalLM(cfg).to(DT).eval()))


# -- plain PyTorch -----------------------------------------------------------------------
def _classification(model: nn.Module, shape=(4,), seed: int = 100, **extra) -> Case:
    gen = _gen(seed)
    data = [(torch.randn(n, *shape, generator=gen, dtype=DT),
             torch.randint(0, 3, (n,), generator=gen)) for n in (3, 2)]
    return Case(model.to(DT).eval(), supervised(nn.CrossEntropyLoss()), data, **extra)


class Top2Router(nn.Module):
    """A hand-written mixture of experts: softmax over the top-2 of 3 gate logits."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 3)
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        top, index = self.gate(x).topk(2, dim=-1)
        weight = top.softmax(-1)
        outs = torch.stack([torch.tanh(e(x)) for e in self.experts], 1)  # [N, E, 4]
        chosen = outs.gather(1, index.unsqueeze(-1).expand(-1, -1, 4))
        return self.head((weight.unsqueeze(-1) * chosen).sum(1))


def top2_router() -> Case:
    torch.manual_seed(0)
    return _classification(Top2Router())


def _two_layers() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def orthogonal() -> Case:
    """``parametrizations.orthogonal`` (matrix exponential of a skew matrix)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    nn.utils.parametrizations.orthogonal(model[0])
    return _classification(model)


def spectral_norm() -> Case:
    """``parametrizations.spectral_norm`` (eval mode: the stored power-iteration vectors)."""
    torch.manual_seed(0)
    model = _two_layers().to(DT)
    nn.utils.parametrizations.spectral_norm(model[0])
    model.train()
    with torch.no_grad():  # a few power iterations: u, v away from their random start
        for _ in range(3):
            model(torch.randn(2, 4, dtype=DT))
    return _classification(model)


class Symmetric(nn.Module):
    def forward(self, x):
        return x.triu() + x.triu(1).transpose(-1, -2)


class Positive(nn.Module):
    def forward(self, x):
        return F.softplus(x)


def custom_parametrizations() -> Case:
    """User parametrisations: a symmetric weight, and a bias through two chained ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    parametrize.register_parametrization(model[2], "bias", Positive())
    parametrize.register_parametrization(model[2], "bias", Positive())
    return _classification(model)


def weight_norm() -> Case:
    """``parametrizations.weight_norm`` and the old ``nn.utils.weight_norm`` (fused op)."""
    torch.manual_seed(0)
    model = _two_layers().to(DT)
    nn.utils.parametrizations.weight_norm(model[0])
    with torch.no_grad():
        model[0].parametrizations.weight.original0.mul_(1.5)  # g away from ||v||
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        nn.utils.weight_norm(model[2], dim=None)
    return _classification(model, reference="fd")


class MaskedEncoder(nn.Module):
    """``nn.TransformerEncoder`` with a padding mask; mean pooling over the valid positions."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
        self.enc, self.head = nn.TransformerEncoder(layer, 1), nn.Linear(4, 3)

    def forward(self, x, mask):
        h = self.enc(x, src_key_padding_mask=mask)
        keep = (~mask).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


def transformer_encoder(model_mode: str) -> Callable[[], Case]:
    def build() -> Case:
        torch.manual_seed(0)
        model = MaskedEncoder().to(DT).eval()
        gen = _gen()
        data = []
        for n in (3, 2):
            mask = torch.zeros(n, 5, dtype=torch.bool)
            mask[0, 3:] = True  # left-aligned padding: the nested-tensor fast path in eval
            data.append((torch.randn(n, 5, 4, generator=gen, dtype=DT), mask,
                         torch.randint(0, 3, (n,), generator=gen)))
        loss = split_loss(lambda m, b: m(b[0], b[1]), lambda o, b: F.cross_entropy(o, b[2]),
                          likelihood="categorical")
        return Case(model, loss, data, model_mode=model_mode, reference="fd")
    return build


class PackedRNN(nn.Module):
    """An LSTM or GRU over packed variable-length sequences; the last hidden state's logits."""

    def __init__(self, cell: type):
        super().__init__()
        self.rnn, self.head = cell(3, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)
        return self.head((h[0] if isinstance(h, tuple) else h)[-1])


def packed_rnn(cell: type) -> Callable[[], Case]:
    def build() -> Case:
        torch.manual_seed(0)
        model = PackedRNN(cell).to(DT).eval()
        gen = _gen()
        data = [(torch.randn(3, 4, 3, generator=gen, dtype=DT), torch.tensor([4, 2, 3]),
                 torch.randint(0, 3, (3,), generator=gen)),
                (torch.randn(2, 4, 3, generator=gen, dtype=DT), torch.tensor([1, 4]),
                 torch.randint(0, 3, (2,), generator=gen))]
        loss = split_loss(lambda m, b: m(b[0], b[1]), lambda o, b: F.cross_entropy(o, b[2]),
                          likelihood="categorical")
        return Case(model, loss, data, reference="fd")
    return build


ZOO: dict[str, Callable[[], Case]] = {
    "t5": t5,
    "mistral_sliding_window": mistral,
    "mixtral_moe": mixtral,
    "top2_router": top2_router,
    "orthogonal": orthogonal,
    "spectral_norm": spectral_norm,
    "custom_parametrization": custom_parametrizations,
    "weight_norm": weight_norm,
    "transformer_encoder_eval": transformer_encoder("eval"),
    "transformer_encoder_train": transformer_encoder("train"),
    "lstm_packed": packed_rnn(nn.LSTM),
    "gru_packed": packed_rnn(nn.GRU),
}


def datum(batch: Any, i: int) -> Any:
    """Datum ``i`` of a batch (tuple or dict) as a batch of one."""
    if isinstance(batch, dict):
        return {k: v[i:i + 1] for k, v in batch.items()}
    return tuple(t[i:i + 1] for t in batch)
