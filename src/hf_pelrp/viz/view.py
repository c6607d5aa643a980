"""What every renderer shows of one row of an :class:`~hf_pelrp.Attribution`: plain Python lists, no tensors.

Padding positions are dropped here (they carry exactly zero relevance), token strings are resolved once (from
``tokens=``, a tokenizer, or ids), and the target is given a readable label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import AttributionInputError
from ..tokens import display_token

#: map key -> the name shown to the user
MAP_TITLES = {"relevance": "combined", "token": "token", "position": "position", "segment": "segment"}


@dataclass
class RowView:
    """One explained row, ready for display.

    Attributes
    ----------
    row : int
        Index of the row in the batch.
    positions : list[int]
        Sequence positions shown (the non-padding ones), in order.
    tokens : list[str]
        Display string of each shown position.
    special : list[bool]
        Whether each shown position is a special token (BOS, CLS, ...), which views may hide.
    maps : dict[str, list[float]]
        ``relevance`` (combined), ``token``, ``position`` (and ``segment``) at each shown position.
    explained : int or None
        Index into ``positions`` of the position whose next-token logit was explained (causal LMs).
    target_id, target_label, target_value, gap
        The explained class / token id, its readable label (or None), the explained logit and the
        conservation gap ``target_value - sum(relevance)``.
    position_by_layer : list[list[float]] or None
        ``[layer][shown position]`` position relevance of rotary models.
    """

    row: int
    positions: list[int]
    tokens: list[str]
    special: list[bool]
    maps: dict[str, list[float]]
    explained: int | None
    target_id: int
    target_label: str | None
    target_value: float
    gap: float
    position_by_layer: list[list[float]] | None


token_text = display_token  # the name the renderers used before hf_pelrp.tokens existed


def _per_row_tokens(tokens: Any, batch: int) -> list[list[str]]:
    if isinstance(tokens, str):
        raise AttributionInputError(
            "tokens must be a list of strings (one per position), not a single string"
        )
    rows = list(tokens)
    if batch == 1 and all(isinstance(t, str) for t in rows):
        rows = [rows]
    if len(rows) != batch or not all(
        not isinstance(r, str) and all(isinstance(t, str) for t in r) for r in rows
    ):
        raise AttributionInputError(
            f"tokens must be a list of strings (batch of 1) or a list of {batch} lists of strings, one per row"
        )
    return [list(r) for r in rows]


def _target_label(
    attr: Any, row: int, target_id: int, tokenizer: Any, labels: Mapping[int, str] | Sequence[str] | None
) -> str | None:
    if labels is not None:
        if isinstance(labels, Mapping):
            label = labels.get(target_id, labels.get(str(target_id)))  # type: ignore[call-overload]
            return None if label is None else str(label)
        return str(labels[target_id]) if 0 <= target_id < len(labels) else None
    if tokenizer is not None and attr.position_index is not None:
        return token_text(tokenizer, target_id)
    return getattr(attr, "labels", {}).get(target_id)


def row_views(
    attr: Any,
    tokens: Sequence[str] | Sequence[Sequence[str]] | None = None,
    tokenizer: Any = None,
    labels: Mapping[int, str] | Sequence[str] | None = None,
) -> list[RowView]:
    """One :class:`RowView` per row of ``attr``.

    Parameters
    ----------
    attr
        The :class:`~hf_pelrp.Attribution` to show.
    tokens
        Display strings: a list (batch of 1) or a list of lists, one string per position (all ``T`` positions,
        or only the non-padding ones). Takes precedence over ``tokenizer``.
    tokenizer
        A transformers tokenizer to decode ``attr.input_ids`` (and the target token of causal LMs) and to
        recognise special tokens.
    labels
        Class names for the target: ``model.config.id2label`` or a list indexed by class id.

    Raises
    ------
    AttributionInputError
        ``tokens`` has the wrong shape, or ``tokenizer`` is given but the attribution kept no ``input_ids``.
    """
    batch, seq_len = attr.token.shape
    mask = attr.attention_mask
    keep = (mask != 0) if mask is not None else torch.ones(batch, seq_len, dtype=torch.bool)
    keep = keep.detach().cpu().bool()
    ids = attr.input_ids.detach().cpu() if attr.input_ids is not None else None

    given = tokens if tokens is not None else getattr(attr, "tokens", None)
    token_rows = _per_row_tokens(given, batch) if given is not None else None
    if token_rows is None and tokenizer is not None and ids is None:
        raise AttributionInputError(
            "tokenizer= needs the token ids, but this attribution kept no input_ids; pass tokens= instead"
        )
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
    stored_special = getattr(attr, "special_tokens_mask", None)

    maps_full = {"relevance": attr.relevance, "token": attr.token, "position": attr.position}
    if attr.segment is not None:
        maps_full["segment"] = attr.segment
    maps_full = {k: v.detach().float().cpu() for k, v in maps_full.items()}
    by_layer = attr.position_by_layer.detach().float().cpu() if attr.position_by_layer is not None else None
    gaps = attr.conservation_gap.detach().float().cpu().tolist()

    vision_names: list[str] = []
    prefix = 0
    patch_map = attr.extras.get("patch_map")
    if ids is None and isinstance(patch_map, torch.Tensor) and patch_map.dim() >= 2:
        # vision: [CLS] (+ [DIST]) then the patches in raster order
        patches = int(torch.tensor(patch_map.shape[1:]).prod())
        prefix = max(seq_len - patches, 0)
        vision_names = ["[CLS]", "[DIST]"][:prefix] + [f"[SPECIAL{i}]" for i in range(2, prefix)]
        vision_names += [f"patch {i}" for i in range(seq_len - prefix)]

    views = []
    for r in range(batch):
        positions = keep[r].nonzero().flatten().tolist()
        if token_rows is not None:
            given_row = token_rows[r]
            if len(given_row) == seq_len:
                texts = [given_row[p] for p in positions]
            elif len(given_row) == len(positions):
                texts = list(given_row)
            else:
                raise AttributionInputError(
                    f"row {r}: {len(given_row)} token strings given, but the attribution has {seq_len} positions "
                    f"({len(positions)} without padding); give one string per position"
                )
        elif tokenizer is not None:
            texts = [token_text(tokenizer, int(ids[r, p])) for p in positions]
        elif ids is not None:
            texts = [f"[{int(ids[r, p])}]" for p in positions]
        else:
            texts = [vision_names[p] if vision_names else f"#{p}" for p in positions]

        if tokenizer is not None and ids is not None:
            special = [int(ids[r, p]) in special_ids for p in positions]
        elif vision_names and token_rows is None:
            special = [p < prefix for p in positions]
        elif isinstance(stored_special, torch.Tensor) and stored_special.shape == (batch, seq_len):
            special = [bool(stored_special[r, p]) for p in positions]
        else:
            special = [False] * len(positions)

        explained = None
        if attr.position_index is not None:
            pos = int(attr.position_index[r])
            explained = positions.index(pos) if pos in positions else None
        target_id = int(attr.target[r])
        views.append(
            RowView(
                row=r,
                positions=positions,
                tokens=texts,
                special=special,
                maps={k: v[r, positions].tolist() for k, v in maps_full.items()},
                explained=explained,
                target_id=target_id,
                target_label=_target_label(attr, r, target_id, tokenizer, labels),
                target_value=float(attr.target_value[r]),
                gap=gaps[r],
                position_by_layer=by_layer[r][:, positions].tolist() if by_layer is not None else None,
            )
        )
    return views


def visible_text(text: str) -> str:
    """Whitespace made visible for display (newline, tab); an empty token shows as ``∅``."""
    if text == "":
        return "∅"
    return text.replace("\r", "␍").replace("\n", "↵").replace("\t", "⇥")
