"""OPT (``opt``): learned absolute positions with an offset of 2, optional ``project_in`` / ``project_out``
between ``word_embed_proj_dim`` and ``hidden_size``, pre-LN (``do_layer_norm_before=True``, most checkpoints)
or post-LN (OPT-350m) blocks, ReLU MLP.

Rules (method.md sections 1-2): the epsilon rule on every linear map (the projections included: nothing to
attach), the identity rule on every LayerNorm (with or without elementwise affine parameters) and on the
activation, the ``"lrp"`` attention (OPT scales the query by ``head_dim ** -0.5`` before the attention call:
a constant factor, nothing to do). Leaves at ``e = project_in(embed_tokens(ids)) + embed_positions(pos)``:
``"token"`` (the token embedding, before ``project_in``) and ``"position"`` (the output of
``OPTLearnedPositionalEmbedding``, the row ``pos + 2`` of its table).

Positions: OPT numbers the real tokens of each row from 0 (``cumsum`` of the attention mask, then ``+ 2``);
hf_pelrp passes the same counted ``position_ids`` explicitly, so a left-padded row sees the positions of the row
alone.
"""

from __future__ import annotations

from ..inputs import TextInputs
from ..positions import Additive
from .base import Adapter, register_adapter
from .norms import layer_norm

OPT = register_adapter(
    Adapter(
        model_types=("opt",),
        name="opt",
        layers="decoder.layers",
        attention="self_attn",
        embeddings={"decoder.embed_tokens": ("token",)},
        positions=Additive(
            {"decoder.embed_positions": "position"}, description="learned absolute (offset 2)"
        ),
        norms={"LayerNorm": layer_norm},
        modules=(
            "OPTForCausalLM",
            "OPTForSequenceClassification",
            "OPTModel",
            "OPTDecoder",
            "OPTDecoderLayer",
            "OPTAttention",
        ),
        inputs=TextInputs(position_ids="count", max_positions=lambda c: c.max_position_embeddings),
        heads=("causal_lm", "sequence_classification"),
        tiny={
            "hidden_size": 32,
            "ffn_dim": 64,
            "word_embed_proj_dim": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 97,
            "max_position_embeddings": 64,
            "pad_token_id": 1,
            "bos_token_id": 2,
            "eos_token_id": 2,
            "num_labels": 3,
        },
    )
)
