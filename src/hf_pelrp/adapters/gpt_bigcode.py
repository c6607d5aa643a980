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

import dataclasses

from .base import register_adapter
from .gpt2 import GPT2

# GPT-2's declaration with GPTBigCode's classes, its length limit (max_position_embeddings) and an MLP width
GPT_BIGCODE = register_adapter(
    dataclasses.replace(
        GPT2,
        model_types=("gpt_bigcode",),
        name="gpt_bigcode",
        modules=tuple(name.replace("GPT2", "GPTBigCode") for name in GPT2.modules if "LMHead" not in name)
        + ("GPTBigCodeForCausalLM",),
        inputs=dataclasses.replace(GPT2.inputs, max_positions=lambda c: c.max_position_embeddings),
        tiny={**GPT2.tiny, "n_inner": 64},
    )
)
