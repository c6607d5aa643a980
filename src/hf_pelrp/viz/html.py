"""A self-contained HTML view of an attribution: tokens coloured by relevance, switchable maps, a per-layer chart.

Everything is inline (CSS, one constant script, the data as JSON): the page makes no network request. All text
goes through :func:`html.escape`; the JSON block is made unable to close its ``<script>`` element by escaping
``<``, ``>`` and ``&`` as ``\\u003c`` etc. A full page also carries a Content-Security-Policy that forbids
network access and allows only the page's own script (by hash), so even a bug in escaping could not run
injected code.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .colors import color_scale, css_hex, diverging_rgb, text_rgb
from .view import MAP_TITLES, RowView, row_views, visible_text

_CSS = """
.hfp-root{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#222;
  max-width:980px;line-height:1.5}
.hfp-root h2{font-size:1.15em;margin:.2em 0 .4em}
.hfp-meta{color:#555;font-size:.9em;margin-bottom:.6em}
.hfp-controls{display:flex;flex-wrap:wrap;gap:.9em;align-items:center;margin:.4em 0 .8em;font-size:.92em}
.hfp-controls label{cursor:pointer}
.hfp-row{border-top:1px solid #ddd;padding:.6em 0}
.hfp-summary{font-size:.9em;color:#333;margin-bottom:.4em}
.hfp-summary b{font-weight:600}
.hfp-text{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:15px;line-height:2.1}
.hfp-tok{white-space:pre;padding:2px 1px;margin:0 1px;border-radius:3px}
.hfp-special{font-style:italic}
.hfp-hide-special .hfp-special{display:none}
.hfp-explained{outline:2px solid #222;outline-offset:1px}
.hfp-arrow{margin:0 .4em;color:#555}
.hfp-target{white-space:pre;padding:2px 4px;border:1px dashed #555;border-radius:3px}
.hfp-legend{display:flex;align-items:center;gap:.4em;font-size:.8em;color:#555;margin-top:.3em}
.hfp-bar{width:160px;height:10px;border:1px solid #bbb;
  background:linear-gradient(90deg,#2166ac,#ffffff 50%,#b2182b)}
.hfp-chart{margin-top:.6em}
.hfp-chart-title{font-size:.85em;color:#444}
"""

# Constant, so that its hash in the page's Content-Security-Policy is constant too. It initialises every root
# on the page not yet initialised (a notebook shows several), reads an optional ``#map=...&special=...`` from
# the URL (used by the browser test, handy for links), and recolours tokens from precomputed colours.
_SCRIPT = """(function () {
  "use strict";
  function init(root) {
    var data = JSON.parse(root.querySelector("script.hfp-data").textContent);
    var hide = root.querySelector("input.hfp-hide");
    var radios = Array.prototype.slice.call(root.querySelectorAll("input.hfp-map"));
    var wantMap = /[#&]map=([a-z]+)/.exec(window.location.hash);
    var wantSpecial = /[#&]special=(show|hide)/.exec(window.location.hash);
    radios.forEach(function (r) { if (wantMap && r.value === wantMap[1]) { r.checked = true; } });
    if (wantSpecial && hide) { hide.checked = wantSpecial[1] === "hide"; }
    function render() {
      var map = data.maps[0];
      radios.forEach(function (r) { if (r.checked) { map = r.value; } });
      var key = hide && hide.checked ? "visible" : "all";
      root.classList.toggle("hfp-hide-special", key === "visible");
      data.rows.forEach(function (row, r) {
        var el = root.querySelector('.hfp-row[data-row="' + r + '"]');
        el.querySelectorAll(".hfp-tok").forEach(function (s) {
          var i = Number(s.getAttribute("data-i"));
          s.style.backgroundColor = row.colors[key][map][i];
          s.style.color = row.text[key][map][i];
        });
        el.querySelector(".hfp-lo").textContent = "-" + row.scale[key][map];
        el.querySelector(".hfp-hi").textContent = "+" + row.scale[key][map];
      });
      root.setAttribute("data-map", map);
      root.setAttribute("data-special", key === "visible" ? "hide" : "show");
    }
    radios.forEach(function (r) { r.addEventListener("change", render); });
    if (hide) { hide.addEventListener("change", render); }
    render();
    root.setAttribute("data-ready", "1");
  }
  document.querySelectorAll(".hfp-root:not([data-ready])").forEach(init);
})();"""

_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode("ascii")
_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{_SCRIPT_HASH}'; connect-src 'none'; form-action 'none'; base-uri 'none'"
)


def json_for_script(data: Any) -> str:
    """``data`` as JSON that is safe inside a ``<script>`` element: no ``<``, ``>``, ``&`` (so no ``</script>``
    or ``<!--``), no raw U+2028 / U+2029, no NaN / Infinity (which are not JSON)."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _colours(values: list[float], scale: float) -> tuple[list[str], list[str]]:
    backgrounds = [diverging_rgb(v, scale) for v in values]
    return [css_hex(b) for b in backgrounds], [css_hex(text_rgb(b)) for b in backgrounds]


def _row_payload(view: RowView, shared_scale: bool) -> dict[str, Any]:
    """Precomputed colours of every map, normalised over all shown tokens and over the non-special ones."""
    keys = list(view.maps)
    visible = [i for i, s in enumerate(view.special) if not s] or list(range(len(view.special)))
    payload: dict[str, Any] = {"colors": {}, "text": {}, "scale": {}}
    for name, subset in (("all", range(len(view.special))), ("visible", visible)):
        picked = {k: [view.maps[k][i] for i in subset] for k in keys}
        shared = color_scale([v for vals in picked.values() for v in vals])
        scales = {k: shared if shared_scale else color_scale(picked[k]) for k in keys}
        payload["scale"][name] = {k: f"{scales[k]:.3g}" for k in keys}
        payload["colors"][name], payload["text"][name] = {}, {}
        for k in keys:
            payload["colors"][name][k], payload["text"][name][k] = _colours(view.maps[k], scales[k])
    payload["tokens"] = view.tokens
    payload["positions"] = view.positions
    payload["values"] = view.maps
    return payload


def _summary(view: RowView, show_row: bool) -> str:
    e = html.escape
    label = (
        f"{e(repr(view.target_label))} (id {view.target_id})" if view.target_label else f"id {view.target_id}"
    )
    relative = abs(view.gap) / abs(view.target_value) if view.target_value != 0 else float("inf")
    sums = " · ".join(f"{e(MAP_TITLES[k])} {_fmt(sum(v))}" for k, v in view.maps.items() if k != "relevance")
    parts = [
        f"<b>row {view.row}</b>" if show_row else "",
        f"target <b>{label}</b>",
        f"explained logit <b>{_fmt(view.target_value)}</b>",
        f"conservation gap <b>{_fmt(view.gap)}</b> ({relative:.1%} of |logit|)",
        f"sums: {sums}",
    ]
    return " · ".join(p for p in parts if p)


def _tokens_html(view: RowView, initial: dict[str, Any], initial_map: str) -> str:
    e = html.escape
    spans = []
    others = [k for k in view.maps if k != "relevance"]
    for i, (pos, text) in enumerate(zip(view.positions, view.tokens, strict=True)):
        detail = " · ".join(f"{MAP_TITLES[k]} {_fmt(view.maps[k][i])}" for k in others)
        title = f"{text!r} at position {pos}\ncombined {_fmt(view.maps['relevance'][i])} ({detail})"
        classes = ["hfp-tok"]
        if view.special[i]:
            classes.append("hfp-special")
        if view.explained == i:
            classes.append("hfp-explained")
        style = (
            f"background-color:{initial['colors'][initial_map][i]};color:{initial['text'][initial_map][i]}"
        )
        spans.append(
            f'<span class="{" ".join(classes)}" data-i="{i}" style="{style}" title="{e(title)}">'
            f"{e(visible_text(text))}</span>"
        )
    if view.explained is not None:
        target = view.target_label if view.target_label is not None else f"[{view.target_id}]"
        spans.append('<span class="hfp-arrow" title="next-token prediction explained">→</span>')
        spans.append(f'<span class="hfp-target">{e(visible_text(target))}</span>')
    return "".join(spans)


def layer_chart_svg(view: RowView, max_width: int = 760) -> str:
    """An inline SVG heatmap of per-layer position relevance ``[layer x position]`` with per-layer totals.

    Colours share one symmetric scale (the largest absolute cell); the bars on the right are each layer's
    summed position relevance on their own symmetric scale.
    """
    grid = view.position_by_layer
    if not grid:
        return ""
    e = html.escape
    layers, columns = len(grid), len(view.positions)
    left, top, bar_w, gap = 64, 8, 120, 16
    # deep models get flatter rows, short inputs wider columns, so the chart stays about one screen
    cell_h = max(9, min(16, 360 // max(layers, 1)))
    cell_w = max(4, min(48, (max_width - left - bar_w - gap) // max(columns, 1)))
    width = left + columns * cell_w + gap + bar_w + 8
    height = top + layers * cell_h + 34
    scale = color_scale([v for row in grid for v in row])
    totals = [sum(row) for row in grid]
    bar_scale = color_scale(totals)
    bar_mid = left + columns * cell_w + gap + bar_w / 2
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="hfp-layers" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="position relevance per layer">',
        '<g font-family="sans-serif" font-size="10" fill="#444">',
    ]
    for layer, row in enumerate(grid):
        y = top + layer * cell_h
        if cell_h >= 11 or layer % 2 == 0:
            parts.append(f'<text x="{left - 6}" y="{y + cell_h - 2}" text-anchor="end">layer {layer}</text>')
        for i, value in enumerate(row):
            colour = css_hex(diverging_rgb(value, scale))
            tip = f"layer {layer}, position {view.positions[i]} {view.tokens[i]!r}: {_fmt(value)}"
            parts.append(
                f'<rect class="hfp-cell" x="{left + i * cell_w}" y="{y}" width="{cell_w}" height="{cell_h}" '
                f'fill="{colour}"><title>{e(tip)}</title></rect>'
            )
        length = abs(totals[layer]) / bar_scale * (bar_w / 2)
        x = bar_mid if totals[layer] >= 0 else bar_mid - length
        colour = css_hex(diverging_rgb(totals[layer], bar_scale))
        parts.append(
            f'<rect class="hfp-total" x="{x:.1f}" y="{y + 2}" width="{length:.1f}" height="{cell_h - 4}" '
            f'fill="{colour}" stroke="#888" stroke-width="0.5"><title>layer {layer} total: '
            f"{_fmt(totals[layer])}</title></rect>"
        )
    grid_bottom = top + layers * cell_h
    parts.append(
        f'<rect x="{left}" y="{top}" width="{columns * cell_w}" height="{layers * cell_h}" fill="none" '
        'stroke="#999" stroke-width="0.5"/>'
    )
    parts.append(f'<line x1="{bar_mid}" y1="{top}" x2="{bar_mid}" y2="{grid_bottom}" stroke="#666"/>')
    step = max(1, -(-columns * 22 // (columns * cell_w or 1)))
    for i in range(0, columns, step):
        x = left + i * cell_w + cell_w / 2
        parts.append(
            f'<text x="{x:.1f}" y="{grid_bottom + 12}" text-anchor="middle">{view.positions[i]}</text>'
        )
    parts.append(
        f'<text x="{left}" y="{grid_bottom + 28}">position (colour scale ±{_fmt(scale)})</text>'
        f'<text x="{bar_mid}" y="{grid_bottom + 28}" text-anchor="middle">layer total</text>'
    )
    parts.append("</g></svg>")
    return "".join(parts)


def to_html(
    attr: Any,
    tokens: Sequence[str] | Sequence[Sequence[str]] | None = None,
    path: str | Path | None = None,
    *,
    tokenizer: Any = None,
    labels: Mapping[int, str] | Sequence[str] | None = None,
    hide_special: bool = True,
    shared_scale: bool = True,
    title: str | None = None,
    full_page: bool = True,
) -> str:
    """Render an attribution as self-contained HTML (and write it to ``path`` if given).

    Parameters
    ----------
    attr
        The :class:`~hf_pelrp.Attribution` to show (every row of the batch is shown).
    tokens
        Display strings, one per position (a list for a batch of 1, else a list per row).
    path
        Where to write the page (UTF-8); the HTML is returned either way.
    tokenizer
        Decodes ``attr.input_ids`` and the target token, and marks special tokens (hideable).
    labels
        Class names for the target, e.g. ``model.config.id2label``.
    hide_special
        Start with special tokens (BOS, CLS, SEP, ...) hidden and excluded from the colour scale (a checkbox
        switches; the maps themselves keep their relevance).
    shared_scale
        One colour scale for the combined, token and position maps of a row (default: colours are comparable
        between maps), or one scale per map.
    title
        Heading of the page.
    full_page
        A complete document with a Content-Security-Policy (default) or a fragment for embedding
        (notebooks use the fragment).

    Returns
    -------
    str
        The HTML.
    """
    e = html.escape
    views = row_views(attr, tokens=tokens, tokenizer=tokenizer, labels=labels)
    payloads = [_row_payload(v, shared_scale) for v in views]
    maps = list(views[0].maps) if views else ["relevance", "token", "position"]
    root_id = f"hfp-{secrets.token_hex(4)}"
    heading = title if title is not None else "hf_pelrp attribution"
    mode = {"attnlrp": "AttnLRP", "cp": "CP-LRP"}.get(attr.mode, attr.mode)
    meta = (
        f"model type <b>{e(attr.model_type or 'unknown')}</b> · rules <b>{e(mode)}</b> · positions as leaves "
        f"<b>{'yes' if attr.positional else 'no (baseline)'}</b> · red: supports the target, blue: speaks "
        "against it"
    )

    radios = "".join(
        f'<label><input type="radio" class="hfp-map" name="{root_id}-map" value="{k}"'
        f"{' checked' if k == maps[0] else ''}> {e(MAP_TITLES[k])}</label>"
        for k in maps
    )
    any_special = any(any(v.special) for v in views)
    hide_box = (
        f'<label><input type="checkbox" class="hfp-hide"{" checked" if hide_special else ""}> hide special '
        "tokens</label>"
        if any_special
        else ""
    )
    # rows without special tokens have identical "visible" and "all" colours, so one key serves every row
    initial_key = "visible" if hide_special and any_special else "all"
    rows_html = []
    for view, payload in zip(views, payloads, strict=True):
        initial = {"colors": payload["colors"][initial_key], "text": payload["text"][initial_key]}
        scale = payload["scale"][initial_key][maps[0]]
        chart = layer_chart_svg(view)
        if chart:
            chart = (
                '<div class="hfp-chart"><div class="hfp-chart-title">position relevance per layer '
                f"(rotary cos + sin)</div>{chart}</div>"
            )
        rows_html.append(
            f'<div class="hfp-row" data-row="{view.row}">'
            f'<div class="hfp-summary">{_summary(view, len(views) > 1)}</div>'
            f'<div class="hfp-text">{_tokens_html(view, initial, maps[0])}</div>'
            f'<div class="hfp-legend"><span class="hfp-lo">-{scale}</span><span class="hfp-bar"></span>'
            f'<span class="hfp-hi">+{scale}</span></div>{chart}</div>'
        )
    data = {"maps": maps, "rows": payloads}
    root_classes = "hfp-root hfp-hide-special" if hide_special and any_special else "hfp-root"
    fragment = (
        f'<div class="{root_classes}" id="{root_id}">'
        f"<style>{_CSS}</style>"
        f'<h2>{e(heading)}</h2><div class="hfp-meta">{meta}</div>'
        f'<div class="hfp-controls"><span>map:</span>{radios}{hide_box}</div>'
        f"{''.join(rows_html)}"
        f'<script type="application/json" class="hfp-data">{json_for_script(data)}</script>'
        f"<script>{_SCRIPT}</script></div>"
    )
    if full_page:
        text = (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(heading)}</title></head><body>{fragment}</body></html>\n"
        )
    else:
        text = fragment
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
