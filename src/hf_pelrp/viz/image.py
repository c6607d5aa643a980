"""Static figures of an attribution (matplotlib, Agg, no display): image overlays for vision models, bar
charts for text.

For vision models the pixel map and the patch map are laid over the image (in grey, so the diverging colours
read clearly) and the position map on the patch grid is drawn beside them. Text attributions get a bar chart of
token and position relevance per token and, for rotary models, a layer x position heatmap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import AttributionInputError
from .view import MAP_TITLES, RowView, row_views, visible_text

#: diverging colour map matching viz.colors (red positive, blue negative, white at zero)
CMAP = "RdBu_r"


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def image_array(image: Any) -> np.ndarray:
    """An image as a float array in [0, 1], ``[H, W, 3]`` or ``[H, W]``.

    Accepts a PIL image, a numpy array or a tensor in ``HWC``, ``CHW`` or ``HW`` layout (``uint8`` or float;
    float images outside [0, 1], such as normalised ``pixel_values``, are min-max scaled per channel).
    """
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL without importing it
        image = np.asarray(image.convert("RGB"))
    arr = _as_numpy(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise AttributionInputError(
            f"image must be [H, W], [H, W, 3] or [3, H, W] (a PIL image, array or tensor), got shape {arr.shape}"
        )
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if arr.min() < 0 or arr.max() > 1:
        axes = (0, 1)
        lo, hi = arr.min(axis=axes, keepdims=True), arr.max(axis=axes, keepdims=True)
        arr = (arr - lo) / np.where(hi > lo, hi - lo, 1.0)
    return arr


def _grey(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _row_map(value: Any, row: int, name: str, batch: int) -> np.ndarray:
    arr = _as_numpy(value)
    if arr.ndim >= 2 and arr.shape[0] == batch:
        arr = arr[row]
    if name == "pixel_map" and arr.ndim == 3:  # [C, H, W]: relevance of a pixel is the sum over its channels
        arr = arr.sum(0)
    if name == "patch_map" and arr.ndim == 1:
        side = math.isqrt(arr.shape[0])
        if side * side != arr.shape[0]:
            raise AttributionInputError(f"patch_map of {arr.shape[0]} patches is not a square grid")
        arr = arr.reshape(side, side)
    if arr.ndim != 2:
        raise AttributionInputError(
            f"{name} must be [B, H, W] (or [B, N] patches), got shape {_as_numpy(value).shape}"
        )
    return arr


def _grid_shape(attr: Any, patch: np.ndarray | None) -> tuple[int, int] | None:
    if patch is not None:
        return patch.shape  # type: ignore[return-value]
    seq = attr.token.shape[-1]
    for prefix in (1, 2, 0):  # CLS; CLS + distillation (DeiT); no prefix
        side = math.isqrt(max(seq - prefix, 0))
        if side > 0 and side * side == seq - prefix:
            return side, side
    return None


def _symmetric(arr: np.ndarray) -> float:
    peak = float(np.abs(arr).max()) if arr.size else 0.0
    return peak if peak > 0 else 1.0


def _stored_image(attr: Any, row: int) -> Any:
    pixels = attr.extras.get("pixel_values")
    if isinstance(pixels, torch.Tensor) and pixels.dim() == 4:
        return pixels[row]
    return pixels


def _plain(text: str) -> str:
    """Text matplotlib shows literally: a ``$`` would otherwise start math mode (and fail on odd tokens)."""
    return text.replace("$", r"\$")


def _summary(view: RowView) -> str:
    label = f"{view.target_label!r} (id {view.target_id})" if view.target_label else f"id {view.target_id}"
    return _plain(f"target {label} · logit {view.target_value:.4g} · conservation gap {view.gap:.4g}")


def _vision_figure(attr: Any, row: int, image: Any, labels: Any, alpha: float) -> Figure:
    batch = attr.batch_size
    pixel = (
        _row_map(attr.extras["pixel_map"], row, "pixel_map", batch) if "pixel_map" in attr.extras else None
    )
    patch = (
        _row_map(attr.extras["patch_map"], row, "patch_map", batch) if "patch_map" in attr.extras else None
    )
    grid = _grid_shape(attr, patch)
    if grid is None:
        raise AttributionInputError(
            f"cannot lay {attr.token.shape[-1]} positions on a square patch grid; the attribution needs a patch_map"
        )
    n_patches = grid[0] * grid[1]
    positions = _as_numpy(attr.position[row])
    prefix = positions.shape[0] - n_patches
    if prefix < 0:
        raise AttributionInputError(
            f"{positions.shape[0]} positions cannot hold a {grid[0]}x{grid[1]} patch grid"
        )
    position_grid = positions[prefix:].reshape(grid)

    source = image if image is not None else _stored_image(attr, row)
    picture = image_array(source) if source is not None else None
    if picture is not None:
        height, width = picture.shape[:2]
    elif pixel is not None:
        height, width = pixel.shape
    else:
        height, width = grid
    extent = (0, width, height, 0)

    panels: list[tuple[str, np.ndarray | None, str]] = []
    if picture is not None:
        panels.append(("image", None, ""))
    if pixel is not None:
        panels.append(("pixel relevance", pixel, "bilinear"))
    if patch is not None:
        panels.append(("patch relevance", patch, "nearest"))
    prefix_note = ""
    if prefix:
        prefix_note = "\nprefix tokens: " + ", ".join(f"{v:+.3g}" for v in positions[:prefix])
    panels.append((f"position relevance{prefix_note}", position_grid, "nearest"))

    fig = Figure(figsize=(3.3 * len(panels), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, data, interpolation) in zip(axes, panels, strict=True):
        ax.set_axis_off()
        ax.set_title(name, fontsize=9)
        if picture is not None:
            if data is None:
                ax.imshow(picture, extent=extent, cmap="gray" if picture.ndim == 2 else None)
                continue
            ax.imshow(_grey(picture), cmap="gray", extent=extent, vmin=0, vmax=1)
        scale = _symmetric(data)
        shown = ax.imshow(
            data,
            cmap=CMAP,
            vmin=-scale,
            vmax=scale,
            alpha=alpha if picture is not None else 1.0,
            extent=extent,
            interpolation=interpolation,
        )
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    view = row_views(attr, labels=labels)[row]
    fig.suptitle(f"{_plain(attr.model_type or 'model')} · {_summary(view)}", fontsize=9)
    return fig


def _text_figure(attr: Any, row: int, tokens: Any, tokenizer: Any, labels: Any, hide_special: bool) -> Figure:
    view = row_views(attr, tokens=tokens, tokenizer=tokenizer, labels=labels)[row]
    shown = [i for i in range(len(view.positions)) if not (hide_special and view.special[i])] or list(
        range(len(view.positions))
    )
    names = [_plain(visible_text(view.tokens[i])) for i in shown]
    parts = [k for k in view.maps if k != "relevance"]
    has_layers = bool(view.position_by_layer)
    width = min(max(6.0, 0.45 * len(shown) + 2), 24.0)
    fig = Figure(figsize=(width, 6.2 if has_layers else 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if has_layers else 1, 1, squeeze=False)[:, 0]
    ax = axes[0]
    x = np.arange(len(shown))
    bar_w = 0.8 / len(parts)
    colours = {"token": "#b2182b", "position": "#2166ac", "segment": "#1b7837"}
    for j, k in enumerate(parts):
        ax.bar(
            x + (j - (len(parts) - 1) / 2) * bar_w,
            [view.maps[k][i] for i in shown],
            bar_w,
            label=MAP_TITLES[k],
            color=colours.get(k, "#777"),
        )
    ax.plot(x, [view.maps["relevance"][i] for i in shown], "ko", ms=3.5, label="combined")
    ax.axhline(0, color="#444", lw=0.6)
    ax.set_xticks(
        x, names, rotation=60 if len(shown) > 8 else 0, ha="right" if len(shown) > 8 else "center", fontsize=8
    )
    if view.explained is not None and view.explained in shown:
        ax.get_xticklabels()[shown.index(view.explained)].set_fontweight("bold")
    ax.set_ylabel("relevance (logit units)")
    ax.legend(fontsize=8, ncols=len(parts) + 1)
    ax.set_title(_summary(view), fontsize=9)
    if has_layers:
        grid = np.asarray(view.position_by_layer)[:, shown]
        scale = _symmetric(grid)
        lax = axes[1]
        im = lax.imshow(grid, cmap=CMAP, vmin=-scale, vmax=scale, aspect="auto", interpolation="nearest")
        lax.set_yticks(range(grid.shape[0]), [f"layer {i}" for i in range(grid.shape[0])], fontsize=8)
        lax.set_xticks(x, names, rotation=60 if len(shown) > 8 else 0, fontsize=8)
        lax.set_title("position relevance per layer (rotary cos + sin)", fontsize=9)
        fig.colorbar(im, ax=lax, fraction=0.03, pad=0.01)
    return fig


def plot(
    attr: Any,
    image: Any = None,
    *,
    row: int = 0,
    tokens: Sequence[str] | Sequence[Sequence[str]] | None = None,
    tokenizer: Any = None,
    labels: Mapping[int, str] | Sequence[str] | None = None,
    alpha: float = 0.6,
    hide_special: bool = True,
) -> Figure:
    """A matplotlib figure of one row of an attribution (not shown; save it or display it in a notebook).

    Vision attributions (``patch_map`` / ``pixel_map`` in ``attr.extras``): the image, the pixel map and the
    patch map laid over the image, and the position map on the patch grid beside them (the relevance of prefix
    tokens such as CLS is printed in its title). Text attributions: token / position / combined relevance per
    token, and per-layer position relevance for rotary models.

    Parameters
    ----------
    attr
        The :class:`~hf_pelrp.Attribution`.
    image
        The input image (PIL image, array or tensor; normalised ``pixel_values`` are rescaled for display).
        Defaults to ``attr.extras["pixel_values"]`` when the attribution kept it; without an image the maps
        are drawn alone.
    row
        Which row of the batch to draw.
    tokens, tokenizer, labels
        Token strings / a tokenizer / class names, as for :func:`hf_pelrp.viz.to_html`.
    alpha
        Opacity of the relevance overlay on the image.
    hide_special
        Leave special tokens out of the text bar chart.
    """
    if not -attr.batch_size <= row < attr.batch_size:
        raise AttributionInputError(f"row {row} is outside the batch of {attr.batch_size}")
    row = row % attr.batch_size
    if "pixel_map" in attr.extras or "patch_map" in attr.extras:
        return _vision_figure(attr, row, image, labels, alpha)
    if image is not None:
        raise AttributionInputError(
            "image= was given, but this attribution has no patch_map / pixel_map (it is not from a vision model)"
        )
    return _text_figure(attr, row, tokens, tokenizer, labels, hide_special)


def save_png(attr: Any, path: str | Path, image: Any = None, *, dpi: int = 120, **kwargs: Any) -> Path:
    """Draw :func:`plot` and write it to ``path`` as PNG; returns the path."""
    fig = plot(attr, image, **kwargs)
    path = Path(path)
    fig.savefig(path, dpi=dpi, format="png")
    return path
