"""ViT / DeiT (``vit``, ``deit``): patch convolution, CLS (+ distillation) token, learned positions.

Rules (method.md sections 1-2): the identity rule on every LayerNorm and on the MLP activation, the ``"lrp"``
attention, the epsilon rule on every other linear map and, where the configuration asks for them, the
generalised Gamma rule on the MLP and head linears (``gamma_linear``) and on the patch convolution
(``gamma_conv``), as the PE-LRP paper does for ViT.

The embedding sum ``e = t + p`` (ViT: ``t = [CLS, conv(patches)]``, DeiT: ``[CLS, DIST, conv(patches)]``) is
rebuilt by a hook on the embeddings module from two leaves with the module's own values:

- ``"token"`` [B, S, D]: the special tokens and the patch-convolution outputs;
- ``"position"`` [B, S, D]: the (interpolated, with ``interpolate_pos_encoding=True``) position embedding,
  one copy per image; with ``positional=False`` it is a constant that absorbs its relevance.

The pixels are a leaf of their own: after the backward pass, the token relevance of the patches is carried
through the patch convolution (with its rule) to the pixels, which gives ``pixel_map``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import LRPConfig
from ..devices import weights_on_device
from ..errors import AttributionInputError, AttributionStateError
from ..hooks import Handles, HookRule, LeafStore, make_leaf
from ..inputs import Prepared, check_unknown_inputs
from ..positions import Additive
from .base import Adapter, register_adapter
from .norms import layer_norm


def _pair(size: int | Iterable[int]) -> tuple[int, int]:
    if isinstance(size, Iterable):
        h, w = size
        return int(h), int(w)
    return int(size), int(size)


def num_special_tokens(embeddings: nn.Module) -> int:
    """1 for ViT (CLS), 2 for DeiT (CLS and distillation token)."""
    return 2 if getattr(embeddings, "distillation_token", None) is not None else 1


@dataclass
class VisionEmbeddingLeaves(HookRule):
    """Leaves ``"token"`` and ``"position"`` at the embedding sum of a ViT / DeiT, and the pixels behind them.

    Three hooks: a pre-hook on ``patch_embeddings`` makes the pixels a leaf (``store.aux["pixels"]``), a hook
    on it keeps the patch tokens still connected to the pixels (``store.aux["patches"]``), and a hook on the
    embeddings module replaces its output by ``token + position`` built from leaves holding the module's own
    values. The rebuilt output is checked to be bit-identical to the module's, so a model whose embeddings
    differ from the layout assumed here fails loudly instead of being explained wrongly.
    """

    store: LeafStore
    positional: bool

    def attach(self, module: nn.Module, handles: Handles) -> None:
        store = self.store

        def pixels_in(_module, args):
            pixels = make_leaf(args[0])
            store.aux["pixels"] = pixels
            return (pixels, *args[1:])

        def patches_out(_module, _args, output):
            store.aux["patches"] = output

        def embeddings_out(emb, args, kwargs, output):
            # accelerate offload: the class token and the positions are on `meta` once the forward returned
            with weights_on_device(emb):
                return rebuild(emb, args, kwargs, output)

        def rebuild(emb, args, kwargs, output):
            masked = kwargs.get("bool_masked_pos", args[1] if len(args) > 1 else None)
            if masked is not None:
                raise AttributionInputError(
                    "bool_masked_pos (masked image modelling) is not supported by hf_pelrp: attribute unmasked images"
                )
            patches = store.aux["patches"]
            height, width = store.aux["pixels"].shape[-2:]
            batch = patches.shape[0]
            specials = [emb.cls_token] + ([emb.distillation_token] if num_special_tokens(emb) == 2 else [])
            token = make_leaf(
                torch.cat([s.detach().expand(batch, -1, -1) for s in specials] + [patches.detach()], dim=1)
            )
            interpolate = kwargs.get("interpolate_pos_encoding", args[2] if len(args) > 2 else False)
            if interpolate:
                position = emb.interpolate_pos_encoding(token, height, width)
            else:
                position = emb.position_embeddings
            # one copy per image: a shared [1, S, D] leaf would sum the gradients of the whole batch
            position = position.detach().expand(batch, -1, -1)
            if self.positional:
                position = make_leaf(position)
                store.additive["position"] = position
            store.additive["token"] = token
            rebuilt = emb.dropout(token + position)
            if not torch.equal(rebuilt.detach(), output.detach()):
                raise AttributionStateError(
                    f"{type(emb).__name__} computed something other than [special tokens, patches] + positions; "
                    "the ViT adapter cannot split it into token and position leaves."
                )
            return rebuilt

        patch = module.patch_embeddings
        handles.append(patch.register_forward_pre_hook(pixels_in))
        handles.append(patch.register_forward_hook(patches_out))
        handles.append(module.register_forward_hook(embeddings_out, with_kwargs=True))


def _embedding_rules(
    model: nn.Module, config: LRPConfig, store: LeafStore
) -> list[tuple[nn.Module, HookRule]]:
    return [(model.base_model.embeddings, VisionEmbeddingLeaves(store, config.positional))]


@dataclass(frozen=True)
class ImageInputs:
    """``pixel_values`` [B, C, H, W] (a [C, H, W] image is one row), checked against the model's config; the
    attention mask is all ones over the sequence (special tokens, then the patches row by row)."""

    kind: str = "image"

    def validate(self, model: nn.Module, inputs: dict[str, Any]) -> Prepared:
        inputs = {k: v for k, v in inputs.items() if v is not None}
        name = type(model).__name__
        for key in ("input_ids", "inputs_embeds"):
            if key in inputs:
                raise AttributionInputError(
                    f"{name} takes images: pass pixel_values=<tensor [batch, channels, height, width]>, not {key}"
                )
        if "attention_mask" in inputs:
            raise AttributionInputError(f"{name} attends over all patches: attention_mask is not supported")
        check_unknown_inputs(inputs, ("pixel_values", "interpolate_pos_encoding"), model)
        pixels = inputs.get("pixel_values")
        if pixels is None:
            raise AttributionInputError(
                "no input: pass pixel_values=<tensor [batch, channels, height, width]>"
            )
        pixels = torch.as_tensor(pixels)
        if pixels.device.type == "meta":
            raise AttributionInputError("pixel_values is on the meta device (no data): pass real images")
        if not pixels.is_floating_point():
            raise AttributionInputError(
                f"pixel_values must be a floating-point tensor (the image processor's output), got {pixels.dtype}"
            )
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        if pixels.dim() != 4:
            raise AttributionInputError(
                f"pixel_values must have shape [batch, channels, height, width], got {tuple(pixels.shape)}"
            )
        batch, channels, height, width = pixels.shape
        if batch == 0:
            raise AttributionInputError("empty input: pixel_values holds no image")
        if channels != model.config.num_channels:
            raise AttributionInputError(
                f"pixel_values has {channels} channel(s) but {name} expects {model.config.num_channels} "
                "(config.num_channels): convert the images (e.g. grayscale to RGB) before attributing"
            )
        dtype = model.base_model.embeddings.patch_embeddings.projection.weight.dtype
        if pixels.dtype != dtype:
            raise AttributionInputError(
                f"pixel_values has dtype {pixels.dtype} but the model computes in {dtype}: cast it with .to(model.dtype)"
            )
        if not torch.isfinite(pixels).all():
            raise AttributionInputError("pixel_values holds NaN or infinite values")
        emb = model.base_model.embeddings
        image_h, image_w = _pair(emb.patch_embeddings.image_size)
        patch_h, patch_w = _pair(emb.patch_embeddings.patch_size)
        if inputs.get("interpolate_pos_encoding"):
            if height < patch_h or width < patch_w:
                raise AttributionInputError(
                    f"the image is {height}x{width}, smaller than one {patch_h}x{patch_w} patch"
                )
            grid = emb.position_embeddings.shape[1] - num_special_tokens(emb)
            if math.isqrt(grid) ** 2 != grid:
                raise AttributionInputError(
                    f"{name} was trained on a non-square patch grid, which interpolate_pos_encoding cannot "
                    f"resize: pass {image_h}x{image_w} images without it"
                )
        elif (height, width) != (image_h, image_w):
            raise AttributionInputError(
                f"the image is {height}x{width} but {name} takes {image_h}x{image_w} images: resize the images "
                f"to {image_h}x{image_w}, or pass interpolate_pos_encoding=True to interpolate the position "
                "embeddings to the new size"
            )
        out = {"pixel_values": pixels}
        if "interpolate_pos_encoding" in inputs:
            out["interpolate_pos_encoding"] = bool(inputs["interpolate_pos_encoding"])
        seq_len = num_special_tokens(emb) + (height // patch_h) * (width // patch_w)
        mask = torch.ones(batch, seq_len, dtype=torch.long, device=pixels.device)
        return Prepared(out, mask)


def vision_maps(model: nn.Module, store: LeafStore, maps: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``patch_map`` [B, H/p, W/p] and ``pixel_map`` [B, H, W] of the latest backward pass.

    - ``patch_map[b, r, c] = token[b, s] + position[b, s]`` for the patch token ``s`` at grid cell ``(r, c)``
      (the special tokens are left out).
    - ``pixel_map = sum_channels pixels * g_pixels + spread``: the token relevance of each patch carried
      through the patch convolution with its rule (the convolution's bias absorbs its share, as any epsilon-
      or Gamma-rule bias does), plus each patch's position relevance spread evenly over its ``p * p`` pixels
      (the PE-LRP paper's ViT recipe, without its clamping; pixels beyond the last full patch get 0). Hence
      with a bias-free patch convolution ``pixel_map.sum() == patch_map.sum()``.
    """
    pixels, patches = store.aux.get("pixels"), store.aux.get("patches")
    token = store.additive.get("token")
    if pixels is None or patches is None or token is None:
        return {}
    batch, _, height, width = pixels.shape
    patch_h, patch_w = _pair(model.base_model.embeddings.patch_embeddings.patch_size)
    grid_h, grid_w = height // patch_h, width // patch_w
    special = token.shape[1] - patches.shape[1]
    dtype = maps["token"].dtype
    from_tokens = torch.zeros(batch, height, width, dtype=dtype, device=pixels.device)
    if token.grad is not None:
        with torch.enable_grad():
            (pixel_grad,) = torch.autograd.grad(
                patches,
                pixels,
                grad_outputs=token.grad[:, special:].to(patches.dtype),
                retain_graph=True,
                allow_unused=True,
            )
        if pixel_grad is not None:
            from_tokens = (pixels.detach().to(dtype) * pixel_grad.to(dtype)).sum(1)
    position = maps["position"][:, special:].reshape(batch, grid_h, grid_w)
    patch_map = maps["token"][:, special:].reshape(batch, grid_h, grid_w) + position
    spread = (position / (patch_h * patch_w)).repeat_interleave(patch_h, 1).repeat_interleave(patch_w, 2)
    pixel_map = from_tokens.clone()
    pixel_map[:, : grid_h * patch_h, : grid_w * patch_w] += spread.to(pixel_map.device)
    return {"patch_map": patch_map, "pixel_map": pixel_map}


#: the MLP and head linears the Gamma rule applies to (the paper's ViT rules), and the patch convolution
_GAMMA = {
    "gamma_linear": (
        "*.mlp.fc1",
        "*.mlp.fc2",
        "classifier",
        "cls_classifier",
        "distillation_classifier",
        "*.pooler.dense",
    ),
    "gamma_conv": ("*.patch_embeddings.projection",),
}

for _model_types, _prefix, _heads in (
    (("vit",), "ViT", ("ViTForImageClassification",)),
    (("deit",), "DeiT", ("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")),
):
    register_adapter(
        Adapter(
            model_types=_model_types,
            name=_model_types[0],
            layers="layers",
            attention="attention",
            embeddings={},
            positions=Additive({}, description="learned absolute, [CLS, patches] + positions"),
            norms={"LayerNorm": layer_norm},
            modules=(
                *_heads,
                f"{_prefix}Model",
                f"{_prefix}Embeddings",
                f"{_prefix}PatchEmbeddings",
                f"{_prefix}Encoder",
                f"{_prefix}Layer",
                f"{_prefix}Attention",
                f"{_prefix}SelfAttention",
                f"{_prefix}SelfOutput",
                f"{_prefix}MLP",
                f"{_prefix}Intermediate",
                f"{_prefix}Output",
                f"{_prefix}Pooler",
            ),
            gamma=_GAMMA,
            inputs=ImageInputs(),
            heads=("image_classification",),
            extra_rules=_embedding_rules,
            extra_maps=vision_maps,
            tiny={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 16,
                "patch_size": 4,
                "num_channels": 3,
                "num_labels": 3,
            },
        )
    )
