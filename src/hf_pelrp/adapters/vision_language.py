"""Vision-language models explained over the image patches, the text and the positions together (issue 19).

A vision-language model (VLM) embeds the prompt's text with its language model's table and, where the prompt
holds an image, replaces the image's placeholder tokens by the projected output of a vision tower. Its logit is
explained by one backward pass through all three parts:

- the **language model** keeps the rules, leaves and positional kind of its text declaration (token relevance at
  ``embed_tokens``, rotary / M-RoPE leaves in every layer): placeholder tokens get position relevance like any
  token, and exactly 0 token relevance (the model overwrites their embeddings, so nothing of them reaches the
  logit);
- the **projector** (LLaVA's linear-GELU-linear MLP, Gemma 3's average pooling, RMSNorm and matrix product) is
  linear maps, activations and norms: the epsilon rule, the identity rule and the norm surrogates of the
  declaration, as anywhere else;
- the **vision tower** (a :class:`VisionTower`) gets the ``"lrp"`` attention in every block and its own leaves at
  the patch embedding: ``image_token`` (the special tokens and the patch contents) and ``image_position`` (the
  tower's positions: a learned table for CLIP / SigLIP).

The result (:class:`hf_pelrp.Attribution`) carries the text maps as for a decoder, plus ``image`` [B, P] (each
patch's content), ``image_position`` [B, P], ``image_special`` [B] (the class token of CLIP-style towers, content
and position together; 0 where the tower has none) and ``image_grid`` [B, 2] (patch rows and columns, raster
order). Under bias-free CP rules the four add up with the text maps to the explained logit exactly
(``check_adapter`` proves it for every declared type); ``conservation_gap`` reports what the rules leave.

One image per prompt row (the images of ``pixel_values`` in row order); rows without an image, several images
in one row, videos and precomputed image features are refused with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..attention import AttentionRule, attention_rule
from ..config import LRPConfig
from ..errors import AttributionInputError, AttributionStateError, UnsupportedModelError
from ..hooks import HookRule, LeafStore, OutputGradient
from ..inputs import Prepared, check_unknown_inputs
from ..modules import find_module, find_optional
from ..rules import relevance_of
from .base import Adapter, Surrogate, _dispatches
from .qwen2_vl import TextOnlyInputs
from .vit import VisionEmbeddingLeaves, VisionLayout, _pair

#: the leaves of a vision tower (store.additive): the special tokens and patch contents, the tower's positions
IMAGE_LEAVES = ("image_token", "image_position")


@dataclass(frozen=True)
class VisionTower:
    """Where a VLM keeps its vision tower, and how the tower's leaves are made and read.

    The default methods describe a ViT-style tower (CLIP, SigLIP): ``e = [special tokens, patches] + positions``
    rebuilt at the embeddings module from the leaves ``image_token`` and ``image_position``
    (:class:`~hf_pelrp.adapters.vit.VisionEmbeddingLeaves` with the VLM's leaf names). Towers of another kind
    (2-D rotary positions, merged patches) subclass it and override :meth:`rules`, :meth:`attention_rule` and
    :meth:`read`.

    Parameters
    ----------
    path
        Path of the tower from the model's base model (``"vision_tower"``).
    layers
        Path of the tower's blocks from the tower (``"encoder.layers"``).
    attention
        Path of the attention module from each block (``"self_attn"``).
    layout
        Where a ViT-style tower keeps the parts of its embedding sum (``embeddings`` relative to the tower).
    modules
        Class names of the tower and the projector, whose computation the rules cover.
    norms
        Class name -> surrogate of the tower's and the projector's norms.
    constants
        Tower-relative paths of embedding tables that are constants of the pass (their values enter through
        leaves: the position table).
    cut
        Tower-relative paths of modules whose output the model computes but does not use (SigLIP's attention
        pooling head): cut from the relevance graph, so a model that used it would show a conservation gap
        instead of relevance through rules never applied.
    """

    path: str
    layers: str
    attention: str
    layout: VisionLayout | None = None
    modules: tuple[str, ...] = ()
    norms: Mapping[str, Surrogate] = field(default_factory=dict)
    constants: tuple[str, ...] = ()
    cut: tuple[str, ...] = ()

    def _layout(self) -> VisionLayout:
        # the ViT-style methods below read the layout; a tower of another kind overrides them
        if self.layout is None:
            raise UnsupportedModelError(
                f"the {type(self).__name__} declaration has no VisionLayout, and this method reads one: a tower "
                "of another kind overrides rules(), read() and tokens_per_image() (declaration error)"
            )
        return self.layout

    def tower(self, model: nn.Module) -> nn.Module:
        return find_module(getattr(model, "base_model", model), self.path)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(find_module(self.tower(model), self.layers))

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [find_module(block, self.attention) for block in self.blocks(model)]

    def rules(
        self, model: nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[nn.Module, HookRule]]:
        """The tower's leaves (and the cut of unused outputs)."""
        layout = self._layout()
        tower = self.tower(model)
        leaves = VisionEmbeddingLeaves(store, config.positional, layout, names=IMAGE_LEAVES, prefix="image_")
        rules: list[tuple[nn.Module, HookRule]] = [(find_module(tower, layout.embeddings), leaves)]
        for path in self.cut:
            module = find_optional(tower, path)
            if module is not None:
                rules.append((module, OutputGradient(0.0)))
        return rules

    def attention_rule(self, rule: AttentionRule, config: LRPConfig) -> AttentionRule:
        """The tower's attention rule: learned absolute positions do not change it."""
        return rule

    def read(self, model: nn.Module, store: LeafStore) -> dict[str, torch.Tensor] | None:
        """Per-image maps ``image`` [N, P], ``image_position`` [N, P], ``image_special`` [N], ``image_grid`` [N, 2]
        of the latest backward pass; ``None`` when no image ran through the tower."""
        token_leaf = store.additive.get("image_token")
        if token_leaf is None:
            return None
        layout = self._layout()
        emb = find_module(self.tower(model), layout.embeddings)
        specials = len(layout.special_tokens(emb))
        token = relevance_of(token_leaf)
        leaf = store.additive.get("image_position")
        position = torch.zeros_like(token) if leaf is None else relevance_of(leaf).to(token)
        height, width = store.aux["image_pixels_shape"]
        patch_h, patch_w = store.aux["image_patch_size"]
        grid = torch.tensor([height // patch_h, width // patch_w], device=token.device)
        return {
            "image": token[:, specials:],
            "image_position": position[:, specials:],
            "image_special": (token[:, :specials] + position[:, :specials]).sum(-1),
            "image_grid": grid.expand(token.shape[0], 2).clone(),
        }

    def tokens_per_image(self, model: nn.Module, pixels: torch.Tensor) -> int:
        """How many placeholder tokens one image of ``pixels`` fills (the patches, without special tokens)."""
        layout = self._layout()
        emb = find_module(self.tower(model), layout.embeddings)
        patch_h, patch_w = layout.patch_size(emb)
        return (pixels.shape[-2] // patch_h) * (pixels.shape[-1] // patch_w)


@dataclass(frozen=True)
class ImageTextInputs(TextOnlyInputs):
    """The inputs of a VLM: text (checked as its language model's), and optionally ``pixel_values`` with one
    image per row, each filling the row's ``tokens(model, pixels)`` placeholder tokens.

    Without ``pixel_values`` the prompt is text only, and placeholder tokens are refused (they would have no
    image). ``image_keys`` are further keywords that come with images (Gemma 3's ``token_type_ids``), passed on
    with them; a family that checks them subclasses :meth:`validate`.
    """

    tokens: Callable[[nn.Module, torch.Tensor], int] | None = None
    image_keys: tuple[str, ...] = ()
    kind: str = "image_text"

    def validate(self, model: nn.Module, inputs: dict[str, Any]) -> Prepared:
        inputs = {k: v for k, v in inputs.items() if v is not None}
        pixels = inputs.pop("pixel_values", None)
        if pixels is None:
            given = [k for k in self.image_keys if k in inputs]
            if given:
                raise AttributionInputError(f"{', '.join(given)} come with images: pass pixel_values too")
            ids = inputs.get("input_ids")
            if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
                count = int((ids == _image_token_id(model)).sum())
                if count:
                    raise AttributionInputError(
                        f"input_ids hold {count} image placeholder token(s) (id {_image_token_id(model)}) but no "
                        "pixel_values were given: pass the image (the processor's pixel_values, one per row), or "
                        "remove the placeholders for a text-only prompt."
                    )
            return super().validate(model, inputs)
        check_unknown_inputs(inputs, (*self.accepted(), *self.image_keys), model)
        extra = {k: inputs.pop(k) for k in self.image_keys if k in inputs}
        require_input_ids(model, inputs)
        prepared = super(TextOnlyInputs, self).validate(model, inputs)  # text checks, placeholders allowed
        ids = prepared.inputs["input_ids"]
        pixels = _checked_pixels(model, pixels)
        if pixels.shape[0] != ids.shape[0]:
            raise AttributionInputError(
                f"{pixels.shape[0]} image(s) for {ids.shape[0]} prompt row(s): hf_pelrp explains one image per row "
                "(row i holds image i). Attribute rows with several images, or without one, in separate calls."
            )
        placeholder = _image_token_id(model)
        assert self.tokens is not None
        per_image = self.tokens(model, pixels)
        counts = (ids == placeholder).sum(-1)
        wrong = [(i, int(c)) for i, c in enumerate(counts.tolist()) if c != per_image]
        if wrong:
            row, count = wrong[0]
            raise AttributionInputError(
                f"row {row} holds {count} image placeholder token(s) (id {placeholder}), but one image fills "
                f"{per_image}: build the prompt with the model's processor (it expands the image token to one "
                "placeholder per image feature), one image per row."
            )
        return dataclasses.replace(prepared, inputs={**prepared.inputs, "pixel_values": pixels, **extra})

    def example(
        self, model: nn.Module, batch: int = 2, text: int = 6, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """A valid random prompt for ``model`` (check_adapter): ``text`` random tokens per row with one image's
        placeholders after the first two, and one random image per row."""
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        vision = getattr(model.config, "vision_config", model.config)
        h, w = _pair(vision.image_size)
        dtype = next(model.parameters()).dtype
        pixels = torch.randn(batch, getattr(vision, "num_channels", 3), h, w, generator=gen).to(dtype)
        assert self.tokens is not None
        per_image = self.tokens(model, pixels)
        ids = insert_placeholders(model, random_text(model, batch, text, gen), per_image)
        out: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": pixels,
        }
        if "token_type_ids" in self.image_keys:
            out["token_type_ids"] = (ids == _image_token_id(model)).long()
        return out


def random_text(model: nn.Module, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Random token ids of ``model``'s vocabulary without padding and multimodal placeholder tokens."""
    vocab = model.get_input_embeddings().num_embeddings
    avoid = {getattr(model.config, "pad_token_id", None)}
    avoid |= {
        getattr(model.config, n, None) for n in ("image_token_id", "image_token_index", "video_token_id")
    }
    avoid |= {getattr(model.config, n, None) for n in ("boi_token_id", "eoi_token_id", "boi_token_index")}
    allowed = torch.tensor([i for i in range(1, vocab) if i not in avoid])
    return allowed[torch.randint(0, len(allowed), (batch, length), generator=gen)]


def insert_placeholders(model: nn.Module, ids: torch.Tensor, count: int) -> torch.Tensor:
    """``ids`` [B, T] with ``count`` image placeholder tokens after the first two of every row."""
    holders = torch.full((ids.shape[0], count), _image_token_id(model), dtype=ids.dtype)
    return torch.cat([ids[:, :2], holders, ids[:, 2:]], dim=1)


def placeholder_prompt(model: nn.Module, counts: list[int], text: int, gen: torch.Generator) -> torch.Tensor:
    """Random prompts [B, max(counts) + text] of equal length, row i holding ``counts[i]`` image placeholders
    after its first two tokens (rows with fewer placeholders get more text)."""
    longest = max(counts) + text
    rows = []
    for n in counts:
        words = random_text(model, 1, longest - n, gen)
        rows.append(insert_placeholders(model, words, n)[0])
    return torch.stack(rows)


def require_input_ids(model: nn.Module, inputs: Mapping[str, Any]) -> None:
    """Refuse a prompt with images given as ``inputs_embeds``: the placeholders must come as token ids."""
    if "input_ids" not in inputs:
        raise AttributionInputError(
            f"{type(model).__name__} with images needs input_ids holding the image placeholder tokens (the "
            "processor's output), not inputs_embeds"
        )


def _image_token_id(model: nn.Module) -> int:
    config = model.config
    value = getattr(config, "image_token_id", None)
    if value is None:
        value = getattr(config, "image_token_index", None)
    if value is None:
        raise UnsupportedModelError(f"{type(model).__name__}'s config names no image_token_id")
    return int(value)


def pixel_tensor(pixels: Any) -> torch.Tensor:
    """The first checks of any VLM's ``pixel_values``: a floating-point tensor with data."""
    if not isinstance(pixels, torch.Tensor):
        raise AttributionInputError(f"pixel_values must be a tensor, got {type(pixels).__name__}")
    if pixels.device.type == "meta":
        raise AttributionInputError("pixel_values is on the meta device (no data): pass real images")
    if not pixels.is_floating_point():
        raise AttributionInputError(
            f"pixel_values must be a floating-point tensor (the image processor's output), got {pixels.dtype}"
        )
    return pixels


def pixel_values_fit(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The last checks of any VLM's ``pixel_values`` (after the family's shape checks): the model's dtype, finite."""
    dtype = next(model.parameters()).dtype
    if pixels.dtype != dtype:
        raise AttributionInputError(
            f"pixel_values has dtype {pixels.dtype} but the model computes in {dtype}: cast it with .to(model.dtype)"
        )
    if not bool(torch.isfinite(pixels).all()):
        raise AttributionInputError("pixel_values holds NaN or infinite values")
    return pixels


def _checked_pixels(model: nn.Module, pixels: Any) -> torch.Tensor:
    name = type(model).__name__
    pixels = pixel_tensor(pixels)
    if pixels.dim() != 4:
        raise AttributionInputError(
            f"pixel_values must have shape [images, channels, height, width], got {tuple(pixels.shape)}"
        )
    vision = getattr(model.config, "vision_config", model.config)
    channels = getattr(vision, "num_channels", pixels.shape[1])
    if pixels.shape[1] != channels:
        raise AttributionInputError(
            f"pixel_values has {pixels.shape[1]} channel(s) but {name}'s vision tower expects {channels}"
        )
    size = getattr(vision, "image_size", None)
    if size is not None and tuple(pixels.shape[-2:]) != _pair(size):
        h, w = _pair(size)
        raise AttributionInputError(
            f"the images are {pixels.shape[-2]}x{pixels.shape[-1]} but {name}'s vision tower takes {h}x{w}: "
            "prepare them with the model's image processor"
        )
    return pixel_values_fit(model, pixels)


@dataclass(frozen=True)
class VisionLanguageAdapter(Adapter):
    """A VLM's declaration: its language model's (all :class:`Adapter` fields, rooted one level down), plus the
    vision tower (``vision``). The text fields (``layers``, ``attention``, ``embeddings``, ``positions``,
    ``gated``) describe the language model; ``modules``, ``norms`` and ``constants`` cover the whole model."""

    vision: VisionTower | None = None

    def _tower(self) -> VisionTower:
        if self.vision is None:
            raise UnsupportedModelError(f"the {self.label} declaration has no vision tower")
        return self.vision

    def _check_structure(self, model: nn.Module) -> None:
        super()._check_structure(model)
        inline = sorted(
            {type(m).__name__ for m in self._tower().attention_modules(model) if not _dispatches(type(m))}
        )
        if inline:
            raise UnsupportedModelError(
                f"{type(model).__name__}'s vision attention ({', '.join(inline)}) does not dispatch through "
                "transformers' AttentionInterface, so the LRP attention rules cannot be attached to it."
            )

    def module_rules(
        self, model: nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[nn.Module, HookRule]]:
        return [*super().module_rules(model, config, store), *self._tower().rules(model, config, store)]

    def attention_rules(self, model: nn.Module, config: LRPConfig) -> list[tuple[nn.Module, AttentionRule]]:
        """The language model's rules, and one per vision block; those run only when the prompt holds an image
        (:meth:`family_maps` checks that they did)."""
        tower = self._tower()
        rules = super().attention_rules(model, config)
        for module in tower.attention_modules(model):
            rule = AttentionRule(config.qk_factor, config.qk_factor, config.v_factor, config.scores_factor)
            rule = tower.attention_rule(rule, config)
            rule.required = False
            rules.append((module, rule))
        return rules

    def family_maps(
        self, model: nn.Module, store: LeafStore, maps: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The image maps of the latest backward pass (none for a text-only prompt), after the family's own."""
        out = super().family_maps(model, store, maps)
        tower = self._tower()
        images = tower.read(model, store)
        if images is None:
            return out
        idle = [
            i
            for i, m in enumerate(tower.attention_modules(model))
            if (r := attention_rule(m)) and r.calls == 0
        ]
        if idle:
            raise AttributionStateError(
                f"the vision tower's attention of block(s) {idle} of {type(model).__name__} did not run through "
                "hf_pelrp's 'lrp' attention, so its rules were not applied: load the model without a custom "
                "attention kernel."
            )
        out.update(images)
        return out


def with_images(text_only: Adapter, tower: VisionTower, inputs: ImageTextInputs, **changes: Any) -> Adapter:
    """The declaration of a VLM explained with its images: ``text_only`` (the wrapper's text-only declaration,
    :func:`hf_pelrp.adapters.vlm_text.text_only_vlm`) with the vision tower's rules, norms and leaves added."""
    own = {f.name: getattr(text_only, f.name) for f in dataclasses.fields(Adapter)}
    own.update(
        norms={**text_only.norms, **tower.norms},
        modules=tuple(dict.fromkeys((*text_only.modules, *tower.modules))),
        constants=tuple(
            dict.fromkeys((*text_only.constants, *(f"{tower.path}.{c}" for c in tower.constants)))
        ),
        inputs=inputs,
    )
    own.update(changes)
    return VisionLanguageAdapter(**own, vision=tower)
