"""GPT-NeoX (``gpt_neox``: Pythia, GPT-NeoX-20B, ...): partial rotary, LayerNorm, GELU MLP, fused ``q k v``.

Rules (method.md sections 1-2): the identity rule on every LayerNorm and on the MLP activation, the ``"lrp"``
attention, and with ``positional=True`` per-layer ``(cos, sin)`` leaves. Only the first ``rotary_ndims =
head_size * partial_rotary_factor`` channels of each head rotate (method.md "Rotary variants"): the rotary
leaves record the width of cos at every forward pass, so the 1/2 of the uniform rule reaches those channels
only and the pass-through channels keep the full AttnLRP factor. Both block layouts are covered:
``use_parallel_residual=True`` (``x + attn(ln1(x)) + mlp(ln2(x))``) and ``False`` (sequential): the
residual sums are epsilon-rule additions, nothing to attach.
"""

from __future__ import annotations

from ..positions import Rotary
from .base import Adapter, register_adapter
from .llama import DECODER_INPUTS
from .norms import layer_norm

#: 4 heads of 8 channels, half of them rotary: a whole-head 1/2 would be visibly wrong
TINY_PARTIAL_ROTARY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 97,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "num_labels": 3,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
}

GPT_NEOX = register_adapter(
    Adapter(
        model_types=("gpt_neox",),
        name="gpt_neox",
        layers="layers",
        attention="attention",
        embeddings={"embed_in": ("token",)},
        positions=Rotary(),
        norms={"LayerNorm": layer_norm},
        modules=(
            "GPTNeoXForCausalLM",
            "GPTNeoXForSequenceClassification",
            "GPTNeoXModel",
            "GPTNeoXLayer",
            "GPTNeoXAttention",
            "GPTNeoXMLP",
            "GPTNeoXRotaryEmbedding",
        ),
        inputs=DECODER_INPUTS,
        heads=("causal_lm", "sequence_classification"),
        tiny=TINY_PARTIAL_ROTARY,
    )
)
