"""The CLIP and SigLIP vision towers with an image-classification head (``clip``, ``siglip``:
``CLIPForImageClassification``, ``SiglipForImageClassification``).

Both heads build only the vision tower (``model.vision_model``) from ``config.vision_config`` and classify the
mean of its patch tokens: CLIP the mean of the last hidden states after the CLS token (its ``post_layernorm``
acts on the pooled CLS only, which the logits do not use), SigLIP the mean of all (patch) tokens after its
``post_layernorm``; a mean is a linear map (epsilon rule).

Layout (a :class:`~hf_pelrp.adapters.vit.VisionLayout`): a patch convolution ``patch_embedding`` (CLIP: no
bias), CLIP's ``class_embedding`` as the one special token (SigLIP has none), and an ``nn.Embedding`` of
positions read at ``position_ids`` (or interpolated with ``interpolate_pos_encoding=True``). The embedding sum
``e = [CLS, patches] + positions`` is rebuilt from the leaves ``"token"`` and ``"position"`` by the ViT rule
(:class:`~hf_pelrp.adapters.vit.VisionEmbeddingLeaves`), so the position table is declared a constant of the
forward (its values enter through the ``"position"`` leaf). CLIP applies a LayerNorm before the encoder
(``pre_layrnorm``).

Rules: the identity rule on every LayerNorm and activation (CLIP's QuickGELU ``x * sigmoid(1.702 x)``,
SigLIP's tanh-GELU), the ``"lrp"`` attention, the epsilon rule (or the Gamma rule where asked) on linear maps
and the patch convolution; ``patch_map`` and ``pixel_map`` as for ViT.

SigLIP's vision tower also computes an attention-pooling head (``SiglipMultiheadAttentionPoolingHead``, built
on ``torch.nn.MultiheadAttention``, which does not dispatch through transformers' attention interface). The
classification head does not use its output (``pooler_output``), so it carries no relevance; the adapter cuts
it from the relevance graph (its output is a constant of the pass), so that if a model ever fed it to the
logits, the missing relevance would show as a conservation gap (``check_adapter`` fails) instead of flowing
through attention rules that were never applied.
"""

from __future__ import annotations

from torch import nn

from ..config import LRPConfig
from ..hooks import HookRule, LeafStore, OutputGradient
from .base import register_adapter
from .vit import TINY_VIT, VisionLayout, vision_embedding_rules, vision_encoder

CLIP_LAYOUT = VisionLayout(
    embeddings="vision_model.embeddings",
    patches="patch_embedding",
    conv="patch_embedding",
    specials=("class_embedding",),
    position="position_embedding",
    vision_config="vision_config",
)
SIGLIP_LAYOUT = VisionLayout(
    embeddings="vision_model.embeddings",
    patches="patch_embedding",
    conv="patch_embedding",
    specials=(),
    position="position_embedding",
    vision_config="vision_config",
)

_GAMMA = {
    "gamma_linear": ("*.mlp.fc1", "*.mlp.fc2", "classifier"),
    "gamma_conv": ("*.embeddings.patch_embedding",),
}

_TINY_TOWERS = {
    "vision_config": {k: v for k, v in TINY_VIT.items() if k != "num_labels"},
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 97,
        "max_position_embeddings": 16,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "num_labels": 3,
}


def _encoder_classes(prefix: str) -> tuple[str, ...]:
    return tuple(
        prefix + part
        for part in (
            "ForImageClassification",
            "VisionModel",
            "VisionEmbeddings",
            "Encoder",
            "EncoderLayer",
            "Attention",
            "MLP",
        )
    )


CLIP = register_adapter(
    vision_encoder(
        ("clip",),
        _encoder_classes("CLIP"),
        layout=CLIP_LAYOUT,
        layers="vision_model.encoder.layers",
        attention="self_attn",
        constants=("vision_model.embeddings.position_embedding",),
        gamma=_GAMMA,
        tiny={**_TINY_TOWERS, "projection_dim": 16},
    )
)

_siglip_embeddings = vision_embedding_rules(SIGLIP_LAYOUT)


def _siglip_rules(model: nn.Module, config: LRPConfig, store: LeafStore) -> list[tuple[nn.Module, HookRule]]:
    """The embedding leaves, and the attention-pooling head cut from the relevance graph (see the module
    docstring)."""
    rules = _siglip_embeddings(model, config, store)
    head = getattr(model.vision_model, "head", None)
    if head is not None:
        rules.append((head, OutputGradient(0.0)))
    return rules


SIGLIP = register_adapter(
    vision_encoder(
        ("siglip",),
        (*_encoder_classes("Siglip"), "SiglipMultiheadAttentionPoolingHead", "MultiheadAttention"),
        layout=SIGLIP_LAYOUT,
        layers="vision_model.encoder.layers",
        attention="self_attn",
        positions="learned absolute, patches + positions (no CLS)",
        constants=("vision_model.embeddings.position_embedding",),
        gamma=_GAMMA,
        extra_rules=_siglip_rules,
        tiny=_TINY_TOWERS,
    )
)
