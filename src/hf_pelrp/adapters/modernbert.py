"""ModernBERT (``modernbert``): a rotary encoder with alternating global and local (sliding-window) attention,
a GeGLU MLP with a fused input projection, and LayerNorms without bias.

Rules (method.md sections 1-2):

- the epsilon rule on every linear map (the fused ``Wqkv`` and ``Wi`` included), the identity rule on every
  LayerNorm (bias-free or not) and on the activations of the MLP and of the prediction head;
- the GeGLU ``act(input) * gate`` with ``input, gate = Wi(x).chunk(2)``: the FIRST half of ``Wi`` feeds the
  activation, the second half is the linear factor: uniform rule (1/2 each under AttnLRP; CP-LRP makes the
  activated half a constant), declared as ``GatedProduct(act="mlp.act", up="mlp.Wi", up_channels="second_half")``;
- the ``"lrp"`` attention, and per-layer rotary ``(cos, sin)`` leaves (``Rotary()``, half layout, every channel
  of a head rotates). Global and local layers use rotary tables of different bases (160k / 10k); each layer's
  own pair becomes its own leaf, so ``position_by_layer`` shows both kinds. The sliding window is part of the
  attention mask (transformers builds it through the ``"lrp"`` mask function), i.e. a constant of the pass.

The sequence classifier pools the CLS token (``classifier_pooling="cls"``) or the mean over the attention mask
(``"mean"``: a linear map with constant weights, epsilon rule). There is no unpadding in transformers 5's
ModernBERT: padding is masked in attention, and as for the BERT family left padding is moved to the right
internally (positions count from the first real token), so padding gets exactly 0.
"""

from __future__ import annotations

from ..inputs import TextInputs
from ..positions import Rotary
from .base import Adapter, GatedProduct, register_adapter
from .norms import layer_norm

MODERNBERT = register_adapter(
    Adapter(
        model_types=("modernbert",),
        name="modernbert",
        layers="layers",
        attention="attn",
        embeddings={"embeddings.tok_embeddings": ("token",)},
        positions=Rotary(),
        norms={"LayerNorm": layer_norm},
        modules=(
            "ModernBertForSequenceClassification",
            "ModernBertForMaskedLM",
            "ModernBertModel",
            "ModernBertEmbeddings",
            "ModernBertEncoderLayer",
            "ModernBertAttention",
            "ModernBertMLP",
            "ModernBertRotaryEmbedding",
            "ModernBertPredictionHead",
        ),
        gated=(GatedProduct(act="mlp.act", up="mlp.Wi", up_channels="second_half"),),
        inputs=TextInputs(
            position_ids="count", max_positions=lambda c: c.max_position_embeddings, padding="right"
        ),
        heads=("sequence_classification", "masked_lm"),
        tiny={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "layer_types": ["full_attention", "sliding_attention", "full_attention"],
            "local_attention": 4,
            "vocab_size": 97,
            "max_position_embeddings": 64,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "cls_token_id": 1,
            "eos_token_id": 2,
            "sep_token_id": 2,
            "num_labels": 3,
            # attention that is not near-uniform at random init (ModernBERT initialises with std 0.02)
            "initializer_range": 0.2,
        },
    )
)
