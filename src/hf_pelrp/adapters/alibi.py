"""ALiBi decoders (``bloom``, ``mpt``, ``falcon`` with ``alibi=True``): positions as a linear bias on the scores;
and Falcon's rotary variant (``alibi=False``), a config-aware variant of the ``falcon`` type (see the end).

Their attention is written inline (no call of transformers' attention interface), so the factors of the
``"lrp"`` attention come from hooks (:mod:`hf_pelrp.inline_attention`): per-channel factors on the fused
``query_key_value`` projection (q, k 1/4, v 1/2; CP-LRP 0, 0, 1) and, with ``positional=True``, a per-layer,
per-row leaf for the bias ``m_h (j - i)`` with the ``scores`` factor (1/2; CP-LRP 0), kept apart from the mask
(method.md 2, "Positions inside attention"). The leaf is the canonical bias ``b_ij - b_ii``: BLOOM and Falcon
build ``m_h pos_j``, MPT ``m_h (j - T + 1)``; softmax ignores the per-query constant, the leaf does not
(:func:`hf_pelrp.positions.canonical_alibi`).

- BLOOM: the ``alibi`` argument ([B * H, 1, T]) of each ``BloomAttention`` becomes [B * H, T, T] backed by the
  leaf; the mask is added separately by the model. The MLP's ``BloomGelu`` gets the identity rule.
- Falcon (``alibi=True``, SDPA path): the model folds ``alibi / sqrt(d)`` into the float mask it passes to each
  layer; the leaf is spliced into the unmasked entries of that mask (masked entries keep ``finfo.min``).
  (``FalconAttention`` calls the attention interface in transformers 5, but the declaration keeps the hooks on
  the fused projection, written and tested for this variant.)
- Falcon (``alibi=False``: Falcon-7B / 40B / 180B): rotary positions, and the attention dispatches through
  transformers' attention interface (``FalconAttention`` in transformers 5): a declaration of its own,
  ``FALCON_ROTARY`` (per-layer ``(cos, sin)`` leaves, the ``"lrp"`` attention rule at the interface), chosen
  from ``config.alibi`` by :func:`hf_pelrp.adapters.base.register_variants`; check_adapter proves both.
- MPT: ``position_bias`` ([H, 1, max_seq_len], no batch axis) cannot carry a per-row leaf, so each
  ``MptAttention`` is re-computed explicitly with the factors and the leaf
  (:class:`hf_pelrp.inline_attention.Recomputed`, checked to reproduce the module's output), reading the bias
  relative to each row's last real token (see :func:`mpt_attention`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import LRPConfig
from ..errors import UnsupportedModelError
from ..hooks import Activation, HookRule, LeafStore
from ..inline_attention import AttentionMaskCapture, BiasArgument, QKVFactors, Recomputed, qkv_roles
from ..inputs import TextInputs
from ..positions import AttentionBias, Rotary, canonical_alibi
from ..rules import identity_rule, scale_gradient
from .base import Adapter, register_adapter, register_variants
from .llama import DECODER_INPUTS
from .norms import layer_norm

ALIBI = AttentionBias(
    description="ALiBi: linear bias m_h (j - i) on the attention scores", per_pair_offsets=True
)
#: ALiBi extrapolates: no position limit; there are no position ids (the bias is built from the attention mask,
#: so position_ids= is refused rather than ignored; Falcon's forward reads them only for its rotary variant)
ALIBI_INPUTS = TextInputs(position_ids=None, max_positions=None)
#: BLOOM and MPT take the softmax of a float64 model in float32, where the mask's float64 minimum becomes -inf:
#: a left-padded query row (all keys masked) is NaN, and the NaN reaches every real token through its value
#: (0 * NaN). Their bias depends only on distances between real tokens, so the engine runs every batch
#: right-padded (moving the user's left padding) and puts the maps back: the same maps in every precision.
#: Their sequence classifiers read the last token that is not config.pad_token_id, as the causal families do.
RIGHT_PADDED_INPUTS = TextInputs(
    position_ids=None, max_positions=None, padding="right", last_token_pooling=True
)


def _factors(config: LRPConfig) -> tuple[float, float, float]:
    return (config.qk_factor, config.qk_factor, config.v_factor)


# ---- BLOOM ---------------------------------------------------------------------------------------------------


def _bloom_alibi(attention, alibi, args, kwargs, store, layer, factor):
    hidden = args[0] if args else kwargs["hidden_states"]
    batch, length = hidden.shape[:2]
    heads = attention.num_heads
    if alibi.shape != (batch * heads, 1, length):
        raise UnsupportedModelError(
            f"BloomAttention received an alibi tensor of shape {tuple(alibi.shape)}, expected "
            f"{(batch * heads, 1, length)} (no cache): attribution runs one forward pass over the whole input"
        )
    full = alibi.view(batch, heads, 1, length).expand(batch, heads, length, length)
    return canonical_alibi(full, None, factor, store, layer).reshape(batch * heads, length, length)


def _bloom_rules(model: nn.Module, config: LRPConfig, store: LeafStore) -> list[tuple[nn.Module, HookRule]]:
    base = model.base_model
    rules: list[tuple[nn.Module, HookRule]] = [(base, AttentionMaskCapture(store))]
    for layer, block in enumerate(base.h):
        attention = block.self_attention
        roles = qkv_roles("interleaved", attention.num_heads, attention.head_dim)
        rules.append((attention.query_key_value, QKVFactors(roles, _factors(config))))
        rules.append((block.mlp.gelu_impl, Activation()))
        if config.positional:

            def replace(att, value, args, kwargs, st, i, f=config.scores_factor):
                return _bloom_alibi(att, value, args, kwargs, st, i, f)

            rules.append((attention, BiasArgument(store, layer, "alibi", replace)))
    return rules


register_adapter(
    Adapter(
        model_types=("bloom",),
        name="bloom",
        layers="h",
        attention="self_attention",
        embeddings={"word_embeddings": ("token",)},
        positions=ALIBI,
        norms={"LayerNorm": layer_norm},
        modules=(
            "BloomForCausalLM",
            "BloomForSequenceClassification",
            "BloomModel",
            "BloomBlock",
            "BloomAttention",
            "BloomMLP",
            "BloomGelu",
        ),
        inputs=RIGHT_PADDED_INPUTS,
        heads=("causal_lm", "sequence_classification"),
        extra_rules=_bloom_rules,
        attention_interface=False,
        tiny={
            "hidden_size": 32,
            "n_layer": 2,
            "n_head": 4,
            "vocab_size": 97,
            "pad_token_id": 0,
            "num_labels": 3,
        },
    )
)


# ---- Falcon (ALiBi) ------------------------------------------------------------------------------------------


def _falcon_layout(attention: nn.Module) -> torch.Tensor:
    heads, dim = attention.num_heads, attention.head_dim
    if attention.new_decoder_architecture:
        return qkv_roles("grouped", heads, dim, attention.num_kv_heads)
    if attention.multi_query:
        return qkv_roles("multi_query", heads, dim)
    return qkv_roles("interleaved", heads, dim)


def _falcon_mask(attention, mask, args, kwargs, store, layer, factor):
    hidden = args[0] if args else kwargs["hidden_states"]
    batch, length = hidden.shape[:2]
    heads = attention.num_heads
    if mask.dim() != 4 or mask.shape[1] != heads or not mask.is_floating_point():
        raise UnsupportedModelError(
            "Falcon with ALiBi passes each layer a float mask [B, H, T, T] that holds alibi / sqrt(d); this one has "
            f"shape {tuple(mask.shape)}, dtype {mask.dtype}: not the layout the adapter was written for"
        )
    full = mask.expand(batch, heads, length, mask.shape[-1])
    masked = full <= torch.finfo(full.dtype).min / 2
    return canonical_alibi(full, masked, factor, store, layer)


def _falcon_rules(model: nn.Module, config: LRPConfig, store: LeafStore) -> list[tuple[nn.Module, HookRule]]:
    base = model.base_model
    rules: list[tuple[nn.Module, HookRule]] = [(base, AttentionMaskCapture(store))]
    for layer, block in enumerate(base.h):
        attention = block.self_attention
        rules.append((attention.query_key_value, QKVFactors(_falcon_layout(attention), _factors(config))))
        if config.positional:

            def replace(att, value, args, kwargs, st, i, f=config.scores_factor):
                return _falcon_mask(att, value, args, kwargs, st, i, f)

            rules.append((attention, BiasArgument(store, layer, "attention_mask", replace)))
    return rules


def _falcon_alibi_only(model: nn.Module) -> None:
    config = model.config
    if not getattr(config, "alibi", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} uses rotary positions (alibi=False): it is explained by the rotary Falcon "
            "declaration (FALCON_ROTARY, chosen by hf_pelrp.adapter_for from config.alibi), not the ALiBi one."
        )
    implementation = getattr(config, "_attn_implementation", None)
    if implementation != "sdpa":
        raise UnsupportedModelError(
            f"{type(model).__name__} runs attention with {implementation!r}; hf_pelrp explains Falcon's ALiBi "
            "variant on its SDPA path (transformers' eager ALiBi path adds the bias a second time on top of the "
            "mask that already holds it). Load the model with attn_implementation='sdpa'."
        )


FALCON_ALIBI = register_adapter(
    Adapter(
        model_types=("falcon",),
        name="falcon",
        layers="h",
        attention="self_attention",
        embeddings={"word_embeddings": ("token",)},
        positions=ALIBI,
        norms={"LayerNorm": layer_norm},
        modules=(
            "FalconForCausalLM",
            "FalconForSequenceClassification",
            "FalconModel",
            "FalconDecoderLayer",
            "FalconAttention",
            "FalconMLP",
            "FalconLinear",
            "FalconRotaryEmbedding",
        ),
        inputs=ALIBI_INPUTS,
        heads=("causal_lm", "sequence_classification"),
        extra_rules=_falcon_rules,
        checks=(_falcon_alibi_only,),
        attention_interface=False,
        tiny={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 97,
            "alibi": True,
            "multi_query": False,
            "parallel_attn": False,
            "new_decoder_architecture": False,
            "bias": True,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 1,
            "num_labels": 3,
        },
    )
)


# ---- Falcon (rotary) -----------------------------------------------------------------------------------------


def _falcon_rotary_only(model: nn.Module) -> None:
    if getattr(model.config, "alibi", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} uses ALiBi (alibi=True): it is explained by the ALiBi Falcon declaration, "
            "not the rotary one."
        )


#: Falcon-7B / 40B / 180B (``alibi=False``): q and k are rotated with the LLaMA ``apply_rotary_pos_emb``
#: (``position_embeddings=(cos, sin)`` from the model's ``FalconRotaryEmbedding``) and the attention dispatches
#: through transformers' attention interface, so the declaration is the interface's: the ``"lrp"`` attention
#: rule takes the q, k, v factors where they enter the interface (whatever the fused layout: interleaved,
#: multi-query, grouped), and per-layer ``(cos, sin)`` leaves with the 1/2 split. The block layouts
#: (sequential, ``parallel_attn``, ``new_decoder_architecture`` with one or two input LayerNorms) are residual
#: sums of LayerNorm'd branches: nothing else to attach.
FALCON_ROTARY = Adapter(
    model_types=("falcon",),
    name="falcon (rotary)",
    layers="h",
    attention="self_attention",
    embeddings={"word_embeddings": ("token",)},
    positions=Rotary(),
    norms={"LayerNorm": layer_norm},
    modules=FALCON_ALIBI.modules,
    inputs=DECODER_INPUTS,
    heads=("causal_lm", "sequence_classification"),
    checks=(_falcon_rotary_only,),
    tiny={
        **FALCON_ALIBI.tiny,
        "alibi": False,
        "new_decoder_architecture": True,
        "num_kv_heads": 2,
        "parallel_attn": True,
        "max_position_embeddings": 64,
    },
)


def _falcon_variant(config: Any) -> Adapter:
    """Falcon's declaration by ``config.alibi``: ALiBi (Falcon-RW) or rotary (Falcon-7B / 40B / 180B)."""
    return FALCON_ALIBI if getattr(config, "alibi", False) else FALCON_ROTARY


register_variants("falcon", _falcon_variant, (FALCON_ALIBI, FALCON_ROTARY))


# ---- MPT -----------------------------------------------------------------------------------------------------


def mpt_attention(
    attention: nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    *,
    factors: tuple[float, float, float],
    scores_factor: float,
    store: LeafStore,
    layer: int,
    positional: bool,
) -> torch.Tensor:
    """``MptAttention``'s output written out (as transformers computes it) with the LRP factors and, with
    ``positional``, the bias backed by the canonical ALiBi leaf of ``layer``.

    MPT reads its bias table ``m_h (k - L + 1)`` (``L = max_seq_len``) at the last ``T`` columns, i.e. relative to
    the last position of the (padded) batch. Here each row reads it relative to its own last real token (counted
    over ``store.aux["attention_mask"]``): a shift softmax ignores, identical for an unpadded row, and for a
    right-padded row exactly what the row alone computes (MPT's float32 softmax would otherwise round the
    shifted scores differently).
    """
    hidden = args[0] if args else kwargs["hidden_states"]
    bias = kwargs.get("position_bias", args[1] if len(args) > 1 else None)
    mask = kwargs.get("attention_mask")
    batch, length = hidden.shape[:2]
    heads, dim = attention.n_heads, attention.head_dim
    mixed = attention.Wqkv(hidden)
    if attention.clip_qkv:
        mixed = identity_rule(mixed, mixed.clamp(min=-attention.clip_qkv, max=attention.clip_qkv))
    query, key, value = (t.reshape(batch, length, heads, dim).transpose(1, 2) for t in mixed.chunk(3, dim=2))
    query = scale_gradient(query, factors[0])
    key = scale_gradient(key, factors[1])
    value = scale_gradient(value, factors[2])
    scores = torch.matmul(query, key.transpose(-1, -2)) * attention.softmax_scale
    if bias is not None:
        if bias.dim() != 3 or bias.shape[1] != 1 or bias.shape[0] != heads:
            raise UnsupportedModelError(
                f"MptAttention received a position_bias of shape {tuple(bias.shape)}, expected [{heads}, 1, L]"
            )
        real = store.aux.get("attention_mask")
        if real is None or real.shape != (batch, length):
            real = torch.ones(batch, length, dtype=torch.long, device=hidden.device)
        real = real.to(hidden.device).long()
        counted = (real.cumsum(-1) - 1).clamp(min=0)
        offset = counted - (real.sum(-1, keepdim=True) - 1)  # 0 at each row's last real token
        columns = (bias.shape[-1] - 1 + offset).clamp(0, bias.shape[-1] - 1)  # [B, T]
        rows = bias[:, 0, :].to(scores.device)[:, columns]  # [H, B, T]
        full = rows.permute(1, 0, 2)[:, :, None, :].expand(batch, heads, length, length)
        if positional:
            masked = None if mask is None else mask.expand(batch, heads, length, length)
            full = canonical_alibi(full, masked, scores_factor, store, layer)
        scores = scores + full
    if mask is not None:
        scores = scores.masked_fill(mask, torch.finfo(query.dtype).min)
    weights = nn.functional.softmax(scores.float(), dim=-1).to(value.dtype)
    context = torch.matmul(weights, value).permute(0, 2, 1, 3).contiguous().view(batch, length, -1)
    return attention.out_proj(context)


def _mpt_rules(model: nn.Module, config: LRPConfig, store: LeafStore) -> list[tuple[nn.Module, HookRule]]:
    base = model.base_model
    rules: list[tuple[nn.Module, HookRule]] = [(base, AttentionMaskCapture(store))]
    for layer, block in enumerate(base.blocks):

        def compute(att, args, kwargs, i=layer):
            return mpt_attention(
                att,
                args,
                kwargs,
                factors=_factors(config),
                scores_factor=config.scores_factor,
                store=store,
                layer=i,
                positional=config.positional,
            )

        rules.append(
            (block.attn, Recomputed(compute, name=f"blocks.{layer}.attn (MptAttention)", own_value=True))
        )
    return rules


def _mpt_checks(model: nn.Module) -> None:
    attn = getattr(model.config, "attn_config", None)
    for flag in ("qk_ln", "prefix_lm", "attn_uses_sequence_id"):
        if getattr(attn, flag, False):
            raise UnsupportedModelError(
                f"{type(model).__name__} sets attn_config.{flag}=True, which transformers' MptAttention does not "
                "implement; hf_pelrp explains the attention transformers computes and refuses the mismatch."
            )


register_adapter(
    Adapter(
        model_types=("mpt",),
        name="mpt",
        layers="blocks",
        attention="attn",
        embeddings={"wte": ("token",)},
        positions=ALIBI,
        norms={"LayerNorm": layer_norm},
        modules=(
            "MptForCausalLM",
            "MptForSequenceClassification",
            "MptModel",
            "MptBlock",
            "MptAttention",
            "MptMLP",
        ),
        inputs=RIGHT_PADDED_INPUTS,
        heads=("causal_lm", "sequence_classification"),
        extra_rules=_mpt_rules,
        checks=(_mpt_checks,),
        attention_interface=False,
        tiny={
            "d_model": 32,
            "n_heads": 4,
            "n_layers": 2,
            "vocab_size": 97,
            "max_seq_len": 64,
            "pad_token_id": 0,
            "num_labels": 3,
        },
    )
)
