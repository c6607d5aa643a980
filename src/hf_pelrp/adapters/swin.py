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

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import LRPConfig
from ..errors import AttributionInputError, UnsupportedModelError
from ..hooks import Handles, HookRule, LeafStore, make_leaf
from ..inline_attention import Recomputed
from ..inputs import Prepared, check_unknown_inputs
from ..modules import find_module
from ..positions import BIAS_LEAF, AttentionBias, DistanceBins, bias_leaf
from ..rules import scale_gradient, straight_through
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


# ---- SwinV2: cosine attention and a continuous position bias, written inline --------------------------------------


def _normalised(x: torch.Tensor) -> torch.Tensor:
    """``x / ||x||`` (the model's ``F.normalize``) with the norm a constant of the backward pass: the identity rule
    for a normalisation (AttnLRP Prop. 3.4), as for LayerNorm's scale."""
    value = nn.functional.normalize(x, dim=-1)
    norm = x.detach().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return straight_through(value, x / norm)


def swinv2_attention(
    attention: nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    *,
    config: LRPConfig,
    store: LeafStore,
    layer: int,
) -> torch.Tensor:
    """``Swinv2SelfAttention`` written out with the LRP factors: cosine scores ``s q^ . k^`` (the norms constant)
    plus the bias ``16 sigmoid(MLP(log-spaced offsets))`` as the layer's leaf [B * windows, H, W^2, W^2]."""
    hidden = args[0] if args else kwargs["hidden_states"]
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    rows, length, _ = hidden.shape
    heads, dim = attention.num_attention_heads, attention.attention_head_size
    query = attention.query(hidden).view(rows, -1, heads, dim).transpose(1, 2)
    key = attention.key(hidden).view(rows, -1, heads, dim).transpose(1, 2)
    value = attention.value(hidden).view(rows, -1, heads, dim).transpose(1, 2)
    query = scale_gradient(query, config.qk_factor)
    key = scale_gradient(key, config.qk_factor)
    value = scale_gradient(value, config.v_factor)
    scores = _normalised(query) @ _normalised(key).transpose(-2, -1)
    scores = scores * torch.clamp(attention.logit_scale, max=math.log(1.0 / 0.01)).exp()
    table = attention.continuous_position_bias_mlp(attention.relative_coords_table).view(-1, heads)
    bias = table[attention.relative_position_index.view(-1)].view(length, length, -1)
    bias = 16 * torch.sigmoid(bias.permute(2, 0, 1).contiguous())
    if config.positional:
        leaf = bias_leaf(store, layer, bias.detach().unsqueeze(0).expand(rows, -1, -1, -1))
        scores = scores + scale_gradient(leaf, config.scores_factor)
    else:
        scores = scores + bias.detach().unsqueeze(0)
    if mask is not None:  # as transformers does it (the mask enters twice)
        count = mask.shape[0]
        scores = scores.view(rows // count, count, heads, length, length) + mask.unsqueeze(1).unsqueeze(0)
        scores = scores + mask.unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, heads, length, length)
    probs = nn.functional.softmax(scores, dim=-1)
    context = torch.matmul(probs, value).permute(0, 2, 1, 3).contiguous()
    return context.view(context.size()[:-2] + (heads * dim,))


@dataclass
class Swinv2Windows(HookRule):
    """Record one SwinV2 layer's geometry (attached to the layer) so that its leaf is read back onto the patches."""

    store: LeafStore
    layer: int

    def attach(self, module: nn.Module, handles: Handles) -> None:
        store, layer = self.store, self.layer

        def layer_in(swin_layer, args, kwargs):
            height, width = (int(d) for d in (args[1] if len(args) > 1 else kwargs["input_dimensions"]))
            window = int(swin_layer.window_size)
            if height % window or width % window:
                raise UnsupportedModelError(
                    f"a SwinV2 stage of {height}x{width} patches is padded to a multiple of its window ({window}); "
                    "hf_pelrp explains image sizes whose stages divide into whole windows"
                )
            windows = (height // window) * (width // window)
            grid = store.aux["grid"]
            store.aux[("windows", BIAS_LEAF, layer)] = (
                windows,
                _to_patches(swin_layer, height, width, grid, windows),
            )
            index = swin_layer.attention.self.relative_position_index
            key = ("bins", BIAS_LEAF) if layer == 0 else ("bins", BIAS_LEAF, layer)
            if layer == 0 or window != store.aux.get("window0"):
                store.aux[key] = _window_bins(window, index)
            if layer == 0:
                store.aux["window0"] = window

        handles.append(module.register_forward_pre_hook(layer_in, with_kwargs=True))


def _swinv2_rules(model: nn.Module, config: LRPConfig, store: LeafStore) -> list[tuple[nn.Module, HookRule]]:
    rules: list[tuple[nn.Module, HookRule]] = [(model.base_model.embeddings, SwinEmbeddingLeaves(store))]
    blocks = [b for stage in model.base_model.encoder.layers for b in stage.blocks]
    for layer, block in enumerate(blocks):

        def compute(att, args, kwargs, i=layer):
            return swinv2_attention(att, args, kwargs, config=config, store=store, layer=i)

        rules.append((block, Swinv2Windows(store, layer)))
        rules.append((block.attention.self, Recomputed(compute, name=f"layer {layer} (Swinv2SelfAttention)")))
    return rules


register_adapter(
    StagedAdapter(
        model_types=("swinv2",),
        name="swinv2",
        layers="encoder.layers",
        stage_blocks="blocks",
        attention="attention.self",
        embeddings={},
        positions=AttentionBias(
            description="continuous relative position bias inside shifted windows (SwinV2), cosine attention"
        ),
        norms={"LayerNorm": layer_norm},
        modules=(
            "Swinv2ForImageClassification",
            "Swinv2Model",
            "Swinv2Embeddings",
            "Swinv2PatchEmbeddings",
            "Swinv2Encoder",
            "Swinv2Stage",
            "Swinv2Layer",
            "Swinv2Attention",
            "Swinv2SelfAttention",
            "Swinv2SelfOutput",
            "Swinv2Intermediate",
            "Swinv2Output",
            "Swinv2PatchMerging",
            "Swinv2DropPath",
            "AdaptiveAvgPool1d",
        ),
        inputs=SwinImageInputs(),
        heads=("image_classification",),
        extra_rules=_swinv2_rules,
        extra_maps=vision_maps,
        checks=(_no_absolute_positions,),
        attention_interface=False,
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
