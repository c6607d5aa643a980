"""DistilBERT adapter (``distilbert``): word + position embeddings (learned, or fixed sinusoidal), no token types.

Rules as for BERT (:mod:`hf_pelrp.adapters.bert`): identity rule on every LayerNorm and activation, the
``"lrp"`` attention, leaves ``"token"`` and (with ``positional=True``) ``"position"``. With
``sinusoidal_pos_embds=True`` the position embedding is the fixed sinusoidal table: its output at each position
is a leaf like a learned one (the table itself is never modified; the leaf is a copy). The classification
head's ``ReLU`` is called as a function; for ReLU the identity rule's local gradient ``relu(x) / x`` equals the
ordinary derivative, so no rule is needed there. DistilBERT has no token types: ``attr.segment`` is ``None``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..attention import AttentionRule
from ..config import LRPConfig
from ..errors import AttributionInputError, UnsupportedModelError
from ..hooks import EmbeddingLeaf, HookRule, LeafStore
from .additive import AdditiveLeaf, check_activation, norm_and_activation_rules, validate_ids
from .base import Adapter, register_adapter


class DistilBertAdapter(Adapter):
    model_types = ("distilbert",)
    positional_kind = "absolute"
    additive_leaves = ("token", "position")

    def _base(self, model: nn.Module) -> nn.Module:
        base = getattr(model, "base_model", model)
        emb = getattr(base, "embeddings", None)
        if not hasattr(emb, "word_embeddings") or not hasattr(emb, "position_embeddings"):
            raise UnsupportedModelError(
                f"{type(model).__name__} does not have the DistilBERT layout (embeddings.word_embeddings, "
                ".position_embeddings, transformer.layer) the 'distilbert' adapter expects."
            )
        return base

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self._base(model).transformer.layer)

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        for i, layer in enumerate(self.layers(model)):
            check_activation(model, f"transformer.layer.{i}.ffn", getattr(layer.ffn, "activation", None))

    def module_rules(
        self, model: nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[nn.Module, HookRule]]:
        emb = self._base(model).embeddings
        rules: list[tuple[nn.Module, HookRule]] = [(emb.word_embeddings, EmbeddingLeaf(store, "token"))]
        if config.positional:
            rules.append((emb.position_embeddings, AdditiveLeaf(store, "position")))
        rules.extend(norm_and_activation_rules(model))
        return rules

    def attention_rules(self, model: nn.Module, config: LRPConfig) -> list[tuple[nn.Module, AttentionRule]]:
        rule = AttentionRule(q=config.qk_factor, k=config.qk_factor, v=config.v_factor)
        return [(layer.attention, rule) for layer in self.layers(model)]

    def validate_inputs(
        self, model: nn.Module, inputs: dict[str, Any]
    ) -> tuple[dict[str, Any], torch.Tensor]:
        if inputs.get("token_type_ids") is not None:
            raise AttributionInputError(
                f"{type(model).__name__} has no token types: drop token_type_ids (DistilBERT tokenizers do not "
                "return them; call the tokenizer with return_token_type_ids=False)."
            )
        inputs, mask = super().validate_inputs(model, inputs)
        validate_ids(inputs, "position_ids", mask, model.config.max_position_embeddings, "position")
        if "position_ids" not in inputs and mask.shape[-1] > model.config.max_position_embeddings:
            raise AttributionInputError(
                f"the input has {mask.shape[-1]} tokens but {type(model).__name__} has position embeddings for "
                f"at most {model.config.max_position_embeddings}: truncate the input."
            )
        return inputs, mask


register_adapter(DistilBertAdapter())
