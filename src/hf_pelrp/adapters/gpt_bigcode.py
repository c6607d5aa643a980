"""GPT-BigCode (``gpt_bigcode``: SantaCoder, StarCoder): the GPT-2 layout with ``nn.Linear`` layers and
multi-query attention (one key / value head shared by all query heads; ``multi_query=False`` gives plain
multi-head attention).

Rules (method.md sections 1-2): the epsilon rule on every linear map (the fused ``c_attn`` included), the
identity rule on every LayerNorm and on the MLP activation, the ``"lrp"`` attention (the shared key / value
head receives the gradient of every query head that reads it: the key side of the position relevance is summed
over the heads sharing it, as for GQA). Leaves at ``e = wte(ids) + wpe(pos) (+ wte(token_type_ids))``:
``"token"``, ``"position"`` (learned absolute) and ``"segment"`` (token types are embedded with the token
table, as in GPT-2). Cross-attention layers are refused.
"""

from __future__ import annotations

from ..inputs import TextInputs
from ..positions import Additive
from .base import Adapter, register_adapter
from .gpt2 import _no_cross_attention
from .norms import layer_norm

GPT_BIGCODE = register_adapter(
    Adapter(
        model_types=("gpt_bigcode",),
        name="gpt_bigcode",
        layers="h",
        attention="attn",
        embeddings={"wte": ("token", "segment")},
        positions=Additive({"wpe": "position"}),
        norms={"LayerNorm": layer_norm},
        modules=(
            "GPTBigCodeForCausalLM",
            "GPTBigCodeForSequenceClassification",
            "GPTBigCodeModel",
            "GPTBigCodeBlock",
            "GPTBigCodeAttention",
            "GPTBigCodeMLP",
        ),
        inputs=TextInputs(
            position_ids="count", max_positions=lambda c: c.max_position_embeddings, token_types="vocab_size"
        ),
        heads=("causal_lm", "sequence_classification"),
        checks=(_no_cross_attention,),
        tiny={
            "n_embd": 32,
            "n_inner": 64,
            "n_layer": 2,
            "n_head": 4,
            "vocab_size": 97,
            "n_positions": 64,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 1,
            "num_labels": 3,
        },
    )
)
