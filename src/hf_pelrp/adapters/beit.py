"""BEiT (``beit``): a ViT whose positions are a learned relative position bias per window offset.

Rules as for ViT (:mod:`hf_pelrp.adapters.vit`): identity rule on every LayerNorm and on the MLP activation,
epsilon rule on every linear map (the layer scale ``lambda * h`` is a constant factor), the ``"lrp"`` attention,
the Gamma rule where the configuration asks for it. Positions (method.md 2, "Positions inside attention"):
each ``BeitAttention`` receives its bias ``B[idx(i, j)]`` (its own table, the model's shared table, or their
sum; ``idx`` is the offset ``(dy, dx)`` of the two patches, with three extra entries for the CLS token) as the
float ``attention_mask`` of the attention interface. A pre-hook replaces it by a per-layer, per-image leaf
[B, H, T, T]; the ``"lrp"`` attention gives it the ``scores`` factor (1/2 AttnLRP, 0 CP-LRP).

Maps: ``token`` / ``position`` over ``[CLS, patches]`` (``position`` = bias relevance per key), ``patch_map`` and
``pixel_map`` as for ViT, and ``position_by_distance`` per table entry, with ``position_offsets`` [B, bins, 2]
giving the offset ``(dy, dx)`` of each entry; the last three bins are BEiT's CLS entries (CLS to patch, patch
to CLS, CLS to CLS), labelled -3, -2, -1 in ``position_distances`` (offset (0, 0)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import LRPConfig
from ..errors import AttributionInputError, AttributionStateError, UnsupportedModelError
from ..hooks import Handles, HookRule, LeafStore, make_leaf
from ..inline_attention import BiasArgument
from ..positions import BIAS_LEAF, AttentionBias, DistanceBins, bias_leaf
from .base import Adapter, register_adapter
from .norms import layer_norm
from .vit import _GAMMA, TINY_VIT, ImageInputs, VisionLayout, vision_maps


@dataclass
class BeitEmbeddingLeaves(HookRule):
    """``"token"`` = ``[CLS, conv(patches)]`` at BEiT's embeddings (no absolute positions), and the pixels.

    As :class:`hf_pelrp.adapters.vit.VisionEmbeddingLeaves` without the position addend: the rebuilt output is
    checked to equal the module's.
    """

    store: LeafStore

    def attach(self, module: nn.Module, handles: Handles) -> None:
        store = self.store

        def pixels_in(_module, args):
            pixels = make_leaf(args[0])
            store.aux["pixels"] = pixels
            return (pixels, *args[1:])

        def patches_out(_module, _args, output):
            store.aux["patches"] = output

        def embeddings_out(emb, args, kwargs, output):
            if kwargs.get("bool_masked_pos", args[1] if len(args) > 1 else None) is not None:
                raise AttributionInputError(
                    "bool_masked_pos (masked image modelling) is not supported by hf_pelrp: attribute unmasked images"
                )
            patches = store.aux["patches"]
            batch = patches.shape[0]
            token = make_leaf(
                torch.cat([emb.cls_token.detach().expand(batch, -1, -1), patches.detach()], dim=1)
            )
            store.additive["token"] = token
            rebuilt = emb.dropout(token)
            if not torch.equal(rebuilt.detach(), output.detach()):
                raise AttributionStateError(
                    f"{type(emb).__name__} computed something other than [CLS, patches]; the BEiT adapter cannot "
                    "make it a token leaf."
                )
            return rebuilt

        handles.append(module.patch_embeddings.register_forward_pre_hook(pixels_in))
        handles.append(module.patch_embeddings.register_forward_hook(patches_out))
        handles.append(module.register_forward_hook(embeddings_out, with_kwargs=True))


def _window_bins(window: tuple[int, int], device: torch.device) -> DistanceBins:
    """The table entry of each (query, key) pair of ``[CLS, patches]`` (BEiT's index), with each entry's offset."""
    from transformers.models.beit.modeling_beit import BeitRelativePositionBias

    index = BeitRelativePositionBias.generate_relative_position_index(tuple(window)).to(device)
    rows, cols = 2 * window[0] - 1, 2 * window[1] - 1
    entries = torch.arange(rows * cols, device=device)
    offsets = torch.stack([entries // cols - (window[0] - 1), entries % cols - (window[1] - 1)], -1)
    offsets = torch.cat([offsets, torch.zeros(3, 2, dtype=offsets.dtype, device=device)])
    labels = torch.cat([entries, torch.tensor([-3, -2, -1], device=device)])
    return DistanceBins(index[None], labels, offsets=offsets)


def _beit_bias(attention, value, args, kwargs, store, layer):
    hidden = args[0] if args else kwargs["hidden_states"]
    batch, length = hidden.shape[:2]
    if not value.is_floating_point() or value.dim() != 4 or not bool(torch.isfinite(value).all()):
        raise UnsupportedModelError(
            "BeitAttention received an attention mask that is not a finite relative position bias; hf_pelrp "
            "explains BEiT on unmasked images (no attention_mask, no bool_masked_pos)"
        )
    full = value.expand(batch, value.shape[1], length, length)
    leaf = bias_leaf(store, layer, full)
    pixels = store.aux.get("pixels")
    if pixels is not None and ("bins", BIAS_LEAF) not in store.aux:
        patch = attention_patch_size(store)
        window = (pixels.shape[-2] // patch[0], pixels.shape[-1] // patch[1])
        if window[0] * window[1] + 1 == length:
            store.aux[("bins", BIAS_LEAF)] = _window_bins(window, leaf.device)
    return leaf


def attention_patch_size(store: LeafStore) -> tuple[int, int]:
    """The patch size of the image behind the tokens (``store.aux["pixels"]`` / ``["patches"]``)."""
    pixels, patches = store.aux["pixels"], store.aux["patches"]
    grid = patches.shape[1]
    height, width = pixels.shape[-2:]
    side = int(round((height * width / grid) ** 0.5))
    return side, side


def _beit_leaves(model, layers, attention, store):
    return [
        (module, BiasArgument(store, i, "attention_mask", _beit_bias)) for i, module in enumerate(attention)
    ]


def _embedding_rules(
    model: nn.Module, config: LRPConfig, store: LeafStore
) -> list[tuple[nn.Module, HookRule]]:
    return [(model.base_model.embeddings, BeitEmbeddingLeaves(store))]


@dataclass(frozen=True)
class BeitLayout(VisionLayout):
    """ViT's layout without an absolute position table.

    ``interpolate_pos_encoding=True`` works for BEiT's relative bias: the model resamples its bias table to the
    window of the image (``BeitRelativePositionBias.forward``) and the leaf is whatever bias the attention
    receives, with the offset bins of that window (:func:`_window_bins`); the flag adds only a resize of the
    [T, T] bias to its own size. The size checks of :class:`ImageInputs` read the training grid here.
    """

    def table_rows(self, emb: nn.Module) -> int:
        return emb.patch_embeddings.num_patches + len(self.special_tokens(emb))


def _relative_bias_only(model: nn.Module) -> None:
    config = model.config
    if getattr(config, "use_absolute_position_embeddings", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} adds absolute position embeddings as well as a relative position bias; "
            "hf_pelrp's BEiT adapter explains the relative bias (the BEiT checkpoints' setting). Combining both "
            "kinds in one position map is not implemented."
        )


BEIT = register_adapter(
    Adapter(
        model_types=("beit",),
        name="beit",
        layers="layers",
        attention="attention",
        embeddings={},
        positions=AttentionBias(
            leaves=_beit_leaves, description="relative position bias per window offset (BEiT)"
        ),
        norms={"LayerNorm": layer_norm},
        modules=(
            "BeitForImageClassification",
            "BeitModel",
            "BeitEmbeddings",
            "BeitPatchEmbeddings",
            "BeitRelativePositionBias",
            "BeitLayer",
            "BeitAttention",
            "BeitMLP",
            "BeitDropPath",
            "BeitPooler",
        ),
        gamma=_GAMMA,
        inputs=ImageInputs(layout=BeitLayout()),
        heads=("image_classification",),
        extra_rules=_embedding_rules,
        extra_maps=vision_maps,
        checks=(_relative_bias_only,),
        tiny={
            **TINY_VIT,
            "use_relative_position_bias": True,
            "use_mean_pooling": True,
        },
    )
)
