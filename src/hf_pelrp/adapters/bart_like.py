"""The BART-layout encoder-decoders: mBART, Marian, Pegasus, Blenderbot, Blenderbot-small and M2M100 (NLLB
checkpoints are ``m2m_100`` models), declared with BART's building blocks
(:func:`hf_pelrp.adapters.seq2seq.bart_like`).

They differ from BART only in what the rules see as constants or leaves, never in a rule:

- ``mbart``: learned positions with offset 2 like BART, a ``*ScaledWordEmbedding`` (the token leaf is the scaled
  row), ``layernorm_embedding`` after the sum and a final ``layer_norm`` on each side (LayerNorms: identity rule).
- ``marian``, ``pegasus``: fixed sinusoidal tables (``nn.Embedding`` subclasses indexed with a 1-D ``arange``: the
  [T, H] block becomes one ``"position"`` / ``"target_position"`` leaf per row, :class:`hf_pelrp.positions.
  SharedRows`); the embedding scale multiplies the token leaf outside the table (a constant factor). Pegasus has
  final layer norms.
- ``blenderbot``: learned positions without offset, final layer norms; ``blenderbot-small``: learned positions
  without offset, ``layernorm_embedding`` (after the sum in the encoder, on the token embedding alone before the
  positions are added in the decoder: both LayerNorms are identity-rule linear maps of their input).
- ``m2m_100``: a sinusoidal table (a plain ``nn.Module``, declared by class name) whose position ids count the
  non-pad tokens from ``padding_idx + 1`` (pad ids get the zero row); its output is detached by the module, and
  the leaf is that output.

The heads are BART's where transformers has them: ``*ForConditionalGeneration`` (``MarianMTModel`` for Marian,
registered as a sequence-to-sequence LM head) and ``MBartForSequenceClassification``.
"""

from __future__ import annotations

from ..heads import SEQ2SEQ_LM, register_head_class
from .base import register_adapter
from .seq2seq import bart_like

_LM = ("seq2seq_lm",)

register_adapter(
    bart_like(
        "mbart",
        "MBart",
        description="learned absolute (offset 2), encoder and decoder",
        tiny={"scale_embedding": True},
    )
)
register_head_class("marian", "MarianMTModel", SEQ2SEQ_LM)
register_adapter(
    bart_like(
        "marian",
        "Marian",
        description="fixed sinusoidal, encoder and decoder",
        modules=("MarianMTModel",),
        heads=_LM,
        tiny={"scale_embedding": True, "decoder_start_token_id": 1},
    )
)
register_adapter(
    bart_like(
        "pegasus",
        "Pegasus",
        description="fixed sinusoidal, encoder and decoder",
        heads=_LM,
        tiny={"scale_embedding": True},
    )
)
register_adapter(
    bart_like(
        "blenderbot",
        "Blenderbot",
        description="learned absolute, encoder and decoder",
        heads=_LM,
        tiny={"scale_embedding": True},
    )
)
register_adapter(
    bart_like(
        "blenderbot-small",
        "BlenderbotSmall",
        description="learned absolute, encoder and decoder",
        heads=_LM,
        tiny={"scale_embedding": True},
    )
)
register_adapter(
    bart_like(
        "m2m_100",
        "M2M100",
        description="fixed sinusoidal (ids from padding_idx + 1), encoder and decoder",
        modules=("M2M100SinusoidalPositionalEmbedding",),
        heads=_LM,
        tiny={"scale_embedding": True},
    )
)
