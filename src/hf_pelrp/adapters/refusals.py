"""Model types refused by name, with the reason (rather than a generic "not supported")."""

from __future__ import annotations

from .base import refuse_model_type

_RELATIVE = (
    "it encodes positions as relative attention biases, which hf_pelrp does not explain yet (its positional "
    "maps would be silently empty)."
)

_DISENTANGLED = (
    "its disentangled attention (content-to-position and position-to-content terms of shared relative "
    "embeddings) is computed inline; the position-factor leaves it needs are not implemented yet, so its "
    "positional maps would be silently empty."
)

REFUSED: dict[str, str] = {
    "longt5": _RELATIVE,
    "deberta": _DISENTANGLED,
    "transfo-xl": _RELATIVE,
    "xlnet": _RELATIVE,
    "funnel": _RELATIVE,
}

for _model_type, _reason in REFUSED.items():
    refuse_model_type(_model_type, _reason)
