"""Seeing an attribution: self-contained HTML (:func:`to_html`), a terminal table or notebook view
(:func:`show`), and matplotlib figures (:func:`plot`, :func:`save_png`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .html import to_html
from .terminal import render_tables, show_terminal


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


# matplotlib is imported on first use only: importing hf_pelrp should not pay for it


def plot(attr: Any, image: Any = None, **kwargs: Any) -> Any:
    """A matplotlib figure of one row of ``attr`` (see :func:`hf_pelrp.viz.image.plot`)."""
    from .image import plot as _plot

    return _plot(attr, image, **kwargs)


def save_png(attr: Any, path: str | Path, image: Any = None, **kwargs: Any) -> Path:
    """Write :func:`plot` to ``path`` as PNG (see :func:`hf_pelrp.viz.image.save_png`); returns the path."""
    from .image import save_png as _save_png

    return _save_png(attr, path, image, **kwargs)


__all__ = ["in_notebook", "plot", "render_tables", "save_png", "show", "show_terminal", "to_html"]
