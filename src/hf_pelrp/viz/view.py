"""What every renderer shows of an attribution: plain Python lists, no tensors.

:func:`row_views` gives one :class:`RowView` per row of an :class:`~hf_pelrp.Attribution`,
:func:`generation_view` one :class:`GenerationView` of a :class:`~hf_pelrp.GenerationAttribution`. Padding
positions are dropped here (they carry exactly zero relevance), token strings are resolved once (from
``tokens=``, else the attribution's own ``tokens``, else a tokenizer, else ids), special tokens are marked
(from a tokenizer, else the attribution's ``special_tokens_mask``), and targets get readable labels (from
``labels=``, a tokenizer, or the attribution's ``labels``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import AttributionInputError
from ..tokens import display_token
from .strings import clean, visible_text

__all__ = ["MAP_TITLES", "DecoderView", "GenerationRow", "GenerationView", "RowView", "generation_view"]
__all__ += ["layer_chart_title", "row_views", "token_text", "visible_text"]

#: map key -> the name shown to the user
MAP_TITLES = {"relevance": "combined", "token": "token", "position": "position", "segment": "segment"}

#: how a label argument may be given: ``model.config.id2label`` or a list indexed by id
Labels = Mapping[int, str] | Sequence[str]


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
        Display string of each shown position (valid Unicode; whitespace not yet made visible).
    special : list[bool]
        Whether each shown position is a special token (BOS, CLS, ...), which views may hide.
    maps : dict[str, list[float]]
        ``relevance`` (combined), ``token``, ``position`` (and ``segment``) at each shown position.
    explained : int or None
        Index into ``positions`` of the position whose next-token logit was explained (causal LMs).
    target_id, target_label, target_value, gap
        The explained class / token id, its readable label (or None), the explained logit and the
        conservation gap ``target_value - sum(relevance)``.
    foil_id, foil_label
        The contrast id of a contrastive explanation and its label (None without a foil).
    position_by_layer : list[list[float]] or None
        ``[layer][shown position]`` position relevance of models whose positions enter every layer (rotary,
        biases inside attention); None when the positions were constants (``positional=False``: all zero).
    decoder : DecoderView or None
        Encoder-decoder models: the target prefix (decoder input), where the explained position lies; the
        source then has no explained position (``explained`` is None).
    position_by_offset : list[list[float]] or None
        ``[layer][offset]`` position relevance per query-key offset (``LRPConfig(offsets=True)``), with the
        offsets ``d = i - j`` in ``offsets``; None where it was not computed.
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
    foil_id: int | None = None
    foil_label: str | None = None
    decoder: DecoderView | None = None
    position_by_offset: list[list[float]] | None = None
    offsets: list[int] | None = None

    @property
    def predicts_next(self) -> bool:
        """Whether the target is the token after an explained position (causal LMs, encoder-decoder models)."""
        return self.explained is not None or (self.decoder is not None and self.decoder.explained is not None)


@dataclass
class DecoderView:
    """The target prefix (decoder input) of an encoder-decoder row: the tokens the decoder saw before the
    explained target token.

    Attributes
    ----------
    positions : list[int]
        Decoder positions shown (the non-padding ones).
    tokens : list[str]
        Display string of each shown position.
    special : list[bool]
        Whether each shown position is a special token (the decoder start token, ...).
    maps : dict[str, list[float]]
        ``relevance``, ``token``, ``position`` (the keys of the row's source maps) at each shown position.
    explained : int or None
        Index into ``positions`` of the decoder position whose logits were explained.
    """

    positions: list[int]
    tokens: list[str]
    special: list[bool]
    maps: dict[str, list[float]]
    explained: int | None


def is_seq2seq(attr: Any) -> bool:
    """Whether ``attr`` explains an encoder-decoder target (its target-prefix maps are in the extras): told by
    the data, so a result read back as a plain :class:`~hf_pelrp.Attribution` is recognised too."""
    extras = getattr(attr, "extras", None) or {}
    return isinstance(extras.get("target_token"), torch.Tensor)


def conservation_gap(attr: Any) -> torch.Tensor:
    """``target_value`` minus all the relevance of the result, [rows]: for an encoder-decoder result the
    target prefix's relevance counts too (as :attr:`hf_pelrp.Seq2SeqAttribution.conservation_gap`)."""
    gap = attr.target_value - attr.relevance.sum(-1)
    if is_seq2seq(attr):
        extras = attr.extras
        prefix = extras["target_token"]
        if isinstance(extras.get("target_position"), torch.Tensor):
            prefix = prefix + extras["target_position"]
        gap = gap - prefix.sum(-1).to(gap)
    image = getattr(attr, "image_total", None)  # a vision-language model's image is part of the explanation
    return gap if image is None else gap - image.to(gap)


def layer_chart_title(attr: Any) -> str:
    """What the per-layer position chart shows, named by the model's positional kind (its adapter's
    declaration): ``"rotary cos + sin"``, the bias of T5 / ALiBi (``"relative position buckets inside attention
    (T5 bias table)"``), ..."""
    from ..adapters.base import adapter_variants
    from ..errors import UnsupportedModelError

    try:
        kinds = [a.positions for a in adapter_variants(attr.model_type)] if attr.model_type else []
    except UnsupportedModelError:  # a model type this version does not know (e.g. a file from another one)
        kinds = []
    # a config-aware type (Falcon: ALiBi or rotary) whose variants differ: the result does not say which ran
    names = {getattr(k, "name", "") for k in kinds}
    kind = kinds[0] if len(names) == 1 else None
    name = getattr(kind, "name", "")
    if name in ("rotary", "mrope"):
        return f"{'M-RoPE' if name == 'mrope' else 'rotary'} cos + sin"
    if name == "attention bias":
        return clean(kind.description)
    if "position_by_distance" in (getattr(attr, "extras", None) or {}):
        return "positional bias inside attention"
    return clean(name) if name else "per-layer positional leaves"


def is_generation(attr: Any) -> bool:
    """Whether ``attr`` is a continuation's result (a :class:`~hf_pelrp.GenerationAttribution`): told by its
    fields, so the viewers need not import the result module (which imports them)."""
    return hasattr(attr, "prompt_length") and hasattr(attr, "generated_ids")


def token_text(tokenizer: Any, token_id: int) -> str:
    """The display string of a token id (see :func:`hf_pelrp.tokens.display_token`), as valid Unicode."""
    return clean(display_token(tokenizer, token_id))


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
    return [[clean(t) for t in r] for r in rows]


def _from_labels(labels: Labels, index: int) -> str | None:
    if isinstance(labels, Mapping):
        label = labels.get(index, labels.get(str(index)))  # type: ignore[call-overload]
        return None if label is None else clean(str(label))
    return clean(str(labels[index])) if 0 <= index < len(labels) else None


def label_of(
    index: int, *, labels: Labels | None, tokenizer: Any, stored: Mapping[int, str] | None, is_token: bool
) -> str | None:
    """The readable name of a target / foil id: from ``labels=``, else decoded by ``tokenizer`` (language
    models, where ids are tokens), else the attribution's own ``labels``; None if none knows it."""
    if labels is not None:
        return _from_labels(labels, index)
    if tokenizer is not None and is_token:
        return token_text(tokenizer, index)
    if stored:
        label = stored.get(index)
        return None if label is None else clean(str(label))
    return None


def _special_ids(tokenizer: Any) -> set[int]:
    return (
        {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
        if tokenizer is not None
        else set()
    )


def row_views(
    attr: Any,
    tokens: Sequence[str] | Sequence[Sequence[str]] | None = None,
    tokenizer: Any = None,
    labels: Labels | None = None,
) -> list[RowView]:
    """One :class:`RowView` per row of ``attr``.

    Parameters
    ----------
    attr
        The :class:`~hf_pelrp.Attribution` to show.
    tokens
        Display strings: a list (batch of 1) or a list of lists, one string per position (all ``T`` positions,
        or only the non-padding ones). Takes precedence over ``attr.tokens`` and ``tokenizer``.
    tokenizer
        A transformers tokenizer to decode ``attr.input_ids`` (and the target token of causal LMs) and to
        recognise special tokens. Not needed when the attribution carries its ``tokens`` (the pipeline and the
        CLI fill them).
    labels
        Class names for the target: ``model.config.id2label`` or a list indexed by class id. Defaults to
        ``attr.labels``.

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
    special_ids = _special_ids(tokenizer)
    stored_special = getattr(attr, "special_tokens_mask", None)
    if isinstance(stored_special, torch.Tensor):
        stored_special = (
            stored_special.detach().cpu().bool() if stored_special.shape == (batch, seq_len) else None
        )
    stored_labels = getattr(attr, "labels", None) or {}
    is_lm = attr.position_index is not None

    maps_full = {"relevance": attr.relevance, "token": attr.token, "position": attr.position}
    if attr.segment is not None:
        maps_full["segment"] = attr.segment
    maps_full = {k: v.detach().float().cpu() for k, v in maps_full.items()}
    by_layer = attr.position_by_layer.detach().float().cpu() if attr.position_by_layer is not None else None
    if by_layer is not None and not attr.positional:
        by_layer = None  # positions were constants: the per-layer map is all zero, nothing to draw
    gaps = conservation_gap(attr).detach().float().cpu().tolist()
    by_offset = attr.extras.get("position_by_offset")
    offset_labels = attr.extras.get("offset_labels")
    if not (isinstance(by_offset, torch.Tensor) and isinstance(offset_labels, torch.Tensor)):
        by_offset = offset_labels = None
    foils = attr.foil.detach().cpu().tolist() if getattr(attr, "foil", None) is not None else None
    decoders = _decoder_views(attr, tokenizer, list(maps_full)) if is_seq2seq(attr) else None

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

        if tokenizer is not None and ids is not None and special_ids:
            special = [int(ids[r, p]) in special_ids for p in positions]
        elif stored_special is not None:
            special = [bool(stored_special[r, p]) for p in positions]
        elif vision_names:
            special = [p < prefix for p in positions]
        else:
            special = [False] * len(positions)

        explained = None
        # an encoder-decoder's explained position is in the decoder (its target prefix), not in the source
        if attr.position_index is not None and decoders is None:
            pos = int(attr.position_index[r])
            explained = positions.index(pos) if pos in positions else None
        target_id = int(attr.target[r])
        foil_id = int(foils[r]) if foils is not None else None
        find = {"labels": labels, "tokenizer": tokenizer, "stored": stored_labels, "is_token": is_lm}
        views.append(
            RowView(
                row=r,
                positions=positions,
                tokens=texts,
                special=special,
                maps={k: v[r, positions].tolist() for k, v in maps_full.items()},
                explained=explained,
                target_id=target_id,
                target_label=label_of(target_id, **find),
                target_value=float(attr.target_value[r]),
                gap=gaps[r],
                position_by_layer=by_layer[r][:, positions].tolist() if by_layer is not None else None,
                foil_id=foil_id,
                foil_label=label_of(foil_id, **find) if foil_id is not None else None,
                decoder=decoders[r] if decoders is not None else None,
                position_by_offset=by_offset[r].detach().float().cpu().tolist()
                if by_offset is not None
                else None,
                offsets=offset_labels[r].tolist() if offset_labels is not None else None,
            )
        )
    return views


def _decoder_views(attr: Any, tokenizer: Any, keys: list[str]) -> list[DecoderView]:
    """The target prefix of each row of an encoder-decoder result (``target_*`` extras), padding dropped."""
    extras = attr.extras
    token = extras["target_token"].detach().float().cpu()
    position = extras.get("target_position")
    position = (
        position.detach().float().cpu() if isinstance(position, torch.Tensor) else torch.zeros_like(token)
    )
    maps = {"relevance": token + position, "token": token, "position": position}
    maps = {k: maps.get(k, torch.zeros_like(token)) for k in keys}  # the source's keys (a segment is 0 here)
    ids = extras.get("target_input_ids")
    ids = ids.detach().cpu() if isinstance(ids, torch.Tensor) else None
    mask = extras.get("target_attention_mask")
    keep = (
        (mask.detach().cpu() != 0)
        if isinstance(mask, torch.Tensor)
        else torch.ones_like(token, dtype=torch.bool)
    )
    stored = extras.get("target_tokens")
    special_ids = _special_ids(tokenizer)
    views = []
    for r in range(token.shape[0]):
        positions = keep[r].nonzero().flatten().tolist()
        if attr.position_index is not None:
            # the decoder is causal: positions after the explained one cannot carry relevance (a continuation's
            # rows share one decoder input), so they are not part of this row's prefix
            positions = [p for p in positions if p <= int(attr.position_index[r])]
        if stored is not None and len(stored[r]) == token.shape[-1]:
            texts = [clean(str(stored[r][p])) for p in positions]
        elif tokenizer is not None and ids is not None:
            texts = [token_text(tokenizer, int(ids[r, p])) for p in positions]
        elif ids is not None:
            texts = [f"[{int(ids[r, p])}]" for p in positions]
        else:
            texts = [f"#{p}" for p in positions]
        special = [ids is not None and int(ids[r, p]) in special_ids for p in positions]
        explained = None
        if attr.position_index is not None:
            pos = int(attr.position_index[r])
            explained = positions.index(pos) if pos in positions else None
        views.append(
            DecoderView(
                positions=positions,
                tokens=texts,
                special=special,
                maps={k: v[r, positions].tolist() for k, v in maps.items()},
                explained=explained,
            )
        )
    return views


@dataclass
class GenerationRow:
    """One explained continuation token (or, with ``span_reduce``, the whole span).

    Attributes
    ----------
    index : int
        The row of the :class:`~hf_pelrp.GenerationAttribution`.
    target_id : int or None
        The explained token id (None for a span sum).
    label : str
        The explained token's display string (``' Paris'``) or, for a span sum, the span's text.
    foil_label : str or None
        The contrast token's display string, for contrastive rows.
    explained : int
        The position whose next-token logit was explained (the token before the target).
    visible : int
        Columns ``0 .. visible - 1`` can carry relevance; the rest lie in the row's future (exactly 0).
    maps : dict[str, list[float]]
        ``relevance``, ``token``, ``position`` (``segment``) over all ``T`` columns.
    target_value, gap : float
        The explained logit and the conservation gap.
    position_by_layer : list[list[float]] or None
        ``[layer][column]`` position relevance of rotary models.
    """

    index: int
    target_id: int | None
    label: str
    foil_label: str | None
    explained: int
    visible: int
    maps: dict[str, list[float]]
    target_value: float
    gap: float
    position_by_layer: list[list[float]] | None


@dataclass
class GenerationView:
    """A continuation as a target x source matrix: rows are explained tokens, columns the ``T`` positions of
    prompt + continuation.

    Attributes
    ----------
    tokens : list[str]
        Display string of each of the ``T`` positions.
    special : list[bool]
        Whether each position is a special token.
    prompt_length : int
        Columns ``0 .. prompt_length - 1`` are the prompt, the rest the continuation.
    rows : list[GenerationRow]
        One per explained token (one for a span sum).
    span : bool
        Whether the single row explains the sum over the continuation (``span_reduce="sum"``).
    """

    tokens: list[str]
    special: list[bool]
    prompt_length: int
    rows: list[GenerationRow]
    span: bool

    @property
    def map_keys(self) -> list[str]:
        return list(self.rows[0].maps) if self.rows else ["relevance", "token", "position"]


def generation_view(
    gen: Any,
    tokens: Sequence[str] | None = None,
    tokenizer: Any = None,
    labels: Labels | None = None,
) -> GenerationView:
    """The :class:`GenerationView` of a :class:`~hf_pelrp.GenerationAttribution`.

    Parameters
    ----------
    gen
        The generation attribution.
    tokens
        Display strings of the ``T`` positions; defaults to ``gen.tokens``, else decoded by ``tokenizer``,
        else ids.
    tokenizer
        Decodes ids and marks special tokens.
    labels
        Names of the explained ids (defaults to ``gen.labels``, else the continuation's own tokens).

    Raises
    ------
    AttributionInputError
        ``tokens`` does not hold one string per position.
    """
    ids = gen.input_ids.detach().cpu().reshape(-1).tolist()
    length = len(ids)
    given = tokens if tokens is not None else getattr(gen, "tokens", None)
    if given is not None:
        if isinstance(given, str) or len(given) != length or not all(isinstance(t, str) for t in given):
            raise AttributionInputError(
                f"tokens must be a list of {length} strings, one per position of the prompt and continuation"
            )
        texts = [clean(t) for t in given]
    elif tokenizer is not None:
        texts = [token_text(tokenizer, i) for i in ids]
    else:
        texts = [f"[{i}]" for i in ids]
    special_ids = _special_ids(tokenizer)
    stored_special = getattr(gen, "special_tokens_mask", None)
    if special_ids:
        special = [i in special_ids for i in ids]
    elif isinstance(stored_special, torch.Tensor) and stored_special.numel() == length:
        special = [bool(s) for s in stored_special.detach().cpu().reshape(-1).tolist()]
    else:
        special = [False] * length

    prompt = int(gen.prompt_length)
    maps_full = {"relevance": gen.relevance, "token": gen.token, "position": gen.position}
    if gen.segment is not None:
        maps_full["segment"] = gen.segment
    maps_full = {k: v.detach().float().cpu() for k, v in maps_full.items()}
    by_layer = gen.position_by_layer.detach().float().cpu() if gen.position_by_layer is not None else None
    if by_layer is not None and not gen.positional:
        by_layer = None  # positions were constants: the per-layer map is all zero
    values = gen.target_value.detach().float().cpu().tolist()
    gaps = gen.conservation_gap.detach().float().cpu().tolist()
    targets = gen.target.detach().cpu().reshape(-1).tolist()
    foils = gen.foil.detach().cpu().reshape(-1).tolist() if gen.foil is not None else None
    stored = getattr(gen, "labels", None) or {}
    span = gen.span_reduce is not None

    def name(index: int, fallback: str | None) -> str:
        found = label_of(index, labels=labels, tokenizer=tokenizer, stored=stored, is_token=True)
        return found if found is not None else fallback if fallback is not None else f"[{index}]"

    rows = []
    for s in range(maps_full["relevance"].shape[0]):
        if span:
            label = "".join(texts[prompt:])
            target_id, foil_label, explained, visible = None, None, length - 2, length - 1
        else:
            target_id = int(targets[s])
            label = name(target_id, texts[prompt + s] if prompt + s < length else None)
            foil_label = name(int(foils[s]), None) if foils is not None else None
            explained, visible = prompt + s - 1, prompt + s
        rows.append(
            GenerationRow(
                index=s,
                target_id=target_id,
                label=label,
                foil_label=foil_label,
                explained=explained,
                visible=visible,
                maps={k: v[s].tolist() for k, v in maps_full.items()},
                target_value=float(values[s]),
                gap=float(gaps[s]),
                position_by_layer=by_layer[s].tolist() if by_layer is not None else None,
            )
        )
    return GenerationView(tokens=texts, special=special, prompt_length=prompt, rows=rows, span=span)
