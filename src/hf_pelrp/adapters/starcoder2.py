"""StarCoder2 (``starcoder2``): LayerNorm with bias, an ungated MLP ``c_proj(act(c_fc(x)))``, biases everywhere.

Rules: the identity rule on ``nn.LayerNorm`` (its bias absorbs its share, as any epsilon-rule bias) and on the
MLP activation (no product: factor 1), the ``"lrp"`` attention and the rotary leaves as for LLaMA; the biases of
the linear layers absorb relevance (zeroed, conservation is exact, which check_adapter verifies).
"""

from __future__ import annotations

from .base import register_adapter
from .llama import llama_like
from .norms import layer_norm

STARCODER2 = register_adapter(
    llama_like(
        ("starcoder2",),
        "Starcoder2",
        name="starcoder2",
        norms={"LayerNorm": layer_norm},
        gated=(),
        tiny={"use_bias": True},
    )
)
