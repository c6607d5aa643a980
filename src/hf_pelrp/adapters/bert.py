"""BERT-family adapter (``bert``, ``roberta``): word + token-type + learned position embeddings, post-LN encoder.

Rules (method.md sections 1-2): epsilon rule on every Linear (nothing to attach), the identity rule on every
LayerNorm (the embedding LayerNorm included) and every activation, including the pooler's ``tanh`` and the
activations RoBERTa's heads call as plain functions (``tanh`` in the classification head, ``gelu`` in the LM
head), and the ``"lrp"`` attention (``config.qk_factor`` on q, k, ``config.v_factor`` on v).

Leaves at ``e = word + token_type + position``:

- ``"token"``: the word embedding (or ``inputs_embeds``).
- ``"position"``: the position embedding, with ``positional=True`` only; otherwise it is a constant whose
  relevance is absorbed (the conservation gap shows how much). RoBERTa's own position ids (counted from
  ``padding_idx + 1`` over non-padding tokens) are left to the model.
- ``"segment"``: the token-type embedding, always a leaf when the model has more than one token type
  (``type_vocab_size > 1``, e.g. BERT). With a single token type (RoBERTa checkpoints) the token-type vector is
  the same learned vector at every position of every input: a bias, which absorbs its relevance under the
  epsilon rule like every other bias, so ``attr.segment`` is ``None`` and the gap includes it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..attention import AttentionRule
from ..config import LRPConfig
from ..errors import AttributionInputError, UnsupportedModelError
from ..hooks import EmbeddingLeaf, HookRule, LeafStore
from .additive import (
    AdditiveLeaf,
    FunctionalActivation,
    check_activation,
    norm_and_activation_rules,
    validate_ids,
)
from .base import Adapter, register_adapter


def has_segments(model: nn.Module) -> bool:
    """Whether the model distinguishes token types (then ``attr.segment`` is reported)."""
    return getattr(model.config, "type_vocab_size", 0) > 1


class BertAdapter(Adapter):
    model_types = ("bert", "roberta")
    positional_kind = "absolute"
    additive_leaves = ("token", "position", "segment")

    def _base(self, model: nn.Module) -> nn.Module:
        base = getattr(model, "base_model", model)
        emb = getattr(base, "embeddings", None)
        names = ("word_embeddings", "position_embeddings", "token_type_embeddings")
        if emb is None or not all(hasattr(emb, n) for n in names) or not hasattr(base, "encoder"):
            raise UnsupportedModelError(
                f"{type(model).__name__} does not have the BERT layout (embeddings.word_embeddings, "
                f".position_embeddings, .token_type_embeddings, encoder.layer) the {model.config.model_type!r} "
                "adapter expects."
            )
        return base

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self._base(model).encoder.layer)

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        if getattr(model.config, "is_decoder", False):
            raise UnsupportedModelError(
                f"{type(model).__name__} is configured as a decoder (is_decoder=True); hf_pelrp supports the "
                "BERT family as encoders (sequence classification, masked LM)."
            )
        for i, layer in enumerate(self.layers(model)):
            act = getattr(getattr(layer, "intermediate", None), "intermediate_act_fn", None)
            check_activation(model, f"encoder.layer.{i}.intermediate", act)

    def module_rules(
        self, model: nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[nn.Module, HookRule]]:
        emb = self._base(model).embeddings
        rules: list[tuple[nn.Module, HookRule]] = [(emb.word_embeddings, EmbeddingLeaf(store, "token"))]
        if has_segments(model):
            rules.append((emb.token_type_embeddings, AdditiveLeaf(store, "segment")))
        if config.positional:
            rules.append((emb.position_embeddings, AdditiveLeaf(store, "position")))
        rules.extend(norm_and_activation_rules(model))
        rules.extend(_functional_activation_rules(model))
        return rules

    def attention_rules(self, model: nn.Module, config: LRPConfig) -> list[tuple[nn.Module, AttentionRule]]:
        rule = AttentionRule(q=config.qk_factor, k=config.qk_factor, v=config.v_factor)
        return [(layer.attention.self, rule) for layer in self.layers(model)]

    def validate_inputs(
        self, model: nn.Module, inputs: dict[str, Any]
    ) -> tuple[dict[str, Any], torch.Tensor]:
        inputs, mask = super().validate_inputs(model, inputs)
        validate_ids(inputs, "token_type_ids", mask, model.config.type_vocab_size, "token-type")
        validate_ids(inputs, "position_ids", mask, model.config.max_position_embeddings, "position")
        if "position_ids" not in inputs:
            _check_length(model, mask.shape[-1])
        return inputs, mask


def _check_length(model: nn.Module, seq_len: int) -> None:
    limit = model.config.max_position_embeddings
    if model.config.model_type == "roberta":
        # RoBERTa's positions start after padding_idx
        limit -= model.config.pad_token_id + 1
    if seq_len > limit:
        raise AttributionInputError(
            f"the input has {seq_len} tokens but {type(model).__name__} has position embeddings for at most "
            f"{limit}: truncate the input (tokenizer(..., truncation=True))."
        )


def _functional_activation_rules(model: nn.Module) -> list[tuple[nn.Module, HookRule]]:
    """Identity rule for activations called as functions inside RoBERTa-style heads.

    ``*ClassificationHead``: ``out_proj(tanh(dense(x)))``; ``*LMHead``: ``layer_norm(gelu(dense(x)))``.
    """
    rules: list[tuple[nn.Module, HookRule]] = []
    for module in model.modules():
        name = type(module).__name__
        dense = getattr(module, "dense", None)
        if dense is None:
            continue
        if name.endswith("ClassificationHead") and hasattr(module, "out_proj"):
            rules.append((module.out_proj, FunctionalActivation(dense)))
        elif name.endswith("LMHead") and hasattr(module, "layer_norm"):
            rules.append((module.layer_norm, FunctionalActivation(dense)))
    return rules


register_adapter(BertAdapter())
