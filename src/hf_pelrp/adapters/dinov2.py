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
from .base import register_adapter
from .vit import TINY_VIT, VisionLayout, vision_embedding_rules, vision_encoder

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


#: DINOv2 and its variants: the ViT tiny instance with an MLP ratio instead of an intermediate size
TINY_DINOV2 = {**{k: v for k, v in TINY_VIT.items() if k != "intermediate_size"}, "mlp_ratio": 2}
#: the linears the Gamma rule applies to (SwiGLU's down projection included) and the patch convolution
DINOV2_GAMMA = {
    "gamma_linear": ("*.mlp.fc1", "*.mlp.fc2", "*.mlp.down_proj", "classifier"),
    "gamma_conv": ("*.patch_embeddings.projection",),
}


def dinov2_classes(prefix: str) -> tuple[str, ...]:
    parts = ("Model", "Embeddings", "PatchEmbeddings", "Encoder", "Layer", "Attention", "LayerScale")
    parts += ("DropPath", "MLP", "SwiGLUFFN")
    return (f"{prefix}ForImageClassification", *(prefix + part for part in parts))


DINOV2 = register_adapter(
    vision_encoder(
        ("dinov2",),
        dinov2_classes("Dinov2"),
        layout=DINOV2_LAYOUT,
        layers="encoder.layer",
        positions="learned absolute, always interpolated: [CLS, patches] + positions",
        gamma=DINOV2_GAMMA,
        vision_options=tuple(VISION_OPTIONS),
        extra_rules=_rules,
        tiny=TINY_DINOV2,
    )
)
