"""Seeing an attribution: self-contained HTML (:func:`to_html`), a terminal table or notebook view (:func:`show`),
and matplotlib figures (:func:`plot`, :func:`save_png`).

Each function takes an :class:`~hf_pelrp.Attribution` (text or image) or a
:class:`~hf_pelrp.GenerationAttribution` (shown as a target x source matrix; :func:`generation_html`,
:func:`generation_plot`, :func:`generation_png` and :func:`render_generation_table` are the same views under
their own names). Token strings and label names come from the attribution itself when the entry point filled
them (pipeline, CLI); ``tokens=`` / ``tokenizer=`` / ``labels=`` override. jinja2, matplotlib and rich are
imported on first use.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .html import generation_html, to_html


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where HTML output is rendered), False in a terminal or a script."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def show(attr: Any, tokens: Any = None, **kwargs: Any) -> None:
    """Show an attribution where the user is: the HTML view in a Jupyter notebook, a coloured table (rich)
    in a terminal. Keyword arguments go to :func:`to_html` or :func:`render_tables` (``tokenizer=``,
    ``labels=``, ``hide_special=``)."""
    if in_notebook():
        from IPython.display import HTML, display

        display(HTML(to_html(attr, tokens, full_page=False, **kwargs)))
    else:
        show_terminal(attr, tokens, **kwargs)


def render_tables(attr: Any, tokens: Any = None, **kwargs: Any) -> Any:
    """The rich renderable of an attribution (see :func:`hf_pelrp.viz.terminal.render_tables`); a generation
    attribution gives its matrix (:func:`render_generation_table`)."""
    from .terminal import render_tables as _render_tables

    return _render_tables(attr, tokens, **kwargs)


def render_generation_table(gen: Any, **kwargs: Any) -> Any:
    """The rich table of a continuation: a row per input position, a column per explained token (see
    :func:`hf_pelrp.viz.terminal.render_generation_table`)."""
    from .terminal import render_generation_table as _render

    return _render(gen, **kwargs)


def show_terminal(attr: Any, tokens: Any = None, *, console: Any = None, **kwargs: Any) -> None:
    """Print :func:`render_tables` to ``console`` (default: a new rich Console)."""
    from .terminal import show_terminal as _show_terminal

    _show_terminal(attr, tokens, console=console, **kwargs)


def plot(attr: Any, image: Any = None, **kwargs: Any) -> Any:
    """A matplotlib figure of one row of ``attr`` (see :func:`hf_pelrp.viz.image.plot`); a generation
    attribution gives its matrix (:func:`generation_plot`)."""
    from .image import plot as _plot

    return _plot(attr, image, **kwargs)


def save_png(attr: Any, path: str | Path, image: Any = None, **kwargs: Any) -> Path:
    """Write :func:`plot` to ``path`` as PNG (see :func:`hf_pelrp.viz.image.save_png`); returns the path."""
    from .image import save_png as _save_png

    return _save_png(attr, path, image, **kwargs)


def generation_plot(gen: Any, **kwargs: Any) -> Any:
    """The matplotlib target x source matrix of a continuation (see :func:`hf_pelrp.viz.image.generation_plot`)."""
    from .image import generation_plot as _generation_plot

    return _generation_plot(gen, **kwargs)


def generation_png(gen: Any, path: str | Path, **kwargs: Any) -> Path:
    """Write :func:`generation_plot` to ``path`` as PNG; returns the path."""
    from .image import generation_png as _generation_png

    return _generation_png(gen, path, **kwargs)


__all__ = [
    "generation_html",
    "generation_plot",
    "generation_png",
    "in_notebook",
    "plot",
    "render_generation_table",
    "render_tables",
    "save_png",
    "show",
    "show_terminal",
    "to_html",
]
