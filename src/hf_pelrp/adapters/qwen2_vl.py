"""Qwen2-VL and Qwen2.5-VL (``qwen2_vl``, ``qwen2_5_vl``): the language model with M-RoPE, on text-only inputs.

The ``*ForConditionalGeneration`` models are explained as causal LMs on text-only inputs: their language model
is a Qwen2 decoder (RMSNorm, SiLU-gated MLP, GQA attention with q/k/v biases) whose rotary embedding is M-RoPE
(:class:`hf_pelrp.positions.MultimodalRotary`): the frequencies are split into temporal, height and width
sections, each rotated by the position ids of its axis, and ``attr.position_by_axis`` [B, 3, T] gives the
position relevance of each axis. On text the three axes carry the same position (the count of real tokens),
so the axes differ only by the frequencies they own.

Images and videos are refused: the vision tower (its patch embedding, attention, merger) has no declared
rules, and the 3-D positions of visual tokens are built from the grids inside the model. The vision tower's
classes are accepted by the declaration only because the inputs check makes sure that they never run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import AttributionInputError
from ..heads import CAUSAL_LM, register_head_class
from ..inputs import Prepared, TextInputs, scaled_rotary_limit
from ..positions import MultimodalRotary
from .base import Adapter, GatedProduct, register_adapter
from .llama import TINY_DECODER
from .norms import rms_norm

#: model keywords that carry images or videos
_MULTIMODAL = (
    "pixel_values",
    "pixel_values_videos",
    "image_grid_thw",
    "video_grid_thw",
    "mm_token_type_ids",
    "mm_encoder_outputs",
    "second_per_grid_ts",
    "rope_deltas",
    # other vision-language wrappers explained on text (hf_pelrp.adapters.vlm_text)
    "pixel_attention_mask",
    "image_sizes",
    "image_patches",
    "image_patches_indices",
    "vision_feature_layer",
)


@dataclass(frozen=True)
class TextOnlyInputs(TextInputs):
    """The inputs of a vision-language model explained on text only: images, videos and their placeholder
    tokens (``config.image_token_id``, ``config.video_token_id``) are refused with the reason."""

    placeholders: tuple[str, ...] = ("image_token_id", "video_token_id")

    def validate(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Prepared:
        given = [k for k in _MULTIMODAL if inputs.get(k) is not None]
        if given:
            raise AttributionInputError(
                f"{type(model).__name__} is explained on text-only inputs: hf_pelrp has no rules for its vision "
                f"tower, so {', '.join(given)} cannot be attributed. Pass input_ids (and attention_mask) of text."
            )
        prepared = super().validate(model, inputs)
        ids = prepared.inputs.get("input_ids")
        if ids is not None:
            for name in self.placeholders:
                value = getattr(model.config, name, None)
                if value is not None and bool((ids == value).any()):
                    raise AttributionInputError(
                        f"input_ids hold the {name.split('_')[0]} placeholder token {value} (config.{name}): "
                        f"{type(model).__name__} is explained on text-only inputs (hf_pelrp has no rules for its "
                        "vision tower). Remove the image / video from the prompt."
                    )
        return prepared


def _text_limit(config: Any) -> int | None:
    return scaled_rotary_limit(config.get_text_config())


def qwen_vl(model_type: str, prefix: str, vision: tuple[str, ...]) -> Adapter:
    """The declaration of a Qwen-VL ``*ForConditionalGeneration`` model explained on text-only inputs."""
    register_head_class(model_type, f"{prefix}ForConditionalGeneration", CAUSAL_LM)
    text = {k: v for k, v in TINY_DECODER.items() if k != "num_labels"}
    return Adapter(
        model_types=(model_type,),
        layers="language_model.layers",
        attention="self_attn",
        embeddings={"language_model.embed_tokens": ("token",)},
        positions=MultimodalRotary(sections="language_model.rotary_emb"),
        norms={f"{prefix}RMSNorm": rms_norm},
        modules=(
            f"{prefix}ForConditionalGeneration",
            f"{prefix}Model",
            f"{prefix}TextModel",
            f"{prefix}DecoderLayer",
            f"{prefix}Attention",
            f"{prefix}RotaryEmbedding",
            "Qwen2MLP",
            # the vision tower: never runs, TextOnlyInputs refuses images and videos
            *vision,
        ),
        gated=(GatedProduct(act="mlp.act_fn", up="mlp.up_proj"),),
        inputs=TextOnlyInputs(position_ids="count", max_positions=_text_limit),
        heads=(CAUSAL_LM,),
        tiny={
            # M-RoPE sections of the 4 frequencies of a head of 8 channels: temporal 2, height 1, width 1
            "text_config": {
                **text,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "mrope_section": [2, 1, 1],
                },
            },
            "vision_config": {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2},
            # placeholder ids outside the tiny vocabulary, so that random text never holds one
            "image_token_id": 1000,
            "video_token_id": 1001,
            "vision_start_token_id": 1002,
            "vision_end_token_id": 1003,
        },
        name=model_type,
    )


#: the vision transformers' classes (Qwen2.5-VL's RMSNorm is the text declaration's norm class)
QWEN2_VL_VISION = (
    "Qwen2VisionTransformerPretrainedModel",
    "Qwen2VLVisionBlock",
    "Qwen2VLVisionRotaryEmbedding",
    "PatchEmbed",
    "PatchMerger",
    "VisionAttention",
    "VisionMlp",
    "LayerNorm",
)
QWEN2_5_VL_VISION = (
    "Qwen2_5_VisionTransformerPretrainedModel",
    "Qwen2_5_VLVisionBlock",
    "Qwen2_5_VLVisionRotaryEmbedding",
    "Qwen2_5_VisionPatchEmbed",
    "Qwen2_5_VLPatchMerger",
    "Qwen2_5_VLVisionAttention",
    "Qwen2_5_VLMLP",
)


register_adapter(
    qwen_vl(
        "qwen2_vl",
        "Qwen2VL",
        QWEN2_VL_VISION,
    )
)
register_adapter(
    qwen_vl(
        "qwen2_5_vl",
        "Qwen2_5_VL",
        QWEN2_5_VL_VISION,
    )
)
