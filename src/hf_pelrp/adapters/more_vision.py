"""More ViT-style image classifiers: I-JEPA (``ijepa``), ViT-MSN (``vit_msn``), DINOv2 with registers
(``dinov2_with_registers``), MetaCLIP 2 (``metaclip_2``) and data2vec-vision (``data2vec-vision``).

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
- **data2vec-vision**: BEiT's layout (``[CLS, conv(patches)]``, no absolute positions, a relative position bias
  per window offset: each layer's own table, the model's shared one, or their sum; layer scale; mean pooling
  with a LayerNorm), but its attention is written inline (``Data2VecVisionSelfAttention`` and its SDPA subclass,
  not transformers' attention interface). So, as for SwinV2, the attention is re-computed with the LRP factors
  (q, k ``qk_factor``, v ``v_factor``) and the bias, computed by the model's own bias modules, as the layer's
  leaf [B, H, T, T] with the ``scores`` factor (:func:`data2vec_vision_attention`, checked to reproduce the
  module's output; its value stays the module's). Maps as for BEiT (``position_by_distance`` per table entry).
  Absolute position embeddings (alone or with the bias), or no positional encoding at all, are refused.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import LRPConfig
from ..errors import AttributionInputError, AttributionStateError, UnsupportedModelError
from ..hooks import Handles, HookRule, LeafStore, OutputGradient, make_leaf
from ..inline_attention import Recomputed
from ..positions import BIAS_LEAF, AttentionBias, bias_leaf
from ..rules import scale_gradient
from .base import Adapter, register_adapter
from .beit import BeitLayout, _window_bins, attention_patch_size
from .clip import _GAMMA as _CLIP_GAMMA
from .clip import _TINY_TOWERS, CLIP_LAYOUT, _encoder_classes
from .dinov2 import DINOV2_GAMMA, TINY_DINOV2, dinov2_classes
from .norms import layer_norm
from .vit import _GAMMA as _VIT_GAMMA
from .vit import TINY_VIT, ImageInputs, VisionLayout, vision_embedding_rules, vision_encoder, vision_maps


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
    vision_encoder(
        ("ijepa",),
        _vit_classes("IJepa", "IJepaForImageClassification", pooler=True),
        layout=IJEPA_LAYOUT,
        positions="learned absolute, patches + positions (no CLS)",
        gamma=_VIT_GAMMA,
    )
)

VIT_MSN = register_adapter(
    vision_encoder(
        ("vit_msn",),
        _vit_classes("ViTMSN", "ViTMSNForImageClassification", pooler=False),
        layout=VIT_MSN_LAYOUT,
        gamma=_VIT_GAMMA,
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
    vision_encoder(
        ("dinov2_with_registers",),
        dinov2_classes("Dinov2WithRegisters"),
        layout=DINOV2_REGISTERS_LAYOUT,
        layers="encoder.layer",
        positions="learned absolute, always interpolated: [CLS, patches] + positions; registers: none",
        gamma=DINOV2_GAMMA,
        extra_rules=_register_rules,
        tiny={**TINY_DINOV2, "num_register_tokens": 2},
    )
)


# ---- MetaCLIP 2: CLIP's layout -------------------------------------------------------------------------------

METACLIP_2 = register_adapter(
    vision_encoder(
        ("metaclip_2",),
        _encoder_classes("MetaClip2"),
        layout=CLIP_LAYOUT,
        layers="vision_model.encoder.layers",
        attention="self_attn",
        constants=("vision_model.embeddings.position_embedding",),
        gamma=_CLIP_GAMMA,
        tiny={**_TINY_TOWERS, "projection_dim": 16},
    )
)


# ---- data2vec-vision: BEiT's layout, attention written inline ------------------------------------------------


@dataclass
class TupleEmbeddingLeaves(HookRule):
    """BEiT's :class:`~hf_pelrp.adapters.beit.BeitEmbeddingLeaves` for embeddings (and patch embeddings) that
    return ``(tokens, (patch_height, patch_width))``, as data2vec-vision's do: ``"token"`` = ``[CLS, patches]``,
    the pixels a leaf, the rebuilt output checked to equal the module's."""

    store: LeafStore

    def attach(self, module: nn.Module, handles: Handles) -> None:
        store = self.store

        def pixels_in(_module, args):
            pixels = make_leaf(args[0])
            store.aux["pixels"] = pixels
            return (pixels, *args[1:])

        def patches_out(_module, _args, output):
            store.aux["patches"] = output[0]

        def embeddings_out(emb, args, kwargs, output):
            if kwargs.get("bool_masked_pos", args[1] if len(args) > 1 else None) is not None:
                raise AttributionInputError(
                    "bool_masked_pos (masked image modelling) is not supported by hf_pelrp: attribute unmasked images"
                )
            tokens, shape = output
            patches = store.aux["patches"]
            batch = patches.shape[0]
            token = make_leaf(
                torch.cat([emb.cls_token.detach().expand(batch, -1, -1), patches.detach()], dim=1)
            )
            store.additive["token"] = token
            rebuilt = emb.dropout(token)
            if not torch.equal(rebuilt.detach(), tokens.detach()):
                raise AttributionStateError(
                    f"{type(emb).__name__} computed something other than [CLS, patches]; the data2vec-vision "
                    "adapter cannot make it a token leaf."
                )
            return rebuilt, shape

        handles.append(module.patch_embeddings.register_forward_pre_hook(pixels_in))
        handles.append(module.patch_embeddings.register_forward_hook(patches_out))
        handles.append(module.register_forward_hook(embeddings_out, with_kwargs=True))


def data2vec_vision_attention(
    attention: nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    *,
    config: LRPConfig,
    store: LeafStore,
    layer: int,
) -> torch.Tensor:
    """``Data2VecVisionSelfAttention`` (eager or SDPA) written out with the LRP factors:
    ``softmax(q k^T / sqrt(d) + b) v`` with q, k scaled by ``qk_factor`` and v by ``v_factor``; the bias ``b``
    (the layer's own relative position bias, the model's shared one passed in, or their sum, computed by the
    model's own modules) is the layer's leaf [B, H, T, T] with the ``scores`` factor (method.md 2, "Positions
    inside attention"); with ``positional=False`` it is a constant."""
    given = inspect.signature(type(attention).forward).bind(attention, *args, **kwargs).arguments
    hidden = given["hidden_states"]
    rows, length, _ = hidden.shape
    heads, dim = attention.num_attention_heads, attention.attention_head_size
    query = attention.query(hidden).view(rows, length, heads, dim).transpose(1, 2)
    key = attention.key(hidden).view(rows, length, heads, dim).transpose(1, 2)
    value = attention.value(hidden).view(rows, length, heads, dim).transpose(1, 2)
    query = scale_gradient(query, config.qk_factor)
    key = scale_gradient(key, config.qk_factor)
    value = scale_gradient(value, config.v_factor)
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(dim)
    bias = given.get("relative_position_bias")
    if attention.has_relative_position_bias:
        height, width = given["resolution"]
        window = (height // attention.config.patch_size, width // attention.config.patch_size)
        own = attention.relative_position_bias(
            window, bool(given.get("interpolate_pos_encoding")), dim_size=length
        )
        bias = own if bias is None else own + bias
    if bias is None:
        raise UnsupportedModelError(
            f"{type(attention).__name__} (layer {layer}) has no relative position bias: hf_pelrp explains "
            "data2vec-vision models whose positions are relative position biases (use_relative_position_bias or "
            "use_shared_relative_position_bias), the checkpoints' setting."
        )
    full = bias.detach().expand(rows, heads, length, length)
    if config.positional:
        leaf = bias_leaf(store, layer, full)
        pixels = store.aux.get("pixels")
        if pixels is not None and ("bins", BIAS_LEAF) not in store.aux:
            patch = attention_patch_size(store)
            window = (pixels.shape[-2] // patch[0], pixels.shape[-1] // patch[1])
            if window[0] * window[1] + 1 == length:
                store.aux[("bins", BIAS_LEAF)] = _window_bins(window, leaf.device)
        scores = scores + scale_gradient(leaf, config.scores_factor)
    else:
        scores = scores + full
    probs = nn.functional.softmax(scores, dim=-1)
    context = torch.matmul(probs, value).permute(0, 2, 1, 3).contiguous()
    return context.view(rows, length, heads * dim)


def _data2vec_rules(
    model: nn.Module, config: LRPConfig, store: LeafStore
) -> list[tuple[nn.Module, HookRule]]:
    rules: list[tuple[nn.Module, HookRule]] = [(model.base_model.embeddings, TupleEmbeddingLeaves(store))]
    for layer, block in enumerate(model.base_model.encoder.layer):

        def compute(att, args, kwargs, i=layer):
            return data2vec_vision_attention(att, args, kwargs, config=config, store=store, layer=i)

        rules.append(
            (
                block.attention.attention,
                Recomputed(compute, name=f"layer {layer} (data2vec-vision attention)"),
            )
        )
    return rules


def _data2vec_relative_bias_only(model: nn.Module) -> None:
    config = model.config
    if getattr(config, "use_absolute_position_embeddings", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} adds absolute position embeddings; hf_pelrp's data2vec-vision adapter explains "
            "the relative position bias (the checkpoints' setting). Combining both kinds in one position map is "
            "not implemented."
        )
    if not (config.use_relative_position_bias or config.use_shared_relative_position_bias):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no positional encoding (no absolute embeddings, no relative position "
            "bias): there is no position to explain. hf_pelrp explains data2vec-vision with a relative position "
            "bias (use_relative_position_bias or use_shared_relative_position_bias)."
        )


DATA2VEC_VISION = register_adapter(
    Adapter(
        model_types=("data2vec-vision",),
        name="data2vec-vision",
        layers="encoder.layer",
        attention="attention.attention",
        embeddings={},
        positions=AttentionBias(description="relative position bias per window offset (BEiT layout), inline"),
        norms={"LayerNorm": layer_norm},
        modules=(
            "Data2VecVisionForImageClassification",
            *(
                "Data2VecVision" + part
                for part in (
                    "Model",
                    "Embeddings",
                    "PatchEmbeddings",
                    "RelativePositionBias",
                    "Encoder",
                    "Layer",
                    "Attention",
                    "SelfAttention",
                    "SdpaSelfAttention",
                    "SelfOutput",
                    "Intermediate",
                    "Output",
                    "DropPath",
                    "Pooler",
                )
            ),
        ),
        gamma={
            "gamma_linear": ("*.intermediate.dense", "*.output.dense", "classifier"),
            "gamma_conv": ("*.patch_embeddings.projection",),
        },
        inputs=ImageInputs(layout=BeitLayout()),
        heads=("image_classification",),
        extra_rules=_data2vec_rules,
        extra_maps=vision_maps,
        checks=(_data2vec_relative_bias_only,),
        attention_interface=False,
        tiny={
            **TINY_VIT,
            "use_relative_position_bias": True,
            "use_mean_pooling": True,
        },
    )
)
