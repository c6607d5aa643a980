"""Vision-language models explained with their images (:mod:`hf_pelrp.adapters.vision_language`): LLaVA (a CLIP
tower, LLaVA's two-layer MLP projector, a LLaMA decoder) and Gemma 3 (a SigLIP tower, average pooling, an
RMSNorm and a matrix product, the Gemma 3 decoder).

Each replaces the type's text-only declaration (:mod:`hf_pelrp.adapters.vlm_text`): text-only prompts are
explained exactly as before, and prompts with an image get the image maps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import _REGISTRY, register_adapter
from .norms import layer_norm
from .vision_language import ImageTextInputs, VisionTower, with_images
from .vit import VisionLayout
from .vlm_text import _CLIP


def _tower_layout(specials: tuple[str, ...]) -> VisionLayout:
    return VisionLayout(
        embeddings="embeddings",
        patches="patch_embedding",
        conv="patch_embedding",
        specials=specials,
        position="position_embedding",
    )


#: a CLIP vision tower (``CLIPVisionModel``) inside a VLM: class token, learned positions
CLIP_TOWER = VisionTower(
    path="vision_tower",
    layers="encoder.layers",
    attention="self_attn",
    layout=_tower_layout(("class_embedding",)),
    modules=_CLIP,
    norms={"LayerNorm": layer_norm},
    constants=("embeddings.position_embedding",),
)


def _text_inputs(adapter: Any, **fields: Any) -> dict[str, Any]:
    text = adapter.inputs
    return {
        "position_ids": text.position_ids,
        "max_positions": text.max_positions,
        "placeholders": text.placeholders,
        **fields,
    }


# ---- LLaVA ------------------------------------------------------------------------------------------------


def _llava_tokens(model: nn.Module, pixels: torch.Tensor) -> int:
    """One placeholder per patch; ``vision_feature_select_strategy="full"`` keeps the class token too."""
    patches = CLIP_TOWER.tokens_per_image(model, pixels)
    return patches + (1 if model.config.vision_feature_select_strategy == "full" else 0)


_LLAVA_TEXT = _REGISTRY["llava"]
LLAVA = register_adapter(
    with_images(
        _LLAVA_TEXT,
        CLIP_TOWER,
        ImageTextInputs(**_text_inputs(_LLAVA_TEXT, tokens=_llava_tokens)),
        tiny={
            **_LLAVA_TEXT.tiny,
            "vision_config": {
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 16,
                "patch_size": 4,
            },
            # inside the tiny vocabulary (LLaVA embeds the placeholder before replacing it); the random text of
            # check_adapter avoids it
            "image_token_id": 96,
        },
    )
)
