"""DINOv2 (``dinov2``): a ViT with layer scale, always-interpolated positions and a CLS + mean-patch head.

Layout: ``e = [CLS, conv(patches)] + interpolate(positions)`` (the model always calls
``interpolate_pos_encoding``, which returns the table itself at the training size and a bicubic resampling of
it otherwise: a constant of the pass either way), pre-LN blocks whose attention and MLP outputs are scaled by a
learned per-channel vector (``Dinov2LayerScale``: ``x * lambda``, a product with a parameter, i.e. a constant
scaling: nothing to attach), an MLP (``fc1``, activation, ``fc2``) or, with ``use_swiglu_ffn=True`` (the giant
model), a SwiGLU ``down(silu(gate(x)) * up(x))``. The classifier reads ``[h_CLS, mean(h_patches)]`` (a linear
map) after the final LayerNorm.

Rules (method.md sections 1-2): as for ViT (:mod:`hf_pelrp.adapters.vit`): the identity rule on every
LayerNorm and activation, the ``"lrp"`` attention, the epsilon rule (or, where asked, the Gamma rule) on the
linear maps and the patch convolution; for the SwiGLU the uniform rule on ``silu(gate) * up`` (1/2 each under
AttnLRP, the activated gate constant under CP-LRP). Leaves ``"token"`` (CLS and patch tokens) and
``"position"`` (the interpolated table, one copy per image), ``patch_map`` and ``pixel_map``.
"""

from __future__ import annotations

from torch import nn

from ..config import VISION_OPTIONS, LRPConfig
from ..hooks import HookRule, LeafStore, OutputGradient
from ..positions import Additive
from .base import Adapter, register_adapter
from .norms import layer_norm
from .vit import ImageInputs, VisionLayout, vision_embedding_rules, vision_maps

DINOV2_LAYOUT = VisionLayout(specials=("cls_token",), interpolation="always")

_embedding_rules = vision_embedding_rules(DINOV2_LAYOUT)


def _rules(model: nn.Module, config: LRPConfig, store: LeafStore) -> list[tuple[nn.Module, HookRule]]:
    """The embedding leaves, and the uniform rule at ``silu(gate) * up`` of SwiGLU MLPs: the activation
    already has its identity rule (factor 1), a second hook scales its gradient by the gate factor."""
    rules = _embedding_rules(model, config, store)
    for layer in model.base_model.encoder.layer:
        if type(layer.mlp).__name__ == "Dinov2SwiGLUFFN":
            rules.append((layer.mlp.act_fn, OutputGradient(config.gate_factor)))
            rules.append((layer.mlp.up_proj, OutputGradient(config.up_factor)))
    return rules


DINOV2 = register_adapter(
    Adapter(
        model_types=("dinov2",),
        name="dinov2",
        layers="encoder.layer",
        attention="attention",
        embeddings={},
        positions=Additive(
            {}, description="learned absolute, always interpolated: [CLS, patches] + positions"
        ),
        norms={"LayerNorm": layer_norm},
        modules=(
            "Dinov2ForImageClassification",
            "Dinov2Model",
            "Dinov2Embeddings",
            "Dinov2PatchEmbeddings",
            "Dinov2Encoder",
            "Dinov2Layer",
            "Dinov2Attention",
            "Dinov2LayerScale",
            "Dinov2DropPath",
            "Dinov2MLP",
            "Dinov2SwiGLUFFN",
        ),
        gamma={
            "gamma_linear": ("*.mlp.fc1", "*.mlp.fc2", "*.mlp.down_proj", "classifier"),
            "gamma_conv": ("*.patch_embeddings.projection",),
        },
        vision_options=tuple(VISION_OPTIONS),
        inputs=ImageInputs(layout=DINOV2_LAYOUT),
        heads=("image_classification",),
        extra_rules=_rules,
        extra_maps=vision_maps,
        tiny={
            "hidden_size": 32,
            "mlp_ratio": 2,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 16,
            "patch_size": 4,
            "num_channels": 3,
            "num_labels": 3,
        },
    )
)
