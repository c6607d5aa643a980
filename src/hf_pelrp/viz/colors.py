"""Diverging colours for signed relevance: red for positive (supports the target), blue for negative (speaks
against it), white at zero.

One colour function serves every renderer: the HTML report, the terminal table and the matplotlib figures
(:func:`matplotlib_cmap` is sampled from :func:`diverging_rgb`), so a value has the same colour everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: endpoints of the diverging scale (ColorBrewer RdBu), the LRP convention: red supports the target
POSITIVE_RGB = (178, 24, 43)
NEGATIVE_RGB = (33, 102, 172)
WHITE_RGB = (255, 255, 255)

#: what the colours mean, for legends
MEANING = "red: supports the target, blue: speaks against it"

#: levels of the matplotlib colour map (odd, so that 0 has a level of its own: white)
CMAP_LEVELS = 511


def color_scale(values: Sequence[float] | Any) -> float:
    """The normaliser of a map: the largest absolute value (1.0 for an all-zero map, which stays white)."""
    peak = max((abs(float(v)) for v in values), default=0.0)
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


def diverging_rgb_array(values: Any, scale: float) -> np.ndarray:
    """:func:`diverging_rgb` of every element of ``values``: a ``uint8`` array of shape ``values.shape + (3,)``
    (the same numbers, computed at once)."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    v = np.asarray(values, dtype=np.float64)
    t = np.minimum(np.abs(v) / scale, 1.0)[..., None]
    end = np.where(
        (v >= 0)[..., None], np.array(POSITIVE_RGB, np.float64), np.array(NEGATIVE_RGB, np.float64)
    )
    white = np.array(WHITE_RGB, np.float64)
    return np.rint(white + t * (end - white)).astype(np.uint8)


def css_hex(rgb: tuple[int, int, int]) -> str:
    """``#rrggbb`` for an RGB triple."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def text_rgb(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``background`` (by relative luminance)."""
    r, g, b = background
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def css_gradient() -> str:
    """The scale as a CSS gradient, blue (negative) to white to red (positive), for legends."""
    return f"linear-gradient(90deg,{css_hex(NEGATIVE_RGB)},{css_hex(WHITE_RGB)} 50%,{css_hex(POSITIVE_RGB)})"


def matplotlib_cmap() -> Any:
    """A matplotlib colour map sampled from :func:`diverging_rgb` (use it with ``vmin=-scale, vmax=scale``):
    the figures colour a value as the HTML report does, to within one level of 511."""
    from .deps import require

    colors = require("matplotlib.colors")
    levels = np.linspace(-1.0, 1.0, CMAP_LEVELS)
    table = diverging_rgb_array(levels, 1.0).astype(np.float64) / 255.0
    cmap = colors.ListedColormap(table, name="hf_pelrp_diverging")
    return cmap.with_extremes(bad="#e9e9e9")  # masked cells (a causal row's future) are grey, not a value
