"""LLaVA-NeXT explained with its images (``llava_next``, ``llava_next_video`` on images, ``llava_onevision``;
issue 19).

LLaVA-NeXT ("anyres") resizes an image to the best of ``config.image_grid_pinpoints``, cuts it into tiles of the
tower's size and adds the whole image resized to one tile (the "base" tile, first). Every tile runs through the
CLIP tower (:data:`~hf_pelrp.adapters.vlm_images.CLIP_TOWER`: class token, learned positions, the leaves
``image_token`` / ``image_position`` at its embedding sum) and LLaVA's MLP projector. The model then packs the
features: the base tile's patches, then the other tiles' patches laid out as one large grid, cropped to the
image's aspect ratio (``unpad_image``: the patches of the padding are dropped) with the learned
``image_newline`` vector appended after every row of that grid.

Relevance of the parts:

- patch contents and positions of every tile: ``image`` / ``image_position``; a cropped patch reaches the answer
  only through the tower's attention within its tile, and gets what flows that way;
- the class tokens of the tiles (dropped by ``vision_feature_select_strategy="default"`` after the tower, but
  attended to inside it) and the ``image_newline`` copies: ``image_special`` (per row: every tile's class token,
  content and position, plus the row's newlines). The newline is a parameter: its relevance is read at the
  language model's input (a zero-valued straight-through probe on the newline positions, whose gradient is the
  relevance reaching them), so that conservation holds with it.

**Layout of the maps.** ``pixel_values`` is [B, n_tiles, C, H, W] (the processor's output: row ``b`` holds
the tiles of its image, base tile first, then the grid tiles row by row; slots past the number of tiles
``image_sizes[b]`` gives are padding, which the model ignores). ``image`` / ``image_position`` are
[B, n_tiles * P] (P patches of a tile in raster order, tiles in ``pixel_values`` order, padding slots exactly 0)
and ``image_grid`` is ``(n_tiles * h, w)``: the tiles stacked from top to bottom, as for Idefics3
(:mod:`hf_pelrp.adapters.vlm_idefics3`). One image per row; ``image_sizes`` [B, 2] (height, width) is required.

LLaVA-OneVision packs the same way with a SigLIP tower (no class token, ``"full"`` features) and resizes the
cropped grid (bilinear) when it holds more than ``anyres_max_N`` tiles' worth of patches: a linear map, through
which relevance moves by its gradient (the epsilon rule of a map without bias). ``batch_num_images`` other than
one image per row is refused.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import LRPConfig
from ..errors import AttributionInputError, UnsupportedModelError
from ..hooks import Handles, HookRule, LeafStore, make_leaf
from ..inputs import Prepared, TextInputs, check_unknown_inputs
from ..rules import relevance_of
from .base import _REGISTRY, register_adapter
from .vision_language import (
    ImageTextInputs,
    VisionTower,
    _image_token_id,
    placeholder_prompt,
    require_input_ids,
    with_images,
)
from .vit import _pair
from .vlm_idefics3 import _checked_tiles
from .vlm_images import CLIP_TOWER, SIGLIP_TOWER, TINY_TOWER
from .vlm_text import _SIGLIP_TOWER

#: the marker of a newline in :func:`feature_layout`
NEWLINE = -1


def tiles_per_image(model: nn.Module, image_sizes: torch.Tensor) -> list[int]:
    """The number of tiles (base tile included) of each image of ``image_sizes`` [N, 2], with the model's code."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    return [
        image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
        for size in image_sizes
    ]


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def feature_layout(model: nn.Module, image_sizes: torch.Tensor) -> list[torch.Tensor]:
    """Per image, what each of its placeholder tokens holds: ``tile * P + patch`` (tile 0 is the base tile) or
    :data:`NEWLINE`. Computed by running the model's own ``pack_image_features`` on index tensors, so that the
    grid arrangement and the ``unpad_image`` crop are the model's. (Where LLaVA-OneVision interpolates a large
    grid down, the entries of the grid are no longer indices; the newlines and the length stay exact.)"""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    patches = side * side
    features = [
        torch.arange(n * patches, dtype=torch.float64).reshape(n, patches, 1)
        for n in tiles_per_image(model, image_sizes)
    ]
    pack = _base(model).pack_image_features
    options: dict[str, Any] = {"image_newline": torch.tensor([float(NEWLINE)], dtype=torch.float64)}
    accepted = inspect.signature(pack).parameters
    if "vision_feature_select_strategy" in accepted:
        options["vision_feature_select_strategy"] = model.config.vision_feature_select_strategy
    if "vision_aspect_ratio" in accepted:
        options["vision_aspect_ratio"] = model.config.vision_aspect_ratio
    packed, _ = pack(features, image_sizes, **options)
    return [p[:, 0].long() for p in packed]


@dataclass
class NewlineProbe(HookRule):
    """At the language model's input: a leaf ``image_newline`` [n, D] holding the ``image_newline`` copies the
    model put into the prompt, added as ``leaf - leaf.detach()`` (exactly 0, so the values are unchanged), whose
    gradient is the relevance reaching them. The positions come from ``store.aux["image_newline_mask"]``, set by
    :class:`NewlineMask` in the same forward pass."""

    store: LeafStore

    def attach(self, module: nn.Module, handles: Handles) -> None:
        def before(_module, args, kwargs):
            mask = self.store.aux.pop("image_newline_mask", None)
            embeds = kwargs.get("inputs_embeds")
            if mask is None or embeds is None:
                return None
            mask = mask.to(embeds.device)
            leaf = make_leaf(embeds[mask])
            self.store.additive["image_newline"] = leaf
            delta = torch.zeros_like(embeds).index_put((mask,), leaf - leaf.detach())
            self.store.aux["image_newline_rows"] = mask.nonzero()[:, 0]
            return args, {**kwargs, "inputs_embeds": embeds + delta}

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))


@dataclass
class NewlineMask(HookRule):
    """At the VLM's base model: the tiles per row (``store.aux["image_tiles"]``), the tile slots of
    ``pixel_values`` (``["image_slots"]``) and the [B, T] mask of the
    prompt positions that will hold an ``image_newline`` copy (``store.aux["image_newline_mask"]``)."""

    store: LeafStore

    def attach(self, module: nn.Module, handles: Handles) -> None:
        def before(model_module, args, kwargs):
            sizes = kwargs.get("image_sizes")
            ids = kwargs.get("input_ids", args[0] if args else None)
            if kwargs.get("pixel_values") is None or sizes is None or ids is None:
                return
            self.store.aux["image_tiles"] = tiles_per_image(model_module, sizes)
            self.store.aux["image_slots"] = kwargs["pixel_values"].shape[1]
            placeholders = ids == model_module.config.image_token_id
            mask = torch.zeros_like(placeholders)
            layout = torch.cat(feature_layout(model_module, sizes)).to(ids.device)
            mask[placeholders] = layout == NEWLINE
            self.store.aux["image_newline_mask"] = mask

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))


@dataclass(frozen=True)
class AnyresTower(VisionTower):
    """LLaVA-NeXT's CLIP tower run on every tile, with the ``image_newline`` probe (module docstring)."""

    def rules(
        self, model: nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[nn.Module, HookRule]]:
        base = _base(model)
        return [
            *super().rules(model, config, store),
            (base, NewlineMask(store)),
            (base.language_model, NewlineProbe(store)),
        ]

    def read(self, model: nn.Module, store: LeafStore) -> dict[str, torch.Tensor] | None:
        tiles = super().read(model, store)  # per tile of the tower's batch
        if tiles is None:
            return None
        counts = store.aux["image_tiles"]
        rows, slots = len(counts), store.aux["image_slots"]
        patches = tiles["image"].shape[-1]

        def per_row(values: torch.Tensor) -> torch.Tensor:
            out = values.new_zeros(rows, slots, patches)
            for row, part in enumerate(values.split(counts)):
                out[row, : len(part)] = part
            return out.reshape(rows, slots * patches)

        special = torch.stack([part.sum() for part in tiles["image_special"].split(counts)])
        leaf = store.additive.get("image_newline")
        if leaf is not None:
            newline = relevance_of(leaf).to(special)
            where = store.aux["image_newline_rows"].to(special.device)
            special = special.index_add(0, where, newline)
        grid = tiles["image_grid"][0] * torch.tensor([slots, 1], device=special.device)
        return {
            "image": per_row(tiles["image"]),
            "image_position": per_row(tiles["image_position"]),
            "image_special": special,
            "image_grid": grid.expand(rows, 2).clone(),
        }


@dataclass(frozen=True)
class AnyresImageTextInputs(ImageTextInputs):
    """LLaVA-NeXT inputs: text, and optionally ``pixel_values`` [B, n_tiles, C, H, W] with ``image_sizes``
    [B, 2] (one image per row, each of the tower's tile size); row ``b`` must hold as many image placeholders as
    the model packs for ``image_sizes[b]`` (patches of the kept tiles and the newlines)."""

    image_keys: tuple[str, ...] = ("image_sizes",)
    #: the feature strategy the packing needs: ``"default"`` drops a CLIP tower's class token, ``"full"`` keeps
    #: every token of a SigLIP tower (which has none)
    strategy: str = "default"

    def validate(self, model: nn.Module, inputs: dict[str, Any]) -> Prepared:
        inputs = {k: v for k, v in inputs.items() if v is not None}
        pixels = inputs.pop("pixel_values", None)
        sizes = inputs.pop("image_sizes", None)
        per_row = inputs.pop("batch_num_images", None)
        if pixels is None:
            if sizes is not None or per_row is not None:
                raise AttributionInputError(
                    "image_sizes / batch_num_images come with images: pass pixel_values too"
                )
            return super().validate(model, inputs)  # text only: placeholder tokens refused
        if per_row is not None and (len(per_row) != len(pixels) or any(int(n) != 1 for n in per_row)):
            raise AttributionInputError(
                f"batch_num_images={[int(n) for n in per_row]}: hf_pelrp explains one image per prompt row; attribute rows "
                "with several images one image at a time"
            )
        name = type(model).__name__
        if inputs.get("pixel_values_videos") is not None:
            raise AttributionInputError(
                f"{name}'s videos are not explained by hf_pelrp (images are): leave pixel_values_videos out"
            )
        if model.config.vision_feature_select_strategy != self.strategy:
            raise UnsupportedModelError(
                f"{name} with vision_feature_select_strategy={model.config.vision_feature_select_strategy!r}: "
                f"it packs tiles of patches only with {self.strategy!r} (the patches without a class token)"
            )
        check_unknown_inputs(inputs, self.accepted(), model)
        require_input_ids(model, inputs)
        prepared = TextInputs.validate(self, model, inputs)
        ids = prepared.inputs["input_ids"]
        for key in self.placeholders:
            value = getattr(model.config, key, None)
            if key != "image_token_id" and value is not None and bool((ids == value).any()):
                raise AttributionInputError(
                    f"input_ids hold the placeholder token {value} (config.{key}) of an input hf_pelrp does not "
                    "explain (videos): remove it from the prompt"
                )
        pixels = _checked_tiles(model, pixels, ids.shape[0])
        sizes = _checked_sizes(sizes, ids.shape[0])
        need = tiles_per_image(model, sizes)
        short = [(i, n) for i, n in enumerate(need) if n > pixels.shape[1]]
        if short:
            row, n = short[0]
            raise AttributionInputError(
                f"image_sizes[{row}] = {sizes[row].tolist()} makes {n} tiles (base tile included, grid from "
                f"config.image_grid_pinpoints) but pixel_values holds {pixels.shape[1]} per row: pass the "
                "processor's pixel_values and image_sizes together"
            )
        counts = (ids == _image_token_id(model)).sum(-1).tolist()
        wanted = [len(layout) for layout in feature_layout(model, sizes)]
        wrong = [(i, c, w) for i, (c, w) in enumerate(zip(counts, wanted, strict=True)) if c != w]
        if wrong:
            row, count, want = wrong[0]
            raise AttributionInputError(
                f"row {row} holds {count} image placeholder token(s) (id {_image_token_id(model)}), but its image "
                f"of size {sizes[row].tolist()} fills {want} (the kept patches of its tiles and the newlines): "
                "build the prompt with the model's processor, one image per row"
            )
        extra = {} if per_row is None else {"batch_num_images": per_row}
        return dataclasses.replace(
            prepared, inputs={**prepared.inputs, "pixel_values": pixels, "image_sizes": sizes, **extra}
        )

    def example(
        self, model: nn.Module, batch: int = 2, text: int = 6, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """A valid random prompt (check_adapter): images of sizes cycling through (32, 32) and (12, 40) with the
        tiny pinpoints (5 and 3 tiles; the second cropped to 2 of its 4 patch rows), padding slots of zeros, each
        row's placeholders after its first two text tokens, padding-free text of equal length."""
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        vision = model.config.vision_config
        h, w = _pair(vision.image_size)
        dtype = next(model.parameters()).dtype
        choices = [[2 * h, 2 * w], [(3 * h) // 4, (5 * w) // 2]]
        sizes = torch.tensor([choices[i % 2] for i in range(batch)])
        counts = tiles_per_image(model, sizes)
        pixels = torch.zeros(batch, max(counts), vision.num_channels, h, w, dtype=dtype)
        for row, n in enumerate(counts):
            pixels[row, :n] = torch.randn(n, vision.num_channels, h, w, generator=gen).to(dtype)
        lengths = [len(layout) for layout in feature_layout(model, sizes)]
        ids = placeholder_prompt(model, lengths, text, gen)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": pixels,
            "image_sizes": sizes,
        }


def _checked_sizes(sizes: Any, rows: int) -> torch.Tensor:
    if sizes is None:
        raise AttributionInputError(
            "LLaVA-NeXT needs image_sizes [batch, 2] (each image's height and width, the processor's output) "
            "with pixel_values"
        )
    sizes = torch.as_tensor(sizes)
    if sizes.dim() != 2 or sizes.shape != (rows, 2) or sizes.is_floating_point():
        raise AttributionInputError(
            f"image_sizes must be an integer tensor [{rows}, 2] (height, width of each row's image), got "
            f"{tuple(sizes.shape)} {sizes.dtype}"
        )
    if bool((sizes <= 0).any()):
        raise AttributionInputError("image_sizes must be positive (height, width of each image)")
    return sizes


def _anyres(model_type: str, tower: VisionTower = CLIP_TOWER, strategy: str = "default", **tiny: Any) -> Any:
    """The declaration with images of an anyres type (LLaVA-NeXT's packing), from its text-only one (``tower``:
    where its vision tower is and what it is; ``tiny``: more tiny config fields)."""
    text_only = _REGISTRY[model_type]
    text = text_only.inputs
    return register_adapter(
        with_images(
            text_only,
            AnyresTower(**{f.name: getattr(tower, f.name) for f in dataclasses.fields(VisionTower)}),
            AnyresImageTextInputs(
                position_ids=text.position_ids,
                max_positions=text.max_positions,
                placeholders=text.placeholders,
                tokens=lambda model, _pixels: tower.tokens_per_image(model, _pixels),
                strategy=strategy,
                image_keys=("image_sizes", "batch_num_images"),
            ),
            tiny={
                **text_only.tiny,
                # room for a 2x2 grid of tiles: 16 + 8 * 8 patches and 8 newlines
                "text_config": {**text_only.tiny["text_config"], "max_position_embeddings": 128},
                "vision_config": dict(TINY_TOWER),
                # tiles of 16x16: 1x2, 2x1 and 2x2 grids (3 to 5 tiles with the base tile)
                "image_grid_pinpoints": [[16, 32], [32, 16], [32, 32]],
                # the default -2 with the tiny tower's 2 layers: the first layer's output
                "vision_feature_layer": -2,
                # inside the tiny vocabulary (the model embeds the placeholder before replacing it)
                "image_token_id": 96,
                **tiny,
            },
        )
    )


LLAVA_NEXT = _anyres("llava_next")
#: LLaVA-NeXT-Video's images are LLaVA-NeXT's (the same tower, projector and packing); videos are refused
#: (its video placeholder inside the tiny vocabulary too, so that its refusal with images is tested)
LLAVA_NEXT_VIDEO = _anyres("llava_next_video", video_token_id=95)

#: LLaVA-OneVision's SigLIP tower (no class token; the attention-pooling head computed but unused: cut)
SIGLIP_ANYRES_TOWER = dataclasses.replace(SIGLIP_TOWER, modules=_SIGLIP_TOWER)
#: LLaVA-OneVision: LLaVA-NeXT's packing with a SigLIP tower ("full" features) and large grids interpolated down
#: to at most ``anyres_max_N`` tiles' worth of patches (bilinear: a linear map, relevance moves through it by
#: its gradient); the tiny model's ``anyres_max_1`` interpolates a 2x2 grid, so that this path is tested
LLAVA_ONEVISION = _anyres(
    "llava_onevision",
    SIGLIP_ANYRES_TOWER,
    "full",
    vision_feature_select_strategy="full",
    vision_feature_layer=-1,
    vision_aspect_ratio="anyres_max_1",
)
