"""Terminal views (rich): one coloured table per row of an attribution (positions x maps), and for a
continuation a table of input positions x explained tokens.

Token strings are printed through :func:`~hf_pelrp.viz.strings.terminal_text` (no ANSI escapes, control or
bidirectional characters reach the terminal) and always as :class:`rich.text.Text`, never as console markup,
so ``[bold]`` in a token is text. rich is imported on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import AttributionInputError
from .colors import color_scale, diverging_rgb, text_rgb
from .deps import require
from .strings import quoted, terminal_text
from .view import MAP_TITLES, generation_view, is_generation, row_views

_MODES = {"attnlrp": "AttnLRP", "cp": "CP-LRP"}


def _rich() -> tuple[Any, Any, Any, Any, Any]:
    console = require("rich.console")
    style = require("rich.style")
    table = require("rich.table")
    text = require("rich.text")
    return console, style.Style, table.Table, text.Text, console.Group


def _cell(value: float, scale: float) -> Any:
    _console, style, _table, text, _group = _rich()
    background = diverging_rgb(value, scale)
    foreground = text_rgb(background)
    return text(
        f"{value:+.4g}", style=style(bgcolor=f"rgb{background}", color=f"rgb{foreground}"), justify="right"
    )


def _heading(attr: Any) -> Any:
    text = _rich()[3]
    mode = _MODES.get(attr.mode, terminal_text(str(attr.mode)))
    return text(
        f"hf_pelrp attribution · {terminal_text(attr.model_type or 'unknown model')} · {mode} · positions as "
        f"leaves: {'yes' if attr.positional else 'no'} · red: supports the target, blue: speaks against it",
        style="bold",
    )


def _target(label: str | None, index: int | None) -> str:
    if label is None:
        return f"id {index}"
    return f"{quoted(label, terminal=True)} (id {index})"


def render_tables(
    attr: Any,
    tokens: Sequence[str] | Sequence[Sequence[str]] | None = None,
    *,
    tokenizer: Any = None,
    labels: Mapping[int, str] | Sequence[str] | None = None,
    hide_special: bool = False,
    **kwargs: Any,
) -> Any:
    """The rich renderable of :func:`show_terminal`: per row a heading and a table of positions x maps.

    Every map column shares one symmetric colour scale per row (the largest absolute value shown), so
    colours compare across columns. A :class:`~hf_pelrp.GenerationAttribution` gives
    :func:`render_generation_table` (keyword arguments go there).
    """
    if is_generation(attr):
        return render_generation_table(
            attr, tokens=tokens, tokenizer=tokenizer, labels=labels, hide_special=hide_special, **kwargs
        )
    if kwargs:
        raise TypeError(f"render_tables() got unexpected keyword arguments {sorted(kwargs)}")
    _console, _style, table_cls, text, group = _rich()
    views = row_views(attr, tokens=tokens, tokenizer=tokenizer, labels=labels)
    image_totals = _image_totals(attr)
    parts: list[Any] = [_heading(attr)]
    for view in views:
        shown = [i for i in range(len(view.positions)) if not (hide_special and view.special[i])]
        keys = list(view.maps)
        decoder = view.decoder
        shown_dec = (
            []
            if decoder is None
            else [
                i
                for i in range(len(decoder.positions))
                if not (hide_special and decoder.special[i]) or i == decoder.explained
            ]
        )
        values = [view.maps[k][i] for k in keys for i in shown]
        values += [decoder.maps[k][i] for k in keys for i in shown_dec] if decoder is not None else []
        scale = color_scale(values)  # an encoder-decoder row: source and target prefix on one scale
        target = _target(view.target_label, view.target_id)
        if view.foil_id is not None:
            target += f" vs foil {_target(view.foil_label, view.foil_id)}"
        rel = abs(view.gap) / abs(view.target_value) if view.target_value != 0 else float("inf")
        # a vision-language row: the image's share (patches, their positions, special tokens), not in the table
        image = "" if image_totals is None else f" · image {image_totals[view.row]:.4g}"
        parts.append(
            text(
                f"row {view.row}: target {target} · explained logit {view.target_value:.4g}{image} · "
                f"conservation gap {view.gap:.4g} ({rel:.1%} of |logit|)",
                style="italic",
            )
        )
        table = table_cls()
        table.add_column(text("pos"), justify="right", style="dim")
        table.add_column(text("token"))
        for k in keys:
            table.add_column(text(MAP_TITLES[k]), justify="right")
        for i in shown:
            marker = " ◀ explained" if view.explained == i else ""
            token = text(terminal_text(view.tokens[i]) + marker, style="italic" if view.special[i] else "")
            table.add_row(text(str(view.positions[i])), token, *(_cell(view.maps[k][i], scale) for k in keys))
        if decoder is not None:
            # the target prefix (decoder input): its positions are "d0", "d1", ...; the target follows the marker
            table.add_section()
            for i in shown_dec:
                marker = f" ◀ explained → {target}" if decoder.explained == i else ""
                token = text(
                    terminal_text(decoder.tokens[i]) + marker, style="italic" if decoder.special[i] else ""
                )
                cells = (_cell(decoder.maps[k][i], scale) for k in keys)
                table.add_row(text(f"d{decoder.positions[i]}"), token, *cells)
        table.add_section()
        hidden = len(shown) < len(view.positions) or (
            decoder is not None and len(shown_dec) < len(decoder.positions)
        )
        table.add_row(
            text(""),
            text("sum (all positions)" if hidden else "sum", style="bold"),
            *(
                text(f"{sum(view.maps[k]) + (sum(decoder.maps[k]) if decoder else 0):+.4g}", justify="right")
                for k in keys
            ),
        )
        parts.append(table)
    return group(*parts)


def render_generation_table(
    gen: Any,
    *,
    tokens: Sequence[str] | None = None,
    tokenizer: Any = None,
    labels: Mapping[int, str] | Sequence[str] | None = None,
    hide_special: bool = False,
    map: str = "relevance",  # noqa: A002 - the name the HTML report's switch uses
    scale: str = "row",
) -> Any:
    """A continuation as a rich table: a row per input position, a column per explained token (the transposed
    matrix: long prompts grow downwards), cells coloured on each token's own scale (``scale="row"``) or one
    scale (``"matrix"``); positions after a token's explained position show ``·``."""
    if scale not in ("row", "matrix"):
        raise AttributionInputError(f"scale must be 'row' or 'matrix', got {scale!r}")
    _console, _style, table_cls, text, group = _rich()
    view = generation_view(gen, tokens=tokens, tokenizer=tokenizer, labels=labels)
    if map not in view.map_keys:
        raise AttributionInputError(f"map must be one of {view.map_keys}, got {map!r}")
    columns = [c for c in range(len(view.tokens)) if not (hide_special and view.special[c])]
    scales = [color_scale([row.maps[map][c] for c in columns if c < row.visible]) for row in view.rows]
    if scale == "matrix":
        scales = [max(scales)] * len(scales)
    table = table_cls()
    table.add_column(text("pos"), justify="right", style="dim")
    table.add_column(text("input token"))
    for row in view.rows:
        header = ("→ " if not view.span else "") + quoted(row.label, terminal=True)
        table.add_column(text(header), justify="right")
    for c in columns:
        cells = [
            _cell(row.maps[map][c], scales[r]) if c < row.visible else text("·", style="dim", justify="right")
            for r, row in enumerate(view.rows)
        ]
        style = "italic" if view.special[c] else ("bold" if c >= view.prompt_length else "")
        table.add_row(text(str(c)), text(terminal_text(view.tokens[c]), style=style), *cells)
    table.add_section()
    value_name = "logit" if gen.foil is None else "logit diff."
    table.add_row(
        text(""),
        text(value_name, style="bold"),
        *(text(f"{r.target_value:+.4g}", justify="right") for r in view.rows),
    )
    image_totals = _image_totals(gen)
    if image_totals is not None:  # a vision-language model: the image's share of each row
        table.add_row(
            text(""), text("image", style="bold"), *(text(f"{t:+.4g}", justify="right") for t in image_totals)
        )
    table.add_row(
        text(""), text("gap", style="bold"), *(text(f"{r.gap:+.4g}", justify="right") for r in view.rows)
    )
    note = "each token on its own scale" if scale == "row" else "one scale for all tokens"
    caption = text(
        f"{MAP_TITLES[map]} relevance of each input position (rows) for each explained token (columns); "
        f"bold: continuation; ·: after the explained position; {note}",
        style="italic",
    )
    return group(_heading(gen), caption, table)


def _image_totals(attr: Any) -> list[float] | None:
    """A vision-language result's image relevance per row (patches, positions, special tokens), or None."""
    total = getattr(attr, "image_total", None)
    return None if total is None else total.detach().float().cpu().tolist()


def show_terminal(attr: Any, tokens: Any = None, *, console: Any = None, **kwargs: Any) -> None:
    """Print the coloured tables of :func:`render_tables` to ``console`` (default: a new rich Console)."""
    if console is None:
        console = require("rich.console").Console()
    console.print(render_tables(attr, tokens, **kwargs))
