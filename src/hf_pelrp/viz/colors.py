"""Diverging colours for signed relevance: red for positive, blue for negative, white at zero.

One colour function serves every renderer (HTML, terminal), so a token has the same colour everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

#: endpoints of the diverging scale (ColorBrewer RdBu), the LRP convention: red supports the target
POSITIVE_RGB = (178, 24, 43)
NEGATIVE_RGB = (33, 102, 172)
WHITE_RGB = (255, 255, 255)


def color_scale(values: Sequence[float]) -> float:
    """The normaliser of a map: the largest absolute value (1.0 for an all-zero map, which stays white)."""
    peak = max((abs(v) for v in values), default=0.0)
    return peak if peak > 0 else 1.0


def diverging_rgb(value: float, scale: float) -> tuple[int, int, int]:
    """The colour of ``value`` on a symmetric scale ``[-scale, scale]``: white at 0, saturated at +-scale.

    Values beyond the scale are clipped; the colour is linear in ``|value| / scale`` between white and the
    endpoint of the sign's side.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    t = min(abs(value) / scale, 1.0)
    end = POSITIVE_RGB if value >= 0 else NEGATIVE_RGB
    return tuple(round(w + t * (e - w)) for w, e in zip(WHITE_RGB, end, strict=True))  # type: ignore[return-value]


def css_hex(rgb: tuple[int, int, int]) -> str:
    """``#rrggbb`` for an RGB triple."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def text_rgb(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``background`` (by relative luminance)."""
    r, g, b = background
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)
