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

Other ViT-style vision towers (DINOv2, the CLIP and SigLIP vision towers) differ only in where these parts
live (a :class:`VisionLayout`: the embeddings module, the patch module and convolution, the special tokens, the
position table, whether positions are always interpolated, where the vision config is); the same rule, input
checks and maps serve them (:mod:`hf_pelrp.adapters.dinov2`, :mod:`hf_pelrp.adapters.clip`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import VISION_OPTIONS, LRPConfig
from ..devices import weights_on_device
from ..errors import AttributionInputError, AttributionStateError
from ..hooks import Handles, HookRule, LeafStore, layer_map_of, make_leaf
from ..inputs import Prepared, check_unknown_inputs
from ..modules import find_module
from ..positions import Additive
from ..rules import INPUT_RULES, contrast_logits, reference_split, straight_through
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


@dataclass(frozen=True)
class VisionLayout:
    """Where a ViT-style vision tower keeps the parts of ``e = [special tokens, patches] + positions``.

    The defaults describe ViT / DeiT. Paths are module paths (``find_module``); ``embeddings`` is relative to
    ``model.base_model``, ``patches`` and ``conv`` to the embeddings module.

    Parameters
    ----------
    embeddings
        The embeddings module (its output is the sum).
    patches
        The module that takes the pixels and gives the patch tokens: ``[B, N, D]``, or a convolution's
        ``[B, D, h, w]`` (CLIP, SigLIP), flattened in raster order as the model does.
    conv
        The patch convolution (its weight's dtype is the model's, its kernel the patch size).
    specials
        Attributes of the embeddings module holding the special tokens, in sequence order (``[1, 1, D]`` or
        ``[D]``); absent or ``None`` ones are skipped (DeiT has a distillation token, ViT does not; SigLIP has
        none).
    position
        The position table: a ``[1, S, D]`` parameter, or an ``nn.Embedding`` read at the module's
        ``position_ids`` buffer (CLIP, SigLIP).
    interpolation
        ``"optional"``: the table is interpolated to the image size with ``interpolate_pos_encoding=True`` (ViT,
        CLIP, SigLIP); ``"always"``: the model always calls ``interpolate_pos_encoding`` (DINOv2), which returns
        the table itself at the training size.
    vision_config
        The attribute of ``model.config`` holding the vision config (``"vision_config"``: CLIP, SigLIP);
        ``None``: ``model.config`` itself.
    """

    embeddings: str = "embeddings"
    patches: str = "patch_embeddings"
    conv: str = "patch_embeddings.projection"
    specials: tuple[str, ...] = ("cls_token", "distillation_token")
    position: str = "position_embeddings"
    interpolation: str = "optional"
    vision_config: str | None = None

    def embeddings_of(self, model: nn.Module) -> nn.Module:
        return find_module(model.base_model, self.embeddings)

    def config_of(self, model: nn.Module) -> Any:
        return getattr(model.config, self.vision_config) if self.vision_config else model.config

    def special_tokens(self, emb: nn.Module) -> list[torch.Tensor]:
        found = (getattr(emb, name, None) for name in self.specials)
        return [t for t in found if isinstance(t, torch.Tensor)]

    def patch_size(self, emb: nn.Module) -> tuple[int, int]:
        return _pair(find_module(emb, self.conv).kernel_size)

    def table_rows(self, emb: nn.Module) -> int:
        """The number of positions the (uninterpolated) table holds."""
        table = getattr(emb, self.position)
        return table.num_embeddings if isinstance(table, nn.Embedding) else table.shape[1]

    def positions(
        self, emb: nn.Module, token: torch.Tensor, height: int, width: int, interpolate: bool
    ) -> torch.Tensor:
        """The position embedding [1, S, D] the model adds, computed with the module's own code."""
        if interpolate or self.interpolation == "always":
            return emb.interpolate_pos_encoding(token, height, width)
        table = getattr(emb, self.position)
        if isinstance(table, nn.Embedding):
            return table(emb.position_ids)
        return table


#: the layout of ViT / DeiT
VIT_LAYOUT = VisionLayout()


def _patch_tokens(output: torch.Tensor) -> torch.Tensor:
    """The patch tokens [B, N, D] from the patch module's output (a convolution's [B, D, h, w] is flattened in
    raster order, as the models do)."""
    return output.flatten(2).transpose(1, 2) if output.dim() == 4 else output


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
    layout: VisionLayout = field(default_factory=VisionLayout)
    #: ``LRPConfig.position_reference`` / ``patch_rule`` (issue 20): where the vision maps take them from
    position_reference: str | None = None
    patch_rule: str | None = None
    image_readout: str | None = None
    #: the names of the content and position leaves (a VLM's tower: ``("image_token", "image_position")``) and
    #: the prefix of the ``store.aux`` entries (so that a tower inside a VLM keeps apart from anything else)
    names: tuple[str, str] = ("token", "position")
    prefix: str = ""

    def attach(self, module: nn.Module, handles: Handles) -> None:
        store, layout = self.store, self.layout
        token_name, position_name = self.names
        pixels_key, patches_key = self.prefix + "pixels", self.prefix + "patches"

        signature = inspect.signature(type(module).forward)

        def pixels_in(_module, args):
            if (
                self.prefix
            ):  # a VLM reads no pixel map: the pixels stay as they are (no gradient kept for them)
                store.aux[pixels_key + "_shape"] = tuple(args[0].shape[-2:])
                return None
            pixels = make_leaf(args[0])
            store.aux[pixels_key] = pixels
            return (pixels, *args[1:])

        def patches_out(_module, _args, output):
            store.aux[patches_key] = _patch_tokens(output)

        def embeddings_out(emb, args, kwargs, output):
            # accelerate offload: the class token and the positions are on `meta` once the forward returned
            with weights_on_device(emb):
                return rebuild(emb, args, kwargs, output)

        def rebuild(emb, args, kwargs, output):
            given = signature.bind(emb, *args, **kwargs).arguments
            masked = given.get("bool_masked_pos")
            if masked is not None:
                raise AttributionInputError(
                    "bool_masked_pos (masked image modelling) is not supported by hf_pelrp: attribute unmasked images"
                )
            patches = store.aux[patches_key]
            height, width = (
                store.aux[pixels_key + "_shape"] if self.prefix else store.aux[pixels_key].shape[-2:]
            )
            batch = patches.shape[0]
            specials = [
                s.detach().reshape(1, 1, -1).expand(batch, -1, -1) for s in layout.special_tokens(emb)
            ]
            token = make_leaf(torch.cat(specials + [patches.detach()], dim=1))
            store.aux[self.prefix + "patch_size"] = layout.patch_size(emb)
            if self.patch_rule is not None:
                store.aux["patch_rule"] = (self.patch_rule, find_module(emb, layout.conv))
            if self.image_readout is not None:
                store.aux["image_readout"] = self.image_readout
            position = layout.positions(
                emb, token, height, width, bool(given.get("interpolate_pos_encoding"))
            )
            # one copy per image: a shared [1, S, D] leaf would sum the gradients of the whole batch
            position = position.detach().expand(batch, -1, -1)
            if self.positional and self.position_reference == "mean":
                rebuilt = _split_at_mean(store, token, position)
            else:
                if self.positional:
                    position = make_leaf(position)
                    store.additive[position_name] = position
                store.additive[token_name] = token
                rebuilt = token + position
            dropout = getattr(emb, "dropout", None)
            if isinstance(dropout, nn.Module):
                rebuilt = dropout(rebuilt)
            if not torch.equal(rebuilt.detach(), output.detach()):
                raise AttributionStateError(
                    f"{type(emb).__name__} computed something other than [special tokens, patches] + positions; "
                    "the ViT adapter cannot split it into token and position leaves."
                )
            return rebuilt

        patch = find_module(module, layout.patches)
        handles.append(patch.register_forward_pre_hook(pixels_in))
        handles.append(patch.register_forward_hook(patches_out))
        handles.append(module.register_forward_hook(embeddings_out, with_kwargs=True))


def _split_at_mean(store: LeafStore, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """``position_reference="mean"``: ``e = (t + r) + (p - r)`` with ``r`` the mean position row
    (:func:`hf_pelrp.rules.reference_split`). The token leaf holds ``t + r`` (the sink credited to the content),
    the position leaf ``p - r``; the sum is returned with the bit-exact value of ``t + p``."""
    shared, deviation = reference_split(position, position.mean(1, keepdim=True))
    with_shared = make_leaf(token.detach() + shared)
    deviation = make_leaf(deviation)
    store.additive["token"] = with_shared
    store.additive["position"] = deviation
    store.aux["position_shared"] = shared
    return straight_through(token.detach() + position, with_shared + deviation)


@dataclass
class ContrastLogits(HookRule):
    """``LRPConfig.logit_contrast``: the model's output logits explained against the other classes
    (:func:`hf_pelrp.rules.contrast_logits`); a forward hook on the whole model, values unchanged."""

    kind: str

    def attach(self, module: nn.Module, handles: Handles) -> None:
        def hook(_module, _args, output):
            logits = getattr(output, "logits", None)
            if not isinstance(logits, torch.Tensor):
                raise AttributionStateError(
                    f"{type(module).__name__} returned no logits: logit_contrast needs a classification head"
                )
            output.logits = contrast_logits(logits, self.kind)
            return output

        handles.append(module.register_forward_hook(hook))


def _vision_options(
    model: nn.Module, config: LRPConfig, store: LeafStore, layout: VisionLayout
) -> list[tuple[nn.Module, HookRule]]:
    leaves = VisionEmbeddingLeaves(
        store, config.positional, layout, config.position_reference, config.patch_rule, config.image_readout
    )
    rules: list[tuple[nn.Module, HookRule]] = [(layout.embeddings_of(model), leaves)]
    if config.logit_contrast is not None:
        rules.append((model, ContrastLogits(config.logit_contrast)))
    return rules


def _embedding_rules(
    model: nn.Module, config: LRPConfig, store: LeafStore
) -> list[tuple[nn.Module, HookRule]]:
    return _vision_options(model, config, store, VIT_LAYOUT)


def vision_embedding_rules(layout: VisionLayout):
    """``extra_rules`` of a vision family with ``layout``: the :class:`VisionEmbeddingLeaves` rule on its
    embeddings module (and the issue-20 options of :data:`hf_pelrp.config.VISION_OPTIONS`)."""

    def rules(model: nn.Module, config: LRPConfig, store: LeafStore) -> list[tuple[nn.Module, HookRule]]:
        return _vision_options(model, config, store, layout)

    return rules


@dataclass(frozen=True)
class ImageInputs:
    """``pixel_values`` [B, C, H, W] (a [C, H, W] image is one row), checked against the model's (vision)
    config; the attention mask is all ones over the sequence (special tokens, then the patches row by row).
    ``layout`` says where the vision tower keeps its parts (default: ViT / DeiT)."""

    kind: str = "image"
    layout: VisionLayout = field(default_factory=VisionLayout)

    def validate(self, model: nn.Module, inputs: dict[str, Any]) -> Prepared:
        inputs = {k: v for k, v in inputs.items() if v is not None}
        name = type(model).__name__
        layout = self.layout
        for key in ("input_ids", "inputs_embeds"):
            if key in inputs:
                raise AttributionInputError(
                    f"{name} takes images: pass pixel_values=<tensor [batch, channels, height, width]>, not {key}"
                )
        if "attention_mask" in inputs:
            raise AttributionInputError(f"{name} attends over all patches: attention_mask is not supported")
        always = layout.interpolation == "always"
        if always and "interpolate_pos_encoding" in inputs:
            raise AttributionInputError(
                f"{name} always interpolates its position embeddings to the image size: drop "
                "interpolate_pos_encoding"
            )
        check_unknown_inputs(
            inputs, ("pixel_values",) + (() if always else ("interpolate_pos_encoding",)), model
        )
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
        config = layout.config_of(model)
        if channels != config.num_channels:
            raise AttributionInputError(
                f"pixel_values has {channels} channel(s) but {name} expects {config.num_channels} "
                "(config.num_channels): convert the images (e.g. grayscale to RGB) before attributing"
            )
        emb = layout.embeddings_of(model)
        dtype = find_module(emb, layout.conv).weight.dtype
        if pixels.dtype != dtype:
            raise AttributionInputError(
                f"pixel_values has dtype {pixels.dtype} but the model computes in {dtype}: cast it with .to(model.dtype)"
            )
        if not torch.isfinite(pixels).all():
            raise AttributionInputError("pixel_values holds NaN or infinite values")
        image_h, image_w = _pair(config.image_size)
        patch_h, patch_w = layout.patch_size(emb)
        specials = len(layout.special_tokens(emb))
        if always or inputs.get("interpolate_pos_encoding"):
            if height < patch_h or width < patch_w:
                raise AttributionInputError(
                    f"the image is {height}x{width}, smaller than one {patch_h}x{patch_w} patch"
                )
            grid = layout.table_rows(emb) - specials
            if math.isqrt(grid) ** 2 != grid:
                raise AttributionInputError(
                    f"{name} was trained on a non-square patch grid, which interpolate_pos_encoding cannot "
                    + (
                        "handle: this model cannot be attributed"
                        if always
                        else f"resize: pass {image_h}x{image_w} images without it"
                    )
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
        seq_len = specials + (height // patch_h) * (width // patch_w)
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
    - ``LRPConfig.patch_rule`` replaces the pixels' share by an input-layer rule (:func:`_input_rule_map`),
      ``position_reference="mean"`` spreads the sink row's share like the position's, and
      ``image_readout="positive"`` clamps ``pixel_map`` at 0 and makes ``patch_map`` its per-patch sums.
    """
    pixels, patches = store.aux.get("pixels"), store.aux.get("patches")
    token = store.additive.get("token")
    if pixels is None or patches is None or token is None:
        return {}
    batch, _, height, width = pixels.shape
    patch_size = store.aux.get("patch_size")
    if patch_size is None:
        patch_size = model.base_model.embeddings.patch_embeddings.patch_size
    patch_h, patch_w = _pair(patch_size)
    grid_h, grid_w = height // patch_h, width // patch_w
    special = token.shape[1] - patches.shape[1]
    dtype = maps["token"].dtype
    from_tokens = torch.zeros(batch, height, width, dtype=dtype, device=pixels.device)
    rule = store.aux.get("patch_rule")
    if token.grad is not None and rule is not None:
        from_tokens = _input_rule_map(rule, pixels, patches, token.grad[:, special:], (grid_h, grid_w), dtype)
    elif token.grad is not None:
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
    spread_per_patch = position
    shared = store.aux.get("position_shared")
    if shared is not None and token.grad is not None:
        # the mean-reference sink is in the token map; on the pixels it is spread like the position itself
        sink = (shared.to(dtype) * token.grad.to(dtype)).sum(-1)[:, special:].reshape(batch, grid_h, grid_w)
        spread_per_patch = position + sink.to(position.device)
    spread = (
        (spread_per_patch / (patch_h * patch_w)).repeat_interleave(patch_h, 1).repeat_interleave(patch_w, 2)
    )
    pixel_map = from_tokens.clone()
    pixel_map[:, : grid_h * patch_h, : grid_w * patch_w] += spread.to(pixel_map.device)
    if store.aux.get("image_readout") == "positive":
        # the paper's ViT read-out: negative evidence dropped from the image maps, patches ranked by what is left
        pixel_map = pixel_map.clamp(min=0)
        covered = pixel_map[:, : grid_h * patch_h, : grid_w * patch_w]
        patch_map = covered.reshape(batch, grid_h, patch_h, grid_w, patch_w).sum((2, 4)).to(patch_map)
    return {"patch_map": patch_map, "pixel_map": pixel_map}


def _input_rule_map(
    rule: tuple[str, nn.Module],
    pixels: torch.Tensor,
    patches: torch.Tensor,
    grad: torch.Tensor,
    grid: tuple[int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """``LRPConfig.patch_rule``: each patch-channel's relevance ``z_j g_j`` (its bias included) carried to the
    pixels by an input-layer rule of :data:`hf_pelrp.rules.INPUT_RULES`, summed over channels -> [B, H, W]."""
    name, conv = rule
    relevance = (patches.detach().to(dtype) * grad.to(dtype)).transpose(1, 2)
    relevance = relevance.reshape(relevance.shape[0], relevance.shape[1], *grid)
    with weights_on_device(conv):
        weight = conv.weight.detach()
        layer_map = layer_map_of(conv)
        x = pixels.detach().to(dtype)
        if name == "zbox":
            out = INPUT_RULES[name](x, relevance.to(x.device), weight, layer_map, low=0.0, high=1.0)
        else:
            out = INPUT_RULES[name](x, relevance.to(x.device), weight, layer_map)
    return out.sum(1)


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

#: the tiny instance of check_adapter for ViT-style classifiers (one source for the families built on it)
TINY_VIT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 16,
    "patch_size": 4,
    "num_channels": 3,
    "num_labels": 3,
}


def vision_encoder(
    model_types: tuple[str, ...],
    modules: tuple[str, ...],
    *,
    layout: VisionLayout | None = None,
    layers: str = "layers",
    attention: str = "attention",
    positions: str = "learned absolute, [CLS, patches] + positions",
    gamma: dict[str, tuple[str, ...]] | None = None,
    constants: tuple[str, ...] = (),
    vision_options: tuple[str, ...] = (),
    extra_rules: Any = None,
    tiny: dict[str, Any] | None = None,
    name: str | None = None,
) -> Adapter:
    """The declaration of a ViT-style image classifier (the shared piece of ViT, DeiT, DINOv2, CLIP, SigLIP,
    I-JEPA, ViT-MSN, MetaCLIP 2, ...): additive learned positions as the ``"position"`` leaf at the embedding
    sum of ``layout`` (:class:`VisionEmbeddingLeaves`), the identity rule on LayerNorm, the ``"lrp"`` attention,
    ``patch_map`` / ``pixel_map``. ``extra_rules`` replaces the embedding rules where a family adds its own (it
    then calls :func:`vision_embedding_rules` itself); ``tiny`` defaults to :data:`TINY_VIT`."""
    layout = layout or VIT_LAYOUT
    return Adapter(
        model_types=model_types,
        name=name or model_types[0],
        layers=layers,
        attention=attention,
        embeddings={},
        positions=Additive({}, description=positions),
        norms={"LayerNorm": layer_norm},
        modules=modules,
        constants=constants,
        gamma=gamma or {},
        vision_options=vision_options,
        inputs=ImageInputs(layout=layout),
        heads=("image_classification",),
        extra_rules=extra_rules or vision_embedding_rules(layout),
        extra_maps=vision_maps,
        tiny=dict(TINY_VIT if tiny is None else tiny),
    )


for _model_types, _prefix, _heads in (
    (("vit",), "ViT", ("ViTForImageClassification",)),
    (("deit",), "DeiT", ("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")),
):
    _parts = ("Model", "Embeddings", "PatchEmbeddings", "Encoder", "Layer", "Attention", "SelfAttention")
    _parts += ("SelfOutput", "MLP", "Intermediate", "Output", "Pooler")
    register_adapter(
        vision_encoder(
            _model_types,
            (*_heads, *(_prefix + part for part in _parts)),
            gamma=_GAMMA,
            vision_options=tuple(VISION_OPTIONS),
            extra_rules=_embedding_rules,
        )
    )
