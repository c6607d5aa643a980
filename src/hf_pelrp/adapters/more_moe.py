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
- ``dbrx``: the experts are DBRX's own layout (``w1``, ``v1``, ``w2`` of [E * I, H]: ``act(x w1_e^T) * (x v1_e^T)``
  then ``w2_e``) and the routing is computed in ``DbrxFFN`` (softmax over the experts, top-k, divided by the
  ``moe_normalize_expert_weights``-norm of the top-k weights). :class:`DbrxExpertsRule` re-computes, at the
  experts, the routing weights with the softmax-router rule (the norm a constant: with ``p = 1`` it is the sum of
  the positive top-k weights, :func:`~hf_pelrp.adapters.moe.softmax_routing_weights`) and the experts with
  :func:`~hf_pelrp.adapters.moe.expert_mixture` on a fused view of DBRX's weights, both checked against the
  model's values at every call; the module's output is kept (straight-through). ``moe_normalize_expert_weights``
  other than 1 or None (no renormalisation) is refused. ``clip_qkv`` clamps the fused ``Wqkv`` output: identity rule
  (:class:`~hf_pelrp.hooks.ClippedOutput`, as OLMo's); transformers 5.25's DBRX does not run without it.
- ``deepseek_v2``: DeepSeek-V3's multi-head latent attention (only the last ``qk_rope_head_dim`` channels of q and
  k rotate) with the rotary embedding as one complex tensor ``freqs_cis`` applied by complex multiplication on
  interleaved pairs: :class:`ComplexRotary` makes its real and imaginary parts the ``cos`` / ``sin`` leaves of the
  layer (``x * (cos + i sin)`` is GPT-J's interleaved rotation, so the rule and the maps are
  ``Rotary(layout="interleaved", rotated="last")``'s). Its router takes the top-k of the softmax (greedy or
  group-limited) times ``routed_scaling_factor``, without renormalisation: :class:`ScaledSoftmaxRouter` (the
  softmax by its Gradient x Input rule, the scale a constant), re-computed and checked at every call; fused
  experts and shared experts as DeepSeek-V3's.
- ``llama4_text``: complex rotary (:class:`ComplexRotary`) in the layers with ``use_rope`` and none in the NoPE
  layers (``Rotary(applies=)``: no leaf, exactly 0 position relevance, full q, k factor), weightless RMSNorms on
  q and k after the rotation (identity rule; a per-row constant scale, which commutes with the factors), chunked
  attention (a mask). Mixture-of-experts blocks scale each expert's *input* by its sigmoid score
  (``E_e(s_e x)``, every expert run on every token, unselected scores 0): the scores are constants in both modes
  (signal-take-all, :class:`ConstantRouterScores`), so the routed input is a constant scaling, and
  :class:`Llama4ExpertsRule` re-computes the experts' ``down(act(gate) * up)`` with the gated-product rule
  (checked against the module's output); a shared gated MLP. ``attn_temperature_tuning`` (a position-dependent
  scale of q in the NoPE layers, on by default in transformers' config) has no positional leaf and is refused.
- ``phimoe``: SparseMixer routing (eval): the first weight is the softmax, over the experts whose logits lie
  within a relative threshold of the maximum (a mask computed without gradient: a constant), at the arg-max; the
  second the same over the logits with the first expert removed. No renormalisation: the weights are entries of
  softmaxes of constant-masked logits, whose rule is Gradient x Input (AttnLRP Prop. 3.1, masked entries carry 0),
  so plain autograd through the router *is* the rule and no router hook is declared (float64 reference in
  ``tests/test_more_decoders.py``); ``w * E`` by the uniform rule (CP: ``w`` constant), fused experts as
  Mixtral's. Training-time jitter and the PhimoeMultiplier estimator are off in eval.
- ``dots1``: per-head q / k RMSNorms, DeepSeek-V3's sigmoid group routing (weights constants), a shared expert,
  dense first blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from ..config import LRPConfig
from ..devices import weights_on_device
from ..errors import UnsupportedModelError
from ..hooks import ClippedOutput, Handles, HookRule, LeafStore, check_reproduces, make_leaf
from ..inputs import TextInputs
from ..positions import Rotary
from ..rules import identity_rule, scale_gradient, straight_through
from .base import Adapter, GatedProduct, register_adapter
from .llama import llama_like
from .moe import (
    DENSE_MLP,
    SHARED_EXPERTS,
    MixtureOfExperts,
    _moe_tiny,
    expert_mixture,
    softmax_routing_weights,
)
from .more_decoders import weightless_rms_norm
from .norms import ACTIVATIONS, layer_norm, rms_norm
from .rotary_decoders import exaone4_rotates

_HEADS = {"head_dim": 8, "bos_token_id": 1, "eos_token_id": 2}


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
        experts=COHERE2_MOE_EXPERTS,
        checks=(softmax_selection,),
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
        experts=ERNIE4_5_MOE_EXPERTS,
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
        experts=GLM4_MOE_EXPERTS,
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
        experts=EXAONE_MOE_EXPERTS,
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


HUNYUAN_V1_MOE_EXPERTS = MixtureOfExperts(
    experts="HunYuanMoEV1Experts", router="HunYuanMoEV1Gate", router_rule=WgSoftmaxRouter
)


HUNYUAN_V1_MOE = register_adapter(
    llama_like(
        ("hunyuan_v1_moe",),
        "HunYuanMoEV1",
        name="hunyuan_v1_moe",
        modules=("HunYuanMoEV1Moe", "HunYuanMoEV1Experts", "HunYuanMoEV1Gate"),
        gated=(GatedProduct(act="mlp.shared_mlp.act_fn", up="mlp.shared_mlp.up_proj"),),
        experts=HUNYUAN_V1_MOE_EXPERTS,
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
        experts=DOTS1_EXPERTS,
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


@dataclass
class DbrxExpertsRule(HookRule):
    """DBRX's routed experts under the rules of :mod:`hf_pelrp.adapters.moe` (see the module docstring)."""

    router: nn.Module
    factors: dict
    name: str = ""
    #: whether DbrxFFN divides the top-k weights by their sum (moe_normalize_expert_weights = 1; None: not at all)
    normalise: bool = True

    def attach(self, module: nn.Module, handles: Handles) -> None:
        def hook(mod, args, kwargs, output):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            x, index, weights = (list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]) :]])[:3]
            if not (x.requires_grad or weights.requires_grad):
                return output
            glu = mod.mlp
            experts, inner = mod.num_experts, mod.ffn_hidden_size
            with weights_on_device(mod), weights_on_device(self.router):
                x = x.reshape(-1, mod.hidden_size)
                w1, v1, w2 = (w.view(experts, inner, -1) for w in (glu.w1, glu.v1, glu.w2))
                view = SimpleNamespace(
                    num_experts=experts,
                    act_fn=glu.activation_fn,
                    gate_up_proj=torch.cat([w1, v1], dim=1),
                    down_proj=w2.transpose(1, 2),
                )
                router = SimpleNamespace(weight=self.router.layer.weight, norm_topk_prob=self.normalise)
                routed = softmax_routing_weights(router, x, index).to(weights.dtype)
                check_reproduces(routed, weights, self.name, "router re-computation")
                if self.factors["weight_factor"] == 0.0:
                    routed = routed.detach()
                surrogate = expert_mixture(view, x, index, routed, **self.factors)
            surrogate = surrogate.view_as(output)
            check_reproduces(surrogate, output, self.name, "expert re-computation")
            return straight_through(output, surrogate.to(output.dtype))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))


def dbrx_rules(model: nn.Module, config: LRPConfig, store: LeafStore) -> list[tuple[nn.Module, HookRule]]:
    """The clipped ``Wqkv`` (identity rule) and the routed experts of every DBRX block."""
    factors = MixtureOfExperts(experts="DbrxExperts").factors(config)
    rules: list[tuple[nn.Module, HookRule]] = []
    clip = model.config.attn_config.clip_qkv
    for i, block in enumerate(model.base_model.blocks):
        if clip is not None:
            rules.append((block.norm_attn_norm.attn.Wqkv, ClippedOutput(float(clip))))
        name = f"blocks.{i}.ffn.experts (DbrxExperts)"
        normalise = model.config.ffn_config.moe_normalize_expert_weights is not None
        rules.append((block.ffn.experts, DbrxExpertsRule(block.ffn.router, factors, name, normalise)))
    return rules


def dbrx_checks(model: nn.Module) -> None:
    """Refuse a top-k normalisation other than the sum (p = 1) and a gate activation without identity rule."""
    ffn = model.config.ffn_config
    if ffn.moe_normalize_expert_weights not in (None, 1):
        raise UnsupportedModelError(
            f"{type(model).__name__} normalises its top-k routing weights by their "
            f"{ffn.moe_normalize_expert_weights}-norm; the dbrx declaration covers the 1-norm (the sum) and no "
            "normalisation only."
        )
    for block in model.base_model.blocks:
        if not isinstance(block.ffn.experts.mlp.activation_fn, ACTIVATIONS):
            raise UnsupportedModelError(
                f"{type(model).__name__}'s expert activation {type(block.ffn.experts.mlp.activation_fn).__name__} "
                "has no LRP identity rule in hf_pelrp."
            )


DBRX = register_adapter(
    Adapter(
        model_types=("dbrx",),
        name="dbrx",
        layers="blocks",
        attention="norm_attn_norm.attn",
        embeddings={"wte": ("token",)},
        positions=Rotary(),
        norms={"LayerNorm": layer_norm},
        modules=(
            "DbrxForCausalLM",
            "DbrxModel",
            "DbrxBlock",
            "DbrxNormAttentionNorm",
            "DbrxAttention",
            "DbrxFFN",
            "DbrxRouter",
            "DbrxExperts",
            "DbrxExpertGLU",
            "DbrxRotaryEmbedding",
        ),
        inputs=TextInputs(position_ids="count", max_positions=lambda c: c.max_seq_len),
        heads=("causal_lm",),
        extra_rules=dbrx_rules,
        checks=(dbrx_checks,),
        tiny={
            "d_model": 32,
            "n_heads": 4,
            "n_layers": 2,
            "max_seq_len": 64,
            "vocab_size": 97,
            "pad_token_id": 0,
            "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 0.1},
            "ffn_config": {"hidden_size": 32, "ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2},
        },
    )
)


class _ComplexRotaryLeaves(HookRule):
    """Replace the complex ``position_embeddings`` of one attention call by ``complex(cos, sin)`` built from the
    layer's own real leaves (made once per forward pass, expanded to the batch), and record the rotated width on
    the layer's attention rule."""

    def __init__(self, kind: Rotary, store: LeafStore, layer: int, rule_of):
        self.kind, self.store, self.layer, self.rule_of = kind, store, layer, rule_of

    def attach(self, module: nn.Module, handles: Handles) -> None:
        kind, store, layer = self.kind, self.store, self.layer

        def hook(_attention, args, kwargs):
            freqs = kwargs.get(kind.keyword)
            if freqs is None or (kind.applies is not None and not kind.applies(_attention)):
                return None  # (a NoPE layer: no leaf, the full q, k factor)
            if not torch.is_complex(freqs):
                raise UnsupportedModelError(
                    f"{type(_attention).__name__} received real position_embeddings; the complex-rotary "
                    "declaration expects one complex freqs_cis tensor"
                )
            batch = store.batch_size
            if batch is not None and freqs.shape[0] == 1 and batch > 1:
                freqs = freqs.expand(batch, *freqs.shape[1:])
            existing = store.layers.get(layer)
            if existing is None or existing["cos"].shape != freqs.shape:
                existing = {"cos": make_leaf(freqs.real), "sin": make_leaf(freqs.imag)}
                store.layers[layer] = existing
            rule = self.rule_of()
            if rule is not None:
                rule.rotated = (kind.rotated_channels(existing["cos"]), kind.rotated)
            kwargs = dict(kwargs)
            kwargs[kind.keyword] = torch.complex(existing["cos"], existing["sin"])
            return args, kwargs

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))


@dataclass(frozen=True)
class ComplexRotary(Rotary):
    """Rotary positions passed as one complex tensor ``freqs_cis`` ([B, T, D / 2]) and applied as
    ``view_as_complex(x) * freqs_cis`` on interleaved pairs: the real part is ``cos``, the imaginary part ``sin``
    of GPT-J's interleaved rotation, and they become the layer's ``cos`` / ``sin`` leaves (method.md 2, "Rotary
    variants"; float64 reference in ``tests/test_more_decoders.py``)."""

    layout: str = "interleaved"
    #: not "rotary": tools that intervene on a ``(cos, sin)`` pair (the evaluation's position flipping) must not
    #: take the complex tensor for one; they refuse this kind by its name
    name: str = "complex rotary"

    def rules(self, model, layers, attention, store):
        from ..attention import attention_rule

        return [
            (module, _ComplexRotaryLeaves(self, store, i, lambda m=module: attention_rule(m)))
            for i, module in enumerate(attention)
        ]

    def describe(self) -> str:
        return "complex rotary (freqs_cis): per-layer `(cos, sin)` leaves (`attr.position_by_layer`)"


@dataclass
class ScaledSoftmaxRouter(HookRule):
    """A router whose weights are ``c * p_{e_k}``, the selected entries of ``p = softmax(x W^T)`` (no
    renormalisation) times a constant ``c`` (``routed_scaling_factor``): the softmax by its Gradient x Input rule,
    the selection and ``c`` constants; the weights keep the module's values (straight-through), checked."""

    name: str = ""

    def attach(self, module: nn.Module, handles: Handles) -> None:
        def hook(mod, args, kwargs, output):
            logits, weights, index = output
            x = args[0] if args else kwargs["hidden_states"]
            if not x.requires_grad:
                return output
            with weights_on_device(mod):
                view = SimpleNamespace(weight=mod.weight, norm_topk_prob=False)
                x = x.reshape(-1, x.shape[-1]).to(weights.device)
                surrogate = softmax_routing_weights(view, x, index) * mod.routed_scaling_factor
            check_reproduces(surrogate, weights, self.name or type(mod).__name__, "router re-computation")
            return logits, straight_through(weights, surrogate.to(weights.dtype)), index

        handles.append(module.register_forward_hook(hook, with_kwargs=True))


DEEPSEEK_V2_EXPERTS = MixtureOfExperts(
    experts="DeepseekV2Experts", router="DeepseekV2TopkRouter", router_rule=ScaledSoftmaxRouter
)


DEEPSEEK_V2 = register_adapter(
    llama_like(
        ("deepseek_v2",),
        "DeepseekV2",
        name="deepseek_v2",
        modules=("DeepseekV2Moe", "DeepseekV2Experts", "DeepseekV2TopkRouter"),
        positions=ComplexRotary(rotated="last"),
        gated=(DENSE_MLP, SHARED_EXPERTS),
        experts=DEEPSEEK_V2_EXPERTS,
        # one dense block, one MoE block (8 routed experts in 2 groups, group-limited greedy, 1 shared expert)
        tiny=_moe_tiny(
            num_key_value_heads=4,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            topk_method="group_limited_greedy",
            routed_scaling_factor=2.5,
            n_shared_experts=1,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
    )
)


@dataclass
class ConstantRouterScores(HookRule):
    """Llama 4's router returns ``(scores, logits)`` with sigmoid scores: constants of the backward pass in both
    modes (signal-take-all, as DeepSeek-V3's sigmoid routing weights)."""

    def attach(self, module: nn.Module, handles: Handles) -> None:
        def hook(_mod, _args, output):
            scores, logits = output
            return scores.detach(), logits

        handles.append(module.register_forward_hook(hook))


@dataclass
class Llama4ExpertsRule(HookRule):
    """``down_e(act(gate_e) * up_e)`` of Llama 4's batched experts (``gate_up_proj`` [E, H, 2I] with
    ``[gate | up]``, ``down_proj`` [E, I, H]) with the gated-product rule: identity rule on ``act``, ``gate_factor``
    on the activated gate, ``up_factor`` on up; re-computed from the module's own parameters, checked against its
    output, and returned with the module's values (straight-through)."""

    gate_factor: float
    up_factor: float
    name: str = ""

    def attach(self, module: nn.Module, handles: Handles) -> None:
        def hook(mod, args, output):
            x = args[0]
            if not x.requires_grad:
                return output
            with weights_on_device(mod):
                states = x.view(mod.gate_up_proj.shape[0], -1, mod.hidden_size)
                gate, up = torch.bmm(states, mod.gate_up_proj).chunk(2, dim=-1)
                activated = identity_rule(gate, mod.act_fn.forward(gate))
                hidden = scale_gradient(activated, self.gate_factor) * scale_gradient(up, self.up_factor)
                surrogate = torch.bmm(hidden, mod.down_proj).view(-1, mod.hidden_size)
            check_reproduces(surrogate, output, self.name or type(mod).__name__, "expert re-computation")
            return straight_through(output, surrogate.to(output.dtype))

        handles.append(module.register_forward_hook(hook))


def llama4_rules(model: nn.Module, config: LRPConfig, store: LeafStore) -> list[tuple[nn.Module, HookRule]]:
    """Constant router scores and the experts' gated products of every Llama 4 mixture-of-experts block."""
    rules: list[tuple[nn.Module, HookRule]] = []
    for path, module in model.named_modules():
        name = type(module).__name__
        if name == "Llama4Router":
            rules.append((module, ConstantRouterScores()))
        elif name == "Llama4TextExperts":
            rules.append(
                (module, Llama4ExpertsRule(config.gate_factor, config.up_factor, name=f"{path} ({name})"))
            )
    return rules


def no_temperature_tuning(model: nn.Module) -> None:
    """Refuse ``attn_temperature_tuning`` (a position-dependent scale of q in the NoPE layers, no leaf)."""
    if getattr(model.config, "attn_temperature_tuning", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} scales q in its NoPE layers by a position-dependent temperature "
            "(attn_temperature_tuning=True): positional information no leaf of hf_pelrp carries, so the position "
            "maps would miss it. Set attn_temperature_tuning=False only if that is the model you mean to explain."
        )


def llama4_uses_rope(attention: nn.Module) -> bool:
    """``Llama4TextAttention`` rotates q and k where ``use_rope`` (``config.no_rope_layers[layer]``) is set."""
    return bool(attention.use_rope)


LLAMA4_TEXT = register_adapter(
    # (Llama4ForCausalLM's base_model is the model itself: base_model_prefix "language_model" names no submodule)
    dataclasses.replace(
        llama_like(
            ("llama4_text",),
            "Llama4Text",
            name="llama4_text",
            # Llama4TextL2Norm: the same weightless norm under its transformers 5.24 name
            norms={
                "Llama4TextRMSNorm": rms_norm,
                "Llama4TextWeightlessRMSNorm": weightless_rms_norm,
                "Llama4TextL2Norm": weightless_rms_norm,
            },
            modules=("Llama4ForCausalLM", "Llama4TextMoe", "Llama4TextExperts", "Llama4Router"),
            positions=ComplexRotary(applies=llama4_uses_rope),
            gated=(
                GatedProduct(act="feed_forward.activation_fn", up="feed_forward.up_proj", optional=True),
                GatedProduct(
                    act="feed_forward.shared_expert.activation_fn",
                    up="feed_forward.shared_expert.up_proj",
                    optional=True,
                ),
            ),
            extra_rules=llama4_rules,
            checks=(no_temperature_tuning,),
            heads=("causal_lm",),
            # layer 0: rotary, dense; layer 1: NoPE, mixture of experts
            tiny={
                "head_dim": 8,
                "intermediate_size": 16,
                "intermediate_size_mlp": 48,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "moe_layers": [1],
                "no_rope_layers": [1, 0],
                "attention_chunk_size": 3,
                "attn_temperature_tuning": False,
                "bos_token_id": 1,
                "eos_token_id": 2,
            },
        ),
        layers="model.layers",
        embeddings={"model.embed_tokens": ("token",)},
    )
)

PHIMOE_EXPERTS = MixtureOfExperts(experts="PhimoeExperts")
PHIMOE = register_adapter(
    llama_like(
        ("phimoe",),
        "Phimoe",
        name="phimoe",
        norms={"LayerNorm": layer_norm},
        modules=("PhimoeSparseMoeBlock", "PhimoeExperts", "PhimoeTopKRouter"),
        gated=(),
        experts=PHIMOE_EXPERTS,
        tiny=_moe_tiny(num_local_experts=4, **_HEADS),
    )
)
