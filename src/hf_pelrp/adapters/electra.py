"""ELECTRA (``electra``): the BERT layout with factorised embeddings (``embedding_size`` may differ from
``hidden_size``: a linear ``embeddings_project`` maps the embedding sum into the encoder).

Rules: those of the BERT family (:mod:`hf_pelrp.adapters.bert`): the epsilon rule on every linear map (the
embedding projection included: nothing to attach), the identity rule on every LayerNorm and on every
activation module (the encoder's ``hidden_act``, the GELU of the classification head and of the generator
head), the ``"lrp"`` attention. Leaves at ``e = word + token_type + position`` (before the projection):
``"token"``, ``"segment"`` and ``"position"``.

Heads: sequence classification (CLS, then ``dense``, GELU, ``out_proj``), masked LM and causal LM (the
generator head ``dense``, GELU, LayerNorm, vocabulary projection). ``ElectraForCausalLM`` is explained as the
model computes it: with ``is_decoder=True`` causally; without it (transformers warns) every position attends to
the whole input. Cross-attention layers are refused.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..errors import UnsupportedModelError
from .base import register_adapter
from .bert import bert_like


def no_cross_attention(model: nn.Module) -> None:
    """Refuse a BERT-layout model with cross-attention layers: relevance flowing into
    ``encoder_hidden_states`` would be lost."""
    if getattr(model.config, "add_cross_attention", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} has cross-attention layers (add_cross_attention=True, e.g. the decoder of an "
            "EncoderDecoderModel): relevance flowing into encoder_hidden_states would be lost and conservation "
            "broken. Load it without add_cross_attention."
        )


ELECTRA = register_adapter(
    dataclasses.replace(
        bert_like(
            ("electra",),
            "Electra",
            modules=("ElectraForCausalLM", "ElectraClassificationHead", "ElectraGeneratorPredictions"),
            name="electra",
            tiny={"embedding_size": 16},
        ),
        heads=("sequence_classification", "masked_lm", "causal_lm"),
        checks=(no_cross_attention,),
    )
)
