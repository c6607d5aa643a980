"""Idefics3 and SmolVLM explained with their images (``idefics3``, ``smolvlm``; issue 19).

Both models split an image into tiles (up to ``max_image_size`` square each, in rows and columns) plus the whole
image resized to one tile (the "global" image), and run every tile through a SigLIP-like vision tower:

- **tower** (``Idefics3VisionTransformer``): patch convolution, a learned position table read at position ids
  that the embeddings module computes from the tile's patch attention mask (bucketed fractional coordinates, so
  a tile padded to the tile size still sees positions spread over the whole table), LayerNorm blocks with the
  ``"lrp"`` attention, a post-LayerNorm; no class token.
- **connector**: a pixel shuffle (a reshape that moves each ``scale x scale`` block of patches into one feature
  vector: linear, so relevance moves with the values, autograd needs no rule) and ``SimpleMLP`` (one linear map
  without bias: the epsilon rule). Each tile fills ``(side / patch)^2 / scale^2`` placeholder tokens.

The tower's leaves sit at the embedding sum ``e = conv(patches) + table[position_ids]``: ``image_token`` (the
patch contents) and ``image_position`` (the table rows the model looked up, taken from the position table's own
output so that the bucketed ids are the model's). The rebuilt sum is checked to be bit-identical to the module's.

**Layout of the maps.** ``pixel_values`` is [B, n_tiles, C, H, W] (the processor's output: a row's tiles in the
order of its placeholders, all-zero tiles padding rows with fewer tiles, which the model drops).
``image`` / ``image_position`` are [B, n_tiles * P] (P patches of a tile, raster order within a tile, tiles in
``pixel_values`` order, padding tiles exactly 0), and ``image_grid`` [B, 2] is ``(n_tiles * h, w)``: the tiles
stacked from top to bottom, each ``h x w`` patches (reshape ``image[b]`` to ``image_grid[b]`` to draw them;
with the processor's splitting the last real tile of a row is the global image). ``image_special`` is 0 (no
class token). A row with several images holds all their tiles in one map; which tile belongs to which image
is told by the text (the processor's ``<row_i_col_j>`` / ``<global-img>`` tokens), not by the tensors.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import LRPConfig
from ..errors import AttributionInputError, AttributionStateError
from ..hooks import Handles, HookRule, LeafStore, make_leaf
from ..inputs import Prepared, TextInputs, check_unknown_inputs
from ..modules import find_module
from ..rules import relevance_of
from .base import _REGISTRY, register_adapter
from .norms import layer_norm
from .vision_language import (
    IMAGE_LEAVES,
    ImageTextInputs,
    VisionTower,
    _image_token_id,
    pixel_tensor,
    pixel_values_fit,
    placeholder_prompt,
    require_input_ids,
    with_images,
)
from .vit import _pair
from .vlm_images import TINY_TOWER
from .vlm_text import _IDEFICS3_TOWER


def real_tiles(pixels: torch.Tensor) -> torch.Tensor:
    """[B, n_tiles] bool: the tiles the model runs through its tower (it drops all-zero padding tiles)."""
    flat = pixels.reshape(*pixels.shape[:2], -1)
    return (flat == 0.0).sum(-1) != flat.shape[-1]


def tokens_per_tile(model: nn.Module) -> int:
    """Placeholder tokens one tile fills: its patches over the pixel shuffle's ``scale^2``."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    return int(side**2 / model.config.scale_factor**2)


@dataclass
class TileEmbeddingLeaves(HookRule):
    """Leaves ``image_token`` (patch contents) and ``image_position`` (looked-up table rows) at an
    ``Idefics3VisionEmbeddings`` module; the embedding output is rebuilt as their sum, bit-identical.

    The position rows are read from the position table's own output (a hook on ``position_embedding``), so the
    ids are the model's bucketed ones whatever the patch attention mask; with ``positional=False`` they are a
    constant that absorbs its relevance.
    """

    store: LeafStore
    positional: bool

    def attach(self, module: nn.Module, handles: Handles) -> None:
        store = self.store
        token_name, position_name = IMAGE_LEAVES
        signature = inspect.signature(type(module).forward)

        def patches_out(_module, _args, output):
            store.aux["image_patches"] = output.flatten(2).transpose(1, 2)

        def table_out(_module, _args, output):
            store.aux["image_table_rows"] = output

        def embeddings_out(emb, args, kwargs, output):
            given = signature.bind(emb, *args, **kwargs).arguments
            pixels = given["pixel_values"]
            store.aux["image_pixels_shape"] = tuple(pixels.shape[-2:])
            store.aux["image_patch_size"] = _pair(emb.patch_embedding.kernel_size)
            token = make_leaf(store.aux.pop("image_patches"))
            position = store.aux.pop("image_table_rows").detach()
            if self.positional:
                position = make_leaf(position)
                store.additive[position_name] = position
            store.additive[token_name] = token
            rebuilt = token + position
            if not torch.equal(rebuilt.detach(), output.detach()):
                raise AttributionStateError(
                    f"{type(emb).__name__} computed something other than conv(patches) + position_embedding("
                    "position_ids); hf_pelrp cannot split it into image token and position leaves."
                )
            return rebuilt

        handles.append(module.patch_embedding.register_forward_hook(patches_out))
        handles.append(module.position_embedding.register_forward_hook(table_out))
        handles.append(module.register_forward_hook(embeddings_out, with_kwargs=True))


@dataclass
class TileRows(HookRule):
    """Records which tiles of ``pixel_values`` [B, n_tiles, ...] are real (``store.aux["image_tiles"]``), at the
    VLM's base model: the tower sees the real tiles only, in row order, and :meth:`TiledTower.read` puts their
    maps back into their rows."""

    store: LeafStore

    def attach(self, module: nn.Module, handles: Handles) -> None:
        def before(_module, args, kwargs):
            pixels = kwargs.get("pixel_values")
            if isinstance(pixels, torch.Tensor) and pixels.dim() == 5:
                self.store.aux["image_tiles"] = real_tiles(pixels)

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))


@dataclass(frozen=True)
class TiledTower(VisionTower):
    """The Idefics3 / SmolVLM vision tower: one pass per tile, maps laid out per row as tiles stacked top to
    bottom (module docstring)."""

    def rules(
        self, model: nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[nn.Module, HookRule]]:
        emb = find_module(self.tower(model), "embeddings")
        return [
            (emb, TileEmbeddingLeaves(store, config.positional)),
            (getattr(model, "base_model", model), TileRows(store)),
        ]

    def read(self, model: nn.Module, store: LeafStore) -> dict[str, torch.Tensor] | None:
        token_leaf = store.additive.get("image_token")
        if token_leaf is None:
            return None
        token = relevance_of(token_leaf)  # [real tiles, P]
        leaf = store.additive.get("image_position")
        position = torch.zeros_like(token) if leaf is None else relevance_of(leaf).to(token)
        tiles = store.aux["image_tiles"].to(token.device)
        rows, slots = tiles.shape
        patches = token.shape[-1]

        def per_row(values: torch.Tensor) -> torch.Tensor:
            out = values.new_zeros(rows * slots, patches)
            out[tiles.reshape(-1)] = values
            return out.reshape(rows, slots * patches)

        height, width = store.aux["image_pixels_shape"]
        patch_h, patch_w = store.aux["image_patch_size"]
        grid = torch.tensor([slots * (height // patch_h), width // patch_w], device=token.device)
        return {
            "image": per_row(token),
            "image_position": per_row(position),
            "image_special": token.new_zeros(rows),
            "image_grid": grid.expand(rows, 2).clone(),
        }

    def tokens_per_image(self, model: nn.Module, pixels: torch.Tensor) -> int:
        """Placeholders of one tile (a row fills one set per real tile)."""
        return tokens_per_tile(model)


@dataclass(frozen=True)
class TiledImageTextInputs(ImageTextInputs):
    """Idefics3 / SmolVLM inputs: text, and optionally ``pixel_values`` [B, n_tiles, C, H, W] (every tile of the
    tower's size, all-zero tiles padding rows with fewer) with an optional ``pixel_attention_mask``
    [B, n_tiles, H, W] (the processor's: False on padded pixels). Row ``b`` must hold ``tokens_per_tile`` image
    placeholders per real tile of row ``b``, and at least one real tile."""

    image_keys: tuple[str, ...] = ("pixel_attention_mask",)

    def validate(self, model: nn.Module, inputs: dict[str, Any]) -> Prepared:
        inputs = {k: v for k, v in inputs.items() if v is not None}
        pixels = inputs.pop("pixel_values", None)
        mask = inputs.pop("pixel_attention_mask", None)
        if pixels is None:
            if mask is not None:
                raise AttributionInputError("pixel_attention_mask comes with images: pass pixel_values too")
            return super().validate(model, inputs)  # text only: placeholder tokens refused
        check_unknown_inputs(inputs, self.accepted(), model)
        require_input_ids(model, inputs)
        prepared = TextInputs.validate(self, model, inputs)  # text checks, placeholders allowed
        ids = prepared.inputs["input_ids"]
        pixels = _checked_tiles(model, pixels, ids.shape[0])
        extra: dict[str, Any] = {}
        if mask is not None:
            extra["pixel_attention_mask"] = _checked_mask(mask, pixels)
        real = real_tiles(pixels)
        empty = [i for i, n in enumerate(real.sum(-1).tolist()) if n == 0]
        if empty:
            raise AttributionInputError(
                f"row {empty[0]} of pixel_values holds only all-zero (padding) tiles: hf_pelrp explains rows with "
                "an image; attribute text-only rows in a separate call, without pixel_values."
            )
        placeholder = _image_token_id(model)
        per_tile = tokens_per_tile(model)
        expected = real.sum(-1) * per_tile
        counts = (ids == placeholder).sum(-1)
        wrong = [
            (i, int(c), int(e))
            for i, (c, e) in enumerate(zip(counts.tolist(), expected.tolist(), strict=True))
            if c != e
        ]
        if wrong:
            row, count, want = wrong[0]
            raise AttributionInputError(
                f"row {row} holds {count} image placeholder token(s) (id {placeholder}), but its {want // per_tile} "
                f"image tile(s) fill {want} ({per_tile} each): build the prompt and pixel_values together with "
                "the model's processor (row i's tiles in row i of pixel_values, all-zero tiles as padding)."
            )
        return dataclasses.replace(prepared, inputs={**prepared.inputs, "pixel_values": pixels, **extra})

    def example(
        self, model: nn.Module, batch: int = 2, text: int = 6, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """A valid random prompt (check_adapter): 3 tile slots per row; row 0 has 3 real tiles, the other rows 2
        real tiles and an all-zero padding tile, the first of them with its right-most patch column padded
        (``pixel_attention_mask`` False there, pixels 0, as the processor pads); each row's placeholders after
        its first two text tokens, padding-free text of equal length."""
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        vision = model.config.vision_config
        h, w = _pair(vision.image_size)
        dtype = next(model.parameters()).dtype
        slots, per_tile = 3, tokens_per_tile(model)
        pixels = torch.randn(batch, slots, vision.num_channels, h, w, generator=gen).to(dtype)
        mask = torch.ones(batch, slots, h, w, dtype=torch.long)
        pixels[1:, -1] = 0.0
        mask[1:, -1] = 0
        if batch > 1:
            pixels[1, 0, :, :, -vision.patch_size :] = 0.0
            mask[1, 0, :, -vision.patch_size :] = 0
        real = real_tiles(pixels).sum(-1)
        ids = placeholder_prompt(model, [n * per_tile for n in real.tolist()], text, gen)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": pixels,
            "pixel_attention_mask": mask,
        }


def _checked_tiles(model: nn.Module, pixels: Any, rows: int) -> torch.Tensor:
    name = type(model).__name__
    pixels = pixel_tensor(pixels)
    if pixels.dim() != 5:
        raise AttributionInputError(
            f"{name} takes pixel_values of shape [batch, tiles, channels, height, width] (its processor's "
            f"output), got {tuple(pixels.shape)}"
        )
    if pixels.shape[0] != rows:
        raise AttributionInputError(
            f"pixel_values has {pixels.shape[0]} row(s) of tiles for {rows} prompt row(s): row i of pixel_values "
            "holds the tiles of row i's image(s)"
        )
    vision = model.config.vision_config
    if pixels.shape[2] != vision.num_channels:
        raise AttributionInputError(
            f"pixel_values has {pixels.shape[2]} channel(s) but {name}'s vision tower expects {vision.num_channels}"
        )
    if tuple(pixels.shape[-2:]) != _pair(vision.image_size):
        h, w = _pair(vision.image_size)
        raise AttributionInputError(
            f"the image tiles are {pixels.shape[-2]}x{pixels.shape[-1]} but {name} fills its placeholders from "
            f"{h}x{w} tiles: prepare the images with the model's processor (it splits and pads them to tiles)"
        )
    return pixel_values_fit(model, pixels)


def _checked_mask(mask: Any, pixels: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise AttributionInputError(f"pixel_attention_mask must be a tensor, got {type(mask).__name__}")
    want = (*pixels.shape[:2], *pixels.shape[-2:])
    if tuple(mask.shape) != want:
        raise AttributionInputError(
            f"pixel_attention_mask has shape {tuple(mask.shape)} but pixel_values {tuple(pixels.shape)} needs "
            f"{want} (one mask per tile, over its pixels)"
        )
    if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
        raise AttributionInputError("pixel_attention_mask must hold 0 / 1 (or bool) values")
    return mask


def _tiled(model_type: str, prefix: str) -> Any:
    text_only = _REGISTRY[model_type]
    tower = TiledTower(
        path="vision_model",
        layers="encoder.layers",
        attention="self_attn",
        modules=tuple(c.format(p=prefix) for c in _IDEFICS3_TOWER),
        norms={"LayerNorm": layer_norm},
        constants=("embeddings.position_embedding",),
    )
    text = text_only.inputs
    inputs = TiledImageTextInputs(
        position_ids=text.position_ids,
        max_positions=text.max_positions,
        placeholders=text.placeholders,
        tokens=lambda model, _pixels: tokens_per_tile(model),
    )
    tiny = {
        **text_only.tiny,
        "vision_config": dict(TINY_TOWER),
        "scale_factor": 2,
        # inside the tiny vocabulary (the model embeds the placeholder before replacing it); the random text of
        # check_adapter avoids it
        "image_token_id": 96,
    }
    return register_adapter(with_images(text_only, tower, inputs, tiny=tiny))


IDEFICS3 = _tiled("idefics3", "Idefics3")
SMOLVLM = _tiled("smolvlm", "SmolVLM")
