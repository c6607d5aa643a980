"""OLMo 2 (``olmo2``): RMSNorm *after* attention and after the MLP, and q / k RMSNorm over the whole projection.

The block is ``h + norm_a(attn(h))``, then ``h + norm_f(mlp(h))``; ``q_norm`` / ``k_norm`` normalise the full
``q_proj`` / ``k_proj`` output (all heads together) before the rotation. Every one of them is an
``Olmo2RMSNorm`` (``(w * x / rms(x))``, the weight applied in float32): the identity rule treats its scale as a
constant wherever it sits, so the declaration is the LLaMA one with OLMo 2's class names.
"""

from __future__ import annotations

from .base import register_adapter
from .llama import llama_like

OLMO2 = register_adapter(llama_like(("olmo2",), "Olmo2", name="olmo2"))
