"""Swin (``swin``): a relative position bias per offset inside shifted windows, tokens merged between stages.

Rules as for ViT (identity rule on every LayerNorm and on the MLP activation, epsilon rule on every linear map,
the patch merging and the average pooling included, the ``"lrp"`` attention). Positions (method.md 2,
"Positions inside attention"): each window attention adds ``B[idx(i, j)]`` (a table per offset ``(dy, dx)``
inside the window) to its scores, and, in shifted blocks, the cyclic-shift mask (0 / -100, added by the model,
not part of the leaf). A hook on ``SwinRelativePositionBias`` makes its output a leaf [B * windows, H, W^2, W^2]
(one copy per window of every image, per layer); the ``"lrp"`` attention gives it the ``scores`` factor.

Maps: the relevance of each key of each window is put back on the patch grid of its stage (undoing the window
partition and the cyclic shift) and, for the later stages, spread evenly over the ``4^s`` patches a merged token
stands for (as ViT's pixel map spreads a patch over its pixels); ``position`` is over the patches of the first
stage, so ``patch_map`` / ``pixel_map`` work as for ViT. ``position_by_distance`` is per window offset of the
first stage's window size (``position_offsets``: ``(dy, dx)`` of each bin).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import LRPConfig
from ..errors import AttributionInputError, UnsupportedModelError
from ..hooks import Handles, HookRule, LeafStore, make_leaf
from ..inputs import Prepared, check_unknown_inputs
from ..modules import find_module
from ..positions import BIAS_LEAF, AttentionBias, DistanceBins, bias_leaf
from .base import Adapter, register_adapter
from .norms import layer_norm
from .vit import ImageInputs, _pair, vision_maps


@dataclass(frozen=True)
class StagedAdapter(Adapter):
    """An :class:`Adapter` whose blocks sit in stages: ``layers`` names the stages, ``stage_blocks`` the block list
    inside each stage."""

    stage_blocks: str = "blocks"

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [
            b
            for stage in find_module(self.base(model), self.layers)
            for b in find_module(stage, self.stage_blocks)
        ]


@dataclass
class SwinEmbeddingLeaves(HookRule):
    """``"token"`` = the patch-embedding output (before the embedding LayerNorm), and the pixels behind it."""

    store: LeafStore

    def attach(self, module: nn.Module, handles: Handles) -> None:
        store = self.store

        def pixels_in(_module, args):
            pixels = make_leaf(args[0])
            store.aux["pixels"] = pixels
            return (pixels, *args[1:])

        def patches_out(_module, _args, output):
            patches, dimensions = output
            store.aux["patches"] = patches
            store.aux["grid"] = tuple(dimensions)
            token = make_leaf(patches)
            store.additive["token"] = token
            return token, dimensions

        handles.append(module.patch_embeddings.register_forward_pre_hook(pixels_in))
        handles.append(module.patch_embeddings.register_forward_hook(patches_out))


def _window_bins(window: int, index: torch.Tensor) -> DistanceBins:
    side = 2 * window - 1
    entries = torch.arange(side * side, device=index.device)
    offsets = torch.stack([entries // side - (window - 1), entries % side - (window - 1)], -1)
    return DistanceBins(index.reshape(1, window * window, window * window), entries, offsets=offsets)


def _to_patches(layer: nn.Module, height: int, width: int, grid: tuple[int, int], windows: int):
    """A map [B, windows, W^2] -> [B, T] of one Swin layer: undo the window partition and the cyclic shift, then
    spread each token of the stage evenly over the first-stage patches it stands for."""
    window, shift = int(layer.window_size), int(layer.shift_size)

    def to_tokens(per_key: torch.Tensor) -> torch.Tensor:
        batch = per_key.shape[0]
        rows, cols = height // window, width // window
        grid_map = (
            per_key.reshape(batch, rows, cols, window, window).transpose(2, 3).reshape(batch, height, width)
        )
        if shift > 0:
            grid_map = torch.roll(grid_map, shifts=(shift, shift), dims=(1, 2))
        factor_h, factor_w = grid[0] // height, grid[1] // width
        spread = grid_map.repeat_interleave(factor_h, 1).repeat_interleave(factor_w, 2) / (
            factor_h * factor_w
        )
        return spread.reshape(batch, -1)

    return to_tokens


@dataclass
class SwinBiasLeaf(HookRule):
    """Make one Swin layer's relative position bias a leaf [B * windows, H, W^2, W^2] (attached to the layer)."""

    store: LeafStore
    layer: int

    def attach(self, module: nn.Module, handles: Handles) -> None:
        store, layer = self.store, self.layer
        seen: dict[str, Any] = {}

        def layer_in(swin_layer, args, kwargs):
            dims = args[1] if len(args) > 1 else kwargs["input_dimensions"]
            seen["dims"] = tuple(int(d) for d in dims)

        def attention_in(_attention, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen["rows"] = hidden.shape[0]

        def bias_out(bias_module, _args, output):
            height, width = seen["dims"]
            swin_layer = module
            window = int(swin_layer.window_size)
            if height % window or width % window:
                raise UnsupportedModelError(
                    f"a Swin stage of {height}x{width} patches is padded to a multiple of its window ({window}); "
                    "hf_pelrp explains image sizes whose stages divide into whole windows (e.g. 224 for Swin-T)"
                )
            batch = store.batch_size
            windows = seen["rows"] // batch
            full = output.expand(seen["rows"], *output.shape[1:])
            leaf = bias_leaf(store, layer, full)
            grid = store.aux["grid"]
            store.aux[("windows", BIAS_LEAF, layer)] = (
                windows,
                _to_patches(swin_layer, height, width, grid, windows),
            )
            if layer == 0:
                store.aux[("bins", BIAS_LEAF)] = _window_bins(window, bias_module.relative_position_index)
            elif ("bins", BIAS_LEAF) in store.aux and window * window != output.shape[-1]:
                store.aux[("bins", BIAS_LEAF, layer)] = _window_bins(
                    window, bias_module.relative_position_index
                )
            return leaf

        handles.append(module.register_forward_pre_hook(layer_in, with_kwargs=True))
        handles.append(module.attention.register_forward_pre_hook(attention_in, with_kwargs=True))
        handles.append(module.attention.relative_position_bias.register_forward_hook(bias_out))


def _swin_leaves(model, layers, attention, store):
    return [(block, SwinBiasLeaf(store, i)) for i, block in enumerate(layers)]


def _embedding_rules(
    model: nn.Module, config: LRPConfig, store: LeafStore
) -> list[tuple[nn.Module, HookRule]]:
    return [(model.base_model.embeddings, SwinEmbeddingLeaves(store))]


@dataclass(frozen=True)
class SwinImageInputs(ImageInputs):
    """``pixel_values`` [B, C, H, W] of the model's image size; the sequence is the patches, row by row."""

    def validate(self, model: nn.Module, inputs: dict[str, Any]) -> Prepared:
        inputs = {k: v for k, v in inputs.items() if v is not None}
        name = type(model).__name__
        for key in ("input_ids", "inputs_embeds", "attention_mask", "interpolate_pos_encoding"):
            if key in inputs:
                raise AttributionInputError(f"{name} takes pixel_values only (no {key}=) for attribution")
        check_unknown_inputs(inputs, ("pixel_values",), model)
        pixels = inputs.get("pixel_values")
        if pixels is None:
            raise AttributionInputError(
                "no input: pass pixel_values=<tensor [batch, channels, height, width]>"
            )
        pixels = torch.as_tensor(pixels)
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        config = model.config
        size = _pair(config.image_size)
        if pixels.dim() != 4 or pixels.shape[1] != config.num_channels or tuple(pixels.shape[-2:]) != size:
            raise AttributionInputError(
                f"pixel_values must have shape [batch, {config.num_channels}, {size[0]}, {size[1]}] for {name}, got "
                f"{tuple(pixels.shape)}: resize the images with the model's image processor"
            )
        dtype = model.base_model.embeddings.patch_embeddings.projection.weight.dtype
        if pixels.dtype != dtype:
            raise AttributionInputError(
                f"pixel_values has dtype {pixels.dtype} but the model computes in {dtype}: cast it with .to(model.dtype)"
            )
        patch = _pair(config.patch_size)
        seq_len = (size[0] // patch[0]) * (size[1] // patch[1])
        mask = torch.ones(pixels.shape[0], seq_len, dtype=torch.long, device=pixels.device)
        return Prepared({"pixel_values": pixels}, mask)


def _no_absolute_positions(model: nn.Module) -> None:
    if getattr(model.config, "use_absolute_embeddings", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} adds absolute position embeddings as well as the window bias "
            "(use_absolute_embeddings=True); hf_pelrp's Swin adapter explains the relative bias (the Swin "
            "checkpoints' setting). Combining both kinds in one position map is not implemented."
        )


register_adapter(
    StagedAdapter(
        model_types=("swin",),
        name="swin",
        layers="encoder.layers",
        stage_blocks="blocks",
        attention="attention",
        embeddings={},
        positions=AttentionBias(
            leaves=_swin_leaves, description="relative position bias per offset inside shifted windows (Swin)"
        ),
        norms={"LayerNorm": layer_norm},
        modules=(
            "SwinForImageClassification",
            "SwinModel",
            "SwinEmbeddings",
            "SwinPatchEmbeddings",
            "SwinEncoder",
            "SwinStage",
            "SwinLayer",
            "SwinAttention",
            "SwinRelativePositionBias",
            "SwinMLP",
            "SwinPatchMerging",
            "SwinDropPath",
            "AdaptiveAvgPool1d",
        ),
        gamma={
            "gamma_linear": ("*.mlp.fc1", "*.mlp.fc2", "classifier"),
            "gamma_conv": ("*.patch_embeddings.projection",),
        },
        inputs=SwinImageInputs(),
        heads=("image_classification",),
        extra_rules=_embedding_rules,
        extra_maps=vision_maps,
        checks=(_no_absolute_positions,),
        tiny={
            "image_size": 16,
            "patch_size": 2,
            "num_channels": 3,
            "embed_dim": 16,
            "depths": [2, 2],
            "num_heads": [2, 4],
            "window_size": 4,
            "mlp_ratio": 2.0,
            "num_labels": 3,
        },
    )
)
