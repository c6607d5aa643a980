"""OLMo (``olmo``): the LLaMA layout with a LayerNorm that has no weight and no bias, and optional q / k / v
clipping.

- ``OlmoLayerNorm`` is ``F.layer_norm(x, None, None, eps=1e-5)`` with the epsilon written into its forward (the
  module has no ``eps`` attribute), so its surrogate names that epsilon; the identity rule keeps the mean
  subtraction and makes the standard deviation a constant.
- ``clip_qkv`` (OLMo 1.7: 8.0) clamps the q, k, v projections in place: an element-wise activation, identity
  rule (:class:`hf_pelrp.hooks.ClippedOutput`); plain autograd would drop the relevance of clipped entries.
  The tiny instance clips about a third of the entries, so check_adapter covers it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LRPConfig
from ..hooks import ClippedOutput, HookRule, LeafStore
from ..rules import layer_norm_identity
from .base import register_adapter
from .llama import llama_like

#: the epsilon OlmoLayerNorm.forward passes to F.layer_norm
OLMO_LAYER_NORM_EPS = 1e-5


def olmo_layer_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` with ``std`` detached (no weight, no bias; epsilon 1e-5)."""
    return layer_norm_identity(x, None, None, OLMO_LAYER_NORM_EPS)


def clip_qkv_rules(model: nn.Module, config: LRPConfig, store: LeafStore) -> list[tuple[nn.Module, HookRule]]:
    """The identity rule on the clipped q, k, v projections of every layer (none without ``clip_qkv``)."""
    limit = getattr(model.config, "clip_qkv", None)
    if limit is None:
        return []
    return [
        (getattr(layer.self_attn, name), ClippedOutput(float(limit)))
        for layer in model.base_model.layers
        for name in ("q_proj", "k_proj", "v_proj")
    ]


OLMO = register_adapter(
    llama_like(
        ("olmo",),
        "Olmo",
        name="olmo",
        norms={"OlmoLayerNorm": olmo_layer_norm},
        extra_rules=clip_qkv_rules,
        tiny={"clip_qkv": 0.1},
    )
)
