"""More BART-layout encoder-decoders (:func:`hf_pelrp.adapters.seq2seq.bart_like`): PLBart.

- ``plbart``: BART's layout (learned positions with offset 2, ``PLBartScaledWordEmbedding``: the token leaf is the
  scaled row, ``layernorm_embedding`` after the sum); its classification head is ``PLBartClassificationHead``.

``mvp`` has BART's layout but its ``MvpAttention`` computes attention inline (no dispatch through transformers'
attention interface), so it is refused by name (:mod:`hf_pelrp.adapters.refusals`).
"""

from __future__ import annotations

from .base import register_adapter
from .seq2seq import bart_like

register_adapter(
    bart_like(
        "plbart",
        "PLBart",
        description="learned absolute (offset 2), encoder and decoder",
        modules=("PLBartScaledWordEmbedding",),
        tiny={"scale_embedding": True},
    )
)
