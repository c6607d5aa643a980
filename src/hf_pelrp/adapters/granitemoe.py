"""GraniteMoE (``granitemoe``): Granite's constant multipliers (embedding, residual, attention, logits: scaling
by constants, nothing to change; see :mod:`hf_pelrp.adapters.granite`) with a mixture of experts in every block.

The experts are the fused layout of :mod:`hf_pelrp.adapters.moe` (re-computed under the rules and checked
against the module's output). The router takes the softmax of the *selected* logits, ``softmax(l_topk)``, which
is the same function as the renormalised top-k of the full softmax, ``p_topk / sum(p_topk)`` (Mixtral's
router): the router rule re-computes it in that form (checked against the module's output at every call), so a
GraniteMoE router is explained exactly as a Mixtral router with the same weights (the denominator a constant,
the softmax by its Gradient x Input rule, the top-k selection a constant; CP-LRP: the weights are constants).
"""

from __future__ import annotations

from .base import register_adapter
from .llama import llama_like
from .moe import MixtureOfExperts, _moe_tiny

GRANITEMOE_EXPERTS = MixtureOfExperts(experts="GraniteMoeExperts", router="GraniteMoeTopKRouter")

GRANITEMOE = register_adapter(
    llama_like(
        ("granitemoe",),
        "GraniteMoe",
        modules=("GraniteMoeMoE", "GraniteMoeExperts", "GraniteMoeTopKRouter"),
        gated=(),
        experts=GRANITEMOE_EXPERTS,
        heads=("causal_lm",),
        tiny=_moe_tiny(
            num_local_experts=4,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.125,
            logits_scaling=8.0,
            initializer_range=0.1,
            bos_token_id=1,
            eos_token_id=2,
        ),
        name="granitemoe",
    )
)
