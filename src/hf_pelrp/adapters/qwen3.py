"""Qwen3 (``qwen3``): the LLaMA layout plus an RMSNorm on each head of q and of k inside attention.

``Qwen3Attention`` computes ``q_norm(q_proj(x))`` per head (``Qwen3RMSNorm`` over ``head_dim``, the class of
the block norms) before the rotation: the identity rule (AttnLRP Prop. 3.4) covers it like every RMSNorm, so
q and k stay linear in the normed hidden state for the backward pass and the rotary split follows as for
LLaMA. Sliding-window layers (``use_sliding_window``) only change the mask.
"""

from __future__ import annotations

from .base import register_adapter
from .llama import llama_like

QWEN3 = register_adapter(llama_like(("qwen3",), "Qwen3", name="qwen3", tiny={"head_dim": 8}))
