"""DeepSeek-V3 (``deepseek_v3``): multi-head latent attention with a decoupled rotary part, and a sigmoid-routed
mixture of experts with shared experts.

Attention (method.md 2, "Rotary variants"): q comes from a low-rank projection (``q_a_proj``, its own RMSNorm,
``q_b_proj``), k and v from a compressed latent (``kv_a_proj_with_mqa``, RMSNorm, ``kv_b_proj``); each head is
``[content part, rotary part]``: ``query = cat(q_pass, q_rot)`` and the single-head ``k_rot`` is shared by every
head. Only the last ``qk_rope_head_dim`` channels of q and k rotate, so the rotary 1/2 applies to them only
(``Rotary(rotated="last")``); with ``rope_interleave`` the pairs are (0, 1), (2, 3), ... of that part, and only
the first half of the cos / sin leaves enters the rotation (the second half receives exactly 0).

MLP: the first ``first_k_dense_replace`` blocks have a gated MLP; the others a mixture of experts
(:mod:`hf_pelrp.adapters.moe`) whose router scores are sigmoids, selected by group top-k with a correction bias
that only changes the selection. Routing weights (renormalised sigmoid scores times ``routed_scaling_factor``)
are constants in both modes (signal-take-all, method.md), the shared experts are plain gated MLPs.
"""

from __future__ import annotations

from ..positions import Rotary
from .base import register_adapter
from .llama import llama_like
from .moe import DENSE_MLP, SHARED_EXPERTS, MixtureOfExperts

DEEPSEEK_V3_MOE = MixtureOfExperts(experts="DeepseekV3Experts", routing="sigmoid")

register_adapter(
    llama_like(
        ("deepseek_v3",),
        "DeepseekV3",
        modules=("DeepseekV3MoE", "DeepseekV3Experts", "DeepseekV3TopkRouter"),
        positions=Rotary(rotated="last"),
        gated=(
            DENSE_MLP,
            SHARED_EXPERTS,
        ),
        experts=DEEPSEEK_V3_MOE,
        # one dense block, one MoE block (8 routed experts in 2 groups, 1 shared expert); low-rank q and kv
        tiny={
            "experts_implementation": "eager",
            "num_key_value_heads": 4,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_group": 2,
            "topk_group": 1,
            "n_shared_experts": 1,
            "moe_intermediate_size": 16,
            "first_k_dense_replace": 1,
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 4,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
        },
        name="deepseek_v3",
    )
)
