"""VipLLaVA explained with its images (``vipllava``; issue 19).

VipLLaVA is LLaVA with a projector that reads several of the CLIP tower's hidden states at once
(``vision_feature_layer``, by default five of them, the class token dropped from each), concatenated along the
channels, then a LayerNorm and LLaVA's linear-GELU-linear MLP. The tower is
:data:`~hf_pelrp.adapters.vlm_images.CLIP_TOWER` (leaves ``image_token`` / ``image_position`` at its embedding
sum, the ``"lrp"`` attention in every block); the projector's LayerNorm gets the identity rule, its linear maps
the epsilon rule. Relevance reaches a tower layer from every feature layer above it, through the residual
stream and the concatenation (a copy: autograd sums the branches). One image per row, one placeholder per patch.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import _REGISTRY, register_adapter
from .vision_language import ImageTextInputs, with_images
from .vlm_images import CLIP_TOWER, TINY_TOWER


def _vipllava_tokens(model: nn.Module, pixels: torch.Tensor) -> int:
    """One placeholder per patch (the class token is dropped from every feature layer)."""
    return CLIP_TOWER.tokens_per_image(model, pixels)


_TEXT_ONLY = _REGISTRY["vipllava"]
_text = _TEXT_ONLY.inputs
VIPLLAVA = register_adapter(
    with_images(
        _TEXT_ONLY,
        CLIP_TOWER,
        ImageTextInputs(
            position_ids=_text.position_ids,
            max_positions=_text.max_positions,
            placeholders=_text.placeholders,
            tokens=_vipllava_tokens,
        ),
        tiny={
            **_TEXT_ONLY.tiny,
            "vision_config": dict(TINY_TOWER),
            # two feature layers of the tiny tower: the embedding (after the pre-LayerNorm) and the last block
            "vision_feature_layer": [0, -1],
            # inside the tiny vocabulary (the model embeds the placeholder before replacing it)
            "image_token_id": 96,
        },
    )
)
