"""Mixture-of-experts decoders whose parts hf_pelrp already covers (issue 18), declared explicitly and proven by
check_adapter like every registered type. The rules are those of :mod:`hf_pelrp.adapters.moe` (fused experts
re-computed under the rules and checked against the module's output; softmax top-k routers by the uniform rule,
their renormalisation denominator a constant; sigmoid routing weights constants in both modes,
signal-take-all; shared experts are plain gated MLPs).

- ``cohere2_moe``: Cohere 2's parallel block (one norm feeding attention and MLP), bias-free LayerNorm (or
  RMSNorm with ``rms_norm_eps``), ``logit_scale``; rotary in the sliding-window layers and in the dense layers
  when ``prefix_dense_sliding_window_pattern == 1`` (``force_rope``), none in the other global layers
  (``Rotary(applies=)``: no leaf there, exactly 0 position relevance, full q, k factor). The router takes the
  softmax of the selected logits (the renormalised top-k of the full softmax, as GraniteMoE's: re-computed in
  that form and checked); ``expert_selection_fn="sigmoid"`` is refused (sigmoid weights renormalised by the
  router have no declaration here). Shared experts, summed or averaged (a constant 1/2).
- ``ernie4_5_moe``: softmax router renormalised by ``clamp(sum, norm_min)`` (a constant; a sum below
  ``norm_min`` would not be reproduced and is refused at that call), a correction bias
  (``Ernie4_5_MoeStatics``) that only changes the selection, shared experts, dense and sparse blocks.
- ``glm4_moe``: partial rotary (the first ``head_dim x partial_rotary_factor`` channels), optional per-head
  q / k RMSNorms, DeepSeek-V3's sigmoid group routing (weights constants), a shared expert, dense first blocks.
- ``exaone_moe``: EXAONE 4's sliding-window layers that rotate and global layers that do not
  (:func:`~hf_pelrp.adapters.rotary_decoders.exaone4_rotates`), q / k RMSNorms, DeepSeek-V3's sigmoid routing,
  a shared expert, dense and sparse blocks.
- ``hunyuan_v1_moe``: per-head q / k RMSNorms, a shared gated MLP in every block, a softmax top-k router whose
  linear map is a submodule (``wg``): :class:`WgSoftmaxRouter` applies the softmax-router rule of
  :func:`~hf_pelrp.adapters.moe.softmax_routing_weights` with ``wg``'s weight (re-computed and checked against
  the module's output at every call, as for Mixtral).
- ``dots1``: per-head q / k RMSNorms, DeepSeek-V3's sigmoid group routing (weights constants), a shared expert,
  dense first blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from torch import nn

from ..config import LRPConfig
from ..devices import weights_on_device
from ..errors import UnsupportedModelError
from ..hooks import Handles, HookRule, LeafStore, check_reproduces
from ..positions import Rotary
from ..rules import straight_through
from .base import GatedProduct, register_adapter
from .llama import llama_like
from .moe import DENSE_MLP, MixtureOfExperts, _moe_tiny, softmax_routing_weights
from .norms import layer_norm, rms_norm
from .rotary_decoders import exaone4_rotates

_HEADS = {"head_dim": 8, "bos_token_id": 1, "eos_token_id": 2}
#: the shared expert of a mixture-of-experts block (absent in dense blocks)
SHARED_EXPERTS = GatedProduct(act="mlp.shared_experts.act_fn", up="mlp.shared_experts.up_proj", optional=True)


def cohere2_moe_rotates(attention: nn.Module) -> bool:
    """``Cohere2MoeAttention`` rotates q and k in its sliding-window layers and where ``force_rope`` is set."""
    return attention.sliding_window is not None or bool(attention.force_rope)


def softmax_selection(model: nn.Module) -> None:
    """Refuse Cohere2-MoE's sigmoid expert selection (only the softmax router is declared)."""
    selection = getattr(model.config, "expert_selection_fn", "softmax")
    if selection != "softmax":
        raise UnsupportedModelError(
            f"{type(model).__name__} selects experts with {selection!r} (expert_selection_fn); the cohere2_moe "
            "declaration covers the softmax router only (sigmoid routing weights renormalised by the router are "
            "not declared)."
        )


COHERE2_MOE_EXPERTS = MixtureOfExperts(experts="Cohere2MoeExperts", router="Cohere2MoeTopKRouter")
COHERE2_MOE = register_adapter(
    llama_like(
        ("cohere2_moe",),
        "Cohere2Moe",
        name="cohere2_moe",
        norms={"Cohere2MoeLayerNorm": layer_norm, "Cohere2MoeRMSNorm": rms_norm},
        modules=("Cohere2MoeSparseMoeBlock", "Cohere2MoeExperts", "Cohere2MoeTopKRouter"),
        positions=Rotary(applies=cohere2_moe_rotates),
        gated=(DENSE_MLP, SHARED_EXPERTS),
        extra_rules=COHERE2_MOE_EXPERTS,
        checks=(COHERE2_MOE_EXPERTS.check, softmax_selection),
        heads=("causal_lm",),
        # (sliding, sparse) rotates; (full, sparse) does not; (full, dense) rotates by force_rope
        tiny=_moe_tiny(
            num_experts=4,
            num_shared_experts=1,
            shared_expert_combination_strategy="average",
            prefix_dense_intermediate_size=48,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention", "full_attention"],
            mlp_layer_types=["sparse", "sparse", "dense"],
            num_hidden_layers=3,
            logit_scale=0.25,
            **_HEADS,
        ),
    )
)

ERNIE4_5_MOE_EXPERTS = MixtureOfExperts(experts="Ernie4_5_MoeExperts", router="Ernie4_5_MoeTopKRouter")
ERNIE4_5_MOE = register_adapter(
    llama_like(
        ("ernie4_5_moe",),
        "Ernie4_5_Moe",
        name="ernie4_5_moe",
        modules=(
            "Ernie4_5_MoeSparseMoeBlock",
            "Ernie4_5_MoeExperts",
            "Ernie4_5_MoeTopKRouter",
            "Ernie4_5_MoeStatics",
        ),
        gated=(DENSE_MLP, SHARED_EXPERTS),
        extra_rules=ERNIE4_5_MOE_EXPERTS,
        checks=(ERNIE4_5_MOE_EXPERTS.check,),
        heads=("causal_lm",),
        # layer 0 dense, layer 1 a mixture of experts with a shared expert
        tiny=_moe_tiny(
            moe_num_experts=4,
            moe_k=2,
            moe_intermediate_size=16,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            moe_layer_interval=1,
            **_HEADS,
        ),
    )
)

GLM4_MOE_EXPERTS = MixtureOfExperts(experts="Glm4MoeExperts", routing="sigmoid")
GLM4_MOE = register_adapter(
    llama_like(
        ("glm4_moe",),
        "Glm4Moe",
        name="glm4_moe",
        modules=("Glm4MoeMoE", "Glm4MoeExperts", "Glm4MoeTopkRouter"),
        gated=(DENSE_MLP, SHARED_EXPERTS),
        extra_rules=GLM4_MOE_EXPERTS,
        checks=(GLM4_MOE_EXPERTS.check,),
        heads=("causal_lm",),
        tiny=_moe_tiny(
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            use_qk_norm=True,
            routed_scaling_factor=2.5,
            **_HEADS,
        ),
    )
)

EXAONE_MOE_EXPERTS = MixtureOfExperts(experts="ExaoneMoeExperts", routing="sigmoid")
EXAONE_MOE = register_adapter(
    llama_like(
        ("exaone_moe",),
        "ExaoneMoe",
        name="exaone_moe",
        modules=("ExaoneMoeSparseMoEBlock", "ExaoneMoeExperts", "ExaoneMoeTopkRouter"),
        positions=Rotary(applies=exaone4_rotates),
        gated=(DENSE_MLP, SHARED_EXPERTS),
        extra_rules=EXAONE_MOE_EXPERTS,
        checks=(EXAONE_MOE_EXPERTS.check,),
        heads=("causal_lm",),
        tiny=_moe_tiny(
            num_experts=8,
            n_group=2,
            topk_group=1,
            num_shared_experts=1,
            moe_intermediate_size=16,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
            mlp_layer_types=["dense", "sparse"],
            num_key_value_heads=2,
            **_HEADS,
        ),
    )
)


@dataclass
class WgSoftmaxRouter(HookRule):
    """The softmax-router rule (:func:`~hf_pelrp.adapters.moe.softmax_routing_weights`: renormalised top-k of the
    softmax, the denominator a constant) of a router whose linear map is its submodule ``wg``; the weights keep
    the module's values (straight-through), checked to be reproduced."""

    name: str = ""

    def attach(self, module: nn.Module, handles: Handles) -> None:
        def hook(mod, args, kwargs, output):
            logits, weights, index = output
            x = args[0] if args else kwargs["hidden_states"]
            if not x.requires_grad:
                return output
            with weights_on_device(mod):
                view = SimpleNamespace(weight=mod.wg.weight, norm_topk_prob=True)
                x = x.reshape(-1, x.shape[-1]).to(device=weights.device, dtype=mod.wg.weight.dtype)
                surrogate = softmax_routing_weights(view, x, index)
            check_reproduces(surrogate, weights, self.name or type(mod).__name__, "router re-computation")
            return logits, straight_through(weights, surrogate.to(weights.dtype)), index

        handles.append(module.register_forward_hook(hook, with_kwargs=True))


HUNYUAN_V1_MOE_EXPERTS = MixtureOfExperts(experts="HunYuanMoEV1Experts")


def hunyuan_v1_moe_rules(
    model: nn.Module, config: LRPConfig, store: LeafStore
) -> list[tuple[nn.Module, HookRule]]:
    """The experts' rules, and the router's where the routing weight carries relevance (AttnLRP)."""
    rules = HUNYUAN_V1_MOE_EXPERTS(model, config, store)
    if HUNYUAN_V1_MOE_EXPERTS.factors(config)["weight_factor"] != 0.0:
        rules += [
            (m, WgSoftmaxRouter(name=f"{path} ({type(m).__name__})"))
            for path, m in model.named_modules()
            if type(m).__name__ == "HunYuanMoEV1Gate"
        ]
    return rules


HUNYUAN_V1_MOE = register_adapter(
    llama_like(
        ("hunyuan_v1_moe",),
        "HunYuanMoEV1",
        name="hunyuan_v1_moe",
        modules=("HunYuanMoEV1Moe", "HunYuanMoEV1Experts", "HunYuanMoEV1Gate"),
        gated=(GatedProduct(act="mlp.shared_mlp.act_fn", up="mlp.shared_mlp.up_proj"),),
        extra_rules=hunyuan_v1_moe_rules,
        checks=(HUNYUAN_V1_MOE_EXPERTS.check,),
        tiny=_moe_tiny(num_experts=4, moe_topk=2, **_HEADS),
    )
)

DOTS1_EXPERTS = MixtureOfExperts(experts="Dots1Experts", routing="sigmoid")
DOTS1 = register_adapter(
    llama_like(
        ("dots1",),
        "Dots1",
        name="dots1",
        modules=("Dots1MoE", "Dots1Experts", "Dots1TopkRouter"),
        gated=(DENSE_MLP, SHARED_EXPERTS),
        extra_rules=DOTS1_EXPERTS,
        checks=(DOTS1_EXPERTS.check,),
        heads=("causal_lm",),
        tiny=_moe_tiny(
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            **_HEADS,
        ),
    )
)
