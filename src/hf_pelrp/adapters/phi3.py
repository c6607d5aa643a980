"""Phi-3 (``phi3``, also Phi-4-mini): fused ``qkv_proj``, fused ``gate_up_proj``, optional partial rotary.

- ``Phi3MLP``: ``down_proj(up * act(gate))`` with ``gate, up = gate_up_proj(x).chunk(2)``: the uniform rule
  on the product acts on the two halves of one linear output (the second half is ``up``).
- ``Phi3Attention``: q, k, v are slices of one ``qkv_proj`` output, a linear map (epsilon rule, nothing to
  attach); the ``"lrp"`` attention scales them after the rotation as for LLaMA.
- ``partial_rotary_factor < 1`` (Phi-4-mini: 0.75) rotates the first ``rotary_dim`` channels of each head
  only (cos / sin have that width); the rotary leaves record the width at each forward pass, so the rotary
  1/2 reaches those channels and the pass-through channels keep the full factor (method.md 2, "Rotary
  variants"). The tiny instance uses a factor of 0.5 so check_adapter covers it.
"""

from __future__ import annotations

from .base import GatedProduct, register_adapter
from .llama import llama_like

PHI3 = register_adapter(
    llama_like(
        ("phi3",),
        "Phi3",
        name="phi3",
        gated=(GatedProduct(act="mlp.activation_fn", up="mlp.gate_up_proj", up_channels="second_half"),),
        tiny={
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        },
    )
)
