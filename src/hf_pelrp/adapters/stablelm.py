"""StableLM (``stablelm``: StableLM-3B-4E1T, StableLM-2): partial rotary, LayerNorm, SiLU-gated MLP, options.

Rules (method.md sections 1-2): the identity rule on every LayerNorm and on the gate activation, the uniform
rule on ``act(gate) * up``, the ``"lrp"`` attention, and with ``positional=True`` per-layer ``(cos, sin)``
leaves on the first ``head_dim * partial_rotary_factor`` channels of each head only (method.md "Rotary
variants"). The configuration options are covered: ``qk_layernorm=True`` normalises q and k with one
bias-free LayerNorm per head (``StableLmLayerNormPerHead`` only splits the heads and concatenates them
again: nothing to attach besides the identity rule on each LayerNorm), ``use_parallel_residual=True`` runs
attention and MLP in parallel on one LayerNorm output (an epsilon-rule residual sum), and ``use_qkv_bias``
adds biases that absorb their share.
"""

from __future__ import annotations

from ..positions import Rotary
from .base import Adapter, GatedProduct, register_adapter
from .gpt_neox import TINY_PARTIAL_ROTARY
from .llama import DECODER_INPUTS
from .norms import layer_norm

STABLELM = register_adapter(
    Adapter(
        model_types=("stablelm",),
        name="stablelm",
        layers="layers",
        attention="self_attn",
        embeddings={"embed_tokens": ("token",)},
        positions=Rotary(),
        norms={"LayerNorm": layer_norm},
        modules=(
            "StableLmForCausalLM",
            "StableLmForSequenceClassification",
            "StableLmModel",
            "StableLmDecoderLayer",
            "StableLmAttention",
            "StableLmMLP",
            "StableLmRotaryEmbedding",
            "StableLmLayerNormPerHead",
        ),
        gated=(GatedProduct(act="mlp.act_fn", up="mlp.up_proj"),),
        inputs=DECODER_INPUTS,
        heads=("causal_lm", "sequence_classification"),
        tiny={**TINY_PARTIAL_ROTARY, "num_key_value_heads": 2, "qk_layernorm": True, "use_qkv_bias": True},
    )
)
