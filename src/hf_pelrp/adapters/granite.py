"""Granite (``granite``): the LLaMA layout with four constant multipliers in the forward pass.

``h_0 = embedding_multiplier * embed(ids)``, ``h + residual_multiplier * f(h)`` for attention and MLP,
``softmax(attention_multiplier * q k^T)`` and ``logits = lm_head(h) / logits_scaling``. Scaling by a constant
is the epsilon rule with nothing to change (method.md 1: "scaling by constants"): Gradient x Input carries
relevance through it, so the LLaMA rules apply unchanged and the token leaf is the table output before the
embedding multiplier. The tiny instance sets all four to values far from 1, so check_adapter proves it.
"""

from __future__ import annotations

from .base import register_adapter
from .llama import llama_like

GRANITE = register_adapter(
    llama_like(
        ("granite",),
        "Granite",
        name="granite",
        tiny={
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 0.125,
            "logits_scaling": 8.0,
            "initializer_range": 0.1,
        },
    )
)
