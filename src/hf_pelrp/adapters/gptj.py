"""GPT-J (``gptj``): interleaved partial rotary, LayerNorm, parallel blocks, GELU MLP.

Rules (method.md sections 1-2): the identity rule on every LayerNorm and on the MLP activation, the ``"lrp"``
attention, and with ``positional=True`` per-layer rotary leaves. GPT-J rotates the pairs (0, 1), (2, 3), ...
of the first ``rotary_dim`` channels of each head (``rotate_every_two``), passes its pair as ``(sin, cos)``
and gives them ``rotary_dim / 2`` channels, repeated inside the model (``repeat_interleave``): the leaves are
those narrow tensors, so each one collects the relevance of both channels of its pair, and the 1/2 of the
uniform rule reaches the ``rotary_dim`` rotated channels only (method.md "Rotary variants"). The positions
are a fixed sinusoidal table of ``n_positions`` rows. GPT-J embeds optional ``token_type_ids`` with its token
table, as GPT-2 does: they become the ``"segment"`` leaf.
"""

from __future__ import annotations

from ..inputs import TextInputs
from ..positions import Rotary
from .base import Adapter, register_adapter
from .norms import layer_norm

GPTJ = register_adapter(
    Adapter(
        model_types=("gptj",),
        name="gptj",
        layers="h",
        attention="attn",
        embeddings={"wte": ("token", "segment")},
        positions=Rotary(names=("sin", "cos"), layout="interleaved"),
        norms={"LayerNorm": layer_norm},
        modules=(
            "GPTJForCausalLM",
            "GPTJForSequenceClassification",
            "GPTJModel",
            "GPTJBlock",
            "GPTJAttention",
            "GPTJMLP",
            "GPTJRotaryEmbedding",
        ),
        inputs=TextInputs(
            position_ids="count", max_positions=lambda c: c.n_positions, token_types="vocab_size"
        ),
        heads=("causal_lm", "sequence_classification"),
        tiny={
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "rotary_dim": 4,
            "vocab_size": 97,
            "n_positions": 64,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 1,
            "num_labels": 3,
        },
    )
)
