"""Readable token strings: what reports, the pipeline and the CLI show for token ids.

A token is shown as the text it stands for: the leading space that byte-level BPE (``Ġ``) and SentencePiece
(``▁``) markers encode is a real space, and no marker is shown. Special tokens keep their names (``[CLS]``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def display_token(tokenizer: Any, token_id: int) -> str:
    """The text of one token id: decoded, keeping the leading space that a sub-word marker stands for but
    single-id decoding drops."""
    text = tokenizer.decode([int(token_id)])
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if isinstance(piece, str) and piece[:1] in ("Ġ", "▁") and not text.startswith(" "):
        text = " " + text
    return text


def display_tokens(tokenizer: Any, ids: Iterable[int]) -> list[str]:
    """:func:`display_token` of every id."""
    return [display_token(tokenizer, int(i)) for i in ids]


def special_ids(tokenizer: Any) -> set[int]:
    """The ids of the tokenizer's special tokens (BOS, CLS, SEP, PAD, ...)."""
    return {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
