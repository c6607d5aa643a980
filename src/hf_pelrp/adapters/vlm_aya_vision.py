"""Aya Vision and Cohere 2 Vision explained with their images (``aya_vision``, ``cohere2_vision``; issue 19).

Aya Vision runs every image tile (its processor crops an image into tiles and adds a thumbnail) through a SigLIP
tower, then a projector: a pixel shuffle (a permutation: relevance moves with the values), a LayerNorm (identity
rule), ``linear_1``, a SwiGLU ``silu(gate) * x`` with ``x, gate = linear_1(...).chunk(2)`` and ``linear_2``
(epsilon rule). The SwiGLU is a gated product outside the decoder's blocks: it gets the rule of the decoder's
gated MLPs (AttnLRP: the uniform rule, half to each factor; CP: the activated gate a constant), attached by
:class:`SwiGluTower`. The tower's leaves are a SigLIP tower's (``image_token`` / ``image_position`` at its
embedding sum, no class token); its attention-pooling head is computed but unused: cut. Cohere 2 Vision is the
same path without the projector's LayerNorm, reading the tower's ``last_hidden_state`` (after its
post-LayerNorm).

**Inputs and layout.** ``pixel_values`` [n_tiles, C, H, W] holds the tiles of all rows in row order (the
processor's output); each row holds ``(side / downsample)^2`` placeholders per tile of its image, so the row's
placeholder count tells how many tiles are its own. ``image`` / ``image_position`` are [B, n_slots * P] with
``n_slots`` the most tiles of a row in the batch (a row's tiles in order, then zeros), ``image_grid``
``(n_slots * h, w)``: the tiles stacked top to bottom (:mod:`hf_pelrp.adapters.vlm_idefics3`). One image per
row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import LRPConfig
from ..errors import AttributionInputError, UnsupportedModelError
from ..hooks import Handles, HookRule, LeafStore, OutputGradient
from ..inputs import Prepared, TextInputs, check_unknown_inputs
from ..modules import find_module
from .base import _REGISTRY, register_adapter
from .norms import layer_norm
from .vision_language import (
    ImageTextInputs,
    VisionTower,
    _checked_pixels,
    _image_token_id,
    insert_placeholders,
    random_text,
    require_input_ids,
    with_images,
)
from .vit import _pair
from .vlm_images import TINY_TOWER, _tower_layout
from .vlm_text import _SIGLIP_TOWER


def tokens_per_tile(model: nn.Module) -> int:
    """Placeholders of one tile: its patches over the pixel shuffle's ``downsample^2``."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    return (side // model.config.downsample_factor) ** 2


@dataclass
class RowTiles(HookRule):
    """At the VLM's base model: how many tiles of ``pixel_values`` each prompt row owns
    (``store.aux["image_tiles"]``), from its placeholder count."""

    store: LeafStore

    def attach(self, module: nn.Module, handles: Handles) -> None:
        def before(model_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if kwargs.get("pixel_values") is None or ids is None:
                return
            counts = (ids == model_module.config.image_token_id).sum(-1) // tokens_per_tile(model_module)
            self.store.aux["image_tiles"] = counts.tolist()

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))


@dataclass(frozen=True)
class SwiGluTower(VisionTower):
    """A SigLIP tower whose projector has a SwiGLU (``linear_1`` gives ``x`` then ``gate``): the gated-product
    rule on it, and the tiles' maps laid out per row (module docstring)."""

    projector: str = "multi_modal_projector"

    def rules(
        self, model: nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[nn.Module, HookRule]]:
        base = getattr(model, "base_model", model)
        proj = find_module(base, self.projector)
        half = proj.linear_1.out_features // 2
        return [
            *super().rules(model, config, store),
            # the activated gate (its identity rule is the generic activation rule): the product's factor
            (proj.act, OutputGradient(config.gate_factor)),
            # x, the first half of linear_1's output
            (proj.linear_1, OutputGradient(config.up_factor, slice(0, half))),
            (base, RowTiles(store)),
        ]

    def read(self, model: nn.Module, store: LeafStore) -> dict[str, torch.Tensor] | None:
        tiles = super().read(model, store)
        if tiles is None:
            return None
        counts = store.aux["image_tiles"]
        rows, slots = len(counts), max(counts)
        patches = tiles["image"].shape[-1]

        def per_row(values: torch.Tensor) -> torch.Tensor:
            out = values.new_zeros(rows, slots, patches)
            for row, part in enumerate(values.split(counts)):
                out[row, : len(part)] = part
            return out.reshape(rows, slots * patches)

        grid = tiles["image_grid"][0] * torch.tensor([slots, 1], device=tiles["image"].device)
        return {
            "image": per_row(tiles["image"]),
            "image_position": per_row(tiles["image_position"]),
            "image_special": tiles["image"].new_zeros(rows),
            "image_grid": grid.expand(rows, 2).clone(),
        }


@dataclass(frozen=True)
class TileRowsInputs(ImageTextInputs):
    """Aya Vision inputs: text, and optionally ``pixel_values`` [n_tiles, C, H, W] (every row's tiles, rows in
    order); row ``b`` holds ``tokens_per_tile`` placeholders per tile it owns, at least one tile, and the rows
    own all the tiles."""

    def validate(self, model: nn.Module, inputs: dict[str, Any]) -> Prepared:
        inputs = {k: v for k, v in inputs.items() if v is not None}
        pixels = inputs.pop("pixel_values", None)
        if pixels is None:
            return super().validate(model, inputs)  # text only: placeholder tokens refused
        name = type(model).__name__
        config = model.config
        strategy = getattr(config, "vision_feature_select_strategy", "full")
        if strategy != "full":
            raise UnsupportedModelError(
                f"{name} with vision_feature_select_strategy={strategy!r}: its SigLIP "
                "tower has no class token to drop, so only 'full' runs (the pixel shuffle needs every patch)"
            )
        check_unknown_inputs(inputs, self.accepted(), model)
        require_input_ids(model, inputs)
        prepared = TextInputs.validate(self, model, inputs)
        ids = prepared.inputs["input_ids"]
        pixels = _checked_pixels(model, pixels)
        per_tile = tokens_per_tile(model)
        counts = (ids == _image_token_id(model)).sum(-1).tolist()
        for row, count in enumerate(counts):
            if count == 0 or count % per_tile:
                raise AttributionInputError(
                    f"row {row} holds {count} image placeholder token(s) (id {_image_token_id(model)}), but each "
                    f"image tile fills {per_tile} and every row needs an image: build the prompt with the model's "
                    "processor, one image per row"
                )
        if sum(counts) // per_tile != pixels.shape[0]:
            raise AttributionInputError(
                f"the prompt rows' placeholders ask for {sum(counts) // per_tile} image tile(s) but pixel_values "
                f"holds {pixels.shape[0]}: pass the processor's pixel_values and input_ids together"
            )
        return dataclasses.replace(prepared, inputs={**prepared.inputs, "pixel_values": pixels})

    def example(
        self, model: nn.Module, batch: int = 2, text: int = 6, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """A valid random prompt (check_adapter): one tile per row (so that a row's slice of every input is the
        row alone), its placeholders after the first two text tokens."""
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        vision = model.config.vision_config
        h, w = _pair(vision.image_size)
        dtype = next(model.parameters()).dtype
        pixels = torch.randn(batch, vision.num_channels, h, w, generator=gen).to(dtype)
        ids = insert_placeholders(model, random_text(model, batch, text, gen), tokens_per_tile(model))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def _swiglu_vlm(model_type: str, projector_classes: tuple[str, ...]) -> Any:
    """The declaration with images of a SigLIP-tower, SwiGLU-projector type, from its text-only one."""
    text_only = _REGISTRY[model_type]
    text = text_only.inputs
    return register_adapter(
        with_images(
            text_only,
            SwiGluTower(
                path="vision_tower",
                layers="encoder.layers",
                attention="self_attn",
                layout=_tower_layout(()),
                modules=(*_SIGLIP_TOWER, *projector_classes),
                norms={"LayerNorm": layer_norm},
                constants=("embeddings.position_embedding",),
                cut=("head",),
            ),
            TileRowsInputs(
                position_ids=text.position_ids,
                max_positions=text.max_positions,
                placeholders=text.placeholders,
                tokens=lambda model, _pixels: tokens_per_tile(model),
            ),
            tiny={
                **text_only.tiny,
                "vision_config": dict(TINY_TOWER),
                "alignment_intermediate_size": 64,  # the SwiGLU: 32 channels of x, 32 of gate
                # inside the tiny vocabulary (the model embeds the placeholder before replacing it)
                "image_token_id": 96,
            },
        )
    )


AYA_VISION = _swiglu_vlm("aya_vision", ("AyaVisionMultiModalProjector", "SiLUActivation"))
COHERE2_VISION = _swiglu_vlm("cohere2_vision", ("Cohere2VisionMultiModalProjector", "SiLU"))
