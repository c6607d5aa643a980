"""Static figures of an attribution (matplotlib, Agg, nothing is displayed), coloured like the HTML report:
:func:`~hf_pelrp.viz.colors.matplotlib_cmap` is sampled from the same colour function (red supports the target,
blue speaks against it, white is zero).

- text: the tokens (decoded) against the combined / token / position maps as a heat strip with values, the
  target as text; for rotary models the layer x token heatmap of position relevance with each layer's total
  as a bar on its own axis;
- images (ViT / DeiT): the image, the pixel and patch maps laid over it (in grey, so the colours read) and the
  position map on the patch grid;
- vision-language models (a result with ``image``): the image, its patch content and position maps laid over it
  (one colour scale for both), and the text strip below;
- continuations: the target x source matrix (:func:`generation_plot`).

matplotlib is imported on first use (``pip install 'hf_pelrp[viz]'`` if it is missing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AttributionInputError
from .colors import MEANING, color_scale, diverging_rgb, matplotlib_cmap, text_rgb
from .deps import require
from .strings import quoted, visible_text
from .view import (
    MAP_TITLES,
    GenerationView,
    RowView,
    generation_view,
    is_generation,
    layer_chart_title,
    row_views,
)
from .vision import grey, image_array, image_view, is_vision
from .vlm import VLM_MAPS, image_panels, is_vlm

__all__ = ["generation_plot", "generation_png", "image_array", "plot", "save_png"]

#: values are printed in the cells of a heatmap with at most this many cells
ANNOTATE_CELLS = 400


def _figure(width: float, height: float) -> Any:
    figure = require("matplotlib.figure")
    agg = require("matplotlib.backends.backend_agg")
    fig = figure.Figure(figsize=(width, height), layout="constrained")
    agg.FigureCanvasAgg(fig)
    return fig


def _plain(text: str) -> str:
    """Text matplotlib shows literally: a ``$`` would otherwise start math mode (and fail on odd tokens)."""
    return text.replace("$", r"\$")


def _label(text: str) -> str:
    """A token for an axis label: visible whitespace, quoted when it starts or ends with a space."""
    shown = visible_text(text)
    return _plain(f"'{shown}'" if shown != shown.strip() else shown)


def _target_text(label: str | None, index: int | None) -> str:
    if label is None:
        return f"id {index}" if index is not None else "(unknown)"
    return f"{quoted(label)} (id {index})" if index is not None else quoted(label)


def _summary(view: RowView) -> str:
    text = f"target {_target_text(view.target_label, view.target_id)}"
    if view.foil_id is not None:
        text += f" vs foil {_target_text(view.foil_label, view.foil_id)}"
    return _plain(f"{text} · logit {view.target_value:.4g} · conservation gap {view.gap:.4g}")


def _rgb(value: float, scale: float) -> tuple[float, float, float]:
    r, g, b = diverging_rgb(value, scale)
    return r / 255, g / 255, b / 255


def _annotate(ax: Any, grid: np.ndarray, scale: float, fontsize: float) -> None:
    """Print each cell's value in it (black or white, as the HTML does); masked cells stay empty."""
    mask = np.ma.getmaskarray(grid)
    data = np.ma.getdata(grid)
    for r in range(data.shape[0]):
        for c in range(data.shape[1]):
            if mask[r, c]:
                continue
            colour = tuple(v / 255 for v in text_rgb(diverging_rgb(float(data[r, c]), scale)))
            ax.text(
                c, r, _short(float(data[r, c])), ha="center", va="center", fontsize=fontsize, color=colour
            )


def _short(x: float) -> str:
    magnitude = abs(x)
    if magnitude >= 9.95:
        return f"{x:.0f}"
    return f"{x:.1f}" if magnitude >= 0.995 else f"{x:.2f}"


#: at most this many token labels on an axis (every k-th beyond)
MAX_TICKS = 64


def _token_ticks(ax: Any, names: list[str], axis: str = "x") -> None:
    many = len(names) > 8 or max((len(n) for n in names), default=0) > 10
    step = -(-len(names) // MAX_TICKS)
    ticks = range(0, len(names), step)
    names = [names[i] for i in ticks]
    if axis == "x":
        ax.set_xticks(
            ticks,
            names,
            rotation=55 if many else 0,
            ha="right" if many else "center",
            rotation_mode="anchor",
            fontsize=8,
            family="monospace",
        )
    else:
        ax.set_yticks(ticks, names, fontsize=8, family="monospace")


def _outline(ax: Any, col: int, row_lo: float, row_hi: float) -> None:
    patches = require("matplotlib.patches")
    ax.add_patch(
        patches.Rectangle((col - 0.5, row_lo - 0.5), 1, row_hi - row_lo + 1, fill=False, lw=1.8, ec="#222")
    )


# ---- text --------------------------------------------------------------------------------------------------


def _strip(ax: Any, view: Any, shown: list[int], keys: list[str], scale: float, cmap_kw: dict) -> Any:
    """One heat strip (maps x tokens) with its values and the explained position outlined (bold label)."""
    names = [_label(view.tokens[i]) for i in shown]
    strip = np.array([[view.maps[k][i] for i in shown] for k in keys])
    image = ax.imshow(strip, aspect="auto", **cmap_kw)
    ax.set_yticks(range(len(keys)), [MAP_TITLES[k] for k in keys], fontsize=8)
    _token_ticks(ax, names)
    ax.tick_params(length=0)
    if len(shown) * len(keys) <= ANNOTATE_CELLS:
        _annotate(ax, strip, scale, 7 if len(shown) <= 20 else 6)
    if view.explained is not None and view.explained in shown:
        col = shown.index(view.explained)
        _outline(ax, col, 0, len(keys) - 1)
        for tick, label in zip(ax.get_xticks(), ax.get_xticklabels(), strict=True):
            if int(tick) == col:
                label.set_fontweight("bold")
    return image


def _shown(special: list[bool], hide_special: bool, keep: int | None = None) -> list[int]:
    """The indices drawn: without the special tokens (if asked), but always ``keep`` (the explained one)."""
    return [i for i in range(len(special)) if not (hide_special and special[i]) or i == keep] or list(
        range(len(special))
    )


def _text_figure(attr: Any, row: int, tokens: Any, tokenizer: Any, labels: Any, hide_special: bool) -> Any:
    view = row_views(attr, tokens=tokens, tokenizer=tokenizer, labels=labels)[row]
    decoder = view.decoder
    shown = _shown(view.special, hide_special)
    shown_dec = _shown(decoder.special, hide_special, decoder.explained) if decoder is not None else []
    names = [_label(view.tokens[i]) for i in shown]
    keys = list(view.maps)
    values = [view.maps[k][i] for k in keys for i in shown]
    if decoder is not None:  # source and target prefix of one explanation: one colour scale
        values += [decoder.maps[k][i] for k in keys for i in shown_dec]
    scale = color_scale(values)
    cmap = matplotlib_cmap()
    has_layers = bool(view.position_by_layer)
    layers = len(view.position_by_layer) if has_layers else 0
    every = names + [_label(decoder.tokens[i]) for i in shown_dec] if decoder is not None else names
    longest = max((len(n) for n in every), default=1)
    label_room = 0.09 * min(longest, 24) if max(len(shown), len(shown_dec)) > 8 or longest > 10 else 0.3
    width = min(max(7.0, 0.55 * max(len(shown), len(shown_dec)) + 3.2), 26.0)
    strip_h = 0.32 * len(keys) + 0.9 + label_room
    dec_h = strip_h if decoder is not None else 0.0
    layer_h = (0.17 * min(layers, 40) + 1.1 + label_room) if has_layers else 0.0
    fig = _figure(width, strip_h + dec_h + layer_h + 0.5)
    cmap_kw = {"cmap": cmap, "vmin": -scale, "vmax": scale, "interpolation": "nearest"}
    heights = [strip_h] + ([dec_h] if decoder is not None else []) + ([layer_h] if has_layers else [])
    grid_spec = fig.add_gridspec(
        len(heights), 2, height_ratios=heights, width_ratios=[max(len(shown), 2), 2.2]
    )
    ax = fig.add_subplot(grid_spec[0, :])
    shown_strip = _strip(ax, view, shown, keys, scale, cmap_kw)
    title = _summary(view)
    target = _target_text(view.target_label, None if view.target_label is not None else view.target_id)
    if decoder is not None:
        title += "\nsource (encoder input)"
        dax = fig.add_subplot(grid_spec[1, :])
        _strip(dax, decoder, shown_dec, keys, scale, cmap_kw)
        dax.set_title(
            _plain(f"decoder prefix (target side) · next token after the outlined position: {target}"),
            fontsize=9,
            loc="left",
        )
        bar = fig.colorbar(shown_strip, ax=[ax, dax], fraction=0.025, pad=0.01, aspect=20)
    else:
        if view.explained is not None:
            title += _plain(f"\nnext token after the outlined position: {target}")
        bar = fig.colorbar(shown_strip, ax=ax, fraction=0.025, pad=0.01, aspect=12)
    ax.set_title(title, fontsize=9, loc="left")
    bar.ax.tick_params(labelsize=7)
    bar.set_label("relevance (logit units)\nred supports, blue opposes", fontsize=7)
    if has_layers:
        grid = np.asarray(view.position_by_layer)[:, shown]
        grid_scale = color_scale(grid.reshape(-1).tolist())
        lax = fig.add_subplot(grid_spec[-1, 0])
        heat = lax.imshow(
            grid, aspect="auto", cmap=cmap, vmin=-grid_scale, vmax=grid_scale, interpolation="nearest"
        )
        step = max(1, -(-layers // 16))
        lax.set_yticks(range(0, layers, step), [f"layer {i}" for i in range(0, layers, step)], fontsize=7)
        _token_ticks(lax, names)
        over = " over the source" if decoder is not None else ""
        heading = f"position relevance per layer{over}: {layer_chart_title(attr)}"
        if len(heading) > 64:  # a long kind (T5's bias table) on its own line, clear of the bars' axis labels
            heading = heading.replace(": ", ":\n", 1)
        lax.set_title(_plain(heading), fontsize=9, loc="left")
        totals = grid.sum(1)
        bar_scale = color_scale(totals.tolist())
        tax = fig.add_subplot(grid_spec[-1, 1], sharey=lax)
        tax.barh(range(layers), totals, color=[_rgb(t, bar_scale) for t in totals], edgecolor="#888", lw=0.4)
        tax.axvline(0, color="#444", lw=0.6)
        tax.set_xlim(-1.05 * bar_scale, 1.05 * bar_scale)
        tax.tick_params(axis="y", left=False, labelleft=False)
        tax.tick_params(axis="x", labelsize=7)
        tax.set_xlabel("layer total", fontsize=8)
        tax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        tax.xaxis.get_offset_text().set_fontsize(7)
        cbar = fig.colorbar(heat, ax=tax, fraction=0.12, pad=0.04, aspect=15)
        cbar.set_label("cells: position relevance", fontsize=7)
        cbar.ax.tick_params(labelsize=7)
        cbar.formatter.set_powerlimits((-2, 3))
        cbar.ax.yaxis.get_offset_text().set_fontsize(7)
    return fig


# ---- images ------------------------------------------------------------------------------------------------


def _vision_figure(attr: Any, row: int, image: Any, labels: Any, alpha: float) -> Any:
    if isinstance(image, list | tuple):  # one image per row of the batch
        if len(image) != attr.batch_size:
            raise AttributionInputError(
                f"image= is a list of {len(image)} images, but the attribution has {attr.batch_size} rows"
            )
        image = image[row]
    view = image_view(attr, row, image)
    picture = view.picture
    extent = (0, view.width, view.height, 0)
    panels: list[tuple[str, np.ndarray | None, str]] = []
    if picture is not None:
        panels.append(("image", None, ""))
    if "pixel" in view.maps:
        panels.append(("pixel relevance", view.maps["pixel"], "bilinear"))
    if "patch_map" in attr.extras:
        panels.append(("patch relevance", view.maps["patch"], "nearest"))
    prefix_note = ""
    if view.prefix:
        prefix_note = "\n" + ", ".join(f"{_plain(name)} {p:+.3g}" for name, _t, p in view.prefix)
    panels.append((f"position relevance{prefix_note}", view.maps["position"], "nearest"))

    cmap = matplotlib_cmap()
    cm = require("matplotlib.cm")
    fig = _figure(3.3 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, data, interpolation) in zip(axes, panels, strict=True):
        ax.set_axis_off()
        ax.set_title(name, fontsize=9)
        if picture is not None:
            if data is None:
                ax.imshow(picture, extent=extent, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1)
                continue
            ax.imshow(grey(picture), cmap="gray", extent=extent, vmin=0, vmax=1)
        scale = color_scale(np.abs(data).reshape(-1).tolist())
        shown = ax.imshow(
            data,
            cmap=cmap,
            vmin=-scale,
            vmax=scale,
            alpha=alpha if picture is not None else 1.0,
            extent=extent,
            interpolation=interpolation,
        )
        # the scale in the map's own colours (the overlay's alpha would stripe the colour bar)
        opaque = cm.ScalarMappable(norm=shown.norm, cmap=cmap)
        bar = fig.colorbar(opaque, ax=ax, fraction=0.046, pad=0.02)
        bar.ax.tick_params(labelsize=7)
        bar.formatter.set_powerlimits((-2, 3))
        bar.ax.yaxis.get_offset_text().set_fontsize(7)
    summary = row_views(attr, labels=labels)[row]
    fig.suptitle(f"{_plain(attr.model_type or 'model')} · {_summary(summary)}\n{MEANING}", fontsize=9)
    return fig


# ---- vision-language models ---------------------------------------------------------------------------------


def _vlm_figure(
    attr: Any,
    row: int,
    image: Any,
    tokens: Any,
    tokenizer: Any,
    labels: Any,
    hide_special: bool,
    alpha: float,
) -> Any:
    """The image (if given) and the patch content / position maps over it, one scale for both (they compare),
    above the text strip of the same row (its own scale: text and patches differ by orders of magnitude)."""
    if isinstance(image, list | tuple):
        if len(image) != attr.batch_size:
            raise AttributionInputError(
                f"image= is a list of {len(image)} images, but the attribution has {attr.batch_size} rows"
            )
        image = image[row]
    panel = image_panels(attr[row] if attr.batch_size > 1 else attr, image)[0]
    view = row_views(attr, tokens=tokens, tokenizer=tokenizer, labels=labels)[row]
    shown = _shown(view.special, hide_special, view.explained)
    keys = list(view.maps)
    picture = panel.picture
    panels: list[tuple[str, np.ndarray | None]] = [("image", None)] if picture is not None else []
    panels += [(f"{VLM_MAPS[k]} · sum {panel.maps[k].sum():.3g}", panel.maps[k]) for k in panel.maps]
    cmap = matplotlib_cmap()
    cm = require("matplotlib.cm")
    width = max(3.3 * len(panels), min(0.55 * len(shown) + 3.2, 26.0))
    fig = _figure(width, 6.4)
    grid = fig.add_gridspec(2, len(panels), height_ratios=[3.6, 2.0])
    extent = (0, panel.width, panel.height, 0)
    scale = color_scale(np.abs(np.concatenate([m.reshape(-1) for m in panel.maps.values()])).tolist())
    for i, (name, data) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        ax.set_axis_off()
        ax.set_title(_plain(name), fontsize=9)
        if picture is not None:
            if data is None:
                ax.imshow(picture, extent=extent, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1)
                continue
            ax.imshow(grey(picture), cmap="gray", extent=extent, vmin=0, vmax=1)
        shown_map = ax.imshow(
            data,
            cmap=cmap,
            vmin=-scale,
            vmax=scale,
            alpha=alpha if picture is not None else 1.0,
            extent=extent,
            interpolation="nearest",
        )
        bar = fig.colorbar(cm.ScalarMappable(norm=shown_map.norm, cmap=cmap), ax=ax, fraction=0.046, pad=0.02)
        bar.ax.tick_params(labelsize=7)
        bar.formatter.set_powerlimits((-2, 3))
        bar.ax.yaxis.get_offset_text().set_fontsize(7)
    text_scale = color_scale([view.maps[k][i] for k in keys for i in shown])
    tax = fig.add_subplot(grid[1, :])
    cmap_kw = {"cmap": cmap, "vmin": -text_scale, "vmax": text_scale, "interpolation": "nearest"}
    strip = _strip(tax, view, shown, keys, text_scale, cmap_kw)
    target = _target_text(view.target_label, None if view.target_label is not None else view.target_id)
    tax.set_title(
        _plain(
            f"text {panel.text_total:.4g} · image {panel.image_total:.4g} (special tokens {panel.special:.3g})"
            f" · next token after the outlined position: {target}"
        ),
        fontsize=9,
        loc="left",
    )
    tbar = fig.colorbar(strip, ax=tax, fraction=0.025, pad=0.01, aspect=12)
    tbar.ax.tick_params(labelsize=7)
    fig.suptitle(f"{_plain(attr.model_type or 'model')} · {_summary(view)}\n{MEANING}", fontsize=9)
    return fig


# ---- continuations -----------------------------------------------------------------------------------------


def _generation_figure(
    view: GenerationView, gen: Any, map_key: str, hide_special: bool, scale: str, annotate: bool | None
) -> Any:
    if map_key not in view.map_keys:
        raise AttributionInputError(f"map must be one of {view.map_keys}, got {map_key!r}")
    if scale not in ("row", "matrix"):
        raise AttributionInputError(f"scale must be 'row' or 'matrix', got {scale!r}")
    columns = [c for c in range(len(view.tokens)) if not (hide_special and view.special[c])] or list(
        range(len(view.tokens))
    )
    data = np.array([[row.maps[map_key][c] for c in columns] for row in view.rows], dtype=np.float64)
    future = np.array([[c >= row.visible for c in columns] for row in view.rows])
    values = np.ma.masked_array(data, mask=future)
    visible_abs = np.where(future, 0.0, np.abs(data))
    if scale == "row":
        scales = np.array([color_scale(r.tolist()) for r in visible_abs])
    else:
        scales = np.full(len(view.rows), color_scale(visible_abs.reshape(-1).tolist()))
    normalised = np.ma.masked_array(data / scales[:, None], mask=future)

    rows, cols = data.shape
    names = [_label(view.tokens[c]) for c in columns]
    row_names = [("→ " if not view.span else "") + _label(r.label) for r in view.rows]
    longest = max((len(n) for n in names), default=1)
    width = min(max(6.5, 0.55 * cols + 0.09 * max(len(n) for n in row_names) + 3.5), 26.0)
    height = min(max(3.0, 0.36 * rows + 1.4 + (0.08 * min(longest, 24) if cols > 8 else 0.3)), 20.0)
    fig = _figure(width, height)
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib_cmap()
    shown = ax.imshow(normalised, aspect="auto", cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    _token_ticks(ax, names)
    _token_ticks(ax, row_names, axis="y")
    ax.tick_params(length=0)
    if annotate is None:
        annotate = rows * cols <= ANNOTATE_CELLS
    if annotate:
        mask = np.ma.getmaskarray(values)
        for r in range(rows):
            for c in range(cols):
                if not mask[r, c]:
                    colour = tuple(v / 255 for v in text_rgb(diverging_rgb(float(normalised[r, c]), 1.0)))
                    ax.text(
                        c, r, _short(float(data[r, c])), ha="center", va="center", fontsize=7, color=colour
                    )
    for r, row in enumerate(view.rows):
        if row.explained in columns:
            _outline(ax, columns.index(row.explained), r, r)
    if view.prompt_length in columns:
        ax.axvline(columns.index(view.prompt_length) - 0.5, color="#555", lw=1.2)
    right = ax.secondary_yaxis("right")
    value_name = "logit" if gen.foil is None else "logit diff."
    right.set_yticks(
        range(rows), [f"{value_name} {r.target_value:.3g} · gap {r.gap:.2g}" for r in view.rows], fontsize=7
    )
    right.tick_params(length=0)
    title = (
        f"continuation attribution · {MAP_TITLES[map_key]} map · rows: explained tokens, columns: input "
        f"(line: start of the continuation; outlined: the position each token is read from; grey: future)"
    )
    ax.set_title(_plain(title), fontsize=8.5, loc="left", wrap=True)
    bar = fig.colorbar(shown, ax=ax, fraction=0.03, pad=0.02, aspect=15)
    bar.ax.tick_params(labelsize=7)
    bar.set_label(
        ("relative to each row's largest |value|" if scale == "row" else f"relative to ±{scales[0]:.3g}")
        + "\nred supports, blue opposes",
        fontsize=7,
    )
    return fig


def generation_plot(
    gen: Any,
    *,
    map: str = "relevance",  # noqa: A002 - the name the HTML report's switch uses
    tokens: Sequence[str] | None = None,
    tokenizer: Any = None,
    labels: Mapping[int, str] | Sequence[str] | None = None,
    hide_special: bool = True,
    scale: str = "row",
    annotate: bool | None = None,
) -> Any:
    """A matplotlib figure of a :class:`~hf_pelrp.GenerationAttribution` as a target x source matrix.

    Parameters
    ----------
    gen
        The generation attribution.
    map
        ``"relevance"`` (combined, default), ``"token"``, ``"position"`` (or ``"segment"``).
    tokens, tokenizer, labels
        As for :func:`hf_pelrp.viz.generation_html`; by default the attribution's own ``tokens`` / ``labels``.
    hide_special
        Leave special-token columns out.
    scale
        ``"row"``: each row on its own scale (default); ``"matrix"``: one scale for all rows.
    annotate
        Print the values in the cells (default: when the matrix has at most 400 cells).
    """
    view = generation_view(gen, tokens=tokens, tokenizer=tokenizer, labels=labels)
    return _generation_figure(view, gen, map, hide_special, scale, annotate)


def generation_png(gen: Any, path: str | Path, *, dpi: int = 130, **kwargs: Any) -> Path:
    """Draw :func:`generation_plot` and write it to ``path`` as PNG; returns the path."""
    fig = generation_plot(gen, **kwargs)
    path = Path(path)
    fig.savefig(path, dpi=dpi, format="png")
    return path


# ---- entry points ------------------------------------------------------------------------------------------


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
    **kwargs: Any,
) -> Any:
    """A matplotlib figure of one row of an attribution (not shown; save it or display it in a notebook).

    Vision attributions (``patch_map`` / ``pixel_map`` in ``attr.extras``): the image, the pixel map and the
    patch map laid over the image, and the position map on the patch grid beside them (the relevance of prefix
    tokens such as CLS is printed in its title). Text attributions: a heat strip of combined / token /
    position relevance per (decoded) token with the values, and per-layer position relevance for rotary
    models. A :class:`~hf_pelrp.GenerationAttribution` gives :func:`generation_plot` (``map=``, ``scale=``).

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
        Token strings / a tokenizer / class names, as for :func:`hf_pelrp.viz.to_html`; by default the
        attribution's own ``tokens`` and ``labels``.
    alpha
        Opacity of the relevance overlay on the image.
    hide_special
        Leave special tokens out of the text figure.
    """
    if is_generation(attr):
        if image is not None:
            raise AttributionInputError("image= does not apply to a continuation attribution")
        return generation_plot(
            attr, tokens=tokens, tokenizer=tokenizer, labels=labels, hide_special=hide_special, **kwargs
        )
    if kwargs:
        raise TypeError(f"plot() got unexpected keyword arguments {sorted(kwargs)}")
    if not -attr.batch_size <= row < attr.batch_size:
        raise AttributionInputError(f"row {row} is outside the batch of {attr.batch_size}")
    row = row % attr.batch_size
    if is_vlm(attr):
        return _vlm_figure(attr, row, image, tokens, tokenizer, labels, hide_special, alpha)
    if is_vision(attr):
        return _vision_figure(attr, row, image, labels, alpha)
    if image is not None:
        raise AttributionInputError(
            "image= was given, but this attribution has no image maps (it is not from a vision model)"
        )
    return _text_figure(attr, row, tokens, tokenizer, labels, hide_special)


def save_png(attr: Any, path: str | Path, image: Any = None, *, dpi: int = 130, **kwargs: Any) -> Path:
    """Draw :func:`plot` and write it to ``path`` as PNG; returns the path."""
    fig = plot(attr, image, **kwargs)
    path = Path(path)
    fig.savefig(path, dpi=dpi, format="png")
    return path
