"""DeBERTa-v2 / v3 (``deberta-v2``): disentangled attention with relative position embeddings.

Scores ``s_ij = c q_i . k_j + c q_i . P^k_{d(i,j)} + c k_j . P^q_{d(j,i)}`` (content-to-content, content-to-
position, position-to-content; ``P = W r + b`` projections of the relative embeddings ``r``, shared by all
layers). Each positional term is a product of a content factor (q or k) and a position factor: the uniform rule
gives each half of the term's relevance (method.md 2, "Positions inside attention"). The position factors of
both terms, per pair, are the layer's leaf ``store.layers[l]["bias"]`` [B, H, T, T]; its relevance is
``1/2 (c2p_ij + p2c_ij) g_ij`` (gradient factor 1/4 under AttnLRP, 0 under CP-LRP). Relevance stops at these
leaves: it is not carried through ``W`` into ``r`` (the relative-embedding table is a constant).

The attention is written inline, so each ``DisentangledSelfAttention`` is re-computed explicitly with the factors
(:class:`hf_pelrp.inline_attention.Recomputed`, checked to reproduce the module's output), calling the module's
own ``disentangled_attention_bias`` with the content or the position side detached. With ``positional=False``
the position factors are constants and the content factor takes the whole term (1/2 of the score gradient).

Other rules as for BERT: identity rule on every LayerNorm and activation (the pooler's activation is applied as a
function: :class:`FunctionalActivationSite`), epsilon rule elsewhere, token (and token-type) embedding leaves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..config import LRPConfig
from ..errors import UnsupportedModelError
from ..hooks import EmbeddingLeaf, HookRule, LeafStore
from ..inline_attention import AttentionMaskCapture, Recomputed
from ..inputs import TextInputs
from ..positions import AttentionBias, bias_leaf
from ..rules import scale_gradient, straight_through
from .base import Adapter, FunctionalActivationSite, register_adapter, register_variants
from .more_encoders import AbsoluteAndBias
from .norms import layer_norm


def deberta_attention(
    attention: nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    *,
    config: LRPConfig,
    store: LeafStore,
    layer: int,
) -> torch.Tensor:
    """``DisentangledSelfAttention``'s context output written out with the LRP factors and position leaves."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import scaled_size_sqrt

    hidden = args[0] if args else kwargs["hidden_states"]
    mask = args[1] if len(args) > 1 else kwargs["attention_mask"]
    query_states = kwargs.get("query_states")
    query_states = hidden if query_states is None else query_states
    relative_pos = kwargs.get("relative_pos")
    rel = kwargs.get("rel_embeddings")
    heads = attention.num_attention_heads
    query = attention.transpose_for_scores(attention.query_proj(query_states), heads)
    key = attention.transpose_for_scores(attention.key_proj(hidden), heads)
    value = attention.transpose_for_scores(attention.value_proj(hidden), heads)
    types = attention.pos_att_type
    scale_factor = 1 + ("c2p" in types) + ("p2c" in types)
    scale = scaled_size_sqrt(query, scale_factor)
    q = scale_gradient(query, config.qk_factor)
    k = scale_gradient(key, config.qk_factor)
    v = scale_gradient(value, config.v_factor)
    scores = torch.bmm(q, k.transpose(-1, -2) / scale.to(dtype=query.dtype))
    if attention.relative_attention:
        rel = rel.detach()
        terms = attention.disentangled_attention_bias(
            query.detach(), key.detach(), relative_pos, rel, scale_factor
        )
        # the content side of each positional product: q through c2p, k through p2c (the other side detached)
        content = config.qk_factor if config.positional else config.scores_factor
        q_side = attention.disentangled_attention_bias(
            scale_gradient(query, content), key.detach(), relative_pos, rel, scale_factor
        )
        k_side = attention.disentangled_attention_bias(
            query.detach(), scale_gradient(key, content), relative_pos, rel, scale_factor
        )
        surrogate = q_side + k_side
        if config.positional:
            batch, length = hidden.shape[0], terms.shape[-1]
            leaf = bias_leaf(store, layer, terms.view(batch, heads, terms.shape[-2], length))
            surrogate = surrogate + scale_gradient(leaf, config.qk_factor).view_as(terms)
        scores = scores + straight_through(terms, surrogate)
    scores = scores.view(-1, heads, scores.size(-2), scores.size(-1))
    scores = scores.masked_fill(~(mask.bool()), torch.finfo(query.dtype).min)
    probs = nn.functional.softmax(scores, dim=-1)
    context = torch.bmm(probs.view(-1, probs.size(-2), probs.size(-1)), v)
    context = context.view(-1, heads, context.size(-2), context.size(-1)).permute(0, 2, 1, 3).contiguous()
    return context.view(context.size()[:-2] + (-1,))


def _deberta_rules(model: nn.Module, config: LRPConfig, store: LeafStore) -> list[tuple[nn.Module, HookRule]]:
    base = model.base_model
    rules: list[tuple[nn.Module, HookRule]] = [(base, AttentionMaskCapture(store))]
    if base.embeddings.token_type_embeddings is not None:
        rules.append((base.embeddings.token_type_embeddings, EmbeddingLeaf(store, ("segment",))))
    for layer, block in enumerate(base.encoder.layer):

        def compute(att, args, kwargs, i=layer):
            return deberta_attention(att, args, kwargs, config=config, store=store, layer=i)

        rules.append(
            (block.attention.self, Recomputed(compute, name=f"encoder.layer.{layer}.attention.self"))
        )
    return rules


def _relative_only(model: nn.Module) -> None:
    config = model.config
    if getattr(config, "position_biased_input", True):
        raise UnsupportedModelError(
            f"{type(model).__name__} adds absolute position embeddings (position_biased_input=True) as well as "
            "disentangled relative attention: it is explained by the absolute + relative DeBERTa-v2 declaration "
            "(DEBERTA_V2_ABSOLUTE, chosen by hf_pelrp.adapter_for from config.position_biased_input), not this one."
        )
    _no_conv(model)


def _absolute_too(model: nn.Module) -> None:
    if not getattr(model.config, "position_biased_input", True):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no absolute position embeddings (position_biased_input=False): it is "
            "explained by the relative-only DeBERTa-v2 declaration, not the absolute + relative one."
        )
    _no_conv(model)


def _no_conv(model: nn.Module) -> None:
    config = model.config
    if getattr(config, "conv_kernel_size", 0) > 0:
        raise UnsupportedModelError(
            f"{type(model).__name__} has the convolution layer of DeBERTa-v2-xlarge (conv_kernel_size > 0), "
            "whose rule the adapter does not declare."
        )


DEBERTA_V2 = register_adapter(
    Adapter(
        model_types=("deberta-v2",),
        name="deberta-v2",
        layers="encoder.layer",
        attention="attention.self",
        embeddings={"embeddings.word_embeddings": ("token",)},
        # the token-type table exists only with type_vocab_size > 0; it is then a leaf (extra_rules); absolute
        # position embeddings and the convolution layer are declared so that the checks refuse them by name
        constants=(
            "encoder.rel_embeddings",
            "embeddings.token_type_embeddings",
            "embeddings.position_embeddings",
        ),
        positions=AttentionBias(
            description="disentangled relative attention (DeBERTa): position factors of c2p / p2c per pair"
        ),
        norms={"LayerNorm": layer_norm},
        modules=(
            "DebertaV2ForSequenceClassification",
            "DebertaV2ForMaskedLM",
            "DebertaV2Model",
            "DebertaV2Embeddings",
            "DebertaV2Encoder",
            "DebertaV2Layer",
            "DebertaV2Attention",
            "DisentangledSelfAttention",
            "DebertaV2SelfOutput",
            "DebertaV2Intermediate",
            "DebertaV2Output",
            "ContextPooler",
            "LegacyDebertaV2OnlyMLMHead",
            "LegacyDebertaV2LMPredictionHead",
            "LegacyDebertaV2PredictionHeadTransform",
            "DebertaV2OnlyMLMHead",
            "DebertaV2LMPredictionHead",
            "ConvLayer",
        ),
        functional=(FunctionalActivationSite("pooler.dense", "classifier"),),
        inputs=TextInputs(position_ids=None, token_types="type_vocab_size", padding="right"),
        heads=("sequence_classification", "masked_lm"),
        extra_rules=_deberta_rules,
        checks=(_relative_only,),
        attention_interface=False,
        tiny={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 97,
            "max_position_embeddings": 64,
            "relative_attention": True,
            "pos_att_type": ["p2c", "c2p"],
            "position_biased_input": False,
            "position_buckets": 8,
            "max_relative_positions": 16,
            "share_att_key": True,
            "norm_rel_ebd": "layer_norm",
            "type_vocab_size": 0,
            "pad_token_id": 0,
            "num_labels": 3,
        },
    )
)

#: ``position_biased_input=True``: the absolute position embedding is added to the word embedding before the
#: embedding LayerNorm, an addend like BERT's, so it is an additive ``position`` leaf (``R_p = p * g`` beside
#: ``R_t = t * g``) next to the per-layer c2p / p2c leaves: ``position`` = ``position_absolute`` (the additive
#: leaf) + ``position_relative`` (the bias leaves per key); ``position_by_layer`` / ``position_by_distance`` are the
#: relative part's. CP-LRP gives the relative leaves exactly 0, not the absolute part. The absolute table is read
#: at ``0 .. T-1`` (the model's own position ids; rows are right-padded, position_ids= is refused as for the
#: relative-only declaration, since the relative part would not read them), so inputs are limited to
#: ``max_position_embeddings`` tokens.
DEBERTA_V2_ABSOLUTE = dataclasses.replace(
    DEBERTA_V2,
    name="deberta-v2 (absolute + relative)",
    constants=("encoder.rel_embeddings", "embeddings.token_type_embeddings"),
    positions=AbsoluteAndBias(
        description="learned absolute + disentangled relative attention (DeBERTa): an additive `position` "
        "leaf and the position factors of c2p / p2c per pair"
    ),
    checks=(_absolute_too,),
    inputs=TextInputs(
        position_ids=None,
        token_types="type_vocab_size",
        padding="right",
        max_positions=lambda c: c.max_position_embeddings,
    ),
    tiny={**DEBERTA_V2.tiny, "position_biased_input": True},
)


def _deberta_variant(config: Any) -> Adapter:
    """DeBERTa-v2's declaration by ``config.position_biased_input`` (transformers' default: True)."""
    return DEBERTA_V2_ABSOLUTE if getattr(config, "position_biased_input", True) else DEBERTA_V2


register_variants("deberta-v2", _deberta_variant, (DEBERTA_V2, DEBERTA_V2_ABSOLUTE))
