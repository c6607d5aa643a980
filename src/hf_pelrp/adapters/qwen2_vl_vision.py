"""The Qwen2-VL / Qwen2.5-VL vision transformer as part of the relevance graph (issue 19).

The tower (``model.model.visual``) embeds each image as a sequence of patches in the image processor's order
(``[total_patches, C * T * ps * ps]``: 2 x 2 blocks of patches that the merger joins, block after block), then

- ``PatchEmbed``: a bias-free ``Conv3d`` over each flattened patch. Its output is the leaf ``image_token``
  (each original patch's content, the way ``embed_tokens`` is the text's);
- per block ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``: LayerNorm and a GELU MLP (Qwen2-VL), RMSNorm and a
  SiLU-gated MLP (Qwen2.5-VL: ``act(gate(x)) * up(x)``, the uniform rule at the product as in the decoder).
  The attention rotates q and k with a 2-D rotary embedding ``(cos, sin)`` [patches, head_dim] over the whole
  head: the first half of the frequencies rotates by the patch's row, the second half by its column. The
  tower computes ``(cos, sin)`` once and passes it to every block; each block's attention gets its *own*
  leaves (``image_rotary.<block>.cos`` / ``.sin``), kept in the model's graph, and the uniform rule at
  ``q * cos + rotate(q) * sin`` sends half of each product to the leaves (``AttentionRule.rotary = 1/2`` on every
  channel), as for the text layers (method.md 2, "Rotary variants");
- attention dispatches through transformers' attention interface once per image (Qwen2-VL, and the full
  attention blocks of Qwen2.5-VL) or once per window (Qwen2.5-VL's window blocks, on patches reordered by
  ``window_index``): every call goes through the ``"lrp"`` attention, which applies the rule to each chunk;
- ``PatchMerger``: a norm and a GELU MLP over each 2 x 2 block of patches (epsilon and identity rules); Qwen2.5-VL
  undoes the window order after it.

Maps per image, in raster order of the patch grid ``(h, w)`` (the processor's block order, and Qwen2.5-VL's
window order, undone): ``image`` [N, h * w] (relevance of ``image_token`` per patch), ``image_position``
[N, h * w] (the rotary leaves of all blocks, per patch), ``image_special`` zeros [N] (the tower has no class
token), ``image_grid`` [N, 2] = ``(h, w)``. Under bias-free CP rules they add up with the text maps to the logit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..attention import AttentionRule, attention_rule
from ..config import LRPConfig
from ..errors import AttributionStateError, UnsupportedModelError
from ..hooks import EmbeddingLeaf, Handles, HookRule, LeafStore, OutputGradient, make_leaf
from ..modules import find_module
from ..rules import relevance_of
from .base import GatedProduct
from .vision_language import VisionTower

#: ``store.aux`` key of the ``grid_thw`` the tower ran with (the latest forward pass)
GRID_KEY = "qwen_vision_grid_thw"


def rotary_leaf_names(block: int) -> tuple[str, str]:
    """``store.additive`` names of one vision block's rotary leaves (cos, sin)."""
    return f"image_rotary.{block}.cos", f"image_rotary.{block}.sin"


@dataclass
class _RecordGrid(HookRule):
    """Record the ``grid_thw`` the tower is called with (the per-image patch grids the maps are laid out by)."""

    store: LeafStore

    def attach(self, module: nn.Module, handles: Handles) -> None:
        def hook(_module, args, kwargs):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            if grid is not None:
                self.store.aux[GRID_KEY] = grid.detach().clone()

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))


@dataclass
class _VisionRotaryLeaves(HookRule):
    """Give one vision block's attention its own ``(cos, sin)`` leaves (in the model's graph), and record on its
    :class:`AttentionRule` that every channel of q and k rotates (the 2-D rotary covers the whole head).

    A re-run of the block in the same forward pass (gradient-checkpointing recomputation) reuses the leaves."""

    store: LeafStore
    block: int

    def attach(self, module: nn.Module, handles: Handles) -> None:
        names = rotary_leaf_names(self.block)

        def hook(attention, args, kwargs):
            pe = kwargs.get("position_embeddings")
            if pe is None:
                raise UnsupportedModelError(
                    f"{type(attention).__name__} was called without position_embeddings: the Qwen vision "
                    "declaration expects the tower's 2-D rotary (cos, sin) as a keyword argument"
                )
            cos, sin = pe
            existing = self.store.additive.get(names[0])
            if existing is None or existing.shape != cos.shape or existing.device != cos.device:
                self.store.additive[names[0]] = make_leaf(cos)
                self.store.additive[names[1]] = make_leaf(sin)
            rule = attention_rule(attention)
            if rule is not None:
                rule.rotated = (cos.shape[-1], "first")
            kwargs = dict(kwargs)
            kwargs["position_embeddings"] = (self.store.additive[names[0]], self.store.additive[names[1]])
            return args, kwargs

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))


@dataclass(frozen=True)
class QwenVisionTower(VisionTower):
    """The Qwen2-VL / Qwen2.5-VL vision transformer (see the module docstring).

    Parameters
    ----------
    patch_embed, rotary
        Tower-relative paths of the patch embedding and of the rotary embedding module.
    gated
        The vision MLP's gated product (Qwen2.5-VL), block-relative; ``None`` for Qwen2-VL's plain MLP.
    windowed
        Whether the tower reorders the patches into attention windows (Qwen2.5-VL's ``window_index``).
    """

    patch_embed: str = "patch_embed"
    rotary: str = "rotary_pos_emb"
    gated: GatedProduct | None = None
    windowed: bool = False

    def rules(
        self, model: nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[nn.Module, HookRule]]:
        tower = self.tower(model)
        rules: list[tuple[nn.Module, HookRule]] = [
            (tower, _RecordGrid(store)),
            (find_module(tower, self.patch_embed), EmbeddingLeaf(store, ("image_token",), per_row=False)),
        ]
        if config.positional:
            rules.extend(
                (attention, _VisionRotaryLeaves(store, i))
                for i, attention in enumerate(self.attention_modules(model))
            )
        if self.gated is not None:
            # after the generic activation rule (identity, factor 1) of the same module: the product's factor
            for block in self.blocks(model):
                rules.append((find_module(block, self.gated.act), OutputGradient(config.gate_factor)))
                rules.append((find_module(block, self.gated.up), OutputGradient(config.up_factor)))
        return rules

    def attention_rule(self, rule: AttentionRule, config: LRPConfig) -> AttentionRule:
        """The rotary 1/2 on q and k (all channels rotate) where the positions are leaves."""
        if config.positional:
            rule.rotary = 0.5
        return rule

    def block_order(self, model: nn.Module, grid: torch.Tensor) -> torch.Tensor | None:
        """For each row of the blocks' hidden states, its row in the processor's order; ``None`` where they
        are the same (Qwen2-VL). Qwen2.5-VL reorders 2 x 2 merge units into windows (``window_index``)."""
        if not self.windowed:
            return None
        from transformers.vision_utils import get_vision_window_index

        vision = self.tower(model).config
        window_index, _ = get_vision_window_index(
            grid.cpu(),
            spatial_merge_size=vision.spatial_merge_size,
            window_size=vision.window_size,
            patch_size=vision.patch_size,
        )
        unit = vision.spatial_merge_size**2
        return (window_index[:, None] * unit + torch.arange(unit)).reshape(-1)

    def raster(self, model: nn.Module, grid: torch.Tensor) -> torch.Tensor:
        """For each patch in the processor's order, its index ``h * W + w`` in its image's raster."""
        from transformers.vision_utils import get_vision_position_ids

        merge = self.tower(model).config.spatial_merge_size
        ids = get_vision_position_ids(grid.cpu(), merge)
        return ids[:, 0] * grid[0, 2].cpu() + ids[:, 1]

    def read(self, model: nn.Module, store: LeafStore) -> dict[str, torch.Tensor] | None:
        token_leaf = store.additive.get("image_token")
        if token_leaf is None:
            return None
        grid = store.aux[GRID_KEY]
        assert isinstance(grid, torch.Tensor)
        if bool((grid[:, 0] != 1).any()) or bool((grid != grid[:1]).any()):
            # validate() refuses these; a forward pass called directly inside hf_pelrp.lrp() may not have run it
            raise AttributionStateError(
                f"the vision tower ran on grids {grid.tolist()}: per-image maps need single images (t = 1) of one "
                "size in a pass"
            )
        images = grid.shape[0]
        token = relevance_of(token_leaf)  # [total patches], the processor's order
        position = torch.zeros_like(token)
        order = self.block_order(model, grid)
        for block in range(len(self.blocks(model))):
            cos, sin = (store.additive.get(name) for name in rotary_leaf_names(block))
            if cos is None or sin is None:
                continue
            r = (relevance_of(cos) + relevance_of(sin)).to(token)  # [total patches], the blocks' order
            if order is not None:
                r = torch.zeros_like(r).index_copy(0, order.to(r.device), r)
            position = position + r
        raster = self.raster(model, grid).to(token.device)
        per_image = token.shape[0] // images
        where = raster.reshape(images, per_image)

        def to_raster(x: torch.Tensor) -> torch.Tensor:
            return (
                torch.zeros_like(x).reshape(images, per_image).scatter(1, where, x.reshape(images, per_image))
            )

        return {
            "image": to_raster(token),
            "image_position": to_raster(position),
            "image_special": torch.zeros(images, dtype=token.dtype, device=token.device),
            "image_grid": grid[:, 1:].to(token.device).clone(),
        }
