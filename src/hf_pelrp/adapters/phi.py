"""Phi (``phi``: Phi-1, Phi-1.5, Phi-2): partial rotary, parallel blocks, optional q / k LayerNorms.

Rules (method.md sections 1-2): the identity rule on every LayerNorm (the block's single input LayerNorm,
the final one, and with ``qk_layernorm=True`` the per-head q / k LayerNorms before the rotation) and on the
MLP activation, the ``"lrp"`` attention, and with ``positional=True`` per-layer ``(cos, sin)`` leaves on the
first ``head_dim * partial_rotary_factor`` channels of each head only (method.md "Rotary variants"). The
block is parallel, ``x + attn(ln(x)) + mlp(ln(x))``: one LayerNorm output feeds two branches, whose
relevances add up at the LayerNorm (plain gradient accumulation), and the residual sum is an epsilon-rule
addition. The linear biases (the LM head's included) absorb their share, as for every epsilon-rule layer.
"""

from __future__ import annotations

from ..positions import Rotary
from .base import Adapter, register_adapter
from .gpt_neox import TINY_PARTIAL_ROTARY
from .llama import DECODER_INPUTS
from .norms import layer_norm

PHI = register_adapter(
    Adapter(
        model_types=("phi",),
        name="phi",
        layers="layers",
        attention="self_attn",
        embeddings={"embed_tokens": ("token",)},
        positions=Rotary(),
        norms={"LayerNorm": layer_norm},
        modules=(
            "PhiForCausalLM",
            "PhiForSequenceClassification",
            "PhiModel",
            "PhiDecoderLayer",
            "PhiAttention",
            "PhiMLP",
            "PhiRotaryEmbedding",
        ),
        inputs=DECODER_INPUTS,
        heads=("causal_lm", "sequence_classification"),
        tiny={**TINY_PARTIAL_ROTARY, "num_key_value_heads": 2, "qk_layernorm": True},
    )
)
