"""GPT-2 (``gpt2``): learned absolute positions ``wte + wpe``, LayerNorm, NewGELU MLP, fused ``c_attn``.

Rules (method.md sections 1-2): the ``Conv1D`` layers follow the epsilon rule (plain Gradient x Input, nothing
to attach), the identity rule on every LayerNorm and on the MLP activation, the ``"lrp"`` attention, and at
``e = wte(ids) + wpe(pos) (+ wte(token_type_ids))`` the leaves ``"token"``, ``"position"`` (with
``positional=True``; otherwise a constant whose relevance the conservation gap shows) and ``"segment"``
(GPT-2 embeds optional ``token_type_ids`` with its token table ``wte``: the table's second call).
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..inputs import TextInputs
from ..positions import Additive
from .base import Adapter, register_adapter
from .norms import layer_norm


def _no_cross_attention(model: nn.Module) -> None:
    if getattr(model.config, "add_cross_attention", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} has cross-attention layers (add_cross_attention=True, e.g. the decoder of an "
            "EncoderDecoderModel): relevance flowing into encoder_hidden_states would be lost and conservation "
            "broken. hf_pelrp supports GPT-2 as a stand-alone decoder; load it without add_cross_attention."
        )


GPT2 = register_adapter(
    Adapter(
        model_types=("gpt2",),
        name="gpt2",
        layers="h",
        attention="attn",
        embeddings={"wte": ("token", "segment")},
        positions=Additive({"wpe": "position"}),
        norms={"LayerNorm": layer_norm},
        modules=(
            "GPT2LMHeadModel",
            "GPT2ForSequenceClassification",
            "GPT2Model",
            "GPT2Block",
            "GPT2Attention",
            "GPT2MLP",
        ),
        inputs=TextInputs(
            position_ids="count", max_positions=lambda c: c.n_positions, token_types="vocab_size"
        ),
        heads=("causal_lm", "sequence_classification"),
        checks=(_no_cross_attention,),
        tiny={
            "n_embd": 32,
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
