"""The BERT family (``bert``, ``roberta``, ``distilbert``): word + token-type + learned (or sinusoidal) position
embeddings, post-LN encoders.

Rules (method.md sections 1-2): epsilon rule on every Linear (nothing to attach), the identity rule on every
LayerNorm (the embedding LayerNorm included) and every activation, including the pooler's ``tanh`` and the
activations RoBERTa's heads call as plain functions (``tanh`` in the classification head, ``gelu`` in the LM
head), and the ``"lrp"`` attention.

Leaves at ``e = word + token_type + position``: ``"token"`` (the word embedding or ``inputs_embeds``),
``"segment"`` (the token-type embedding, always a leaf: RoBERTa's single token type is one learned vector
added at every position, and as a leaf its share is reported instead of lost), ``"position"`` (with
``positional=True``). Encoders read their first token (CLS), so left padding is moved to the right internally
and the maps are put back where the user's tokens were; padding gets exactly 0.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..inputs import TextInputs
from ..positions import Additive
from .base import Adapter, FunctionalActivationSite, register_adapter
from .norms import layer_norm

TINY_ENCODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 97,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "pad_token_id": 0,
    "num_labels": 3,
}


def _encoder_only(model: nn.Module) -> None:
    if getattr(model.config, "is_decoder", False) or getattr(model.config, "add_cross_attention", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} is configured as a decoder (is_decoder=True or add_cross_attention=True); "
            "hf_pelrp supports the BERT family as encoders (sequence classification, masked LM)."
        )


def bert_classes(prefix: str, *extra: str) -> tuple[str, ...]:
    parts = (
        "ForSequenceClassification",
        "ForMaskedLM",
        "Model",
        "Embeddings",
        "Encoder",
        "Layer",
        "Attention",
        "SelfAttention",
        "SelfOutput",
        "Intermediate",
        "Output",
        "Pooler",
    )
    return tuple(prefix + p for p in parts) + extra


def bert_like(
    model_types: tuple[str, ...],
    prefix: str,
    *,
    roberta: bool = False,
    modules: tuple[str, ...] = (),
    **fields,
) -> Adapter:
    """A declaration for a BERT-layout encoder (``embeddings.*``, ``encoder.layer[i].attention.self``)."""
    if roberta:
        inputs = TextInputs(
            position_ids="count",
            position_offset=lambda c: c.pad_token_id + 1,
            max_positions=lambda c: c.max_position_embeddings - c.pad_token_id - 1,
            token_types="type_vocab_size",
            padding="right",
        )
        functional = (
            FunctionalActivationSite("classifier.dense", "classifier.out_proj"),
            FunctionalActivationSite("lm_head.dense", "lm_head.layer_norm"),
        )
        heads_classes = (f"{prefix}ClassificationHead", f"{prefix}LMHead")
    else:
        inputs = TextInputs(
            position_ids="count",
            max_positions=lambda c: c.max_position_embeddings,
            token_types="type_vocab_size",
            padding="right",
        )
        functional = ()
        heads_classes = (
            f"{prefix}OnlyMLMHead",
            f"{prefix}LMPredictionHead",
            f"{prefix}PredictionHeadTransform",
        )
    return Adapter(
        model_types=model_types,
        layers="encoder.layer",
        attention="attention.self",
        embeddings={
            "embeddings.word_embeddings": ("token",),
            "embeddings.token_type_embeddings": ("segment",),
        },
        positions=Additive({"embeddings.position_embeddings": "position"}),
        norms={"LayerNorm": layer_norm},
        modules=bert_classes(prefix, *heads_classes, *modules),
        functional=functional,
        inputs=fields.pop("inputs", inputs),
        heads=("sequence_classification", "masked_lm"),
        checks=(_encoder_only,),
        tiny={**TINY_ENCODER, **fields.pop("tiny", {})},
        **fields,
    )


register_adapter(bert_like(("bert",), "Bert", name="bert"))
register_adapter(
    bert_like(
        ("roberta",), "Roberta", roberta=True, name="roberta", tiny={"type_vocab_size": 1, "pad_token_id": 1}
    )
)


def _sinusoidal(model: nn.Module) -> str:
    return "fixed sinusoidal" if getattr(model.config, "sinusoidal_pos_embds", False) else "learned absolute"


register_adapter(
    Adapter(
        model_types=("distilbert",),
        name="distilbert",
        layers="transformer.layer",
        attention="attention",
        embeddings={"embeddings.word_embeddings": ("token",)},
        positions=Additive(
            {"embeddings.position_embeddings": "position"}, description="learned absolute or fixed sinusoidal"
        ),
        norms={"LayerNorm": layer_norm},
        modules=(
            "DistilBertForSequenceClassification",
            "DistilBertForMaskedLM",
            "DistilBertModel",
            "Embeddings",
            "Transformer",
            "TransformerBlock",
            "DistilBertSelfAttention",
            "FFN",
        ),
        inputs=TextInputs(
            position_ids="count", max_positions=lambda c: c.max_position_embeddings, padding="right"
        ),
        heads=("sequence_classification", "masked_lm"),
        tiny={
            "dim": 32,
            "hidden_dim": 64,
            "n_layers": 2,
            "n_heads": 4,
            "vocab_size": 97,
            "max_position_embeddings": 64,
            "pad_token_id": 0,
            "num_labels": 3,
        },
    )
)
