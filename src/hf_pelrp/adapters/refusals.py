"""Model types refused by name, with the reason (rather than a generic "not supported")."""

from __future__ import annotations

from .base import refuse_model_type
from .more_decoders import (
    DYNAMIC_MASK,
    MIXTURE_OF_ATTENTION,
    SINKS,
)

_RELATIVE = (
    "it encodes positions as relative attention biases, which hf_pelrp does not explain yet (its positional "
    "maps would be silently empty)."
)

_DISENTANGLED = (
    "its disentangled attention (content-to-position and position-to-content terms of shared relative "
    "embeddings) is computed inline; the position-factor leaves it needs are not implemented yet, so its "
    "positional maps would be silently empty."
)

_STATE_SPACE = (
    "it is a state-space / linear-recurrent model (a selective scan or recurrence over the sequence, no "
    "attention): PE-LRP's rules and positional leaves are defined for attention models, so it is outside the "
    "method."
)

_HYBRID = (
    "it is a hybrid whose {layers} layers are recurrent (state-space, linear-attention or convolutional "
    "recurrences) beside its attention layers; hf_pelrp has no rules for those layers, and explaining only the "
    "attention layers would silently drop the relevance that flows through the others."
)

REFUSED: dict[str, str] = {
    "longt5": _RELATIVE,
    "deberta": _DISENTANGLED,
    "transfo-xl": _RELATIVE,
    "xlnet": _RELATIVE,
    "funnel": _RELATIVE,
    **dict.fromkeys(("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm"), _STATE_SPACE),
    **{
        model_type: _HYBRID.format(layers=layers)
        for model_type, layers in (
            ("jamba", "Mamba"),
            ("zamba", "Mamba"),
            ("zamba2", "Mamba-2"),
            ("bamba", "Mamba-2"),
            ("falcon_h1", "Mamba-2"),
            ("granitemoehybrid", "Mamba-2"),
            ("nemotron_h", "Mamba-2"),
            ("lfm2", "short-convolution"),
            ("lfm2_moe", "short-convolution"),
            ("recurrent_gemma", "RG-LRU"),
            ("qwen3_next", "Gated DeltaNet (linear attention)"),
            ("qwen3_5", "Gated DeltaNet (linear attention)"),
            ("kimi_linear", "Kimi Delta Attention (linear attention)"),
            ("minimax", "lightning (linear) attention"),
        )
    },
    "gpt_oss": SINKS,
    "granite_swa": SINKS,
    "granitemoe_swa": SINKS,
    "doge": DYNAMIC_MASK,
    "jetmoe": MIXTURE_OF_ATTENTION,
}

for _model_type, _reason in REFUSED.items():
    refuse_model_type(_model_type, _reason)
