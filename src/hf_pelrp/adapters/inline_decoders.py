"""Models with additive positions whose attention is written inline (no call of transformers' attention
interface): ``gpt_neo`` and ``megatron-bert``.

Their attention modules compute ``softmax(c q k^T + m) v`` themselves (GPT-Neo without the ``1 / sqrt(d)``
scale, in float32), so the ``"lrp"`` attention never runs. :func:`projection_factors` gives exactly its factors with hooks on the separate
q, k, v projections (method.md 1: AttnLRP q and k ``1/4``, v ``1/2``; CP-LRP q and k 0, v 1): each factor is a
constant on the path from the projection to the scores, as the ``"lrp"`` attention applies it on q, k and v.
The softmax keeps its Gradient x Input rule (AttnLRP Prop. 3.1). No positional tensor acts inside attention.

- ``gpt_neo``: learned absolute ``wte + wpe`` (``token``, ``position``; ``segment`` when ``token_type_ids`` are
  given, embedded with the token table as GPT-2 does); local (windowed) and global layers differ only in the
  causal mask. The flash-attention class is not declared (refused by name).
- ``megatron-bert``: the BERT layout (word + token-type + learned position: ``token``, ``segment``,
  ``position``) with pre-LN blocks and a final LayerNorm; its self-attention (``query``, ``key``, ``value``,
  scaled by ``1 / sqrt(d)``) gets the same factors. Heads as for BERT, plus ``MegatronBertForCausalLM``;
  cross-attention layers are refused.

XGLM (inline attention of the same kind, sinusoidal positions) is not declared: its attention does not run in
float64 in transformers 5.25 (``torch.full((), finfo(float64).min)`` in a float32 tensor, modeling_xglm.py:213),
so check_adapter cannot prove a declaration.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..config import LRPConfig
from ..hooks import HookRule, LeafStore, OutputGradient
from ..inputs import TextInputs
from ..positions import Additive
from .base import Adapter, register_adapter
from .bert import bert_like
from .electra import no_cross_attention
from .norms import layer_norm


def projection_factors(
    layers_path: str, attention_path: str, names: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")
):
    """``extra_rules`` giving the inline attention at ``attention_path`` of each block (``layers_path`` in the base
    model) the factors of the ``"lrp"`` attention on the outputs of its q, k and v projections (``names``)."""

    def rules(model: nn.Module, config: LRPConfig, store: LeafStore) -> list[tuple[nn.Module, HookRule]]:
        out: list[tuple[nn.Module, HookRule]] = []
        q, k, v = names
        for block in model.base_model.get_submodule(layers_path):
            attention = block.get_submodule(attention_path)
            out.append((attention.get_submodule(q), OutputGradient(config.qk_factor)))
            out.append((attention.get_submodule(k), OutputGradient(config.qk_factor)))
            out.append((attention.get_submodule(v), OutputGradient(config.v_factor)))
        return out

    return rules


GPT_NEO = register_adapter(
    Adapter(
        model_types=("gpt_neo",),
        name="gpt_neo",
        layers="h",
        attention="attn.attention",
        embeddings={"wte": ("token", "segment")},
        positions=Additive({"wpe": "position"}),
        norms={"LayerNorm": layer_norm},
        modules=(
            "GPTNeoForCausalLM",
            "GPTNeoForSequenceClassification",
            "GPTNeoModel",
            "GPTNeoBlock",
            "GPTNeoAttention",
            "GPTNeoSelfAttention",
            "GPTNeoMLP",
        ),
        inputs=TextInputs(
            position_ids="count", max_positions=lambda c: c.max_position_embeddings, token_types="vocab_size"
        ),
        heads=("causal_lm", "sequence_classification"),
        extra_rules=projection_factors("h", "attn.attention"),
        attention_interface=False,
        tiny={
            "hidden_size": 32,
            "num_layers": 2,
            "attention_types": [[["global", "local"], 1]],
            "num_heads": 4,
            "window_size": 3,
            "intermediate_size": 64,
            "vocab_size": 97,
            "max_position_embeddings": 64,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 1,
            "num_labels": 3,
        },
    )
)

MEGATRON_BERT = register_adapter(
    dataclasses.replace(
        bert_like(
            ("megatron-bert",),
            "MegatronBert",
            modules=("MegatronBertForCausalLM",),
            name="megatron-bert",
            extra_rules=projection_factors("encoder.layer", "attention.self", ("query", "key", "value")),
            attention_interface=False,
        ),
        heads=("sequence_classification", "masked_lm", "causal_lm"),
        checks=(no_cross_attention,),
    )
)
