"""SmolLM3 (``smollm3``): the LLaMA layout with rotary switched off in every n-th layer (NoPE layers).

``SmolLM3Attention.use_rope`` (``config.no_rope_layers[layer]``) decides whether a layer rotates q and k. A
NoPE layer has no positional leaf: its per-layer position relevance is exactly 0 and its q, k keep the full
AttnLRP factor (method.md 2, "Rotary variants"); the other layers get their own ``(cos, sin)`` leaves.
"""

from __future__ import annotations

from torch import nn

from ..positions import Rotary
from .base import register_adapter
from .llama import llama_like


def uses_rope(attention: nn.Module) -> bool:
    """Whether a ``SmolLM3Attention`` rotates q and k (``no_rope_layers`` holds 1 for rotary layers)."""
    return bool(attention.use_rope)


SMOLLM3 = register_adapter(
    llama_like(
        ("smollm3",),
        "SmolLM3",
        name="smollm3",
        positions=Rotary(applies=uses_rope),
        tiny={"no_rope_layers": [1, 0]},
    )
)
