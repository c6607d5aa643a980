"""More BERT-layout encoders, declared with :func:`~hf_pelrp.adapters.bert.bert_like` and proven by check_adapter.

- ``camembert``, ``data2vec-text``: RoBERTa under their own class names (positions counted from
  ``padding_idx + 1``, a single token-type vector as the ``"segment"`` leaf, the heads' ``tanh`` / ``gelu``
  applied as functions: identity rule through :class:`~hf_pelrp.adapters.base.FunctionalActivationSite`).
- ``roberta-prelayernorm``, ``xlm-roberta-xl``: RoBERTa with pre-LN blocks and a final LayerNorm: LayerNorms in
  other places, the same identity rule on each.
- ``ernie``: BERT; ``use_task_id=True`` adds a task-type embedding table, which no leaf declares: refused by
  name (its relevance would be lost), like any undeclared embedding table.

Heads: sequence classification, masked LM and causal LM (``*ForCausalLM``: causal with ``is_decoder=True``,
bidirectional otherwise, as the model computes it), as for XLM-R and ELECTRA. Cross-attention layers are
refused.
"""

from __future__ import annotations

import dataclasses

from .base import Adapter, register_adapter
from .bert import bert_like
from .electra import no_cross_attention

#: RoBERTa-style tiny instances: one token type, padding id 1
_ROBERTA_TINY = {"type_vocab_size": 1, "pad_token_id": 1}


def _encoder(model_type: str, prefix: str, *, roberta: bool) -> Adapter:
    return register_adapter(
        dataclasses.replace(
            bert_like(
                (model_type,),
                prefix,
                roberta=roberta,
                modules=(f"{prefix}ForCausalLM",),
                name=model_type,
                tiny=_ROBERTA_TINY if roberta else {},
            ),
            heads=("sequence_classification", "masked_lm", "causal_lm"),
            checks=(no_cross_attention,),
        )
    )


CAMEMBERT = _encoder("camembert", "Camembert", roberta=True)
DATA2VEC_TEXT = _encoder("data2vec-text", "Data2VecText", roberta=True)
ROBERTA_PRELAYERNORM = _encoder("roberta-prelayernorm", "RobertaPreLayerNorm", roberta=True)
XLM_ROBERTA_XL = _encoder("xlm-roberta-xl", "XLMRobertaXL", roberta=True)
ERNIE = _encoder("ernie", "Ernie", roberta=False)
