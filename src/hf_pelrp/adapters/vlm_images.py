"""Vision-language models explained with their images (:mod:`hf_pelrp.adapters.vision_language`): LLaVA (a CLIP
tower, LLaVA's two-layer MLP projector, a LLaMA decoder) and Gemma 3 (a SigLIP tower, average pooling, an
RMSNorm and a matrix product, the Gemma 3 decoder).

Each replaces the type's text-only declaration (:mod:`hf_pelrp.adapters.vlm_text`): text-only prompts are
explained exactly as before, and prompts with an image get the image maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import AttributionInputError
from ..inputs import Prepared
from .base import _REGISTRY, register_adapter
from .norms import layer_norm
from .vision_language import ImageTextInputs, VisionTower, with_images
from .vit import VisionLayout
from .vlm_text import _CLIP, _SIGLIP


def _tower_layout(specials: tuple[str, ...]) -> VisionLayout:
    return VisionLayout(
        embeddings="embeddings",
        patches="patch_embedding",
        conv="patch_embedding",
        specials=specials,
        position="position_embedding",
    )


#: the tiny vision tower of check_adapter's VLM instances with images (16 x 16 pixels, 4 x 4 patches, 2 blocks): one
#: source for the families built on a CLIP or SigLIP tower
TINY_TOWER = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 4,
}

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
            "vision_config": dict(TINY_TOWER),
            # inside the tiny vocabulary (LLaVA embeds the placeholder before replacing it); the random text of
            # check_adapter avoids it
            "image_token_id": 96,
        },
    )
)


# ---- Gemma 3 ----------------------------------------------------------------------------------------------

#: a SigLIP vision tower (``SiglipVisionModel``) inside a VLM: no special token, learned positions; the attention
#: pooling head is computed but unused (Gemma 3 reads ``last_hidden_state``): cut
SIGLIP_TOWER = VisionTower(
    path="vision_tower",
    layers="encoder.layers",
    attention="self_attn",
    layout=_tower_layout(()),
    modules=_SIGLIP,
    norms={"LayerNorm": layer_norm},
    constants=("embeddings.position_embedding",),
    cut=("head",),
)


def _gemma3_tokens(model: nn.Module, pixels: torch.Tensor) -> int:
    """The projector pools the patch grid to ``mm_tokens_per_image`` tokens."""
    return int(model.config.mm_tokens_per_image)


@dataclass(frozen=True)
class Gemma3ImageTextInputs(ImageTextInputs):
    """Gemma 3's inputs: with images, ``token_type_ids`` (the processor's output: 1 at the image tokens, which
    attend to each other bidirectionally) must mark exactly the placeholders; without images they are all 0
    (and dropped) or absent."""

    image_keys: tuple[str, ...] = ("token_type_ids",)

    def validate(self, model: nn.Module, inputs: dict[str, Any]) -> Prepared:
        inputs = {k: v for k, v in inputs.items() if v is not None}
        types = inputs.get("token_type_ids")
        name = type(model).__name__
        if inputs.get("pixel_values") is None:
            if types is not None and bool((torch.as_tensor(types) != 0).any()):
                raise AttributionInputError(
                    f"token_type_ids mark image tokens, but no pixel_values were given to {name}: pass the image "
                    "(the processor's pixel_values), or leave token_type_ids out for text."
                )
            inputs.pop("token_type_ids", None)
            return super().validate(model, inputs)
        if types is None:
            raise AttributionInputError(
                f"{name} with images needs token_type_ids (1 at the image tokens, the processor's output): "
                "without them its image tokens would attend causally, which Gemma 3 is not used with."
            )
        prepared = super().validate(model, inputs)
        ids = prepared.inputs["input_ids"]
        marked = torch.as_tensor(prepared.inputs["token_type_ids"]).to(ids.device) != 0
        if not torch.equal(marked, ids == model.config.image_token_id):
            raise AttributionInputError(
                "token_type_ids must be 1 exactly at the image placeholder tokens (config.image_token_id) and 0 "
                "elsewhere: use the processor's token_type_ids."
            )
        return prepared


_GEMMA3_TEXT = _REGISTRY["gemma3"]
GEMMA3 = register_adapter(
    with_images(
        _GEMMA3_TEXT,
        SIGLIP_TOWER,
        Gemma3ImageTextInputs(
            position_ids=_GEMMA3_TEXT.inputs.position_ids,
            max_positions=_GEMMA3_TEXT.inputs.max_positions,
            placeholders=_GEMMA3_TEXT.inputs.placeholders,
            tokens=_gemma3_tokens,
        ),
        tiny={
            **_GEMMA3_TEXT.tiny,
            # 4 x 4 patches pooled to 2 x 2 image tokens: the projector's average pooling is exercised
            "vision_config": {**_GEMMA3_TEXT.tiny["vision_config"], "image_size": 56},
            # inside the tiny vocabulary, as in the real checkpoints (the random text avoids it)
            "image_token_index": 96,
        },
    )
)
