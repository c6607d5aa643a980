"""LLaMA-like decoders (``llama``, ``mistral``, ``qwen2``): RMSNorm, SiLU-gated MLP, rotary positions, GQA.

Rules (method.md sections 1-2): identity rule on every RMSNorm and on the gate activation, uniform rule on
``act(gate) * up``, the ``"lrp"`` attention for ``Q K^T`` / ``A V``, and with ``positional=True`` per-layer
``(cos, sin)`` leaves with the 1/2 split at the rotation. :func:`llama_like` is the declaration most decoder
families reuse with their own class prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..inputs import TextInputs, scaled_rotary_limit
from ..positions import PositionalKind, Rotary
from .base import Adapter, GatedProduct, Surrogate, register_adapter
from .norms import rms_norm

#: the tiny configuration check_adapter builds for decoders (GQA: 4 query heads, 2 key-value heads)
TINY_DECODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 97,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "num_labels": 3,
}

DECODER_INPUTS = TextInputs(position_ids="count", max_positions=scaled_rotary_limit)


def decoder_classes(prefix: str, *extra: str) -> tuple[str, ...]:
    """The classes of a LLaMA-layout family: heads, model, block, MLP, attention, rotary embedding."""
    parts = ("ForCausalLM", "ForSequenceClassification", "Model", "DecoderLayer", "MLP", "Attention")
    return tuple(prefix + p for p in parts) + (f"{prefix}RotaryEmbedding", *extra)


def llama_like(
    model_types: tuple[str, ...],
    prefix: str,
    *,
    norms: Mapping[str, Surrogate] | None = None,
    modules: tuple[str, ...] = (),
    positions: PositionalKind | None = None,
    gated: tuple[GatedProduct, ...] = (GatedProduct(act="mlp.act_fn", up="mlp.up_proj"),),
    tiny: Mapping[str, Any] | None = None,
    **fields: Any,
) -> Adapter:
    """A declaration for a family with the LLaMA layout (``model.layers[i].self_attn``, ``.mlp``,
    ``model.embed_tokens``, ``{prefix}RMSNorm``), changed where the family differs."""
    return Adapter(
        model_types=model_types,
        layers="layers",
        attention="self_attn",
        embeddings={"embed_tokens": ("token",)},
        positions=positions if positions is not None else Rotary(),
        norms=norms if norms is not None else {f"{prefix}RMSNorm": rms_norm},
        modules=decoder_classes(prefix, *modules),
        gated=gated,
        inputs=fields.pop("inputs", DECODER_INPUTS),
        heads=fields.pop("heads", ("causal_lm", "sequence_classification")),
        tiny={**TINY_DECODER, **(tiny or {})},
        **fields,
    )


register_adapter(llama_like(("llama",), "Llama", name="llama"))
register_adapter(llama_like(("mistral",), "Mistral", name="mistral"))
register_adapter(llama_like(("qwen2",), "Qwen2", name="qwen2"))
