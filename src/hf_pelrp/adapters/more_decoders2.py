"""More LLaMA-layout decoders of transformers 5.25's causal-LM map (issue 18), declared with
:func:`hf_pelrp.adapters.llama.llama_like` and the mixture-of-experts rules of :mod:`hf_pelrp.adapters.moe`.

- ``minimax_m2``: q / k RMSNorms over all heads together (``MiniMaxM2RMSNorm`` of width ``heads x head_dim``,
  identity rule), partial rotary (``rotary_dim`` / ``partial_rotary_factor``: the 1/2 split on the rotated
  slice only), every block a mixture of experts without shared experts. The router's scores are sigmoids,
  selected with a correction bias that only changes the selection and renormalised over the top-k: routing
  weights are constants in both modes (``routing="sigmoid"``, signal-take-all, as DeepSeek-V3 and GLM-4-MoE),
  so each selected expert's output carries its whole term.
- ``aria_text``: the text model of Aria: every block a mixture of experts with a shared gated MLP (uniform rule /
  CP constant gate, like a dense MLP) beside routed experts; the router selects on the raw logits and softmaxes
  the selected ones (the renormalised softmax of all logits: :class:`~hf_pelrp.adapters.moe.SoftmaxRouter`, as
  Cohere2-MoE); the experts keep their weights transposed (``is_transposed=True``: ``x @ W`` with
  ``gate_up_proj`` [E, H, 2I], ``down_proj`` [E, I, H]). :class:`TransposedExperts` gives the fused-experts
  rule (:func:`~hf_pelrp.adapters.moe.expert_mixture`) the transposed views of the same parameters: the same
  arithmetic, the same factors, and the re-computation is checked against the module's output at every call.
- ``afmoe``: q / k RMSNorms per head, pre- and post-norms around attention and MLP, rotary in the sliding-window
  layers only (the global layers are NoPE: exactly 0 position relevance, full AttnLRP factors), an attention
  output gated by ``sigmoid(gate_proj(x))``: that gate is a constant in both modes (signal-take-all, the rule of
  Qwen2-MoE's shared-expert gate, ``constant_gates``), so the attention output carries the whole product.
  The first ``num_dense_layers`` blocks have a gated MLP; the others a mixture of experts with a shared gated
  MLP and sigmoid routing (a selection-only expert bias, renormalised top-k, times ``route_scale``): constant
  weights.
- ``param2moe``, ``sarvam_moe``: configuration classes of their own that transformers maps to GLM-4-MoE's
  modeling classes (``Glm4MoeForCausalLM``): GLM-4-MoE's declaration under these model types.
- ``sarvam_mla``: a configuration class of its own mapped to DeepSeek-V3's modeling classes
  (``DeepseekV3ForCausalLM``): DeepSeek-V3's declaration (latent attention with a decoupled rotary part, sigmoid
  group routing) under this model type.
- ``mistral4``: DeepSeek-V3's multi-head latent attention (the rotary part decoupled: the rotary rule on that
  part; interleaved pairs with ``rope_interleave``), a softmax top-k router with group selection (the selection
  a constant; :class:`~hf_pelrp.adapters.moe.SoftmaxRouter`'s uniform rule), a shared gated MLP, dense first
  blocks. Two parts are refused rather than explained wrongly: a ``routed_scaling_factor`` other than 1 (the
  router re-computation does not scale), and inputs past ``rope_parameters["original_max_position_embeddings"]``
  when ``llama_4_scaling_beta`` is set: from there q is multiplied by ``1 + beta log(1 + floor(i / L))``, a
  position-dependent factor with no positional leaf (below it the factor is exactly 1). Only
  ``Mistral4ForSequenceClassification`` is declared: transformers 5.25's causal-LM auto map has no ``mistral4``
  entry, so ``check_adapter`` cannot prove ``Mistral4ForCausalLM``.
- ``kolibri1``: q / k RMSNorms per head; rotary without a sliding window or in the sliding-window layers (the
  others NoPE, as EXAONE 4); every block a mixture of experts with a shared gated MLP, its router a sigmoid of
  the selected logits: constant weights.
- ``hy_v3``: q / k RMSNorms per head, rotary; dense first blocks, then experts with a shared gated MLP and
  sigmoid routing (a selection-only correction bias): constant weights.
- ``axk1``, ``glm4_moe_lite``: DeepSeek-V3's layout under their own class names (multi-head latent attention
  with a decoupled rotary part, dense first blocks, experts with a shared gated MLP and sigmoid group routing:
  constant weights); ``youtu``: the same latent attention with dense gated MLPs only.
- ``laguna``: q / k RMSNorms per head, rotary in every layer (sliding-window and full layers); an attention
  output gated by ``softplus(g_proj(x))`` (per head or per channel): like a sigmoid gate it has no
  conservative rule of its own (``softplus(0) = log 2``), so it is a constant in both modes (signal-take-all,
  ``constant_gates``) and the attention output carries the whole product; dense and sparse blocks
  (``mlp_layer_types``), experts with a shared gated MLP and sigmoid routing (selection-only correction bias,
  renormalised top-k, optional tanh soft-capping of the logits: all inside the constant weights), the routed sum
  scaled by a constant ``moe_routed_scaling_factor``.
- ``minicpm5_moe``: rotary; one projection ``q_gate_proj`` gives each head's query and its output gate
  ``[q_h; g_h]``, and the attention output is multiplied by ``sigmoid(g)``: the gate half of that projection's
  output is a constant in both modes (:class:`GateHalfConstant`: signal-take-all, as a sigmoid gate with its own
  projection), the query half keeps its gradient; dense and sparse blocks, experts with a shared gated MLP and
  sigmoid routing (constant weights, times ``routed_scaling_factor``).
- ``apertus1p5_text``: the text model of Apertus 1.5, Apertus's layout under its own class names (an ungated MLP
  whose xIELU activation, ``XIELUActivation``, gets the identity rule as in ``apertus``; q / k RMSNorms).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..config import LRPConfig
from ..devices import weights_on_device
from ..errors import UnsupportedModelError
from ..hooks import Handles, HookRule, LeafStore, check_reproduces
from ..inputs import TextInputs, scaled_rotary_limit
from ..positions import Rotary
from ..rules import straight_through
from . import deepseek as _deepseek  # noqa: F401  (deepseek_v3 registered before it is reused below)
from .base import GatedProduct, adapter_for_type, register_adapter
from .llama import llama_like
from .moe import (
    _EXPERTS_LAYOUT,
    DENSE_MLP,
    SHARED_EXPERTS,
    MixtureOfExperts,
    RoutedExperts,
    _experts_inputs,
    _moe_tiny,
    expert_mixture,
)
from .more_moe import GLM4_MOE
from .rotary_decoders import exaone4_rotates, xielu_rules

_HEADS = {"head_dim": 8, "bos_token_id": 1, "eos_token_id": 2}


class _TransposedView(nn.Module):
    """The [E, 2I, H] / [E, H, I] views of a transposed experts module's parameters (no copy: the gradient
    reaches the module's own parameters), with its ``act_fn`` and ``num_experts``."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts

    def __getattr__(self, name: str):
        if name in ("gate_up_proj", "down_proj"):
            return getattr(self.experts, name).transpose(1, 2)
        if name in ("act_fn", "num_experts", "forward"):
            return getattr(self.experts, name)
        return super().__getattr__(name)


@dataclass(frozen=True)
class TransposedExperts(MixtureOfExperts):
    """:class:`~hf_pelrp.adapters.moe.MixtureOfExperts` for fused experts stored transposed (``x @ W``)."""

    def __call__(
        self, model: nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[nn.Module, HookRule]]:
        rules = super().__call__(model, config, store)
        out = []
        for module, rule in rules:
            if isinstance(rule, RoutedExperts):
                rule = _TransposedRule(**{k: getattr(rule, k) for k in rule.__dataclass_fields__})
            out.append((module, rule))
        return out

    def check(self, model: nn.Module) -> None:
        expected = {**_EXPERTS_LAYOUT, "is_transposed": True}
        for path, module in model.named_modules():
            if type(module).__name__ != self.experts:
                continue
            layout = {key: getattr(module, key, value) for key, value in expected.items()}
            if layout != expected or not hasattr(module, "act_fn"):
                raise UnsupportedModelError(
                    f"module {path!r} ({type(module).__name__}) is not the transposed fused experts layout the "
                    f"{self.experts} declaration re-computes (found {layout}): its relevance would not be exact."
                )


@dataclass
class _TransposedRule(RoutedExperts):
    """:class:`~hf_pelrp.adapters.moe.RoutedExperts` on the transposed views of the module's parameters."""

    def attach(self, module: nn.Module, handles: Handles) -> None:
        view = _TransposedView(module)

        def hook(mod, args, kwargs, output):
            x, index, weights = _experts_inputs(args, kwargs)
            if not (x.requires_grad or weights.requires_grad):
                return output
            with weights_on_device(mod):
                surrogate = expert_mixture(
                    view,
                    x.to(output.device),
                    index.to(output.device),
                    weights.to(output.device),
                    gate_factor=self.gate_factor,
                    up_factor=self.up_factor,
                    weight_factor=self.weight_factor,
                    expert_factor=self.expert_factor,
                )
            check_reproduces(surrogate, output, self.name or type(mod).__name__, "expert re-computation")
            return straight_through(output, surrogate.to(output.dtype))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))


MINIMAX_M2_EXPERTS = MixtureOfExperts(experts="MiniMaxM2Experts", routing="sigmoid")
MINIMAX_M2 = register_adapter(
    llama_like(
        ("minimax_m2",),
        "MiniMaxM2",
        name="minimax_m2",
        modules=("MiniMaxM2SparseMoeBlock", "MiniMaxM2Experts", "MiniMaxM2TopKRouter"),
        gated=(),
        experts=MINIMAX_M2_EXPERTS,
        heads=("causal_lm",),
        tiny=_moe_tiny(num_local_experts=4, partial_rotary_factor=0.5, **_HEADS),
    )
)

APERTUS1P5_TEXT = register_adapter(
    llama_like(
        ("apertus1p5_text",),
        "Apertus1p5Text",
        name="apertus1p5_text",
        modules=("XIELUActivation",),
        gated=(),
        extra_rules=xielu_rules,
        heads=("causal_lm",),
        tiny={**_HEADS, "hidden_act": "xielu", "max_position_embeddings": 16384},
    )
)

ARIA_TEXT_EXPERTS = TransposedExperts(experts="AriaExperts", router="AriaTextTopKRouter")
ARIA_TEXT = register_adapter(
    llama_like(
        ("aria_text",),
        "AriaText",
        name="aria_text",
        modules=("AriaTextMoELayer", "AriaExperts", "AriaTextTopKRouter", "AriaSharedExpertsMLP"),
        gated=(GatedProduct(act="mlp.shared_experts.act_fn", up="mlp.shared_experts.up_proj"),),
        experts=ARIA_TEXT_EXPERTS,
        heads=("causal_lm",),
        tiny=_moe_tiny(moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1, **_HEADS),
    )
)


def afmoe_rotates(attention: nn.Module) -> bool:
    """``AfmoeAttention`` rotates q and k in its sliding-window (local) layers only."""
    return bool(attention.is_local_attention)


AFMOE_EXPERTS = MixtureOfExperts(
    experts="AfmoeExperts", routing="sigmoid", constant_gates=("*.self_attn.gate_proj",)
)
AFMOE = register_adapter(
    llama_like(
        ("afmoe",),
        "Afmoe",
        name="afmoe",
        modules=("AfmoeSparseMoeBlock", "AfmoeExperts", "AfmoeTokenChoiceRouter"),
        positions=Rotary(applies=afmoe_rotates),
        gated=(
            DENSE_MLP,
            SHARED_EXPERTS,
        ),
        experts=AFMOE_EXPERTS,
        heads=("causal_lm",),
        tiny=_moe_tiny(
            num_experts=4,
            num_shared_experts=1,
            moe_intermediate_size=16,
            num_dense_layers=1,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
            **_HEADS,
        ),
    )
)


def _same_classes(declaration, model_type: str):
    """``declaration`` registered again for a model type whose configuration transformers maps to its classes."""
    return register_adapter(dataclasses.replace(declaration, model_types=(model_type,), name=model_type))


for _model_type in ("param2moe", "sarvam_moe"):
    _same_classes(GLM4_MOE, _model_type)
_same_classes(adapter_for_type("deepseek_v3"), "sarvam_mla")


def _mistral4_limit(config) -> int | None:
    """The longest input before Llama-4 attention scaling changes q (exactly 1 below the original context)."""
    limit = scaled_rotary_limit(config)
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("llama_4_scaling_beta"):
        original = params.get("original_max_position_embeddings") or config.max_position_embeddings
        limit = original if limit is None else min(limit, original)
    return limit


def _unit_routed_scaling(model: nn.Module) -> None:
    factor = getattr(model.config, "routed_scaling_factor", 1.0)
    if factor != 1.0:
        raise UnsupportedModelError(
            f"{type(model).__name__} scales its softmax routing weights by routed_scaling_factor={factor}; the "
            "mistral4 declaration's router re-computation covers routed_scaling_factor=1 only."
        )


MISTRAL4_EXPERTS = MixtureOfExperts(experts="Mistral4Experts", router="Mistral4TopkRouter")
MISTRAL4 = register_adapter(
    llama_like(
        ("mistral4",),
        "Mistral4",
        name="mistral4",
        modules=("Mistral4MoE", "Mistral4Experts", "Mistral4TopkRouter"),
        positions=Rotary(rotated="last"),
        gated=(
            DENSE_MLP,
            SHARED_EXPERTS,
        ),
        experts=MISTRAL4_EXPERTS,
        checks=(_unit_routed_scaling,),
        inputs=TextInputs(position_ids="count", max_positions=_mistral4_limit),
        # transformers 5.25 maps mistral4 to Mistral4ForCausalLM in no causal-LM auto map, so check_adapter
        # proves the sequence classifier only: the causal LM head is not declared (refused) until it is proven
        heads=("sequence_classification",),
        tiny=_moe_tiny(
            num_key_value_heads=4,
            num_local_experts=8,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=8,
            v_head_dim=8,
            bos_token_id=1,
            eos_token_id=2,
        ),
    )
)


KOLIBRI1_EXPERTS = MixtureOfExperts(experts="Kolibri1Experts", routing="sigmoid")
KOLIBRI1 = register_adapter(
    llama_like(
        ("kolibri1",),
        "Kolibri1",
        name="kolibri1",
        modules=("Kolibri1SparseMoeBlock", "Kolibri1Experts", "Kolibri1TopKRouter"),
        positions=Rotary(applies=exaone4_rotates),
        gated=(DENSE_MLP, SHARED_EXPERTS),
        experts=KOLIBRI1_EXPERTS,
        heads=("causal_lm",),
        tiny=_moe_tiny(
            num_experts=4,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
            **_HEADS,
        ),
    )
)

HY_V3_EXPERTS = MixtureOfExperts(experts="HYV3Experts", routing="sigmoid")
HY_V3 = register_adapter(
    llama_like(
        ("hy_v3",),
        "HYV3",
        name="hy_v3",
        modules=("HYV3MoE", "HYV3Experts", "HYV3TopKRouter"),
        gated=(DENSE_MLP, SHARED_EXPERTS),
        experts=HY_V3_EXPERTS,
        heads=("causal_lm",),
        tiny=_moe_tiny(
            num_experts=4,
            num_shared_experts=1,
            moe_intermediate_size=16,
            mlp_layer_types=["dense", "sparse"],
            **_HEADS,
        ),
    )
)


#: DeepSeek-V3's tiny configuration (one dense block, one mixture of experts; low-rank q and kv)
_MLA_TINY = {
    "num_key_value_heads": 4,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
}
_MLA_MOE_TINY = _moe_tiny(
    n_routed_experts=8,
    n_group=2,
    topk_group=1,
    n_shared_experts=1,
    moe_intermediate_size=16,
    first_k_dense_replace=1,
    **_MLA_TINY,
)


def _deepseek_like(model_type: str, prefix: str, *, moe: bool, tiny: dict) -> None:
    experts = MixtureOfExperts(experts=f"{prefix}Experts", routing="sigmoid") if moe else None
    register_adapter(
        llama_like(
            (model_type,),
            prefix,
            name=model_type,
            modules=(f"{prefix}MoE", f"{prefix}Experts", f"{prefix}TopkRouter") if moe else (),
            positions=Rotary(rotated="last"),
            gated=(DENSE_MLP, SHARED_EXPERTS) if moe else (GatedProduct(act="mlp.act_fn", up="mlp.up_proj"),),
            experts=experts,
            heads=("causal_lm",),
            tiny=tiny,
        )
    )


_deepseek_like("axk1", "AXK1", moe=True, tiny=_MLA_MOE_TINY)
_deepseek_like("glm4_moe_lite", "Glm4MoeLite", moe=True, tiny=_MLA_MOE_TINY)
_deepseek_like("youtu", "Youtu", moe=False, tiny=_MLA_TINY)


LAGUNA_EXPERTS = MixtureOfExperts(
    experts="LagunaExperts", routing="sigmoid", constant_gates=("*.self_attn.g_proj",)
)
LAGUNA = register_adapter(
    llama_like(
        ("laguna",),
        "Laguna",
        name="laguna",
        modules=("LagunaSparseMoeBlock", "LagunaExperts", "LagunaTopKRouter"),
        gated=(DENSE_MLP, SHARED_EXPERTS),
        experts=LAGUNA_EXPERTS,
        heads=("causal_lm",),
        tiny=_moe_tiny(
            num_experts=4,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            mlp_layer_types=["dense", "sparse"],
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
            moe_routed_scaling_factor=2.0,
            **_HEADS,
        ),
    )
)


@dataclass
class GateHalfConstant(HookRule):
    """The gate half of a fused query-and-gate projection a constant (its output [..., H * 2d] read per head as
    ``[q_h; g_h]``): ``where(gate, y.detach(), y)``, the same value, no gradient into the gate half."""

    head_dim: int

    def attach(self, module: nn.Module, handles: Handles) -> None:
        def hook(mod, args, output):
            shape = output.shape
            per_head = output.view(*shape[:-1], -1, 2, self.head_dim)
            gate = torch.zeros(2, 1, dtype=torch.bool, device=output.device)
            gate[1] = True
            return torch.where(gate, per_head.detach(), per_head).view(shape)

        handles.append(module.register_forward_hook(hook))


MINICPM5_MOE_EXPERTS = MixtureOfExperts(experts="MiniCPM5MoeExperts", routing="sigmoid")


def minicpm5_q_gate_rules(
    model: nn.Module, config: LRPConfig, store: LeafStore
) -> list[tuple[nn.Module, HookRule]]:
    """The constant gate half of every ``q_gate_proj``."""
    return [
        (module.q_gate_proj, GateHalfConstant(module.head_dim))
        for module in model.modules()
        if type(module).__name__ == "MiniCPM5MoeAttention"
    ]


MINICPM5_MOE = register_adapter(
    llama_like(
        ("minicpm5_moe",),
        "MiniCPM5Moe",
        name="minicpm5_moe",
        modules=("MiniCPM5MoeMoE", "MiniCPM5MoeExperts", "MiniCPM5MoeTopkRouter"),
        gated=(DENSE_MLP, SHARED_EXPERTS),
        experts=MINICPM5_MOE_EXPERTS,
        extra_rules=minicpm5_q_gate_rules,
        heads=("causal_lm",),
        tiny=_moe_tiny(
            n_routed_experts=4,
            n_shared_experts=1,
            moe_intermediate_size=16,
            mlp_layer_types=["dense", "sparse"],
            routed_scaling_factor=2.0,
            **_HEADS,
        ),
    )
)
