"""A terminal view of an attribution: one coloured rich table per row (token, position and combined maps)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console, Group
from rich.style import Style
from rich.table import Table
from rich.text import Text

from .colors import color_scale, diverging_rgb, text_rgb
from .view import MAP_TITLES, row_views, visible_text


def _cell(value: float, scale: float) -> Text:
    background = diverging_rgb(value, scale)
    foreground = text_rgb(background)
    return Text(
        f"{value:+.4g}", style=Style(bgcolor=f"rgb{background}", color=f"rgb{foreground}"), justify="right"
    )


def render_tables(
    attr: Any,
    tokens: Sequence[str] | Sequence[Sequence[str]] | None = None,
    *,
    tokenizer: Any = None,
    labels: Mapping[int, str] | Sequence[str] | None = None,
    hide_special: bool = False,
) -> Group:
    """The rich renderable of :func:`show_terminal`: per row a heading and a table of positions x maps.

    Every map column shares one symmetric colour scale per row (the largest absolute value shown), so
    colours compare across columns.
    """
    views = row_views(attr, tokens=tokens, tokenizer=tokenizer, labels=labels)
    mode = {"attnlrp": "AttnLRP", "cp": "CP-LRP"}.get(attr.mode, attr.mode)
    parts: list[Any] = [
        Text(
            f"hf_pelrp attribution · {attr.model_type or 'unknown model'} · {mode} · positions as leaves: "
            f"{'yes' if attr.positional else 'no'}",
            style="bold",
        )
    ]
    for view in views:
        shown = [i for i in range(len(view.positions)) if not (hide_special and view.special[i])]
        keys = list(view.maps)
        scale = color_scale([view.maps[k][i] for k in keys for i in shown])
        label = (
            f"{view.target_label!r} (id {view.target_id})" if view.target_label else f"id {view.target_id}"
        )
        rel = abs(view.gap) / abs(view.target_value) if view.target_value != 0 else float("inf")
        parts.append(
            Text(
                f"row {view.row}: target {label} · explained logit {view.target_value:.4g} · "
                f"conservation gap {view.gap:.4g} ({rel:.1%} of |logit|)",
                style="italic",
            )
        )
        table = Table()
        table.add_column("pos", justify="right", style="dim")
        table.add_column("token")
        for k in keys:
            table.add_column(MAP_TITLES[k], justify="right")
        for i in shown:
            marker = " ◀ explained" if view.explained == i else ""
            token = Text(visible_text(view.tokens[i]) + marker, style="italic" if view.special[i] else "")
            table.add_row(str(view.positions[i]), token, *(_cell(view.maps[k][i], scale) for k in keys))
        table.add_section()
        table.add_row(
            "", Text("sum", style="bold"), *(Text(f"{sum(view.maps[k]):+.4g}", justify="right") for k in keys)
        )
        parts.append(table)
    return Group(*parts)


def show_terminal(attr: Any, tokens: Any = None, *, console: Console | None = None, **kwargs: Any) -> None:
    """Print the coloured tables of :func:`render_tables` to ``console`` (default: a new rich Console)."""
    (console or Console()).print(render_tables(attr, tokens, **kwargs))
