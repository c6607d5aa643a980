"""BioGPT (``biogpt``): learned absolute positions with an offset of 2, ``sqrt(hidden)`` embedding scale, pre-LN
blocks, GELU MLP, attention through transformers' attention interface.

Rules (method.md sections 1-2): the epsilon rule on every linear map, the identity rule on every LayerNorm and
on the activation, the ``"lrp"`` attention. Leaves at ``e = embed_tokens(ids) + embed_positions(pos)``:
``"token"`` (the output of ``BioGptScaledWordEmbedding``, the scale included: a constant scaling, nothing to
change) and ``"position"`` (the output of ``BioGptLearnedPositionalEmbedding``, the row ``pos + 2`` of its
table). As for OPT, hf_pelrp passes counted ``position_ids`` (real tokens of each row from 0), so a left-padded
row sees the positions of the row alone.
"""

from __future__ import annotations

from ..inputs import TextInputs
from ..positions import Additive
from .base import Adapter, register_adapter
from .norms import layer_norm

BIOGPT = register_adapter(
    Adapter(
        model_types=("biogpt",),
        name="biogpt",
        layers="layers",
        attention="self_attn",
        embeddings={"embed_tokens": ("token",)},
        positions=Additive({"embed_positions": "position"}, description="learned absolute (offset 2)"),
        norms={"LayerNorm": layer_norm},
        modules=(
            "BioGptForCausalLM",
            "BioGptForSequenceClassification",
            "BioGptModel",
            "BioGptDecoderLayer",
            "BioGptAttention",
        ),
        inputs=TextInputs(position_ids="count", max_positions=lambda c: c.max_position_embeddings),
        heads=("causal_lm", "sequence_classification"),
        tiny={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 97,
            "max_position_embeddings": 64,
            "scale_embedding": True,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "num_labels": 3,
        },
    )
)
