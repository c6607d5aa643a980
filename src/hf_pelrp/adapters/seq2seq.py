"""Encoder-decoder models: T5 / mT5 / UMT5 (relative position buckets inside attention) and BART (learned
absolute positions with offset 2, in encoder and decoder).

A ``*ForConditionalGeneration`` explanation explains one target token (the logit read at a decoder position) over
the **source** (encoder input) and the **target prefix** (decoder input): both embeddings are leaves
(``"token"`` and ``"target_token"``), and so are both sides' positions (method.md 2). Every attention gets the
attention rule: encoder self-attention, decoder self-attention and cross-attention (which has no positional
bias: T5 passes zeros, BART nothing).

- T5 family: the bias ``T_h[bucket(j - i)]`` is computed inside the attention module (the first layer's, shared
  by the others in T5 / mT5; every layer's own in UMT5) and passed to the attention interface as
  ``position_bias``. There, :attr:`hf_pelrp.attention.AttentionRule.bias_leaf` replaces it by a per-layer, per-row
  leaf [B, H, Tq, Tk] (group ``"bias"`` for the encoder, ``"target_bias"`` for the decoder); the ``"lrp"``
  attention gives it the ``scores`` factor, and SDPA keeps the mask out of it. ``position_by_distance`` is per
  bucket (``position_distances`` = bucket ids, ``position_distance_edges`` = the signed distances each bucket
  covers, within +-max(max_distance, T)).
- BART: ``embed_positions`` of the encoder and of the decoder are additive leaves (``"position"``,
  ``"target_position"``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attention import attention_rule
from ..config import LRPConfig
from ..errors import AttributionInputError, UnsupportedModelError
from ..heads import SEQ2SEQ_LM, head_of
from ..hooks import Activation, Handles, HookRule, LeafStore, OutputGradient
from ..inputs import Prepared, TextInputs, as_batch, check_unknown_inputs, validate_mask
from ..modules import find_module
from ..positions import Additive, AttentionBias, DistanceBins, bias_leaf
from ..rules import relevance_of
from .base import Adapter, FunctionalActivationSite, register_adapter
from .norms import layer_norm, rms_norm

TARGET_BIAS = "target_bias"


@dataclass(frozen=True)
class EncoderDecoderAdapter(Adapter):
    """An :class:`Adapter` for an encoder and a decoder stack.

    ``layers`` / ``attention`` name the encoder's blocks and their self-attention; ``decoder_layers`` the decoder's
    blocks and ``decoder_attention`` the attention modules inside a decoder block (self- and cross-attention), all
    of which get an attention rule. ``constant_patterns`` are ``fnmatch`` patterns of further embedding tables
    that are constants (T5's per-layer bias tables). Gated feed-forward modules (class names matching
    ``gated_modules``, with ``act`` and ``wi_1``) get the uniform rule wherever they sit in a block.
    """

    decoder_layers: str = ""
    decoder_attention: tuple[str, ...] = ()
    constant_patterns: tuple[str, ...] = ()
    gated_modules: str = "*DenseGatedActDense"

    def encoder_blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(find_module(self.base(model), self.layers))

    def decoder_blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(find_module(self.base(model), self.decoder_layers))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return self.encoder_blocks(model) + self.decoder_blocks(model)

    def num_layers(self, model: nn.Module) -> int:
        """Encoder layers: ``position_by_layer`` is over the source."""
        return len(self.encoder_blocks(model))

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        modules = [find_module(block, self.attention) for block in self.encoder_blocks(model)]
        for block in self.decoder_blocks(model):
            modules.extend(find_module(block, path) for path in self.decoder_attention)
        return modules

    def _check_coverage(self, model: nn.Module) -> None:
        base = self.base(model)
        extra = tuple(
            path
            for path, module in base.named_modules()
            if isinstance(module, nn.Embedding)
            and any(fnmatch.fnmatchcase(path, p) for p in self.constant_patterns)
        )
        Adapter._check_coverage(dataclasses.replace(self, constants=(*self.constants, *extra)), model)

    def module_rules(
        self, model: nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[nn.Module, HookRule]]:
        rules = super().module_rules(model, config, store)
        gated = [m for m in model.modules() if fnmatch.fnmatchcase(type(m).__name__, self.gated_modules)]
        acts = {id(m.act) for m in gated}
        rules = [(m, r) for m, r in rules if not (id(m) in acts and isinstance(r, Activation))]
        for module in gated:
            rules.append((module.act, Activation(product_factor=config.gate_factor)))
            rules.append((module.wi_1, OutputGradient(config.up_factor)))
        return rules


# ---- inputs ------------------------------------------------------------------------------------------------


def decoder_start_id(model: nn.Module) -> int:
    """The id a decoder starts from (``decoder_start_token_id`` of the config or generation config, else the
    pad id, T5's convention)."""
    for holder in (model.config, getattr(model, "generation_config", None)):
        value = getattr(holder, "decoder_start_token_id", None) if holder is not None else None
        if value is not None:
            return int(value)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        raise AttributionInputError(
            f"{type(model).__name__} has no decoder_start_token_id: pass decoder_input_ids (the target prefix)"
        )
    return int(pad)


def decoder_vocabulary(model: nn.Module) -> int:
    """The size of the table the decoder embeds the target prefix with (Marian without shared embeddings has
    its own ``decoder_vocab_size``), else the model's input table."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    table = getattr(decoder, "embed_tokens", None)
    if isinstance(table, nn.Embedding):
        return table.num_embeddings
    return model.get_input_embeddings().num_embeddings


@dataclass(frozen=True)
class Seq2SeqInputs:
    """The source (checked as ``source``, a :class:`TextInputs`) and the target prefix ``decoder_input_ids`` [B, T']
    with ``decoder_attention_mask`` (default: the decoder start token alone, i.e. explain the first target token).

    ``target_padding`` ``"any"``: the decoder's positions are relative (T5); ``"right"``: they are absolute
    (BART), so a target prefix must be right-padded (a left-padded one is refused). ``target_positions``: the
    longest target prefix, as a callable of the config (BART's learned decoder table:
    ``max_position_embeddings``); ``None`` for no limit (relative buckets).
    """

    source: TextInputs = dataclasses.field(default_factory=lambda: TextInputs(position_ids=None))
    target_padding: str = "any"
    target_positions: Callable[[Any], int | None] | None = None
    kind: str = "text"

    @property
    def padding(self) -> str:
        return self.source.padding

    def accepted(self) -> tuple[str, ...]:
        return (*self.source.accepted(), "decoder_input_ids", "decoder_attention_mask")

    def validate(self, model: nn.Module, inputs: dict[str, Any]) -> Prepared:
        inputs = {k: v for k, v in inputs.items() if v is not None}
        for key in ("decoder_inputs_embeds", "encoder_outputs", "labels"):
            if key in inputs:
                raise AttributionInputError(
                    f"{key}= is not accepted for encoder-decoder attribution: pass input_ids (the source) and "
                    "decoder_input_ids (the target prefix)"
                )
        check_unknown_inputs(inputs, self.accepted(), model)
        if head_of(model).name != SEQ2SEQ_LM:
            # encoder-decoder classifiers build their decoder input from input_ids (shifted right)
            for key in ("decoder_input_ids", "decoder_attention_mask"):
                if key in inputs:
                    raise AttributionInputError(
                        f"{type(model).__name__} derives its decoder input from input_ids: drop {key}="
                    )
            return self.source.validate(model, inputs)
        target = inputs.pop("decoder_input_ids", None)
        target_mask = inputs.pop("decoder_attention_mask", None)
        prepared = self.source.validate(model, inputs)
        batch = prepared.attention_mask.shape[0]
        device = prepared.attention_mask.device
        if target is None:
            if target_mask is not None:
                raise AttributionInputError("decoder_attention_mask was given without decoder_input_ids")
            target = torch.full((batch, 1), decoder_start_id(model), dtype=torch.long, device=device)
        target = as_batch(target, "decoder_input_ids")
        if target.is_floating_point() or target.dtype == torch.bool:
            raise AttributionInputError(
                f"decoder_input_ids must be integer token ids, got dtype {target.dtype}"
            )
        if target.shape[0] == 1 and batch > 1:
            target = target.expand(batch, -1)
        if target.shape[0] != batch or target.shape[1] == 0:
            raise AttributionInputError(
                f"decoder_input_ids has shape {tuple(target.shape)}: give one non-empty target prefix per source "
                f"row ({batch})"
            )
        size = decoder_vocabulary(model)
        bad = target[(target < 0) | (target >= size)]
        if bad.numel():
            raise AttributionInputError(
                f"decoder token id {int(bad[0])} is out of range: the model's decoder vocabulary has {size} ids"
            )
        limit = self.target_positions(model.config) if self.target_positions is not None else None
        if limit is not None and target.shape[1] > limit:
            raise AttributionInputError(
                f"decoder_input_ids has {target.shape[1]} positions but {type(model).__name__}'s decoder has "
                f"{limit} (config.max_position_embeddings): shorten the target prefix to at most {limit} tokens "
                "(explain a later target token with the most recent tokens only)"
            )
        target_mask = validate_mask(target_mask, batch, target.shape[1], device)
        if self.target_padding == "right":
            lengths = target_mask.sum(-1, keepdim=True)
            prefix = torch.arange(target.shape[1], device=device)[None] < lengths
            if not bool((prefix == target_mask.bool()).all()):
                raise AttributionInputError(
                    f"{type(model).__name__} numbers its decoder positions from the first column: pad the target "
                    "prefixes (decoder_input_ids) on the right"
                )
        out = {
            **prepared.inputs,
            "decoder_input_ids": target.to(device),
            "decoder_attention_mask": target_mask,
        }
        return dataclasses.replace(prepared, inputs=out, target_mask=target_mask)


# ---- maps ------------------------------------------------------------------------------------------------------


@dataclass
class Seq2SeqMaskCapture(HookRule):
    """Keep the source and target masks of the forward pass (``store.aux["attention_mask"]``,
    ``["target_attention_mask"]``) for the distance bins."""

    store: LeafStore

    def attach(self, module: nn.Module, handles: Handles) -> None:
        def hook(_module, _args, kwargs):
            for key, name in (
                ("attention_mask", "attention_mask"),
                ("decoder_attention_mask", "target_attention_mask"),
            ):
                value = kwargs.get(key)
                if isinstance(value, torch.Tensor) and value.dim() == 2:
                    self.store.aux[name] = value.detach()
                else:
                    self.store.aux.pop(name, None)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))


def seq2seq_maps(model: nn.Module, store: LeafStore, maps: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``target_token`` [B, T'] (and an additive ``target_position``) of the latest backward pass."""
    out: dict[str, torch.Tensor] = {}
    token = maps["token"]
    for name in ("target_token", "target_position"):
        leaf = store.additive.get(name)
        if leaf is not None:
            out[name] = relevance_of(leaf).to(token.dtype)
    if "target_token" in out and "target_position" not in out and "target_position" not in maps:
        out["target_position"] = torch.zeros_like(out["target_token"])
    return out


# ---- T5 family --------------------------------------------------------------------------------------------------


def _buckets(attention: nn.Module, relative: torch.Tensor) -> torch.Tensor:
    bucket = attention._relative_position_bucket
    try:  # T5, mT5: a static method of the distance and the settings
        return bucket(
            relative,
            bidirectional=not attention.is_decoder,
            num_buckets=attention.relative_attention_num_buckets,
            max_distance=attention.relative_attention_max_distance,
        )
    except TypeError:  # UMT5: a method reading the settings from the module
        return bucket(relative)


def bucket_bins(
    attention: nn.Module, mask: torch.Tensor | None, length: int, device: torch.device
) -> DistanceBins:
    """The bucket of each (query, key) pair (``-1`` where either is padding), and the distances each bucket covers."""
    steps = torch.arange(length, device=device)
    index = _buckets(attention, steps[None, :] - steps[:, None])[None]
    if mask is not None:
        real = mask.to(device).bool()
        index = torch.where(real[:, :, None] & real[:, None, :], index, torch.full_like(index, -1))
    count = attention.relative_attention_num_buckets
    reach = max(attention.relative_attention_max_distance, length)
    distances = torch.arange(-reach, reach + 1, device=device)
    of = _buckets(attention, distances)
    edges = torch.zeros(count, 2, dtype=torch.long, device=device)
    for bucket in range(count):
        hit = distances[of == bucket]
        if hit.numel():
            edges[bucket] = torch.stack([hit.min(), hit.max()])
    return DistanceBins(index, torch.arange(count, device=device), edges=edges)


@dataclass
class T5BiasLeaf(HookRule):
    """Make the ``position_bias`` a T5 self-attention passes to the attention interface a per-layer, per-row leaf.

    A pre-hook sets :attr:`AttentionRule.bias_leaf` of the module for this forward pass; the ``"lrp"`` attention
    calls it with the bias (computed inside the module, or the first layer's shared one) and the query, which
    gives the batch. The first layer of each stack also records the bucket bins of the pairs.
    """

    store: LeafStore
    layer: int
    group: str

    def attach(self, module: nn.Module, handles: Handles) -> None:
        store, layer, group = self.store, self.layer, self.group

        def make(attention, bias, query):
            batch = query.shape[0]
            full = bias.expand(batch, bias.shape[1], query.shape[2], bias.shape[-1])
            if ("bins", group) not in store.aux:
                mask = store.aux.get("attention_mask" if group != TARGET_BIAS else "target_attention_mask")
                if mask is not None and mask.shape != (batch, full.shape[-1]):
                    mask = None
                store.aux[("bins", group)] = bucket_bins(attention, mask, full.shape[-1], full.device)
            return bias_leaf(store, layer, full, name=group)

        def hook(attention, _args, _kwargs):
            rule = attention_rule(attention)
            if rule is not None:
                rule.bias_leaf = make

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))


def _t5_leaves(model, layers, attention, store):
    base = model.base_model
    rules: list[tuple[nn.Module, HookRule]] = [(model, Seq2SeqMaskCapture(store))]
    for group, stack in (("bias", base.encoder), (TARGET_BIAS, base.decoder)):
        for layer, block in enumerate(stack.block):
            rules.append((block.layer[0].SelfAttention, T5BiasLeaf(store, layer, group)))
    return rules


def _no_cache_position_bias(model: nn.Module) -> None:
    if getattr(model.config, "is_encoder_decoder", True) is False:
        raise UnsupportedModelError(f"{type(model).__name__} is not an encoder-decoder model")


T5_TINY = {
    "d_model": 32,
    "d_ff": 64,
    "d_kv": 8,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "vocab_size": 97,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}


def t5_like(model_type: str, prefix: str, tiny: dict[str, Any] | None = None) -> EncoderDecoderAdapter:
    """The declaration of a T5-layout encoder-decoder (``{prefix}Stack``, ``block[i].layer[...]``)."""
    return EncoderDecoderAdapter(
        model_types=(model_type,),
        name=model_type,
        layers="encoder.block",
        attention="layer.0.SelfAttention",
        decoder_layers="decoder.block",
        decoder_attention=("layer.0.SelfAttention", "layer.1.EncDecAttention"),
        embeddings={"encoder.embed_tokens": ("token",), "decoder.embed_tokens": ("target_token",)},
        constants=("shared",),
        constant_patterns=("*.relative_attention_bias",),
        positions=AttentionBias(
            leaves=_t5_leaves, description="relative position buckets inside attention (T5 bias table)"
        ),
        norms={f"{prefix}LayerNorm": rms_norm},
        modules=tuple(
            prefix + p
            for p in (
                "ForConditionalGeneration",
                "Stack",
                "Block",
                "LayerSelfAttention",
                "LayerCrossAttention",
                "Attention",
                "LayerFF",
                "DenseActDense",
                "DenseGatedActDense",
                "ForSequenceClassification",
                "Model",
                "ClassificationHead",
            )
        ),
        functional=(FunctionalActivationSite("classification_head.dense", "classification_head.out_proj"),),
        # right-aligned sources: a classifier shifts input_ids into its decoder input, where left padding would
        # be attended (the decoder gets no mask); relative positions make the alignment exact
        inputs=Seq2SeqInputs(TextInputs(position_ids=None, padding="right")),
        heads=("seq2seq_lm", "sequence_classification"),
        extra_maps=seq2seq_maps,
        checks=(_no_cache_position_bias,),
        tiny={**T5_TINY, **(tiny or {})},
    )


register_adapter(t5_like("t5", "T5"))
register_adapter(t5_like("mt5", "MT5", {"feed_forward_proj": "gated-gelu"}))
register_adapter(t5_like("umt5", "UMT5", {"feed_forward_proj": "gated-gelu"}))


# ---- BART --------------------------------------------------------------------------------------------------------


def _bart_leaves_capture(
    model: nn.Module, config: LRPConfig, store: LeafStore
) -> list[tuple[nn.Module, HookRule]]:
    return [(model, Seq2SeqMaskCapture(store))]


BART_TINY = {
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "vocab_size": 97,
    "max_position_embeddings": 64,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
    "forced_eos_token_id": None,
}


def bart_like(
    model_type: str,
    prefix: str,
    *,
    description: str,
    modules: tuple[str, ...] = (),
    heads: tuple[str, ...] = ("seq2seq_lm", "sequence_classification"),
    tiny: dict[str, Any] | None = None,
) -> EncoderDecoderAdapter:
    """The declaration of a BART-layout encoder-decoder (``{prefix}Encoder`` / ``{prefix}Decoder`` with ``layers``
    of ``self_attn`` (+ ``encoder_attn``), LayerNorms, ``embed_tokens`` and an additive ``embed_positions`` on each
    side).

    The token tables are the ``"token"`` / ``"target_token"`` leaves (a table that scales its own output, BART's
    ``*ScaledWordEmbedding``, is a leaf after the scale; a model that scales outside the table multiplies the leaf
    by a constant, which the gradient carries), the shared table is a constant, and both ``embed_positions`` are
    additive leaves (``"position"``, ``"target_position"``). The model computes its own position ids (from the
    sequence length, or from the pad ids for M2M100), so ``position_ids=`` is refused, and a source or target
    prefix longer than ``config.max_position_embeddings`` is refused (the learned tables have no more rows; the
    sinusoidal ones would be regrown or index out of range). ``modules``: the model's own class names besides
    the standard ones (``{prefix}Model``, ``Encoder``, ``Decoder``, ``EncoderLayer``, ``DecoderLayer``,
    ``Attention`` and the head classes), e.g. its scaled word or positional embedding classes when these are not
    ``nn.Embedding`` subclasses.
    """
    head_classes = ["ForConditionalGeneration"]
    if "sequence_classification" in heads:
        head_classes += ["ForSequenceClassification", "ClassificationHead"]
    return EncoderDecoderAdapter(
        model_types=(model_type,),
        name=model_type,
        layers="encoder.layers",
        attention="self_attn",
        decoder_layers="decoder.layers",
        decoder_attention=("self_attn", "encoder_attn"),
        embeddings={"encoder.embed_tokens": ("token",), "decoder.embed_tokens": ("target_token",)},
        constants=("shared",),
        positions=Additive(
            {"encoder.embed_positions": "position", "decoder.embed_positions": "target_position"},
            description=description,
        ),
        norms={"LayerNorm": layer_norm},
        modules=tuple(
            prefix + p
            for p in (
                *head_classes,
                "Model",
                "Encoder",
                "Decoder",
                "EncoderLayer",
                "DecoderLayer",
                "Attention",
            )
        )
        + modules,
        inputs=Seq2SeqInputs(
            TextInputs(position_ids=None, max_positions=lambda c: c.max_position_embeddings, padding="right"),
            target_padding="right",
            target_positions=lambda c: c.max_position_embeddings,
        ),
        heads=heads,
        functional=(FunctionalActivationSite("classification_head.dense", "classification_head.out_proj"),),
        extra_rules=_bart_leaves_capture,
        extra_maps=seq2seq_maps,
        tiny={**BART_TINY, **(tiny or {})},
    )


register_adapter(bart_like("bart", "Bart", description="learned absolute (offset 2), encoder and decoder"))
