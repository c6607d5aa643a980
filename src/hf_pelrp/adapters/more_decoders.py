"""Decoders whose parts hf_pelrp already covers, declared explicitly (no inference at run time, listed in the
README), each proven by check_adapter like every registered type (issue 18).

- ``helium``: the LLaMA layout under its own class names.
- ``flex_olmo``: OLMo 2's post-norms and whole-projection q / k RMSNorms with a softmax-routed mixture of experts
  in every block (:mod:`hf_pelrp.adapters.moe`: fused experts re-computed under the rules, router weights by the
  uniform rule, CP-LRP: constants).
- ``mellum``: per-head q / k RMSNorms, sliding-window and global layers (both rotate), and blocks that are either
  a softmax-routed mixture of experts (``mlp_layer_types`` "sparse") or a dense gated MLP; the tiny instance
  holds one of each.
- ``granitemoeshared``: GraniteMoE (constant multipliers, a top-k softmax router) plus a shared expert
  ``output_linear(act(x W[:I]) * x W[I:])`` with a fused ``input_linear`` whose second half is the up projection:
  the uniform rule at the product (CP-LRP: the gate is a constant).
- ``gpt-sw3``: GPT-SW3 checkpoints are GPT-2 classes with GPT-2's config (``GPT2Config``, whose
  ``model_type`` is ``gpt2``): the GPT-2 declaration, registered under the checkpoints' type as well.
- ``openai-gpt`` (GPT-1): learned absolute positions ``tokens_embed + positions_embed`` (``token``, ``position``;
  ``segment`` when ``token_type_ids`` are given, embedded with the token table as GPT-2 does), post-LN blocks
  ``n = ln_1(x + attn(x))``, ``h = ln_2(n + mlp(n))`` (identity rule on both), GELU MLP. Its attention is written
  inline (``softmax(q k^T / sqrt(d)) v`` on a fused ``c_attn``): the factors of the ``"lrp"`` attention are put on
  the output channels of ``c_attn`` (:func:`fused_qkv_factors`: q and k ``qk_factor``, v ``v_factor``), each a
  constant on the path from the projection to the scores and values; the softmax keeps its Gradient x Input rule.
  Float64 reference: ``tests/test_more_decoders.py``.
- ``nanochat``: weightless RMSNorms (``x / rms(x)``: :func:`weightless_rms_norm`, identity rule) before the
  blocks, in them, and on q and k *after* the rotation (a per-row constant scale under the identity rule, so the
  rotary 1/2 and the AttnLRP factors on q and k commute with it); ungated squared-ReLU MLP; final-logit
  soft-capping by the identity rule (:func:`~hf_pelrp.adapters.gemma.final_logit_softcap`).
- ``bitnet``: the LLaMA layout with an RMSNorm after the gated product (``ffn_sub_norm``) and after the
  attention (``attn_sub_norm``), squared-ReLU gate (the transformers model as it is: its linear layers are plain
  ``nn.Linear``; a quantised checkpoint's ``AutoBitLinear`` is not declared and is refused).
- ``solar_open``: DeepSeek-V3's sigmoid routing (group top-k with a correction bias that only changes the
  selection; routing weights constants in both modes, signal-take-all) in every block, plus a shared gated
  expert.
- ``minicpm3``: multi-head latent attention as DeepSeek-V3's (only the last ``qk_rope_head_dim`` channels of q and
  k rotate, with the plain half-split ``cos`` / ``sin``: ``Rotary(rotated="last")``), a scaled word embedding
  (``scale_emb``: a constant scaling inside the token leaf), residual branches scaled by
  ``scale_depth / sqrt(layers)`` and the last hidden state divided by ``logits_scaling`` before the LM head
  (constants, nothing to change).
- ``diffllama``: differential attention ``(softmax(Q K^T) - lambda softmax(Q K^T)) V`` computed as two calls of
  transformers' attention interface on the same rotated q, k and the two halves of v, combined as
  ``o_1 - lambda o_2`` with ``lambda`` a function of parameters only (a constant of the forward pass: the epsilon
  rule at a signed sum, nothing to change), then a weightless ``nn.RMSNorm`` (``groupnorm``, identity rule) and a
  constant factor. Each call gets the ``"lrp"`` attention's factors on its own path, as for any product; no new
  rule is needed.
- ``ctrl``: fixed sinusoidal absolute positions read from a buffer inside the model's forward,
  ``e = sqrt(d) w(ids) + pos_encoding[position_ids] (+ sqrt(d) w(token_type_ids))``: no module outputs the
  position embedding, so :func:`ctrl_position_leaf` makes it a leaf where ``e`` leaves the embedding dropout
  (identity in eval): ``e + (p - p.detach())`` keeps the value and gives ``p`` the gradient ``g`` at ``e``, i.e.
  ``R_p = p * g``, the epsilon split of method.md 2 (position ids are those passed to the model, counted over
  real tokens by hf_pelrp). The token and segment leaves are ``w``'s two calls, handed on as copies
  (CTRL scales them in place). Pre-LN blocks, ReLU MLP, attention through the interface.
- ``gpt_neox_japanese``: GPT-NeoX's fused per-head ``[q | k | v]`` projection and partial rotary (the first
  ``rotary_ndims`` channels of each head), with the attention written inline, so the ``"lrp"`` attention never
  runs. :func:`neox_japanese_factors` gives the same factors with hooks: on the ``query_key_value`` output, q and
  k get ``qk_factor`` (their rotated channels ``qk_factor / 2`` with positions on), v ``v_factor``; the rotary
  leaves receive their gradient times ``qk_factor / 2`` (a pre-hook after the leaves are made). Between the
  projection and the rotation there is only slicing, and the rotation is a product whose uniform rule halves
  both factors, so this equals the factors at the rotated q, k (method.md 2). The last layer's ``dense_bias`` is
  a bias (absorbs its share).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import LRPConfig
from ..hooks import HookRule, LeafStore, OutputGradient, make_leaf
from ..inputs import TextInputs
from ..positions import Additive, Rotary
from ..rules import rms_norm_identity, scale_gradient
from .base import Adapter, GatedProduct, register_adapter
from .gemma import final_logit_softcap
from .gpt2 import GPT2
from .llama import DECODER_INPUTS, llama_like
from .moe import DENSE_MLP, MixtureOfExperts, _moe_tiny
from .norms import _eps, layer_norm, rms_norm

_HEADS = {"head_dim": 8, "bos_token_id": 1, "eos_token_id": 2}

# ---- reasons of the decoders refused by name (hf_pelrp.adapters.refusals) ------------------------------------

#: gpt_oss, granite_swa, granitemoe_swa
SINKS = (
    "its attention has learned per-head sinks (an extra softmax logit per head, s_aux) that the 'lrp' attention "
    "does not reproduce; no rule for the sink logits is implemented yet (the relevance they absorb would be "
    "unaccounted for)."
)
#: doge
DYNAMIC_MASK = (
    "its attention adds a content-dependent bias to the scores (the dynamic mask exp(A * softplus(dt_proj(v))), "
    "with a top-k selection of keys) and its cross-domain MoE retrieves experts by product keys; hf_pelrp has no "
    "rule for either, and treating the bias as a constant would drop the relevance it carries."
)
#: jetmoe
MIXTURE_OF_ATTENTION = (
    "its attention is a mixture of attention heads (routed query and output projections, JetMoeMoA) and its MLP "
    "routed JetMoeParallelExperts with sorted dispatch; hf_pelrp has no declaration of these routed linear maps "
    "yet."
)

HELIUM = register_adapter(llama_like(("helium",), "Helium", name="helium", tiny=_HEADS))

FLEX_OLMO_MOE = MixtureOfExperts(experts="FlexOlmoExperts", router="FlexOlmoTopKRouter")
FLEX_OLMO = register_adapter(
    llama_like(
        ("flex_olmo",),
        "FlexOlmo",
        name="flex_olmo",
        modules=("FlexOlmoSparseMoeBlock", "FlexOlmoExperts", "FlexOlmoTopKRouter"),
        gated=(),
        experts=FLEX_OLMO_MOE,
        heads=("causal_lm",),
        tiny=_moe_tiny(num_experts=4, norm_topk_prob=False, **_HEADS),
    )
)

MELLUM_MOE = MixtureOfExperts(experts="MellumExperts", router="MellumTopKRouter")
MELLUM = register_adapter(
    llama_like(
        ("mellum",),
        "Mellum",
        name="mellum",
        modules=("MellumSparseMoeBlock", "MellumExperts", "MellumTopKRouter"),
        gated=(DENSE_MLP,),
        experts=MELLUM_MOE,
        heads=("causal_lm",),
        tiny=_moe_tiny(
            num_experts=4,
            moe_intermediate_size=16,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
            mlp_layer_types=["sparse", "dense"],
            **_HEADS,
        ),
    )
)

GRANITEMOESHARED_MOE = MixtureOfExperts(
    experts="GraniteMoeSharedExperts", router="GraniteMoeSharedTopKRouter"
)
GRANITEMOESHARED = register_adapter(
    llama_like(
        ("granitemoeshared",),
        "GraniteMoeShared",
        name="granitemoeshared",
        modules=("GraniteMoeSharedMoE", "GraniteMoeSharedExperts", "GraniteMoeSharedTopKRouter"),
        gated=(
            GatedProduct(
                act="shared_mlp.activation",
                up="shared_mlp.input_linear",
                up_channels="second_half",
                optional=True,
            ),
        ),
        experts=GRANITEMOESHARED_MOE,
        heads=("causal_lm",),
        tiny=_moe_tiny(
            num_local_experts=4,
            shared_intermediate_size=24,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.125,
            logits_scaling=8.0,
            initializer_range=0.1,
            bos_token_id=1,
            eos_token_id=2,
        ),
    )
)

GPT_SW3 = register_adapter(dataclasses.replace(GPT2, model_types=("gpt-sw3",), name="gpt-sw3"))


def fused_qkv_factors(
    model: nn.Module, config: LRPConfig, store: LeafStore
) -> list[tuple[nn.Module, HookRule]]:
    """The ``"lrp"`` attention's factors on the fused ``c_attn`` of GPT-1's inline attention: its output is
    ``[q | k | v]`` (``split_size`` channels each); q and k get ``qk_factor``, v gets ``v_factor``."""
    rules: list[tuple[nn.Module, HookRule]] = []
    for block in model.base_model.h:
        width = block.attn.split_size
        rules.append((block.attn.c_attn, OutputGradient(config.qk_factor, slice(0, 2 * width))))
        rules.append((block.attn.c_attn, OutputGradient(config.v_factor, slice(2 * width, 3 * width))))
    return rules


OPENAI_GPT = register_adapter(
    Adapter(
        model_types=("openai-gpt",),
        name="openai-gpt",
        layers="h",
        attention="attn",
        embeddings={"tokens_embed": ("token", "segment")},
        positions=Additive({"positions_embed": "position"}),
        norms={"LayerNorm": layer_norm},
        modules=(
            "OpenAIGPTLMHeadModel",
            "OpenAIGPTForSequenceClassification",
            "OpenAIGPTModel",
            "Block",
            "Attention",
            "MLP",
        ),
        inputs=TextInputs(
            position_ids="count", max_positions=lambda c: c.n_positions, token_types="vocab_size"
        ),
        heads=("causal_lm", "sequence_classification"),
        extra_rules=fused_qkv_factors,
        attention_interface=False,
        tiny={
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "vocab_size": 97,
            "n_positions": 64,
            "pad_token_id": 0,
            "num_labels": 3,
        },
    )
)


def weightless_rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x / rms(x)`` with ``rms`` detached (an RMSNorm without a weight, computed in float32 and cast back)."""
    return rms_norm_identity(x, _eps(module)).to(x.dtype)


NANOCHAT = register_adapter(
    llama_like(
        ("nanochat",),
        "NanoChat",
        name="nanochat",
        norms={"NanoChatRMSNorm": weightless_rms_norm},
        gated=(),
        extra_rules=final_logit_softcap,
        heads=("causal_lm",),
        tiny={**_HEADS, "final_logit_softcapping": 3.0},
    )
)

BITNET = register_adapter(llama_like(("bitnet",), "BitNet", name="bitnet", heads=("causal_lm",), tiny=_HEADS))

SOLAR_OPEN_MOE = MixtureOfExperts(experts="SolarOpenExperts", routing="sigmoid")
SOLAR_OPEN = register_adapter(
    llama_like(
        ("solar_open",),
        "SolarOpen",
        name="solar_open",
        modules=("SolarOpenMoE", "SolarOpenExperts", "SolarOpenTopkRouter"),
        gated=(GatedProduct(act="mlp.shared_experts.act_fn", up="mlp.shared_experts.up_proj"),),
        experts=SOLAR_OPEN_MOE,
        heads=("causal_lm",),
        tiny=_moe_tiny(
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            moe_intermediate_size=16,
            **_HEADS,
        ),
    )
)

MINICPM3 = register_adapter(
    llama_like(
        ("minicpm3",),
        "MiniCPM3",
        name="minicpm3",
        positions=Rotary(rotated="last"),
        modules=("MiniCPM3ScaledWordEmbedding",),
        tiny={
            "num_key_value_heads": 4,
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 4,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
            "scale_emb": 12.0,
            "scale_depth": 1.4,
            "dim_model_base": 8,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    )
)

DIFFLLAMA = register_adapter(
    llama_like(
        ("diffllama",),
        "DiffLlama",
        name="diffllama",
        norms={"DiffLlamaRMSNorm": rms_norm, "RMSNorm": weightless_rms_norm},
        tiny=_HEADS,
    )
)


def _ctrl_rules(model: nn.Module, config: LRPConfig, store: LeafStore) -> list[tuple[nn.Module, HookRule]]:
    """CTRL's scaled in-place embeddings and (with positions on) its sinusoidal position leaf."""
    base = model.base_model
    rules: list[tuple[nn.Module, HookRule]] = [(base.w, _CopyOutput())]
    if config.positional:
        rules.append((base, _RecordPositionIds(store)))
        rules.append((base.dropout, ctrl_position_leaf(base, store)))
    return rules


@dataclasses.dataclass
class _CopyOutput(HookRule):
    """Hand a module's output on as a copy (CTRL multiplies its embeddings in place: a leaf cannot be)."""

    def attach(self, module: nn.Module, handles) -> None:
        handles.append(module.register_forward_hook(lambda _m, _a, out: out.clone()))


@dataclasses.dataclass
class _RecordPositionIds(HookRule):
    """Record the position ids the model is called with (``store.aux["ctrl_position_ids"]``)."""

    store: LeafStore

    def attach(self, module: nn.Module, handles) -> None:
        def hook(_module, args, kwargs):
            self.store.aux["ctrl_position_ids"] = kwargs.get("position_ids")

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))


def ctrl_position_leaf(base: nn.Module, store: LeafStore) -> HookRule:
    """The ``"position"`` leaf of CTRL's sinusoidal table, attached where the embedding sum leaves its dropout."""

    @dataclasses.dataclass
    class _PositionLeaf(HookRule):
        def attach(self, module: nn.Module, handles) -> None:
            def hook(_module, _args, output):
                if not store.aux.get("in_forward") or "position" in store.additive:
                    return None
                batch, length = output.shape[:2]
                ids = store.aux.get("ctrl_position_ids")
                if ids is None:
                    ids = torch.arange(length, device=output.device)[None]
                table = base.pos_encoding.to(device=output.device, dtype=output.dtype)
                position = table[ids.to(output.device)].expand(batch, length, -1)
                leaf = make_leaf(position)
                store.additive["position"] = leaf
                return output + (leaf - leaf.detach())

            handles.append(module.register_forward_hook(hook))

    return _PositionLeaf()


CTRL = register_adapter(
    Adapter(
        model_types=("ctrl",),
        name="ctrl",
        layers="h",
        attention="multi_head_attention",
        embeddings={"w": ("token", "segment")},
        positions=Additive({}, description="fixed sinusoidal"),
        norms={"LayerNorm": layer_norm},
        modules=(
            "CTRLLMHeadModel",
            "CTRLForSequenceClassification",
            "CTRLModel",
            "EncoderLayer",
            "MultiHeadAttention",
        ),
        inputs=TextInputs(
            position_ids="count", max_positions=lambda c: c.n_positions, token_types="vocab_size"
        ),
        heads=("causal_lm", "sequence_classification"),
        extra_rules=_ctrl_rules,
        tiny={
            "n_embd": 32,
            "dff": 64,
            "n_layer": 2,
            "n_head": 4,
            "vocab_size": 97,
            "n_positions": 64,
            "pad_token_id": 0,
            "num_labels": 3,
        },
    )
)


@dataclasses.dataclass
class _ChannelFactors(HookRule):
    """Scale the gradient of the module's output channel by channel (``factors`` [channels])."""

    factors: torch.Tensor

    def attach(self, module: nn.Module, handles) -> None:
        def hook(_module, _args, output):
            return scale_gradient(output, self.factors.to(device=output.device, dtype=output.dtype))

        handles.append(module.register_forward_hook(hook))


@dataclasses.dataclass
class _ScaleRotaryLeaves(HookRule):
    """Scale the gradient the ``(cos, sin)`` pair of an attention call passes back (to its leaves)."""

    factor: float

    def attach(self, module: nn.Module, handles) -> None:
        def hook(_module, args, kwargs):
            pair = kwargs.get("position_embeddings")
            if pair is None:
                return None
            kwargs = dict(kwargs)
            kwargs["position_embeddings"] = tuple(scale_gradient(t, self.factor) for t in pair)
            return args, kwargs

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))


def neox_japanese_factors(
    model: nn.Module, config: LRPConfig, store: LeafStore
) -> list[tuple[nn.Module, HookRule]]:
    """The ``"lrp"`` attention's q / k / v factors and the rotary 1/2 of GPT-NeoX-Japanese's inline attention."""
    rules: list[tuple[nn.Module, HookRule]] = []
    for block in model.base_model.layers:
        attention = block.attention
        width, rotated = attention.head_size, attention.rotary_ndims
        head = torch.full((3 * width,), float(config.qk_factor), dtype=torch.float64)
        head[2 * width :] = config.v_factor
        if config.positional:
            head[:rotated] *= 0.5
            head[width : width + rotated] *= 0.5
            rules.append((attention, _ScaleRotaryLeaves(0.5 * config.qk_factor)))
        factors = head.repeat(attention.num_attention_heads)
        rules.append((attention.query_key_value, _ChannelFactors(factors)))
    return rules


GPT_NEOX_JAPANESE = register_adapter(
    Adapter(
        model_types=("gpt_neox_japanese",),
        name="gpt_neox_japanese",
        layers="layers",
        attention="attention",
        embeddings={"embed_in": ("token",)},
        positions=Rotary(),
        norms={"LayerNorm": layer_norm},
        modules=(
            "GPTNeoXJapaneseForCausalLM",
            "GPTNeoXJapaneseModel",
            "GPTNeoXJapaneseLayer",
            "GPTNeoXJapaneseAttention",
            "GPTNeoXJapaneseMLP",
            "GPTNeoXJapaneseRotaryEmbedding",
        ),
        inputs=DECODER_INPUTS,
        heads=("causal_lm",),
        extra_rules=neox_japanese_factors,
        attention_interface=False,
        tiny={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_multiple_size": 2,
            "vocab_size": 97,
            "max_position_embeddings": 64,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    )
)
