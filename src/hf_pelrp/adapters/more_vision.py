"""More ViT-style image classifiers: I-JEPA (``ijepa``), ViT-MSN (``vit_msn``), DINOv2 with registers
(``dinov2_with_registers``) and MetaCLIP 2 (``metaclip_2``).

Each is a layout of a family already proven here (:mod:`hf_pelrp.adapters.vit`, :mod:`~.dinov2`, :mod:`~.clip`);
the rules are the same (method.md sections 1-2): the identity rule on every LayerNorm and activation, the
``"lrp"`` attention, the epsilon rule (or the Gamma rule where asked) on the linear maps and the patch
convolution, and the additive split ``e = t + p`` at the embedding sum, rebuilt from the leaves ``"token"`` and
``"position"`` by :class:`~hf_pelrp.adapters.vit.VisionEmbeddingLeaves` (checked bit-identical to the module's
output), with ``patch_map`` and ``pixel_map``.

- **I-JEPA**: a ViT without a CLS token, ``e = conv(patches) + positions`` (the table has one row per patch);
  the classifier reads the mean of the final-LayerNorm tokens (a linear map).
- **ViT-MSN**: ViT's layout and classifier (the CLS token after the final LayerNorm); its own class names.
- **DINOv2 with registers**: DINOv2 (always-interpolated positions, layer scale, MLP or SwiGLU, classifier on
  ``[h_CLS, mean(h_patches)]``) plus ``R`` learned *register tokens* inserted after the CLS token **after** the
  position embedding is added: the sequence is ``[CLS + p_0, reg_1 .. reg_R, patch_i + p_i]``. The registers are
  special tokens like CLS: the ``"token"`` leaf holds ``[CLS, reg_1 .. reg_R, patches]`` and the ``"position"``
  leaf holds ``[p_0, 0 .. 0, p_1 ..]`` (a register has no position, so its position relevance is exactly 0).
  Their relevance is reported in ``token[:, 1:1 + R]``, never in ``patch_map`` / ``pixel_map`` (which read only
  the patch tokens).
- **MetaCLIP 2**: CLIP's vision tower layout (class embedding, bias-free patch convolution, ``nn.Embedding``
  positions, ``pre_layrnorm``) with CLIP's classifier (the mean of the patch tokens after the CLS token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import LRPConfig
from ..hooks import HookRule, LeafStore, OutputGradient
from ..positions import Additive
from .base import Adapter, register_adapter
from .clip import _GAMMA as _CLIP_GAMMA
from .clip import _TINY_TOWERS, CLIP_LAYOUT, _encoder_classes
from .norms import layer_norm
from .vit import _GAMMA as _VIT_GAMMA
from .vit import ImageInputs, VisionLayout, vision_embedding_rules, vision_maps

_TINY_VIT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 16,
    "patch_size": 4,
    "num_channels": 3,
    "num_labels": 3,
}


def _vit_classes(prefix: str, head: str, pooler: bool) -> tuple[str, ...]:
    parts = ("Model", "Embeddings", "PatchEmbeddings", "Attention", "MLP", "Layer") + (
        ("Pooler",) if pooler else ()
    )
    return (head, *(prefix + part for part in parts))


# ---- I-JEPA and ViT-MSN: ViT layouts -------------------------------------------------------------------------

#: I-JEPA: no special token, the table holds one row per patch
IJEPA_LAYOUT = VisionLayout(specials=())
#: ViT-MSN: ViT's layout (CLS, no distillation token)
VIT_MSN_LAYOUT = VisionLayout(specials=("cls_token",))

IJEPA = register_adapter(
    Adapter(
        model_types=("ijepa",),
        name="ijepa",
        layers="layers",
        attention="attention",
        embeddings={},
        positions=Additive({}, description="learned absolute, patches + positions (no CLS)"),
        norms={"LayerNorm": layer_norm},
        modules=_vit_classes("IJepa", "IJepaForImageClassification", pooler=True),
        gamma=_VIT_GAMMA,
        inputs=ImageInputs(layout=IJEPA_LAYOUT),
        heads=("image_classification",),
        extra_rules=vision_embedding_rules(IJEPA_LAYOUT),
        extra_maps=vision_maps,
        tiny=_TINY_VIT,
    )
)

VIT_MSN = register_adapter(
    Adapter(
        model_types=("vit_msn",),
        name="vit_msn",
        layers="layers",
        attention="attention",
        embeddings={},
        positions=Additive({}, description="learned absolute, [CLS, patches] + positions"),
        norms={"LayerNorm": layer_norm},
        modules=_vit_classes("ViTMSN", "ViTMSNForImageClassification", pooler=False),
        gamma=_VIT_GAMMA,
        inputs=ImageInputs(layout=VIT_MSN_LAYOUT),
        heads=("image_classification",),
        extra_rules=vision_embedding_rules(VIT_MSN_LAYOUT),
        extra_maps=vision_maps,
        tiny=_TINY_VIT,
    )
)


# ---- DINOv2 with registers -----------------------------------------------------------------------------------


def _registers(emb: nn.Module) -> torch.Tensor:
    return emb.register_tokens.reshape(-1, emb.register_tokens.shape[-1])


@dataclass(frozen=True)
class RegisterLayout(VisionLayout):
    """DINOv2's layout with register tokens after the CLS token, added after the positions (see the module
    docstring): each register is one more special token, with a zero position row."""

    def special_tokens(self, emb: nn.Module) -> list[torch.Tensor]:
        return [emb.cls_token, *_registers(emb).unbind(0)]

    def table_rows(self, emb: nn.Module) -> int:
        # the sequence holds the table's rows (CLS + patches) plus the registers, which have no row
        return super().table_rows(emb) + _registers(emb).shape[0]

    def positions(
        self, emb: nn.Module, token: torch.Tensor, height: int, width: int, interpolate: bool
    ) -> torch.Tensor:
        """``[p_0, 0 (one row per register), p_1 ..]``, with the model's own interpolation of the table to
        ``[CLS, patches]`` (the registers are not part of what the model interpolates)."""
        registers = _registers(emb).shape[0]
        without = torch.cat([token[:, :1], token[:, 1 + registers :]], dim=1)
        table = emb.interpolate_pos_encoding(without, height, width)
        zeros = table.new_zeros(table.shape[0], registers, table.shape[-1])
        return torch.cat([table[:, :1], zeros, table[:, 1:]], dim=1)


DINOV2_REGISTERS_LAYOUT = RegisterLayout(specials=("cls_token",), interpolation="always")

_register_embeddings = vision_embedding_rules(DINOV2_REGISTERS_LAYOUT)


def _register_rules(
    model: nn.Module, config: LRPConfig, store: LeafStore
) -> list[tuple[nn.Module, HookRule]]:
    """The embedding leaves, and the uniform rule at ``silu(gate) * up`` of SwiGLU MLPs (as for DINOv2)."""
    rules = _register_embeddings(model, config, store)
    for layer in model.base_model.encoder.layer:
        if type(layer.mlp).__name__ == "Dinov2WithRegistersSwiGLUFFN":
            rules.append((layer.mlp.act_fn, OutputGradient(config.gate_factor)))
            rules.append((layer.mlp.up_proj, OutputGradient(config.up_factor)))
    return rules


DINOV2_REGISTERS = register_adapter(
    Adapter(
        model_types=("dinov2_with_registers",),
        name="dinov2_with_registers",
        layers="encoder.layer",
        attention="attention",
        embeddings={},
        positions=Additive(
            {},
            description="learned absolute, always interpolated: [CLS, patches] + positions; registers: none",
        ),
        norms={"LayerNorm": layer_norm},
        modules=(
            "Dinov2WithRegistersForImageClassification",
            *(
                "Dinov2WithRegisters" + part
                for part in (
                    "Model",
                    "Embeddings",
                    "PatchEmbeddings",
                    "Encoder",
                    "Layer",
                    "Attention",
                    "LayerScale",
                    "DropPath",
                    "MLP",
                    "SwiGLUFFN",
                )
            ),
        ),
        gamma={
            "gamma_linear": ("*.mlp.fc1", "*.mlp.fc2", "*.mlp.down_proj", "classifier"),
            "gamma_conv": ("*.patch_embeddings.projection",),
        },
        inputs=ImageInputs(layout=DINOV2_REGISTERS_LAYOUT),
        heads=("image_classification",),
        extra_rules=_register_rules,
        extra_maps=vision_maps,
        tiny={
            "hidden_size": 32,
            "mlp_ratio": 2,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 16,
            "patch_size": 4,
            "num_channels": 3,
            "num_register_tokens": 2,
            "num_labels": 3,
        },
    )
)


# ---- MetaCLIP 2: CLIP's layout -------------------------------------------------------------------------------

METACLIP_2 = register_adapter(
    Adapter(
        model_types=("metaclip_2",),
        name="metaclip_2",
        layers="vision_model.encoder.layers",
        attention="self_attn",
        embeddings={},
        positions=Additive({}, description="learned absolute, [CLS, patches] + positions"),
        norms={"LayerNorm": layer_norm},
        modules=_encoder_classes("MetaClip2"),
        constants=("vision_model.embeddings.position_embedding",),
        gamma=_CLIP_GAMMA,
        inputs=ImageInputs(layout=CLIP_LAYOUT),
        heads=("image_classification",),
        extra_rules=vision_embedding_rules(CLIP_LAYOUT),
        extra_maps=vision_maps,
        tiny={**_TINY_TOWERS, "projection_dim": 16},
    )
)
