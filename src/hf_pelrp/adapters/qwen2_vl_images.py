"""Qwen2-VL and Qwen2.5-VL explained with their images (issue 19): the vision transformer
(:class:`~hf_pelrp.adapters.qwen2_vl_vision.QwenVisionTower`), the patch merger and the M-RoPE language model in
one backward pass.

Each replaces the type's text-only declaration (:mod:`hf_pelrp.adapters.qwen2_vl`): text-only prompts are
explained exactly as before. A prompt with images is the image processor's output: ``pixel_values``
[total patches, C * T * ps * ps] (or [images, patches, C * T * ps * ps]), ``image_grid_thw`` [images, 3] and
``input_ids`` holding ``t * h * w / merge**2`` placeholder tokens per image. hf_pelrp computes the text's 3-D
M-RoPE positions from the grids itself (the model's ``get_rope_index``; placeholders get the (t, h, w) position of
their merged patch, the text after the image continues after it), so the text's positional maps are those of the
positions the model really uses, and the model's cached ``rope_deltas`` are left alone.

One image per row, all of one size (one call per image size), ``t = 1``; videos are refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import AttributionInputError
from ..inputs import Prepared, TextInputs, check_unknown_inputs
from .base import _REGISTRY, GatedProduct, register_adapter
from .norms import layer_norm, rms_norm
from .qwen2_vl import QWEN2_5_VL_VISION, QWEN2_VL_VISION, TextOnlyInputs
from .qwen2_vl_vision import QwenVisionTower
from .vision_language import (
    ImageTextInputs,
    _image_token_id,
    insert_placeholders,
    pixel_tensor,
    pixel_values_fit,
    random_text,
    require_input_ids,
    with_images,
)

#: keywords of videos and of precomputed vision outputs, refused with images too
_VIDEO = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
_PRECOMPUTED = ("mm_encoder_outputs", "rope_deltas")


@dataclass(frozen=True)
class QwenImageInputs(ImageTextInputs):
    """The inputs of a Qwen-VL model with images: ``pixel_values`` as flattened patches, ``image_grid_thw``,
    optionally ``mm_token_type_ids`` (made from the placeholders when absent). See the module docstring.

    ``example_grid`` is the (h, w) patch grid of :meth:`example`'s images (check_adapter): not square, and wide
    enough for Qwen2.5-VL's tiny windows to reorder the patches."""

    example_grid: tuple[int, int] = (4, 8)
    image_keys: tuple[str, ...] = ("image_grid_thw", "mm_token_type_ids")

    def validate(self, model: nn.Module, inputs: dict[str, Any]) -> Prepared:
        inputs = {k: v for k, v in inputs.items() if v is not None}
        name = type(model).__name__
        videos = [k for k in _VIDEO if k in inputs]
        if videos or _token_in(model, inputs.get("input_ids"), "video_token_id"):
            what = ", ".join(videos) if videos else "video placeholder tokens"
            raise AttributionInputError(
                f"{name} is explained on images and text: videos ({what}) are not supported by hf_pelrp. "
                "Pass one image per row (pixel_values, image_grid_thw), or text only."
            )
        given = [k for k in _PRECOMPUTED if k in inputs]
        if given:
            raise AttributionInputError(
                f"{', '.join(given)} cannot be attributed: hf_pelrp runs the vision tower and computes the M-RoPE "
                "positions itself. Pass pixel_values and image_grid_thw (the processor's output)."
            )
        pixels = inputs.pop("pixel_values", None)
        grid = inputs.pop("image_grid_thw", None)
        types = inputs.pop("mm_token_type_ids", None)
        if pixels is None:
            if grid is not None:
                raise AttributionInputError("image_grid_thw comes with images: pass pixel_values too")
            if types is not None and bool((torch.as_tensor(types) != 0).any()):
                raise AttributionInputError(
                    "mm_token_type_ids marks image tokens but no pixel_values were given"
                )
            if _token_in(model, inputs.get("input_ids"), "image_token_id"):
                raise AttributionInputError(
                    "input_ids hold image placeholder tokens (config.image_token_id) but no pixel_values: pass "
                    "the image with its grid (pixel_values, image_grid_thw: the processor's output), one per row"
                )
            return TextOnlyInputs.validate(self, model, inputs)
        if "position_ids" in inputs:
            raise AttributionInputError(
                f"{name} computes the 3-D M-RoPE positions of a prompt with images from image_grid_thw: drop "
                "position_ids (hf_pelrp computes them as the model does)"
            )
        require_input_ids(model, inputs)
        check_unknown_inputs(inputs, self.accepted(), model)
        # text checks, placeholders allowed; the position limit is checked below on the M-RoPE positions (an
        # image of h x w merge units takes max(h, w) positions, not h * w)
        prepared = TextInputs.validate(dataclasses.replace(self, max_positions=None), model, inputs)
        ids = prepared.inputs["input_ids"]
        mask = prepared.inputs["attention_mask"]
        grid = _checked_grid(model, grid, ids.shape[0])
        pixels = _checked_patches(model, pixels, grid)
        placeholder = _image_token_id(model)
        merge = _vision(model).spatial_merge_size
        per_image = int(grid[0].prod()) // merge**2
        counts = (ids == placeholder).sum(-1)
        wrong = [(i, int(c)) for i, c in enumerate(counts.tolist()) if c != per_image]
        if wrong:
            row, count = wrong[0]
            raise AttributionInputError(
                f"row {row} holds {count} image placeholder token(s) (id {placeholder}), but an image of grid "
                f"{tuple(grid[0].tolist())} fills {per_image} (t * h * w / {merge}**2): build the prompt with the "
                "model's processor, one image per row."
            )
        expected = (ids == placeholder).to(torch.int32)
        if types is not None:
            types = torch.as_tensor(types)
            if types.shape != ids.shape or not bool((types.to(ids.device) == expected).all()):
                raise AttributionInputError(
                    "mm_token_type_ids does not mark exactly the image placeholder tokens (1) and the text (0): "
                    "pass the processor's mm_token_type_ids, or leave it out"
                )
        # the model's own M-RoPE positions (its compute_3d_position_ids would also cache rope_deltas on it)
        base = getattr(model, "base_model", model)
        with torch.no_grad():
            position_ids, _ = base.get_rope_index(
                ids, mm_token_type_ids=expected, image_grid_thw=grid.to(ids.device), attention_mask=mask
            )
        limit = self.max_positions(model.config) if self.max_positions is not None else None
        needed = int(position_ids.max()) + 1
        if limit is not None and needed > limit:
            raise AttributionInputError(
                f"the prompt with its image reaches position {needed - 1}, but {name} supports at most {limit} "
                "positions: shorten the text or use a smaller image"
            )
        out = dict(prepared.inputs)
        out.update(
            pixel_values=pixels,
            image_grid_thw=grid.to(ids.device),
            mm_token_type_ids=expected,
            position_ids=position_ids,
        )
        return dataclasses.replace(prepared, inputs=out)

    def example(
        self, model: nn.Module, batch: int = 2, text: int = 6, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """``text`` random tokens per row with one image's placeholders after the first two, and one random image
        per row of grid ``(1, *example_grid)``, its patches as ``[images, patches, features]`` (the model views
        them as ``[total patches, features]``; rows can be sliced)."""
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        vision = _vision(model)
        h, w = self.example_grid
        features = _patch_features(vision)
        dtype = next(model.parameters()).dtype
        pixels = torch.randn(batch, h * w, features, generator=gen).to(dtype)
        per_image = h * w // vision.spatial_merge_size**2
        ids = insert_placeholders(model, random_text(model, batch, text, gen), per_image)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": pixels,
            "image_grid_thw": torch.tensor([[1, h, w]] * batch),
            "mm_token_type_ids": (ids == _image_token_id(model)).to(torch.int32),
        }


def _vision(model: nn.Module) -> Any:
    return model.config.vision_config


def _patch_features(vision: Any) -> int:
    return int(vision.in_channels * vision.temporal_patch_size * vision.patch_size**2)


def _token_in(model: nn.Module, ids: Any, name: str) -> bool:
    value = getattr(model.config, name, None)
    return value is not None and isinstance(ids, torch.Tensor) and bool((ids == value).any())


def _checked_grid(model: nn.Module, grid: Any, rows: int) -> torch.Tensor:
    name = type(model).__name__
    if grid is None:
        raise AttributionInputError(
            f"{name} needs image_grid_thw with pixel_values (the image processor returns both)"
        )
    if (
        not isinstance(grid, torch.Tensor)
        or grid.is_floating_point()
        or grid.dim() != 2
        or grid.shape[-1] != 3
    ):
        raise AttributionInputError(
            "image_grid_thw must be an integer tensor of shape [images, 3] (t, h, w per image), got "
            f"{getattr(grid, 'shape', type(grid).__name__)}"
        )
    if grid.shape[0] != rows:
        raise AttributionInputError(
            f"{grid.shape[0]} image(s) for {rows} prompt row(s): hf_pelrp explains one image per row (row i holds "
            "image i). Attribute rows with several images, or without one, in separate calls."
        )
    if bool((grid[:, 0] != 1).any()):
        raise AttributionInputError(
            f"image_grid_thw has t = {grid[:, 0].tolist()}: hf_pelrp explains single images (t = 1), not videos "
            "or stacked frames"
        )
    merge = _vision(model).spatial_merge_size
    if bool((grid[:, 1:] <= 0).any()) or bool((grid[:, 1:] % merge != 0).any()):
        raise AttributionInputError(
            f"image_grid_thw {grid.tolist()}: h and w must be positive multiples of the merge size {merge} (the "
            "image processor's grids are)"
        )
    if bool((grid != grid[:1]).any()):
        raise AttributionInputError(
            f"the images have different patch grids {grid[:, 1:].tolist()}: hf_pelrp gives per-image maps of one "
            "size; attribute images of different sizes in separate calls (or resize them to one size)"
        )
    return grid.to(torch.long)


def _checked_patches(model: nn.Module, pixels: Any, grid: torch.Tensor) -> torch.Tensor:
    vision = _vision(model)
    features = _patch_features(vision)
    pixels = pixel_tensor(pixels)
    patches = int(grid.prod(-1).sum())
    per_image = int(grid[0].prod())
    shapes = [(patches, features), (grid.shape[0], per_image, features)]
    if tuple(pixels.shape) not in shapes:
        raise AttributionInputError(
            f"pixel_values has shape {tuple(pixels.shape)}, but image_grid_thw {grid.tolist()} asks for "
            f"{shapes[0]} (flattened patches of {vision.in_channels} x {vision.temporal_patch_size} x "
            f"{vision.patch_size} x {vision.patch_size}) or {shapes[1]}: use the model's image processor"
        )
    return pixel_values_fit(model, pixels)


_QWEN2_VL_TOWER = QwenVisionTower(
    path="visual",
    layers="blocks",
    attention="attn",
    modules=QWEN2_VL_VISION,
    norms={"LayerNorm": layer_norm},
)

_QWEN2_5_VL_TOWER = QwenVisionTower(
    path="visual",
    layers="blocks",
    attention="attn",
    modules=QWEN2_5_VL_VISION,
    norms={"Qwen2_5_VLRMSNorm": rms_norm},
    gated=GatedProduct(act="mlp.act_fn", up="mlp.up_proj"),
    windowed=True,
)

#: tiny towers: 2 x 2 patches of 3 x 2 x 2 x 2 pixels, 2 blocks, heads of 8 channels (2 rotary frequencies per
#: axis); Qwen2.5-VL: windows of 2 x 2 merge units, block 0 windowed, block 1 full
_TINY_VISION = {
    "qwen2_vl": {
        "depth": 2,
        "embed_dim": 16,
        "hidden_size": 32,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 2,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
    },
    "qwen2_5_vl": {
        "depth": 2,
        "hidden_size": 16,
        "intermediate_size": 24,
        "out_hidden_size": 32,
        "num_heads": 2,
        "patch_size": 2,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "window_size": 8,
        "fullatt_block_indexes": [1],
    },
}


def _with_images(model_type: str, tower: QwenVisionTower) -> None:
    text = _REGISTRY[model_type]
    inputs = QwenImageInputs(
        position_ids=text.inputs.position_ids,
        max_positions=text.inputs.max_positions,
        placeholders=text.inputs.placeholders,
    )
    tiny = {
        **text.tiny,
        "vision_config": _TINY_VISION[model_type],
        # inside the tiny vocabulary (the model embeds the placeholders before replacing them), after the 97 ids
        # of the tiny decoders (tests compare with a plain Qwen2 of 97 ids); check_adapter's random text avoids them
        "text_config": {**text.tiny["text_config"], "vocab_size": 99},
        "image_token_id": 97,
        "video_token_id": 98,
    }
    register_adapter(with_images(text, tower, inputs, tiny=tiny))


_with_images("qwen2_vl", _QWEN2_VL_TOWER)
_with_images("qwen2_5_vl", _QWEN2_5_VL_TOWER)
