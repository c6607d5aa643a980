"""OLMoE (``olmoe``): the LLaMA layout with OLMo 2's whole-projection q / k RMSNorms and a mixture of experts in
every block.

The experts and the router are those of :mod:`hf_pelrp.adapters.moe` (fused ``[gate; up]`` experts re-computed
under the rules and checked against the module's output; a softmax top-k router whose top-k weights are
renormalised only with ``norm_topk_prob``, as OLMoE's router does): the top-k selection is a constant,
``w_e(x) * E_e(x)`` gets the uniform rule (CP-LRP: the weight is a constant). ``clip_qkv`` clamps the *normed*
q and k (after ``q_norm`` / ``k_norm``) and v in place: no rule covers a clamp behind a norm yet, so a model with
``clip_qkv`` set is refused (OLMoE-1B-7B has none).
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import register_adapter
from .llama import llama_like
from .moe import MixtureOfExperts, _moe_tiny

OLMOE_EXPERTS = MixtureOfExperts(experts="OlmoeExperts", router="OlmoeTopKRouter")


def no_clip_qkv(model: nn.Module) -> None:
    """Refuse ``clip_qkv`` (an in-place clamp of the normed q, k and of v that no rule here covers)."""
    if getattr(model.config, "clip_qkv", None) is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} clips q, k, v (clip_qkv={model.config.clip_qkv}) after OLMoE's q / k norms; "
            "hf_pelrp has no rule for a clamp behind a norm yet, and plain gradients would drop the relevance of "
            "the clipped entries."
        )


OLMOE = register_adapter(
    llama_like(
        ("olmoe",),
        "Olmoe",
        modules=("OlmoeSparseMoeBlock", "OlmoeExperts", "OlmoeTopKRouter"),
        gated=(),
        experts=OLMOE_EXPERTS,
        checks=(no_clip_qkv,),
        heads=("causal_lm",),
        tiny=_moe_tiny(num_experts=4, norm_topk_prob=False, bos_token_id=1, eos_token_id=2),
        name="olmoe",
    )
)
