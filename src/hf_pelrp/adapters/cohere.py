"""Cohere / Command-R (``cohere``): bias-free LayerNorm, parallel attention and MLP, interleaved rotary pairs.

- ``CohereLayerNorm``: ``(x - mean) / std * w`` without a bias, also as the optional per-head q / k norm
  (``use_qk_norm``, weight of shape [heads, head_dim]); the identity rule keeps the mean subtraction.
- The block is ``h + attn(norm(h)) + mlp(norm(h))``: one norm feeds both branches, a sum (epsilon rule).
- ``logits = lm_head(h) * logit_scale``: scaling by a constant, nothing to change.
- Rotary pairs are interleaved (``rotate_half`` pairs channels (0, 1), (2, 3), ...), but the rotary embedding
  repeats each frequency in place (``repeat_interleave``), so the cos / sin tensors passed to attention are
  ``head_dim`` wide and act element-wise on every channel of q and k. The rule (1/2 at the rotation, cos / sin
  as leaves) does not depend on the pairing, only on which channels rotate: all of them, as the default
  layout records from the cos width. ``Rotary(layout="interleaved")`` is for GPT-J's half-width cos / sin and
  is not needed here.
"""

from __future__ import annotations

from .base import register_adapter
from .llama import llama_like
from .norms import layer_norm

COHERE = register_adapter(
    llama_like(
        ("cohere",),
        "Cohere",
        name="cohere",
        norms={"CohereLayerNorm": layer_norm},
        tiny={"use_qk_norm": True, "logit_scale": 0.25},
    )
)
