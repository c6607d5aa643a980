"""Token strings made safe to show: valid Unicode everywhere, whitespace and control characters made visible in
reports, and stripped from terminal output.

Token strings come from tokenizers and from users: they may hold lone surrogates (``"\\ud800"``, which cannot
be written as UTF-8), ANSI escape sequences, carriage returns or bidirectional overrides. Every renderer passes
them through these functions first.
"""

from __future__ import annotations

import re

#: ANSI / VT escape sequences: CSI (``ESC [ ... final``), OSC (``ESC ] ... BEL`` or ``ESC \\``), and two-byte
#: escapes (``ESC x``)
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]|\x9b[0-?]*[ -/]*[@-~]"
)
#: C0 and C1 control characters and DEL
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: bidirectional embeddings, overrides, isolates and marks: in a terminal they reorder the text around them
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Unicode line breaks other than ``\n`` / ``\r``: NEL (U+0085), LINE SEPARATOR (U+2028), PARAGRAPH SEPARATOR
#: (U+2029). Terminals and editors may start a new line at them; shown as ``↵`` (other C0 breaks such as the
#: vertical tab are control characters: removed from terminal text, shown as control pictures in reports)
_LINE_BREAKS = re.compile("[\x85\u2028\u2029]")


def clean(text: str) -> str:
    """``text`` as valid Unicode: surrogate pairs joined into their character, lone surrogates replaced by
    U+FFFD (so the text can be encoded as UTF-8)."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _control_picture(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    if code < 0x20:
        return chr(0x2400 + code)  # the Unicode "control pictures" block: ␀ ␁ ... ␛ ...
    if code == 0x7F:
        return "\u2421"  # ␡
    return "\ufffd"  # C1 controls have no pictures


def visible_text(text: str) -> str:
    """A token as shown in HTML and figures: valid Unicode, newline ``↵`` (also U+2028, U+2029 and NEL), tab
    ``⇥``, carriage return ``␍``, other control characters as their Unicode control pictures (``␛`` for ESC),
    the empty token ``∅``.

    Spaces stay spaces (a leading space is part of a byte-level BPE token's text).
    """
    text = clean(text)
    if text == "":
        return "∅"
    text = _LINE_BREAKS.sub("↵", text.replace("\n", "↵").replace("\t", "⇥"))
    return _CONTROL.sub(_control_picture, text)


def terminal_text(text: str) -> str:
    """A token as printed to a terminal: like :func:`visible_text`, but ANSI escape sequences, other control
    characters and bidirectional controls are removed, so a token cannot move the cursor, recolour, clear or
    reorder the terminal; Unicode line and paragraph separators (U+2028, U+2029, NEL) show as ``↵``, so a
    token cannot break a table row either."""
    text = clean(text)
    if text == "":
        return "∅"
    text = _ANSI.sub("", text)
    text = text.replace("\r\n", "↵").replace("\n", "↵").replace("\t", "⇥")
    text = _LINE_BREAKS.sub("↵", text)  # before the control characters go: NEL (U+0085) is one
    return _BIDI.sub("", _CONTROL.sub("", text))


def quoted(text: str, *, terminal: bool = False) -> str:
    """A token in single quotes, so that leading and trailing spaces show: ``' Paris'``."""
    return "'" + (terminal_text(text) if terminal else visible_text(text)) + "'"
