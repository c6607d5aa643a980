"""XLM-RoBERTa (``xlm-roberta``): the RoBERTa layout (:func:`hf_pelrp.adapters.bert.bert_like` with
``roberta=True``): positions counted from ``padding_idx + 1``, the classification head's ``tanh`` and the LM
head's ``gelu`` applied as functions (identity rule through :class:`FunctionalActivationSite`).

Its single token-type vector is the ``"segment"`` leaf: one learned vector added at every position, whose share
is reported (``attr.segment``) rather than lost, so bias-free CP conservation is exact, as for RoBERTa.
Heads: sequence classification, masked LM and causal LM (``XLMRobertaForCausalLM``: causal with
``is_decoder=True``, bidirectional otherwise, as the model computes it). Cross-attention layers are refused.
"""

from __future__ import annotations

import dataclasses

from .base import register_adapter
from .bert import bert_like
from .electra import no_cross_attention

XLM_ROBERTA = register_adapter(
    dataclasses.replace(
        bert_like(
            ("xlm-roberta",),
            "XLMRoberta",
            roberta=True,
            modules=("XLMRobertaForCausalLM",),
            name="xlm-roberta",
            tiny={"type_vocab_size": 1, "pad_token_id": 1},
        ),
        heads=("sequence_classification", "masked_lm", "causal_lm"),
        checks=(no_cross_attention,),
    )
)
