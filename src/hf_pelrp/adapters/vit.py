"""ViT / DeiT adapter (``vit``, ``deit``): patch convolution, CLS (+ distillation) token, learned positions.

Rules (method.md sections 1-2): the identity rule on every LayerNorm and on the MLP activation, the ``"lrp"``
attention (AttnLRP: gradient factors 1/4 on q, k and 1/2 on v; CP-LRP: 0 and 1), the epsilon rule on every
other linear map and, where the configuration asks for them, the generalised Gamma rule on the MLP and head
linears (``gamma_linear``) and on the patch convolution (``gamma_conv``), as the PE-LRP paper does for ViT.

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

from ..attention import AttentionRule
from ..config import LRPConfig
from ..devices import weights_on_device
from ..errors import AttributionInputError, AttributionStateError, UnsupportedModelError
from ..hooks import Gamma, Handles, HookRule, LeafStore, make_leaf
from .additive import check_activation, norm_and_activation_rules
from .base import Adapter, register_adapter

#: names of the classifier heads of ViTForImageClassification, DeiTForImageClassification(WithTeacher)
_HEAD_NAMES = ("classifier", "cls_classifier", "distillation_classifier")


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

    def attach(self, module: nn.Module) -> Handles:
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
        return Handles(
            patch.register_forward_pre_hook(pixels_in),
            patch.register_forward_hook(patches_out),
            module.register_forward_hook(embeddings_out, with_kwargs=True),
        )


class ViTAdapter(Adapter):
    model_types = ("vit", "deit")
    positional_kind = "absolute"
    gamma_fields = frozenset({"gamma_linear", "gamma_conv"})
    additive_leaves = ("token", "position")

    def _base(self, model: nn.Module) -> nn.Module:
        base = getattr(model, "base_model", model)
        emb = getattr(base, "embeddings", None)
        patch = getattr(emb, "patch_embeddings", None)
        if not isinstance(getattr(patch, "projection", None), nn.Conv2d) or not hasattr(base, "layers"):
            raise UnsupportedModelError(
                f"{type(model).__name__} does not have the ViT layout (embeddings.patch_embeddings.projection, "
                f"layers) the {model.config.model_type!r} adapter expects."
            )
        return base

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self._base(model).layers)

    def heads(self, model: nn.Module) -> list[nn.Linear]:
        """The linear layers after the encoder: classifier head(s), or the pooler's dense layer."""
        heads = [getattr(model, name, None) for name in _HEAD_NAMES]
        pooler = getattr(self._base(model), "pooler", None)
        if pooler is not None:
            heads.append(getattr(pooler, "dense", None))
        return [h for h in heads if isinstance(h, nn.Linear)]

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        for i, layer in enumerate(self.layers(model)):
            mlp = getattr(layer, "mlp", None)
            missing = [n for n in ("fc1", "fc2", "activation_fn") if not hasattr(mlp, n)]
            if missing or not hasattr(layer, "attention"):
                raise UnsupportedModelError(
                    f"layer {i} of {type(model).__name__} is not a ViT block (missing "
                    f"{', '.join(missing) or 'attention'})"
                )
            check_activation(model, f"layers.{i}.mlp.activation_fn", mlp.activation_fn)

    def module_rules(
        self, model: nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[nn.Module, HookRule]]:
        base = self._base(model)
        rules: list[tuple[nn.Module, HookRule]] = [
            (base.embeddings, VisionEmbeddingLeaves(store, config.positional))
        ]
        rules.extend(norm_and_activation_rules(model))
        if config.gamma_conv is not None:
            rules.append((base.embeddings.patch_embeddings.projection, Gamma(config.gamma_conv)))
        if config.gamma_linear is not None:
            linears = [m for layer in base.layers for m in (layer.mlp.fc1, layer.mlp.fc2)] + self.heads(model)
            rules.extend((m, Gamma(config.gamma_linear)) for m in linears)
        return rules

    def attention_rules(self, model: nn.Module, config: LRPConfig) -> list[tuple[nn.Module, AttentionRule]]:
        rule = AttentionRule(q=config.qk_factor, k=config.qk_factor, v=config.v_factor)
        return [(layer.attention, rule) for layer in self.layers(model)]

    def validate_inputs(
        self, model: nn.Module, inputs: dict[str, Any]
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """Check ``pixel_values`` [B, C, H, W] (a [C, H, W] image is one row) against the model's config.

        Returns the model inputs and an all-ones mask [B, S] over the sequence (special tokens, then the
        patches row by row).
        """
        inputs = {k: v for k, v in inputs.items() if v is not None}
        name = type(model).__name__
        for key in ("input_ids", "inputs_embeds"):
            if key in inputs:
                raise AttributionInputError(
                    f"{name} takes images: pass pixel_values=<tensor [batch, channels, height, width]>, not {key}"
                )
        if "attention_mask" in inputs:
            raise AttributionInputError(f"{name} attends over all patches: attention_mask is not supported")
        pixels = inputs.get("pixel_values")
        if pixels is None:
            raise AttributionInputError(
                "no input: pass pixel_values=<tensor [batch, channels, height, width]>"
            )
        pixels = torch.as_tensor(pixels)
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
        if not torch.isfinite(pixels).all():
            raise AttributionInputError("pixel_values holds NaN or infinite values")
        emb = self._base(model).embeddings
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
        inputs["pixel_values"] = pixels
        seq_len = num_special_tokens(emb) + (height // patch_h) * (width // patch_w)
        mask = torch.ones(batch, seq_len, dtype=torch.long, device=pixels.device)
        return inputs, mask

    def extra_maps(
        self, model: nn.Module, store: LeafStore, maps: dict[str, torch.Tensor | None]
    ) -> dict[str, torch.Tensor]:
        """``patch_map`` [B, H/p, W/p] and ``pixel_map`` [B, H, W] of the latest backward pass.

        - ``patch_map[b, r, c] = token[b, s] + position[b, s]`` for the patch token ``s`` at grid cell
          ``(r, c)`` (the special tokens are left out).
        - ``pixel_map = sum_channels pixels * g_pixels + spread``: the token relevance of each patch carried
          through the patch convolution with its rule (the convolution's bias absorbs its share, as any
          epsilon- or Gamma-rule bias does), plus each patch's position relevance spread evenly over its
          ``p * p`` pixels (the PE-LRP paper's ViT recipe, without its clamping; pixels beyond the last full
          patch get 0). Hence with a bias-free patch convolution ``pixel_map.sum() == patch_map.sum()``.
        """
        pixels, patches = store.aux.get("pixels"), store.aux.get("patches")
        token = store.additive.get("token")
        if pixels is None or patches is None or token is None:
            return {}
        batch, _, height, width = pixels.shape
        patch_h, patch_w = _pair(self._base(model).embeddings.patch_embeddings.patch_size)
        grid_h, grid_w = height // patch_h, width // patch_w
        special = token.shape[1] - patches.shape[1]
        from_tokens = torch.zeros(batch, height, width, dtype=torch.float32, device=pixels.device)
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
                from_tokens = (pixels.detach().float() * pixel_grad.float()).sum(1)
        position = maps["position"][:, special:].reshape(batch, grid_h, grid_w)
        patch_map = maps["token"][:, special:].reshape(batch, grid_h, grid_w) + position
        spread = (position / (patch_h * patch_w)).repeat_interleave(patch_h, 1).repeat_interleave(patch_w, 2)
        pixel_map = from_tokens.clone()
        pixel_map[:, : grid_h * patch_h, : grid_w * patch_w] += spread.to(pixel_map.device)
        return {"patch_map": patch_map, "pixel_map": pixel_map}


register_adapter(ViTAdapter())
