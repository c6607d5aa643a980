"""Self-contained HTML reports, rendered from Jinja2 templates (``viz/templates``) with autoescape on.

- text (:func:`to_html` of a text :class:`~hf_pelrp.Attribution`): tokens coloured by relevance, switchable
  maps, hideable special tokens, the per-layer position chart of rotary models;
- image (:func:`to_html` of a ViT / DeiT attribution): the image with the pixel, patch, token and position maps
  as switchable overlays (embedded PNGs), or the maps alone without an image;
- generation (:func:`generation_html` of a :class:`~hf_pelrp.GenerationAttribution`): a target x source matrix,
  per-layer charts per token on demand;
- vision-language models (a result with ``image``): the text report (or the matrix) with the image's patch maps
  (content and positions, two panels) drawn on the image passed as ``image=``; one panel per generated token.

Everything is inline (CSS, one constant script, the data as JSON, images as ``data:`` URLs): the page makes no
network request. Text is escaped by the templates; every token string sits in a ``<bdi>`` (bidirectional text
cannot reorder its neighbours) and lone surrogates are replaced; the JSON block cannot close its ``<script>``
(``<``, ``>``, ``&`` are ``\\u003c`` etc.). A full page carries a Content-Security-Policy that forbids network
access and allows only the page's own script (by hash), so even a bug in escaping could not run injected code.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.resources
import json
import secrets
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AttributionInputError
from .colors import MEANING, color_scale, css_gradient, css_hex, diverging_rgb, diverging_rgb_array, text_rgb
from .deps import require
from .strings import clean, quoted, visible_text
from .view import MAP_TITLES, Labels, RowView, generation_view, is_generation, layer_chart_title, row_views
from .vision import IMAGE_MAPS, ImageView, image_views, is_vision, picture_pixels, png_data_url
from .vlm import VLM_MAPS, ImagePanel, image_panels, is_vlm

#: the longer side of an image report's picture, in CSS pixels
IMAGE_DISPLAY_SIZE = 320
#: the longer side of each of a vision-language report's two image panels (they sit beside the text)
VLM_DISPLAY_SIZE = 224
#: the initial opacity (percent) of a relevance overlay on an image
OVERLAY_OPACITY = 70
_MODES = {"attnlrp": "AttnLRP", "cp": "CP-LRP"}


# ---- templates and the page's security policy ---------------------------------------------------------------


@functools.cache
def _asset(name: str) -> str:
    return (importlib.resources.files("hf_pelrp.viz") / "templates" / name).read_text(encoding="utf-8")


@functools.cache
def _environment() -> Any:
    jinja2 = require("jinja2")
    return jinja2.Environment(
        loader=jinja2.PackageLoader("hf_pelrp.viz", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )


def viewer_script() -> str:
    """The one constant script of every report (it is allowed by its hash, see :func:`content_security_policy`)."""
    return _asset("report.js")


def script_hash() -> str:
    """The base64 SHA-256 of :func:`viewer_script`, as the Content-Security-Policy names it."""
    return base64.b64encode(hashlib.sha256(viewer_script().encode("utf-8")).digest()).decode("ascii")


def content_security_policy() -> str:
    """The policy of a full page: nothing from the network, images only as ``data:`` URLs, inline styles, and
    no script but the viewer's own."""
    return (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{script_hash()}'; connect-src 'none'; form-action 'none'; base-uri 'none'"
    )


def json_for_script(data: Any) -> str:
    """``data`` as JSON that is safe inside a ``<script>`` element: no ``<``, ``>``, ``&`` (so no ``</script>``
    or ``<!--``), no raw U+2028 / U+2029, no NaN / Infinity (which are not JSON)."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _render(template: str, path: str | Path | None, **context: Any) -> str:
    markup = require("markupsafe")
    env = _environment()
    context.setdefault("root_id", f"hfp-{secrets.token_hex(4)}")
    context["heading"] = clean(context["heading"])
    page = env.get_template(template).render(
        csp=content_security_policy(),
        css=markup.Markup(_asset("report.css")),
        script=markup.Markup(viewer_script()),
        data_json=markup.Markup(json_for_script(context.pop("data"))),
        gradient=css_gradient(),
        **context,
    )
    page = clean(page).strip() + (
        "\n" if context.get("full_page") else ""
    )  # clean: valid UTF-8 whatever came
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page


def _meta(attr: Any) -> dict[str, str]:
    return {
        "model_type": clean(attr.model_type or "unknown"),
        "mode": _MODES.get(attr.mode, clean(str(attr.mode))),
        "positional": "yes" if attr.positional else "no (baseline)",
        "meaning": MEANING,
    }


# ---- numbers and colours -------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _short(x: float) -> str:
    """A cell value in at most 5 characters: ``0.42``, ``-1.3``, ``12``, ``-0.00``."""
    magnitude = abs(x)
    if magnitude >= 9.95:
        return f"{x:.0f}"
    return f"{x:.1f}" if magnitude >= 0.995 else f"{x:.2f}"


def _colours(values: Sequence[float], scale: float) -> tuple[list[str], list[str]]:
    backgrounds = [diverging_rgb(v, scale) for v in values]
    return [css_hex(b) for b in backgrounds], [css_hex(text_rgb(b)) for b in backgrounds]


def _colour_payload(
    maps: Mapping[str, Sequence[float]],
    subsets: Mapping[str, Sequence[int]],
    shared_scale: bool,
    scales: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Colours of every map, once per subset of indices that sets the scale (``all`` and ``visible``: without
    the special tokens). ``scales`` fixes the scale of each subset instead (one number for all maps)."""
    keys = list(maps)
    payload: dict[str, Any] = {"colors": {}, "text": {}, "scale": {}}
    for name, subset in subsets.items():
        if scales is not None:
            per_map = {k: scales[name] for k in keys}
        else:
            picked = {k: [maps[k][i] for i in subset] for k in keys}
            shared = color_scale([v for vals in picked.values() for v in vals])
            per_map = {k: shared if shared_scale else color_scale(picked[k]) for k in keys}
        payload["scale"][name] = {k: f"{per_map[k]:.3g}" for k in keys}
        payload["colors"][name], payload["text"][name] = {}, {}
        for k in keys:
            payload["colors"][name][k], payload["text"][name][k] = _colours(maps[k], per_map[k])
    return payload


def _subsets(special: Sequence[bool], columns: Sequence[int] | None = None) -> dict[str, list[int]]:
    shown = list(columns) if columns is not None else list(range(len(special)))
    visible = [i for i in shown if not special[i]] or shown
    return {"all": shown, "visible": visible}


def _summary(
    row: int | None,
    target: tuple[str | None, int | None],
    foil: tuple[str | None, int | None] | None,
    value: float,
    gap: float,
    maps: Mapping[str, Sequence[float]] | None,
    value_name: str = "logit",
) -> dict[str, Any]:
    share = abs(gap) / abs(value) if value != 0 else float("inf")
    sums = [(_sum_title(k), _fmt(sum(v))) for k, v in (maps or {}).items() if k != "relevance"]
    return {
        "row": row,
        "target": {"label": None if target[0] is None else visible_text(target[0]), "id": target[1]},
        "foil": None
        if foil is None
        else {"label": None if foil[0] is None else visible_text(foil[0]), "id": foil[1]},
        "value_name": value_name,
        "value": _fmt(value),
        "gap": _fmt(gap),
        "gap_share": f"{share:.1%}",
        "sums": sums,
    }


def _sum_title(key: str) -> str:
    """``token`` -> ``token``; ``decoder position`` -> ``decoder position`` (the target prefix's maps)."""
    side, _, name = key.rpartition(" ")
    return f"{side} {MAP_TITLES[name]}" if side else MAP_TITLES[name]


def _layer_chart(
    grid: Sequence[Sequence[float]],
    tokens: Sequence[str],
    positions: Sequence[int],
    special: Sequence[bool],
    columns: Sequence[int],
    unit: str = "position",
) -> dict[str, Any]:
    """The context of the per-layer position chart: ``grid[layer][i]`` for the columns ``columns`` (``unit``
    names a column in the tips: a position, or an offset for the per-offset chart).

    Colours share one symmetric scale (the largest absolute cell of the non-special columns: a BOS token's
    large relevance does not wash out the rest); the bars are each layer's summed position relevance (all
    columns) on their own symmetric scale, with its axis.
    """
    layers = len(grid)
    visible = [i for i in columns if not special[i]] or list(columns)
    scale = color_scale([grid[layer][i] for layer in range(layers) for i in visible])
    totals = [sum(grid[layer][i] for i in columns) for layer in range(layers)]
    bar_scale = color_scale(totals)
    count = max(len(visible), 1)
    cell_w = max(10, min(56, 640 // count))
    cell_h = max(8, min(16, 360 // max(layers, 1)))
    texts = [visible_text(tokens[i]) for i in columns]
    longest = max((len(t) for t in texts), default=1)
    rows = []
    for layer in range(layers):
        cells = []
        for i in columns:
            value = grid[layer][i]
            tip = f"layer {layer}, {unit} {positions[i]} {quoted(tokens[i])}: {_fmt(value)}"
            cells.append({"color": css_hex(diverging_rgb(value, scale)), "title": tip})
        half = abs(totals[layer]) / bar_scale * 50
        rows.append(
            {
                "label": f"layer {layer}",
                "cells": cells,
                "bar": {
                    "left": f"{50 - half if totals[layer] < 0 else 50:.2f}",
                    "width": f"{half:.2f}",
                    "color": css_hex(diverging_rgb(totals[layer], bar_scale)),
                    "title": f"layer {layer} total: {_fmt(totals[layer])}",
                },
            }
        )
    excluded = len(visible) < len(columns)
    return {
        "columns": [
            {"text": t, "special": special[i], "title": f"{unit} {positions[i]} {quoted(tokens[i])}"}
            for t, i in zip(texts, columns, strict=True)
        ],
        "rows": rows,
        "cell_w": cell_w,
        "cell_h": cell_h,
        "vertical": longest * 7.5 > cell_w + 6,
        "scale": f"{scale:.3g}",
        "scale_note": " (special tokens excluded)" if excluded else "",
        "bar_scale": f"{bar_scale:.3g}",
    }


# ---- text report ---------------------------------------------------------------------------------------------


def _token_cells(
    texts: Sequence[str],
    positions: Sequence[int],
    special: Sequence[bool],
    explained: int | None,
    maps: Mapping[str, Sequence[float]],
    payload: Mapping[str, Any],
    initial_key: str,
    offset: int,
    where: str,
) -> list[dict[str, Any]]:
    """The coloured token chips of one strip; ``offset`` is the strip's first index in the row's colours."""
    first = next(iter(maps))
    others = [k for k in maps if k != "relevance"]
    cells = []
    for i, (pos, text) in enumerate(zip(positions, texts, strict=True)):
        detail = " · ".join(f"{MAP_TITLES[k]} {_fmt(maps[k][i])}" for k in others)
        cells.append(
            {
                "text": visible_text(text),
                "title": f"{quoted(text)} at {where}position {pos}\ncombined {_fmt(maps['relevance'][i])} "
                f"({detail})",
                # the explained token stays visible when special tokens are hidden (a decoder start token)
                "special": special[i] and explained != i,
                "explained": explained == i,
                "index": offset + i,
                "bg": payload["colors"][initial_key][first][offset + i],
                "fg": payload["text"][initial_key][first][offset + i],
            }
        )
    return cells


def _text_rows(
    views: list[RowView], shared_scale: bool, initial_key: str, chart_title: str
) -> tuple[list[Any], list[Any]]:
    rows, payloads = [], []
    for view in views:
        maps = view.maps
        first = next(iter(maps))
        decoder = view.decoder
        # an encoder-decoder row colours its source and its target prefix on one scale (one explanation)
        all_maps = {k: list(v) + (decoder.maps[k] if decoder else []) for k, v in maps.items()}
        # the explained token is never hidden (see _token_cells), so it also sets the scale
        all_special = [s and i != view.explained for i, s in enumerate(view.special)]
        if decoder is not None:
            all_special += [s and i != decoder.explained for i, s in enumerate(decoder.special)]
        payload = _colour_payload(all_maps, _subsets(all_special), shared_scale)
        payload["tokens"] = view.tokens
        payload["positions"] = view.positions
        payload["values"] = maps
        if decoder is not None:
            payload["decoder_tokens"] = decoder.tokens
            payload["decoder_positions"] = decoder.positions
            payload["decoder_values"] = decoder.maps
        payloads.append(payload)
        common = {"maps": maps, "payload": payload, "initial_key": initial_key}
        tokens = _token_cells(
            view.tokens,
            view.positions,
            view.special,
            view.explained,
            **common,
            offset=0,
            where="source " if decoder else "",
        )
        decoder_tokens = None
        if decoder is not None:
            decoder_tokens = _token_cells(
                decoder.tokens,
                decoder.positions,
                decoder.special,
                decoder.explained,
                **{**common, "maps": decoder.maps},
                offset=len(view.tokens),
                where="decoder ",
            )
        next_token = None
        if view.predicts_next:
            next_token = (
                visible_text(view.target_label) if view.target_label is not None else f"[{view.target_id}]"
            )
        chart = None
        if view.position_by_layer:
            chart = _layer_chart(
                view.position_by_layer, view.tokens, view.positions, view.special, range(len(view.positions))
            )
        offset_chart = None
        if view.position_by_offset and view.offsets:
            count = len(view.offsets)
            offset_chart = _layer_chart(
                view.position_by_offset,
                [str(d) for d in view.offsets],
                view.offsets,
                [False] * count,
                range(count),
                unit="offset i - j =",
            )
        foil = (view.foil_label, view.foil_id) if view.foil_id is not None else None
        sums = dict(maps)
        if decoder is not None:
            sums.update({f"decoder {k}": v for k, v in decoder.maps.items() if k != "relevance"})
        rows.append(
            {
                "index": view.row,
                "summary": _summary(
                    view.row if len(views) > 1 else None,
                    (view.target_label, view.target_id),
                    foil,
                    view.target_value,
                    view.gap,
                    sums,
                ),
                "tokens": tokens,
                "decoder_tokens": decoder_tokens,
                "next_token": next_token,
                "scale": payload["scale"][initial_key][first],
                "chart": chart,
                "chart_title": f"position relevance per layer{' over the source' if decoder else ''}: {chart_title}",
                "chart_open": len(views) == 1,
                "offset_chart": offset_chart,
            }
        )
    return rows, payloads


def _ledger_rows(ledger: Any, row: int) -> list[dict[str, str]]:
    """One row of a :class:`hf_pelrp.ConservationLedger` as table lines: stage, entry, share of the logit; the
    stages summed by kind (``ledger.by_kind()``) when there are more than eight."""
    value = float(ledger.target_value[row])
    if len(ledger.stages) > 8:
        entries = [(f"{k} (all layers)", float(v[row])) for k, v in ledger.by_kind().items()]
    else:
        entries = [(k, float(v)) for k, v in zip(ledger.stages, ledger.values[row].tolist(), strict=True)]
    entries.append(("total gap", float(ledger.gap[row])))
    return [
        {"stage": clean(k), "value": _fmt(x), "share": f"{x / value:.1%}" if value != 0 else "n/a"}
        for k, x in entries
    ]


def _text_html(
    attr: Any,
    tokens: Any,
    path: str | Path | None,
    tokenizer: Any,
    labels: Labels | None,
    hide_special: bool,
    shared_scale: bool,
    title: str | None,
    full_page: bool,
    ledger: Any = None,
    image: Any = None,
) -> str:
    views = row_views(attr, tokens=tokens, tokenizer=tokenizer, labels=labels)
    maps = list(views[0].maps) if views else ["relevance", "token", "position"]
    any_special = any(any(v.special) or (v.decoder is not None and any(v.decoder.special)) for v in views)
    # rows without special tokens have identical "visible" and "all" colours, so one key serves every row
    initial_key = "visible" if hide_special and any_special else "all"
    rows, payloads = _text_rows(views, shared_scale, initial_key, layer_chart_title(attr))
    panels = _panel_payloads(image_panels(attr, image), shared_scale) if is_vlm(attr) else None
    for row in rows:
        row["ledger"] = None if ledger is None else _ledger_rows(ledger, row["index"])
        row["image_panel"] = None if panels is None else panels[row["index"]]
        if panels is not None:  # the image's share next to the text maps' sums
            row["summary"]["sums"].append(("image", panels[row["index"]]["image_total"]))
    return _render(
        "text.html.j2",
        path,
        kind="text",
        full_page=full_page,
        heading=title if title is not None else "hf_pelrp attribution",
        meta=_meta(attr),
        root_classes="hfp-root hfp-hide-special" if initial_key == "visible" else "hfp-root",
        map_choices=[(k, MAP_TITLES[k]) for k in maps],
        special_box=any_special,
        hide_special=hide_special,
        rows=rows,
        data={"kind": "text", "maps": maps, "rows": payloads},
    )


# ---- image report --------------------------------------------------------------------------------------------


def _display_size(height: int, width: int, size: int = IMAGE_DISPLAY_SIZE) -> tuple[int, int]:
    factor = size / max(height, width, 1)
    return max(1, round(height * factor)), max(1, round(width * factor))


def _overlay(values: np.ndarray, scale: float) -> str:
    return png_data_url(diverging_rgb_array(values, scale))


def _image_rows(
    views: list[ImageView], summaries: list[RowView], with_image: bool
) -> tuple[list[Any], list[Any], list[str]]:
    rows, payloads = [], []
    keys = list(views[0].maps) if views else list(IMAGE_MAPS)
    for view, summary in zip(views, summaries, strict=True):
        height, width = _display_size(view.height, view.width)
        scales = {k: color_scale(np.abs(m).reshape(-1).tolist() or [0.0]) for k, m in view.maps.items()}
        overlays = []
        for k, m in view.maps.items():
            overlays.append(
                {
                    "key": k,
                    "title": IMAGE_MAPS[k],
                    "src": _overlay(m, scales[k]),
                    "pixelated": m.shape[1] * 2 <= width,
                    "opacity": f"{OVERLAY_OPACITY / 100:.2f}" if view.picture is not None else "1",
                }
            )
        base = None
        if view.picture is not None:
            base = png_data_url(picture_pixels(view.picture))
        payloads.append({"scale": {"all": {k: f"{s:.3g}" for k, s in scales.items()}}})
        first = next(iter(view.maps))
        foil = (summary.foil_label, summary.foil_id) if summary.foil_id is not None else None
        prefix = len(view.prefix)
        cells = []
        for k in range(view.grid[0] * view.grid[1]):
            r, c = divmod(k, view.grid[1])
            name = summary.tokens[prefix + k] if prefix + k < len(summary.tokens) else f"patch {k}"
            values = " · ".join(
                f"{key} {_fmt(float(view.maps[key][r, c]))}" for key in ("patch", "token", "position")
            )
            cells.append(f"{visible_text(name)} (row {r}, column {c})\n{values}")
        rows.append(
            {
                "index": view.row,
                "summary": _summary(
                    view.row if len(views) > 1 else None,
                    (summary.target_label, summary.target_id),
                    foil,
                    summary.target_value,
                    summary.gap,
                    summary.maps,
                ),
                "width": width,
                "height": height,
                "base": base,
                "base_pixelated": view.picture is not None and view.picture.shape[1] * 2 <= width,
                "overlays": overlays,
                "scale": f"{scales[first]:.3g}",
                "grid": view.grid,
                "cells": cells,
                "map_table": [
                    {
                        "title": IMAGE_MAPS[k],
                        "sum": _fmt(float(m.sum())),
                        "peak": _fmt(float(np.abs(m).max())),
                    }
                    for k, m in view.maps.items()
                ],
                "prefix": [
                    {"name": name, "token": f"{t:+.4g}", "position": f"{p:+.4g}"}
                    for name, t, p in view.prefix
                ],
            }
        )
    if with_image:
        keys = [*keys, "image"]
    return rows, payloads, keys


def _image_html(
    attr: Any,
    image: Any,
    path: str | Path | None,
    tokens: Any,
    labels: Labels | None,
    title: str | None,
    full_page: bool,
) -> str:
    views = image_views(attr, image)
    summaries = row_views(attr, tokens=tokens, labels=labels)  # tokens name the patches in the tooltips
    with_image = any(v.picture is not None for v in views)
    rows, payloads, keys = _image_rows(views, summaries, with_image)
    titles = {**IMAGE_MAPS, "image": "image only"}
    return _render(
        "image.html.j2",
        path,
        kind="image",
        full_page=full_page,
        heading=title if title is not None else "hf_pelrp attribution",
        meta=_meta(attr),
        root_classes="hfp-root",
        map_choices=[(k, titles[k]) for k in keys],
        special_box=False,
        hide_special=False,
        with_image=with_image,
        opacity=OVERLAY_OPACITY,
        rows=rows,
        data={"kind": "image", "maps": keys, "rows": payloads},
    )


# ---- a vision-language model's image beside the text -----------------------------------------------------


def _panel_payloads(panels: list[ImagePanel], shared_scale: bool) -> list[dict[str, Any]]:
    """The template data of each :class:`~hf_pelrp.viz.vlm.ImagePanel`: one stage per patch map (the overlay as
    a PNG on the grey image), its sum and scale (one scale for both maps of a row with ``shared_scale``, so
    their colours compare), a tooltip per patch, and the image's totals."""
    bases: dict[int, str] = {}  # a continuation's rows share one image: encoded once
    out = []
    for panel in panels:
        height, width = _display_size(panel.height, panel.width, VLM_DISPLAY_SIZE)
        shared = color_scale(np.abs(np.concatenate([m.reshape(-1) for m in panel.maps.values()])).tolist())
        base = None
        if panel.picture is not None:
            key = id(panel.picture)
            if key not in bases:
                bases[key] = png_data_url(picture_pixels(panel.picture))
            base = bases[key]
        stages = []
        for key, values in panel.maps.items():
            scale = shared if shared_scale else color_scale(np.abs(values).reshape(-1).tolist())
            cells = []
            for k in range(panel.grid[0] * panel.grid[1]):
                r, c = divmod(k, panel.grid[1])
                detail = " · ".join(f"{VLM_MAPS[n]} {_fmt(float(m[r, c]))}" for n, m in panel.maps.items())
                cells.append(f"patch {k} (row {r}, column {c})\n{detail}")
            stages.append(
                {
                    "key": key,
                    "title": VLM_MAPS[key],
                    "src": _overlay(values, scale),
                    "pixelated": values.shape[1] * 2 <= width,
                    "opacity": f"{OVERLAY_OPACITY / 100:.2f}" if base is not None else "1",
                    "sum": _fmt(float(values.sum())),
                    "scale": f"{scale:.3g}",
                    "cells": cells,
                }
            )
        out.append(
            {
                "width": width,
                "height": height,
                "base": base,
                "base_pixelated": panel.picture is not None and panel.picture.shape[1] * 2 <= width,
                "grid": panel.grid,
                "stages": stages,
                "special": _fmt(panel.special),
                "text_total": _fmt(panel.text_total),
                "image_total": _fmt(panel.image_total),
            }
        )
    return out


# ---- generation report ---------------------------------------------------------------------------------------


def generation_html(
    gen: Any,
    path: str | Path | None = None,
    *,
    tokens: Sequence[str] | None = None,
    tokenizer: Any = None,
    labels: Labels | None = None,
    hide_special: bool = True,
    shared_scale: bool = True,
    scale: str = "row",
    layer_charts: bool = True,
    title: str | None = None,
    full_page: bool = True,
    image: Any = None,
) -> str:
    """Render a :class:`~hf_pelrp.GenerationAttribution` as a self-contained target x source matrix page.

    Rows are the explained continuation tokens, columns the positions of prompt + continuation; a cell is the
    relevance of that input position for that row's token (the combined, token or position map, switchable),
    cells in a row's future (exactly 0 by causality) are grey, and the position each token's logit was read
    from is outlined. Per-layer position charts of rotary models open per row on demand.

    Parameters
    ----------
    gen
        The generation attribution.
    path
        Where to write the page (UTF-8); the HTML is returned either way.
    tokens
        Display strings of the ``T`` positions; defaults to ``gen.tokens``, else ``tokenizer``, else ids.
    tokenizer
        Decodes ids (when ``gen.tokens`` is not set) and marks special tokens.
    labels
        Names of the explained ids; defaults to ``gen.labels``, else the continuation's own token strings.
    hide_special
        Start with special-token columns hidden and out of the colour scale (a checkbox switches).
    shared_scale
        One colour scale for all maps of a row (default) or one per map.
    scale
        ``"row"`` (default): each row on its own scale (its largest absolute cell saturates), so every token's
        sources read clearly; ``"matrix"``: one scale for the whole matrix, so rows compare.
    layer_charts
        Include the per-layer position charts (rotary models), folded per row.
    title, full_page
        Heading; a complete document with its Content-Security-Policy (default) or a fragment for notebooks.
    image
        A vision-language model's continuation: the prompt's image (PIL, array or tensor; best the image as the
        model saw it, the pipeline's ``out["image"]``) under each explained token's patch maps. Without it the
        maps are drawn alone.

    Returns
    -------
    str
        The HTML.
    """
    if image is not None and not is_vlm(gen):
        raise AttributionInputError(
            "image= was given, but this continuation has no image maps (it is not from a vision-language model)"
        )
    if scale not in ("row", "matrix"):
        raise AttributionInputError(f"scale must be 'row' or 'matrix', got {scale!r}")
    view = generation_view(gen, tokens=tokens, tokenizer=tokenizer, labels=labels)
    keys = view.map_keys
    any_special = any(view.special)
    initial_key = "visible" if hide_special and any_special else "all"
    fixed = None
    if scale == "matrix":
        fixed = {}
        for name in ("all", "visible"):
            values = []
            for row in view.rows:
                subset = _subsets(view.special, range(row.visible))[name]
                values += [row.maps[k][i] for k in keys for i in subset]
            fixed[name] = color_scale(values)
    payloads, rows, charts = [], [], []
    value_name = "logit" if gen.foil is None else "logit difference"
    panels = _panel_payloads(image_panels(gen, image), shared_scale) if is_vlm(gen) else None
    for row in view.rows:
        payload = _colour_payload(row.maps, _subsets(view.special, range(row.visible)), shared_scale, fixed)
        payload["fmt"] = {k: [_short(v) for v in values] for k, values in row.maps.items()}
        payloads.append(payload)
        first = keys[0]
        cells = []
        for c in range(len(view.tokens)):
            title_text = f"{quoted(row.label)} ← position {c} {quoted(view.tokens[c])}"
            if c >= row.visible:
                cells.append(
                    {"future": True, "title": f"{title_text}: not visible (after the explained position)"}
                )
                continue
            detail = " · ".join(f"{MAP_TITLES[k]} {_fmt(row.maps[k][c])}" for k in keys)
            cells.append(
                {
                    "future": False,
                    "explained": c == row.explained,
                    "bg": payload["colors"][initial_key][first][c],
                    "fg": payload["text"][initial_key][first][c],
                    "text": payload["fmt"][first][c],
                    "title": f"{title_text}\n{detail}",
                }
            )
        rows.append(
            {
                "index": row.index,
                "arrow": not view.span,
                "label": visible_text(row.label),
                "foil": None if row.foil_label is None else visible_text(row.foil_label),
                "cells": cells,
                "value": _fmt(row.target_value),
                "gap": _fmt(row.gap),
                "scale": payload["scale"][initial_key][first],
                "image_total": None if panels is None else panels[row.index]["image_total"],
            }
        )
        if layer_charts and row.position_by_layer:
            chart = _layer_chart(
                row.position_by_layer,
                view.tokens,
                list(range(len(view.tokens))),
                view.special,
                range(row.visible),
            )
            charts.append({"label": visible_text(row.label), "chart": chart})
    texts = [visible_text(t) for t in view.tokens]
    columns = [
        {
            "text": t,
            "special": view.special[c],
            "generated": c >= view.prompt_length,
            "first_generated": c == view.prompt_length,
            "title": f"position {c} {quoted(view.tokens[c])}"
            + (" (continuation)" if c >= view.prompt_length else " (prompt)"),
        }
        for c, t in enumerate(texts)
    ]
    width = sum(max(len(t) * 7.5 + 10, 40) for t in texts) + 260
    if view.span:
        intro = (
            f"the sum of the {len(view.tokens) - view.prompt_length} continuation logits, explained at once "
            "(span_reduce='sum')"
        )
    else:
        intro = (
            f"{len(view.rows)} continuation tokens explained over the {view.prompt_length} prompt tokens and the "
            "tokens generated before each; cells to the right of a row's explained position are not visible to "
            "it (grey); the explained position is outlined"
        )
    note = (
        "each row on its own scale (its largest |cell| saturates)"
        if scale == "row"
        else "one scale for the whole matrix"
    )
    return _render(
        "generation.html.j2",
        path,
        kind="generation",
        full_page=full_page,
        heading=title if title is not None else "hf_pelrp continuation attribution",
        meta=_meta(gen),
        root_classes="hfp-root hfp-hide-special" if initial_key == "visible" else "hfp-root",
        map_choices=[(k, MAP_TITLES[k]) for k in keys],
        special_box=any_special,
        hide_special=hide_special,
        intro=intro,
        columns=columns,
        vertical=width > 1000,
        value_name=value_name,
        rows=rows,
        legend_note=f"{MEANING}; {note}",
        charts=charts,
        chart_title=f"position relevance per layer, per explained token: {layer_chart_title(gen)}",
        span=view.span,
        image_rows=[]
        if panels is None
        else [
            {
                "index": r.index,
                "label": visible_text(r.label),
                "value": _fmt(r.target_value),
                "panel": panels[r.index],
            }
            for r in view.rows
        ],
        data={"kind": "generation", "maps": keys, "rows": payloads, "tokens": view.tokens},
    )


# ---- the entry point -----------------------------------------------------------------------------------------


def to_html(
    attr: Any,
    tokens: Sequence[str] | Sequence[Sequence[str]] | None = None,
    path: str | Path | None = None,
    *,
    tokenizer: Any = None,
    labels: Labels | None = None,
    image: Any = None,
    hide_special: bool = True,
    shared_scale: bool = True,
    title: str | None = None,
    full_page: bool = True,
    ledger: Any = None,
    **kwargs: Any,
) -> str:
    """Render an attribution as self-contained HTML (and write it to ``path`` if given).

    Text attributions show their tokens coloured by relevance; image attributions (ViT / DeiT) show the image
    with the relevance maps as overlays; a :class:`~hf_pelrp.GenerationAttribution` is shown as a matrix (see
    :func:`generation_html`, which takes the extra keyword arguments).

    Parameters
    ----------
    attr
        The :class:`~hf_pelrp.Attribution` (every row of the batch is shown) or generation attribution.
    tokens
        Display strings, one per position (a list for a batch of 1, else a list per row). Defaults to
        ``attr.tokens``, which the pipeline and the CLI fill. A ``pathlib.Path`` or a string ending in
        ``.html`` / ``.htm`` given here (without ``path``) is the file to write: ``attr.to_html("x.html")``.
    path
        Where to write the page (UTF-8); the HTML is returned either way.
    tokenizer
        Decodes ``attr.input_ids`` and the target token when the attribution carries no token strings, and
        marks special tokens (hideable).
    labels
        Class names for the target, e.g. ``model.config.id2label``. Defaults to ``attr.labels``.
    image
        Image attributions: the input image (PIL, array or tensor; a list for a batch) under the maps. Without
        it the maps are drawn alone. Vision-language models (a result with ``image`` maps): the prompt's image
        (one per row; the pipeline's ``out["image"]`` is the image as the model saw it, resized and cropped,
        on which the patch grid lies exactly), drawn beside the text with the patch content and position
        maps.
    hide_special
        Start with special tokens (BOS, CLS, SEP, ...) hidden and excluded from the colour scale (a checkbox
        switches; the maps themselves keep their relevance).
    shared_scale
        One colour scale for the combined, token and position maps of a row (default: colours are comparable
        between maps), or one scale per map; likewise for a vision-language row's two patch maps (content and
        positions).
    title
        Heading of the page.
    full_page
        A complete document with a Content-Security-Policy (default) or a fragment for embedding
        (notebooks use the fragment).
    ledger
        A :class:`hf_pelrp.ConservationLedger` of ``attr`` (text attributions): each row gets a small table of
        where its conservation gap goes (``ledger.to_html()`` passes itself).

    Returns
    -------
    str
        The HTML.
    """
    if path is None and (
        isinstance(tokens, PathLike)
        or (isinstance(tokens, str) and tokens.lower().endswith((".html", ".htm")))
    ):
        # attr.to_html("report.html"): GenerationAttribution.to_html takes the path first, so both spellings
        # write the file (any other lone string is refused as tokens: one string per position is needed)
        tokens, path = None, tokens
    if ledger is not None and (is_generation(attr) or is_vision(attr)):
        raise AttributionInputError("ledger= applies to text attributions (one explained logit per row)")
    if is_generation(attr):
        return generation_html(
            attr,
            path,
            tokens=tokens,
            tokenizer=tokenizer,
            labels=labels,
            hide_special=hide_special,
            shared_scale=shared_scale,
            title=title,
            full_page=full_page,
            image=image,
            **kwargs,
        )
    if kwargs:
        raise TypeError(f"to_html() got unexpected keyword arguments {sorted(kwargs)}")
    if is_vision(attr):
        return _image_html(attr, image, path, tokens, labels, title, full_page)
    if image is not None and not is_vlm(attr):
        raise AttributionInputError(
            "image= was given, but this attribution has no image maps (it is not from a vision model: no "
            "patch_map / pixel_map, no image)"
        )
    return _text_html(
        attr,
        tokens,
        path,
        tokenizer,
        labels,
        hide_special,
        shared_scale,
        title,
        full_page,
        ledger=ledger,
        image=image,
    )


__all__ = ["content_security_policy", "generation_html", "json_for_script", "script_hash", "to_html"]
