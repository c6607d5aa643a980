"""Model types refused by name, with the reason (rather than a generic "not supported")."""

from __future__ import annotations

from .base import refuse_model_type

_RELATIVE = (
    "it encodes positions as relative attention biases, which hf_pelrp does not explain yet (its positional "
    "maps would be silently empty)."
)

REFUSED: dict[str, str] = {
    "t5": _RELATIVE,
    "mt5": _RELATIVE,
    "umt5": _RELATIVE,
    "longt5": _RELATIVE,
    "deberta": _RELATIVE,
    "deberta-v2": _RELATIVE,
    "transfo-xl": _RELATIVE,
    "xlnet": _RELATIVE,
    "funnel": _RELATIVE,
    "swin": _RELATIVE,
    "swinv2": _RELATIVE,
}

for _model_type, _reason in REFUSED.items():
    refuse_model_type(_model_type, _reason)
