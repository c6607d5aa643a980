"""More encoders (issue 18), each declared explicitly and proven by check_adapter with the heads transformers has
(masked LM, sequence classification).

- ``xmod``: XLM-R with a language adapter in every layer (``dense1``, ``hidden_act``, ``dense2`` and a residual,
  chosen per row by ``lang_ids``). The choice of adapter is a constant of the pass (like a top-k routing
  decision); inside it the epsilon rule (linear maps) and the identity rule (activation, LayerNorms) apply, so the
  adapter needs no rule of its own. Leaves as for RoBERTa: ``token``, ``segment``, ``position``.
- ``layoutlm``: BERT whose embedding sum also holds 2-D layout embeddings of each token's bounding box
  (``x(left) + y(upper) + x(right) + y(lower) + h(height) + w(width)``). They are positions too: each of the six
  calls is its own leaf (:class:`LayoutPositions`), ``attr.position`` is the 1-D position plus the six box
  leaves (so conservation covers them), ``attr.extras["position_1d"]`` and ``attr.extras["position_bbox"]`` split
  it. ``bbox`` is accepted per token and moved with the tokens when left padding is aligned.
- ``roc_bert``: BERT plus per-character glyph-shape and pronunciation embeddings (concatenated with the word
  embedding before ``map_inputs_layer``, or added): token content, one leaf each, summed into ``token`` and
  reported as ``token_word`` / ``token_shape`` / ``token_pronunciation``.
- ``gte``, ``nomic_bert``, ``jina_embeddings_v3``: BERT-style rotary encoders through the attention interface:
  per-layer ``(cos, sin)`` leaves, token types as ``segment`` (GTE without a token-type table: none), gated MLPs
  (GTE, NomicBERT). ``eurobert``: the LLaMA layout as a bidirectional encoder. ``esm``: the rotary ESM-2, its erf
  GELU applied as a function (identity rule by hooks), token dropout a constant scale, the contact head (never
  called by the forward pass) left out; absolute-position ESM refused.
- ``rembert``: BERT with factorised embeddings; inline attention gets the ``"lrp"`` factors on its q / k / v
  projections (as Megatron-BERT). ``roformer``: interleaved rotary applied inside inline attention: per-layer
  ``(sin, cos)`` leaves made by a pre-hook, the rotary 1/2 on q, k and the leaves.
- ``mobilebert``: bottlenecks, stacked FFNs, trigram input, ``NoNorm`` (``x * w + b``: :func:`no_norm`).
- ``xlm``, ``flaubert``: blocks in parallel module lists (the attention modules are the blocks), inline
  attention with projection factors, token types embedded with the word table, the language embedding a leaf
  folded into ``segment``.
- ``mpnet``: learned absolute positions and a relative attention bias, both leaves (:class:`AbsoluteAndBias`).

Refused by name (:mod:`hf_pelrp.adapters.refusals`): encoders without softmax attention (``fnet``,
``nystromformer``, ``yoso``, ``mra``) and encoders whose layers no rule covers (``squeezebert``, ``convbert``,
``canine``, ``perceiver``, ``reformer``, ``big_bird``, ``longformer``, ``ibert``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import LRPConfig
from ..errors import AttributionInputError, UnsupportedModelError
from ..hooks import EmbeddingLeaf, FunctionalActivation, HookRule, LeafStore, OutputGradient, make_leaf
from ..inputs import Prepared, TextInputs
from ..modules import find_module, find_optional
from ..positions import Additive, AttentionBias, Rotary, _as_map, bias_leaf
from ..rules import relevance_of, scale_gradient
from .base import Adapter, FunctionalActivationSite, GatedProduct, register_adapter
from .bert import TINY_ENCODER, bert_classes, bert_like
from .electra import no_cross_attention
from .inline_decoders import projection_factors
from .llama import llama_like
from .norms import layer_norm, rms_norm

#: RoBERTa-style tiny instances: one token type, padding id 1
_ROBERTA_TINY = {"type_vocab_size": 1, "pad_token_id": 1}


@dataclass(frozen=True)
class PerTokenInputs(TextInputs):
    """:class:`TextInputs` whose ``per_token`` keywords are [B, T, ...] tensors aligned with the tokens: checked for
    that shape and moved with the tokens when left padding is aligned to the right."""

    per_token: tuple[str, ...] = ()

    def accepted(self) -> tuple[str, ...]:
        return super().accepted() + tuple(k for k in self.per_token if k not in self.extra)

    def validate(self, model: nn.Module, inputs: dict[str, Any]) -> Prepared:
        given = {k: inputs[k] for k in self.per_token if inputs.get(k) is not None}
        prepared = super().validate(model, {k: v for k, v in inputs.items() if k not in given})
        batch, length = prepared.attention_mask.shape
        for key, value in given.items():
            if (
                not isinstance(value, torch.Tensor)
                or value.dim() < 2
                or tuple(value.shape[:2]) != (batch, length)
            ):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise AttributionInputError(
                    f"{key} must be a tensor of shape [batch, seq_len, ...] = [{batch}, {length}, ...] matching the "
                    f"input ids, got {shape}"
                )
            value = value.to(prepared.attention_mask.device)
            prepared.inputs[key] = value if prepared.alignment is None else prepared.alignment.apply(value)
        return prepared


# ---- xmod ---------------------------------------------------------------------------------------------------

XMOD = register_adapter(
    dataclasses.replace(
        bert_like(
            ("xmod",),
            "Xmod",
            roberta=True,
            modules=("XmodForCausalLM", "XmodAdapter"),
            name="xmod",
            tiny={**_ROBERTA_TINY, "languages": ["en_XX", "de_DE"], "default_language": "en_XX"},
        ),
        inputs=TextInputs(
            position_ids="count",
            position_offset=lambda c: c.pad_token_id + 1,
            max_positions=lambda c: c.max_position_embeddings - c.pad_token_id - 1,
            token_types="type_vocab_size",
            padding="right",
            extra=("lang_ids",),
        ),
        heads=("sequence_classification", "masked_lm", "causal_lm"),
        checks=(no_cross_attention,),
    )
)


# ---- layoutlm -------------------------------------------------------------------------------------------------

#: the leaves of LayoutLM's 1-D position table and its 2-D layout tables (x and y are each called twice: left
#: and right, upper and lower)
_LAYOUT_LEAVES: Mapping[str, str] = {
    "embeddings.position_embeddings": "position",
    "embeddings.x_position_embeddings": "bbox_x",
    "embeddings.y_position_embeddings": "bbox_y",
    "embeddings.h_position_embeddings": "bbox_height",
    "embeddings.w_position_embeddings": "bbox_width",
}
_LAYOUT_CALLS: Mapping[str, tuple[str, ...]] = {
    "embeddings.x_position_embeddings": ("bbox_left", "bbox_right"),
    "embeddings.y_position_embeddings": ("bbox_upper", "bbox_lower"),
}


@dataclass(frozen=True)
class LayoutPositions(Additive):
    """Additive 1-D positions plus the additive 2-D layout embeddings of each token's box (LayoutLM).

    Every call of a box table is one more addend of ``e = t + p + s + sum_b box_b``, so each is a leaf (the
    epsilon split of an addition, method.md 2): ``R_b = box_b * g``. ``calls`` names the leaves of a table called
    more than once per pass (x: left and right, y: upper and lower). The position map is the 1-D position plus
    every box leaf; ``position_1d`` and ``position_bbox`` are reported separately.
    """

    modules: Mapping[str, str] = field(default_factory=lambda: dict(_LAYOUT_LEAVES))
    calls: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(_LAYOUT_CALLS))
    description: str = "learned absolute 1-D + 2-D layout (bounding box)"

    def _names(self) -> list[tuple[str, tuple[str, ...]]]:
        return [(path, tuple(self.calls.get(path, (leaf,)))) for path, leaf in self.modules.items()]

    def rules(self, model, layers, attention, store):
        base = model.base_model
        return [(find_module(base, path), EmbeddingLeaf(store, names)) for path, names in self._names()]

    def read(self, store: LeafStore, token: torch.Tensor, num_layers: int) -> dict[str, torch.Tensor]:
        one_d = super().read(store, token, num_layers)["position"]
        box = torch.zeros_like(token)
        for _path, names in self._names():
            for name in names:
                leaf = store.additive.get(name)
                if name != "position" and leaf is not None:
                    box = box + _as_map(relevance_of(leaf), token)
        position = one_d + box
        return {
            "position": position,
            "position_abs": position.abs(),
            "position_1d": one_d,
            "position_bbox": box,
        }

    def describe(self) -> str:
        return f"{self.description}: additive `position` leaf and six box leaves"


LAYOUTLM = register_adapter(
    dataclasses.replace(
        bert_like(("layoutlm",), "LayoutLM", name="layoutlm", tiny={"max_2d_position_embeddings": 64}),
        positions=LayoutPositions(),
        inputs=PerTokenInputs(
            position_ids="count",
            max_positions=lambda c: c.max_position_embeddings,
            token_types="type_vocab_size",
            padding="right",
            per_token=("bbox",),
        ),
    )
)


# ---- roc_bert -------------------------------------------------------------------------------------------------

#: RoCBert's per-character glyph-shape and pronunciation tables: token content, one leaf each
_ROC_CONTENT = {
    "embeddings.shape_embed": "token_shape",
    "embeddings.pronunciation_embed": "token_pronunciation",
}


def _roc_bert_token(model: nn.Module, store: LeafStore, maps: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``token`` = word + shape + pronunciation relevance (all three are the token's content: with
    ``concat_input`` they are concatenated before ``map_inputs_layer``, otherwise added); each part is also
    reported on its own (``token_word``, ``token_shape``, ``token_pronunciation``)."""
    word = maps["token"]
    out = {"token_word": word}
    total = word
    for name in _ROC_CONTENT.values():
        leaf = store.additive.get(name)
        part = torch.zeros_like(word) if leaf is None else _as_map(relevance_of(leaf), word)
        out[name] = part
        total = total + part
    out["token"] = total
    return out


ROC_BERT = register_adapter(
    dataclasses.replace(
        bert_like(
            ("roc_bert",),
            "RoCBert",
            modules=("RoCBertForCausalLM",),
            name="roc_bert",
            tiny={
                "pronunciation_vocab_size": 23,
                "pronunciation_embed_dim": 8,
                "shape_vocab_size": 29,
                "shape_embed_dim": 8,
            },
        ),
        embeddings={
            "embeddings.word_embeddings": ("token",),
            "embeddings.token_type_embeddings": ("segment",),
            **{path: (name,) for path, name in _ROC_CONTENT.items()},
        },
        inputs=PerTokenInputs(
            position_ids="count",
            max_positions=lambda c: c.max_position_embeddings,
            token_types="type_vocab_size",
            padding="right",
            per_token=("input_shape_ids", "input_pronunciation_ids"),
        ),
        extra_maps=_roc_bert_token,
        heads=("sequence_classification", "masked_lm", "causal_lm"),
        checks=(no_cross_attention,),
    )
)


# ---- rotary encoders with the attention interface: gte, nomic_bert, jina_embeddings_v3, eurobert -----------------

#: right-padded encoders counting positions from 0 (rotary: no table, so no length limit of their own)
_ROTARY_ENCODER_INPUTS = TextInputs(position_ids="count", token_types="type_vocab_size", padding="right")


@dataclass(frozen=True)
class OptionalSegment(Adapter):
    """A declaration whose token-type table may be absent (GTE with ``type_vocab_size=0``, as
    gte-base-en-v1.5 ships): then there is no ``"segment"`` leaf (the model adds nothing there)."""

    segment: str = "embeddings.token_type_embeddings"

    def module_rules(self, model, config, store):
        adapter: Adapter = self
        if find_optional(self.base(model), self.segment) is None:
            embeddings = {p: n for p, n in self.embeddings.items() if p != self.segment}
            adapter = dataclasses.replace(self, embeddings=embeddings)
        return Adapter.module_rules(adapter, model, config, store)


def _rotary_encoder(
    model_type: str, prefix: str, *, gated: bool, lm_head: str, tiny: dict, **fields
) -> Adapter:
    """A BERT-style rotary encoder (``embeddings.word_embeddings`` + ``token_type_embeddings``, an embedding
    LayerNorm, post-LN ``layers[i]`` with ``self_attn`` through the attention interface, per-layer rotary leaves)."""
    functional = [FunctionalActivationSite("classifier.dense", "classifier.out_proj")]
    if lm_head:
        functional.append(FunctionalActivationSite(f"{lm_head}.dense", f"{lm_head}.layer_norm"))
    return register_adapter(
        OptionalSegment(
            model_types=(model_type,),
            name=model_type,
            layers="layers",
            attention="self_attn",
            embeddings={
                "embeddings.word_embeddings": ("token",),
                "embeddings.token_type_embeddings": ("segment",),
            },
            positions=Rotary(),
            norms={"LayerNorm": layer_norm},
            modules=tuple(
                f"{prefix}{p}"
                for p in (
                    "ForMaskedLM",
                    "ForSequenceClassification",
                    "Model",
                    "Embeddings",
                    "RotaryEmbedding",
                )
                + ("Layer", "Attention", "MLP", "Pooler")
            )
            + fields.pop("modules", ()),
            gated=(GatedProduct(act="mlp.act_fn", up="mlp.up_proj"),) if gated else (),
            functional=tuple(functional),
            inputs=_ROTARY_ENCODER_INPUTS,
            heads=("sequence_classification", "masked_lm"),
            checks=(no_cross_attention,),
            tiny={**TINY_ENCODER, **tiny},
            **fields,
        )
    )


GTE = _rotary_encoder("gte", "Gte", gated=True, lm_head="lm_head", tiny={}, modules=("GteLMHead",))
NOMIC_BERT = _rotary_encoder(
    "nomic_bert",
    "NomicBert",
    gated=True,
    lm_head="",
    tiny={},
    modules=("NomicBertLMPredictionHead", "NomicBertPredictionHeadTransform", "NomicBertOnlyMLMHead"),
)
JINA_EMBEDDINGS_V3 = _rotary_encoder(
    "jina_embeddings_v3",
    "JinaEmbeddingsV3",
    gated=False,
    lm_head="lm_head",
    tiny={"type_vocab_size": 1, "pad_token_id": 1},
    modules=("JinaEmbeddingsV3LMHead", "JinaEmbeddingsV3ClassificationHead"),
)

EUROBERT = register_adapter(
    llama_like(
        ("eurobert",),
        "EuroBert",
        name="eurobert",
        modules=("EuroBertForMaskedLM",),
        norms={"EuroBertRMSNorm": rms_norm},
        inputs=TextInputs(position_ids="count", padding="right"),
        heads=("sequence_classification", "masked_lm"),
        tiny={"num_labels": 3},
    )
)


# ---- esm ------------------------------------------------------------------------------------------------------


def _esm_gelu(model: nn.Module, config: LRPConfig, store: LeafStore) -> list[tuple[nn.Module, HookRule]]:
    """ESM applies its own erf GELU as a function between ``intermediate.dense`` and ``output.dense`` of every
    layer: the identity rule there (AttnLRP Prop. 3.4)."""
    return [
        (block.output.dense, FunctionalActivation(block.intermediate.dense))
        for block in model.base_model.encoder.layer
    ]


def _esm_rotary_only(model: nn.Module) -> None:
    kind = getattr(model.config, "position_embedding_type", "absolute")
    if kind != "rotary":
        raise UnsupportedModelError(
            f"{type(model).__name__} has position_embedding_type={kind!r}; hf_pelrp's ESM declaration covers the "
            "rotary ESM (ESM-2, position_embedding_type='rotary'); the absolute-position ESM-1 variants are not "
            "declared (their positions are counted from padding_idx + 1 and masked by the attention mask)."
        )
    no_cross_attention(model)


class _WithoutSubtrees:
    """``model`` seen without the modules under ``skipped`` (for the coverage check only; nothing is changed)."""

    def __init__(self, model: nn.Module, skipped: list[nn.Module]):
        self._model = model
        self._skipped = skipped

    def named_modules(self):
        prefixes = [p for p, m in self._model.named_modules() if any(m is s for s in self._skipped)]
        for path, module in self._model.named_modules():
            if not any(path == p or path.startswith(p + ".") for p in prefixes):
                yield path, module

    def __getattr__(self, name: str):
        return getattr(self._model, name)


@dataclass(frozen=True)
class UnusedSubtrees(Adapter):
    """A declaration that leaves out modules the forward pass never calls (``unused``: base-model paths). ESM's
    ``contact_head`` (a logistic regression with a Sigmoid over attention maps) runs only in
    ``EsmModel.predict_contacts``, after and outside the forward pass that attribution explains."""

    unused: tuple[str, ...] = ()

    def _check_coverage(self, model: nn.Module) -> None:
        base = self.base(model)
        for check in self.checks:  # a variant refused by name gets its reason, not "module not covered"
            check(model)
        skipped = [m for path in self.unused if (m := find_optional(base, path)) is not None]
        if skipped:
            # named as the model, so that messages name the model's class
            view = type(type(model).__name__, (_WithoutSubtrees,), {})(model, skipped)
            Adapter._check_coverage(self, view)
        else:
            Adapter._check_coverage(self, model)


ESM = register_adapter(
    UnusedSubtrees(
        unused=("contact_head",),
        model_types=("esm",),
        name="esm",
        layers="encoder.layer",
        attention="attention.self",
        embeddings={"embeddings.word_embeddings": ("token",)},
        positions=Rotary(),
        norms={"LayerNorm": layer_norm},
        modules=(
            "EsmForMaskedLM",
            "EsmForSequenceClassification",
            "EsmModel",
            "EsmEmbeddings",
            "EsmRotaryEmbedding",
            "EsmEncoder",
            "EsmLayer",
            "EsmAttention",
            "EsmSelfAttention",
            "EsmSelfOutput",
            "EsmIntermediate",
            "EsmOutput",
            "EsmPooler",
            "EsmLMHead",
            "EsmClassificationHead",
            "EsmContactPredictionHead",
        ),
        functional=(
            FunctionalActivationSite("classifier.dense", "classifier.out_proj"),
            FunctionalActivationSite("lm_head.dense", "lm_head.layer_norm"),
        ),
        extra_rules=_esm_gelu,
        inputs=TextInputs(position_ids="count", padding="right"),
        heads=("sequence_classification", "masked_lm"),
        checks=(_esm_rotary_only,),
        tiny={**TINY_ENCODER, "position_embedding_type": "rotary", "mask_token_id": 3, "token_dropout": True},
    )
)


# ---- rembert: inline attention --------------------------------------------------------------------------------

REMBERT = register_adapter(
    dataclasses.replace(
        bert_like(
            ("rembert",),
            "RemBert",
            modules=("RemBertForCausalLM",),
            name="rembert",
            extra_rules=projection_factors("encoder.layer", "attention.self", ("query", "key", "value")),
            attention_interface=False,
            tiny={"input_embedding_size": 16, "output_embedding_size": 24},
        ),
        heads=("sequence_classification", "masked_lm", "causal_lm"),
        checks=(no_cross_attention,),
    )
)


# ---- roformer: interleaved rotary, computed inline -------------------------------------------------------------


class _RoFormerLeaves(HookRule):
    """Per-layer ``(sin, cos)`` leaves for RoFormer's inline rotary (PE-LRP, method.md 2).

    RoFormer hands every layer's self-attention one tensor ``sinusoidal_pos = [sin | cos]`` ([1, 1, T, D]) and
    rotates q and k inside the attention's forward (interleaved pairs). A pre-hook replaces it by
    ``scale(cat(sin_l, cos_l), f)`` with fresh leaves ``sin_l``, ``cos_l`` of this layer ([B, T, D / 2], one per
    row). ``q_rot = q cos + rot(q) sin`` (likewise k) only feeds the scores, whose gradient the ``"lrp"``
    attention scales by ``qk_factor``; the uniform rule halves each rotation product, so both factors of every
    product get ``f = qk_factor / 2``: the leaves here, q and k at their projections (:func:`_roformer_factors`).
    """

    def __init__(self, store: LeafStore, layer: int, factor: float):
        self.store, self.layer, self.factor = store, layer, factor

    def attach(self, module: torch.nn.Module, handles) -> None:
        store, layer, factor = self.store, self.layer, self.factor

        def hook(_attention, args, kwargs):
            pe = kwargs.get("sinusoidal_pos")
            if pe is None:
                return None
            sin, cos = pe[0, 0].chunk(2, dim=-1)
            batch = store.batch_size or 1
            existing = store.layers.get(layer)
            if existing is None or existing["sin"].shape[1:] != sin.shape:
                existing = {
                    "sin": make_leaf(sin.expand(batch, *sin.shape)),
                    "cos": make_leaf(cos.expand(batch, *cos.shape)),
                }
                store.layers[layer] = existing
            both = torch.cat((existing["sin"], existing["cos"]), dim=-1)[:, None]
            kwargs = dict(kwargs)
            kwargs["sinusoidal_pos"] = scale_gradient(both, factor)
            return args, kwargs

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))


@dataclass(frozen=True)
class InlineInterleavedRotary(Rotary):
    """RoFormer's rotary: interleaved pairs, ``(sin, cos)`` leaves per layer made by :class:`_RoFormerLeaves`;
    read like every rotary kind (``position_by_layer``, ``position``)."""

    names: tuple[str, str] = ("sin", "cos")
    layout: str = "interleaved"
    keyword: str = "sinusoidal_pos"

    def rules(self, model, layers, attention, store):
        return []  # the leaves' gradient factor depends on the rule mode: made by _roformer_rules

    def attention_rule(self, rule, config):
        return rule  # no "lrp" attention runs (inline attention): the factors are hooks (_roformer_rules)

    def describe(self) -> str:
        return "interleaved rotary, applied inline: per-layer `(sin, cos)` leaves (`attr.position_by_layer`)"


def _roformer_rules(
    model: nn.Module, config: LRPConfig, store: LeafStore
) -> list[tuple[nn.Module, HookRule]]:
    """The ``"lrp"`` attention's factors on RoFormer's inline attention (q, k: ``qk_factor``; v: ``v_factor``),
    with the rotary 1/2 on q, k and the leaves when positions are leaves."""
    rotary = 0.5 if config.positional else 1.0
    rules: list[tuple[nn.Module, HookRule]] = []
    for i, block in enumerate(model.base_model.encoder.layer):
        attention = block.attention.self
        rules.append((attention.query, OutputGradient(config.qk_factor * rotary)))
        rules.append((attention.key, OutputGradient(config.qk_factor * rotary)))
        rules.append((attention.value, OutputGradient(config.v_factor)))
        if config.positional:
            rules.append((attention, _RoFormerLeaves(store, i, config.qk_factor * rotary)))
    return rules


def _roformer_checks(model: nn.Module) -> None:
    if getattr(model.config, "rotary_value", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} has rotary_value=True: the values are rotated too, so the same (sin, cos) "
            "leaves would need the q / k factor on one path and the v factor on another; not declared."
        )
    no_cross_attention(model)


ROFORMER = register_adapter(
    Adapter(
        model_types=("roformer",),
        name="roformer",
        layers="encoder.layer",
        attention="attention.self",
        embeddings={
            "embeddings.word_embeddings": ("token",),
            "embeddings.token_type_embeddings": ("segment",),
        },
        positions=InlineInterleavedRotary(),
        norms={"LayerNorm": layer_norm},
        modules=bert_classes("RoFormer", "RoFormerForCausalLM", "RoFormerClassificationHead")
        + ("RoFormerOnlyMLMHead", "RoFormerLMPredictionHead", "RoFormerPredictionHeadTransform"),
        constants=("encoder.embed_positions",),
        functional=(FunctionalActivationSite("classifier.dense", "classifier.out_proj"),),
        extra_rules=_roformer_rules,
        attention_interface=False,
        inputs=TextInputs(
            position_ids=None,
            max_positions=lambda c: c.max_position_embeddings,
            token_types="type_vocab_size",
            padding="right",
        ),
        heads=("sequence_classification", "masked_lm", "causal_lm"),
        checks=(_roformer_checks,),
        tiny={**TINY_ENCODER, "embedding_size": 32},
    )
)


# ---- mobilebert -----------------------------------------------------------------------------------------------


def no_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MobileBERT's ``NoNorm``: ``x * w + b``, an element-wise affine map with no normalising scale; its identity
    rule is the epsilon rule of that diagonal linear map (the bias absorbs its share), so nothing is detached."""
    return x * module.weight + module.bias


MOBILEBERT = register_adapter(
    Adapter(
        model_types=("mobilebert",),
        name="mobilebert",
        layers="encoder.layer",
        attention="attention.self",
        embeddings={
            "embeddings.word_embeddings": ("token",),
            "embeddings.token_type_embeddings": ("segment",),
        },
        positions=Additive({"embeddings.position_embeddings": "position"}),
        norms={"LayerNorm": layer_norm, "NoNorm": no_norm},
        modules=bert_classes("MobileBert")
        + (
            "MobileBertOnlyMLMHead",
            "MobileBertLMPredictionHead",
            "MobileBertPredictionHeadTransform",
            "OutputBottleneck",
            "BottleneckLayer",
            "Bottleneck",
            "FFNOutput",
            "FFNLayer",
        ),
        inputs=TextInputs(
            position_ids="count",
            max_positions=lambda c: c.max_position_embeddings,
            token_types="type_vocab_size",
            padding="right",
        ),
        heads=("sequence_classification", "masked_lm"),
        checks=(no_cross_attention,),
        tiny={
            **TINY_ENCODER,
            "embedding_size": 16,
            "true_hidden_size": 16,
            "intra_bottleneck_size": 16,
            "num_feedforward_networks": 2,
        },
    )
)


# ---- xlm, flaubert: inline attention in parallel module lists -------------------------------------------------


def _fold_language(model: nn.Module, store: LeafStore, maps: dict[str, Any]) -> dict[str, torch.Tensor]:
    """XLM's language embedding (``langs``) is one more addend of the embedding sum beside the token types: its
    relevance joins ``segment`` (conservation covers it) and is also reported as ``language``."""
    leaf = store.additive.get("language")
    if leaf is None:
        return {}
    token = maps["token"]
    language = _as_map(relevance_of(leaf), token)
    segment = maps.get("segment")
    return {"language": language, "segment": language if segment is None else segment + language}


def _no_adaptive_softmax(model: nn.Module) -> None:
    if getattr(model.config, "asm", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} uses an adaptive log-softmax output (asm=True): its clustered log-probabilities "
            "are not logits of one linear map; not declared."
        )


def _post_norm_only(model: nn.Module) -> None:
    if getattr(model.config, "pre_norm", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} has pre_norm=True, whose forward does not run in transformers 5.25 (it indexes "
            "its EncoderDecoderCache: `cache=cache[i]`, modeling_flaubert.py:908), so check_adapter cannot prove it; "
            "the post-norm FlauBERT (pre_norm=False, the released checkpoints) is declared."
        )


def _xlm_like(model_type: str, prefix: str, attention_class: str, ffn_class: str) -> Adapter:
    return register_adapter(
        Adapter(
            model_types=(model_type,),
            name=model_type,
            # the blocks live in parallel lists (attentions[i], layer_norm1[i], ffns[i], layer_norm2[i]): the
            # attention modules themselves are listed as the blocks
            layers="attentions",
            attention="",
            embeddings={"embeddings": ("token", "segment"), "lang_embeddings": ("language",)},
            positions=Additive(
                {"position_embeddings": "position"}, description="learned absolute or sinusoidal"
            ),
            norms={"LayerNorm": layer_norm},
            modules=(
                f"{prefix}WithLMHeadModel",
                f"{prefix}ForSequenceClassification",
                f"{prefix}Model",
                f"{prefix}PredLayer",
                f"{prefix}SequenceSummary",
                attention_class,
                ffn_class,
            ),
            functional=(FunctionalActivationSite("*.lin1", "transformer.ffns.*.lin2"),),
            extra_rules=projection_factors("attentions", "", ("q_lin", "k_lin", "v_lin")),
            extra_maps=_fold_language,
            attention_interface=False,
            inputs=PerTokenInputs(
                position_ids="count",
                max_positions=lambda c: c.max_position_embeddings,
                token_types="n_words",
                padding="right",
                per_token=("langs",),
            ),
            heads=("sequence_classification", "causal_lm"),
            checks=(_no_adaptive_softmax, _post_norm_only),
            tiny={
                "emb_dim": 32,
                "n_layers": 2,
                "n_heads": 4,
                "n_words": 97,
                "max_position_embeddings": 64,
                "pad_index": 2,
                "pad_token_id": 2,
                "n_langs": 2,
                "use_lang_emb": True,
                "num_labels": 3,
            },
        )
    )


XLM = _xlm_like("xlm", "XLM", "MultiHeadAttention", "TransformerFFN")
FLAUBERT = _xlm_like("flaubert", "Flaubert", "MultiHeadAttention", "TransformerFFN")


# ---- mpnet: absolute positions and a relative attention bias, inline attention ---------------------------------


class _MPNetBiasLeaves(HookRule):
    """Make the ``position_bias`` MPNet hands one layer's inline self-attention a per-layer, per-row leaf
    (``store.layers[l]["bias"]``, [B, H, T, T]), its gradient scaled by the ``scores`` factor (1/2 AttnLRP, 0 CP):
    ``s = q k^T / sqrt(d) + b + mask`` is a sum, so ``R_b = b * g`` (method.md 2, "Positions inside attention");
    the mask is added separately and stays out of the leaf."""

    def __init__(self, store: LeafStore, layer: int, factor: float):
        self.store, self.layer, self.factor = store, layer, factor

    def attach(self, module: torch.nn.Module, handles) -> None:
        store, layer, factor = self.store, self.layer, self.factor

        def hook(_attention, args, kwargs):
            positional = len(args) > 2
            bias = args[2] if positional else kwargs.get("position_bias")
            if bias is None:
                return None
            leaf = scale_gradient(bias_leaf(store, layer, bias), factor)
            if positional:
                return (*args[:2], leaf, *args[3:]), kwargs
            return args, {**kwargs, "position_bias": leaf}

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))


@dataclass(frozen=True)
class AbsoluteAndBias(AttentionBias):
    """Learned absolute positions added to the token embedding AND a relative bias inside attention (MPNet).

    Both are positions: ``position`` = the additive leaf's relevance + the bias leaves' relevance per key
    (``position_absolute``, ``position_relative`` separately; ``position_by_layer`` and ``position_by_distance``
    are the bias's). Not "inside attention" as a whole: CP-LRP gives the bias 0 but the absolute part keeps its
    share.
    """

    additive: Additive = field(default_factory=Additive)
    inside_attention: bool = False
    name: str = "absolute + attention bias"
    description: str = "learned absolute + relative attention bias"

    @property
    def modules(self) -> Mapping[str, str]:
        return self.additive.modules

    def rules(self, model, layers, attention, store):
        return self.additive.rules(model, layers, attention, store)  # the bias leaves: _mpnet_rules

    def read(self, store: LeafStore, token: torch.Tensor, num_layers: int) -> dict[str, torch.Tensor]:
        maps = super().read(store, token, num_layers)
        absolute = self.additive.read(store, token, num_layers)["position"]
        relative = maps["position"]
        maps.update(
            position=absolute + relative,
            position_abs=absolute.abs() + maps["position_abs"],
            position_absolute=absolute,
            position_relative=relative,
        )
        return maps

    def describe(self) -> str:
        return f"{self.description}: additive `position` leaf and per-layer bias leaves"


def _mpnet_rules(model: nn.Module, config: LRPConfig, store: LeafStore) -> list[tuple[nn.Module, HookRule]]:
    rules = projection_factors("encoder.layer", "attention.attn", ("q", "k", "v"))(model, config, store)
    if config.positional:
        for i, block in enumerate(model.base_model.encoder.layer):
            rules.append((block.attention.attn, _MPNetBiasLeaves(store, i, config.scores_factor)))
    return rules


MPNET = register_adapter(
    Adapter(
        model_types=("mpnet",),
        name="mpnet",
        layers="encoder.layer",
        attention="attention.attn",
        embeddings={"embeddings.word_embeddings": ("token",)},
        positions=AbsoluteAndBias(),
        norms={"LayerNorm": layer_norm},
        modules=(
            "MPNetForMaskedLM",
            "MPNetForSequenceClassification",
            "MPNetModel",
            "MPNetEmbeddings",
            "MPNetEncoder",
            "MPNetLayer",
            "MPNetAttention",
            "MPNetSelfAttention",
            "MPNetIntermediate",
            "MPNetOutput",
            "MPNetPooler",
            "MPNetLMHead",
            "MPNetClassificationHead",
        ),
        constants=("encoder.relative_attention_bias",),
        functional=(
            FunctionalActivationSite("classifier.dense", "classifier.out_proj"),
            FunctionalActivationSite("lm_head.dense", "lm_head.layer_norm"),
        ),
        extra_rules=_mpnet_rules,
        attention_interface=False,
        inputs=TextInputs(
            position_ids="count",
            position_offset=lambda c: 2,  # MPNet's padding_idx is 1, whatever config.pad_token_id says
            max_positions=lambda c: c.max_position_embeddings - 2,
            padding="right",
        ),
        heads=("sequence_classification", "masked_lm"),
        tiny={**TINY_ENCODER, "pad_token_id": 1},
    )
)
