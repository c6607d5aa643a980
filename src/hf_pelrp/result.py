"""The results of an attribution: :class:`Attribution` (one explained logit per row) and
:class:`GenerationAttribution` (one row per explained continuation token), with the operations callers need
(slice rows, stack rows, strip padding, replace fields) so that nobody rebuilds a result field by field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from .errors import AttributionInputError, AttributionStateError

#: tensor fields whose last axis is the sequence (they are padded, unpadded and sliced along it)
_SEQUENCE_FIELDS = ("token", "position", "segment", "position_by_layer", "input_ids", "attention_mask")
_SEQUENCE_FIELDS += ("special_tokens_mask",)
#: maps the positional kinds put in ``extras`` with the sequence as last axis (hf_pelrp.positions): the PE-LRP
#: aggregation [B, T], the rotary pair kept apart [B, L, 2, T], the M-RoPE axes [B, 3, T]. (Distance bins,
#: ``position_by_distance`` [B, bins], are not positions: they stay as they are.)
_SEQUENCE_EXTRAS = ("position_abs", "position_by_leaf", "position_by_axis")
#: a vision-language model's image maps (issue 19): result fields of their own, not positions of the sequence
IMAGE_MAPS = ("image", "image_position", "image_special", "image_grid")
#: an encoder-decoder result's target prefix: the same maps under this prefix, masked by its own
#: ``target_attention_mask`` (hf_pelrp.positions.AttentionBias names a leaf group's maps "<group>_position...")
_TARGET_PREFIX = "target_"


def _per_row(x: Any, batch: int) -> bool:
    """Whether ``x`` holds one entry per batch row (a tensor / array / list with the batch as leading axis)."""
    if isinstance(x, torch.Tensor | np.ndarray):
        return x.ndim > 0 and x.shape[0] == batch
    return False


class _Relevance:
    """``relevance`` and ``conservation_gap`` from the maps every result has (token, position, segment)."""

    token: torch.Tensor
    position: torch.Tensor
    segment: torch.Tensor | None
    target_value: torch.Tensor

    @property
    def relevance(self) -> torch.Tensor:
        """``token + position (+ segment)`` per row and position, [rows, T]."""
        total = self.token + self.position
        if self.segment is not None:
            total = total + self.segment
        return total

    @property
    def image_total(self) -> torch.Tensor | None:
        """The relevance of the image per row, [rows]: ``image + image_position`` summed over the patches, plus
        ``image_special``; ``None`` without an image (vision-language models, issue 19)."""
        image = getattr(self, "image", None)
        if image is None:
            return None
        total = image.sum(-1)
        for name in ("image_position", "image_special"):
            part = getattr(self, name, None)
            if part is not None:
                total = total + (part if part.dim() == total.dim() else part.sum(-1))
        return total

    @property
    def conservation_gap(self) -> torch.Tensor:
        """``target_value - relevance.sum(-1)`` (minus :attr:`image_total` where the input held an image), [rows]:
        the relevance the rules absorbed."""
        gap = self.target_value - self.relevance.sum(-1)
        image = self.image_total
        return gap if image is None else gap - image.to(gap)


@dataclass
class Attribution(_Relevance):
    """Relevance maps of one attribution, all detached, on one device (float32, or float64 for float64 models).

    Attributes
    ----------
    token : FloatTensor [B, T]
        Relevance of each token's content (``sum_d e_t * g`` at the token embedding).
    position : FloatTensor [B, T]
        Relevance of each position, signed, summed over layers for rotary models.
    relevance : FloatTensor [B, T]
        ``token + position`` (+ ``segment`` where the model has token types).
    position_by_layer : FloatTensor [B, L, T] or None
        Per-layer position relevance for models whose positions enter every layer (rotary), else None.
    position_by_offset : FloatTensor [B, L, D] or None
        Position relevance per layer and query-key offset ``d = i - j`` (``LRPConfig(offsets=True)``, rotary and
        ALiBi models; read from ``extras``), else None.
    target : LongTensor [B]
        The explained class / vocabulary id of each row.
    target_value : FloatTensor [B]
        The explained logit (minus the foil's logit for a contrastive explanation): the seed of the backward pass.
    conservation_gap : FloatTensor [B]
        ``target_value - relevance.sum(-1)``: the relevance the rules absorbed (biases, the softmax rule).
    segment : FloatTensor [B, T] or None
        Relevance of the token-type (segment) embedding, for models that have one.
    foil : LongTensor [B] or None
        The contrast id of a contrastive explanation (``logit(target) - logit(foil)``).
    position_index : LongTensor [B] or None
        For causal / masked LMs, the sequence position whose logits were explained.
    input_ids, attention_mask : LongTensor [B, T] or None
        The inputs, kept for display.
    tokens : list[list[str]] or None
        Display strings of every position of every row (decoded: a leading space is a space, no ``Ġ`` / ``▁``
        markers), set by the entry points that have a tokenizer (pipeline, CLI, ``tokenizer=``).
    special_tokens_mask : BoolTensor [B, T] or None
        True at special tokens (BOS, CLS, SEP, ...), which reports may hide.
    labels : dict[int, str]
        Readable names of ids: class names of a classifier, the decoded target / foil tokens of an LM.
    mode, positional, model_type : str, bool, str
        The rules and the architecture that produced the maps.
    gamma : dict
        The generalised Gamma rule parameters in effect (``{"gamma_linear": 0.05, "gamma_conv": 100.0}`` for
        the ``vit-paper`` preset); empty when every linear and convolution layer followed the epsilon rule.
    rules : dict
        Every other rule setting that differs from :class:`hf_pelrp.LRPConfig`'s defaults (e.g.
        ``{"softmax": "identity", "softmax_eps": 0.1}`` for the ``attnlrp-conservative`` preset, ``{"offsets":
        True}``); empty for the plain rules of ``mode``.
    extras : dict
        Family-specific maps (e.g. ``patch_map`` / ``pixel_map`` for vision models), readable as attributes.
    image : FloatTensor [B, P] or None
        Vision-language models with an image in the prompt (issue 19): the relevance of each image patch's
        content at the vision tower's patch embedding, patches in raster order (``image_grid``).
    image_position : FloatTensor [B, P] or None
        The relevance of the vision tower's positions per patch (CLIP / SigLIP: the learned position table).
    image_special : FloatTensor [B] or None
        The relevance of the tower's special tokens (CLIP's class token, content and position), 0 where the
        tower has none.
    image_grid : LongTensor [B, 2] or None
        The patch grid (rows, columns) of each row's image, to draw ``image`` on it.
    """

    token: torch.Tensor
    position: torch.Tensor
    target: torch.Tensor
    target_value: torch.Tensor
    position_by_layer: torch.Tensor | None = None
    segment: torch.Tensor | None = None
    foil: torch.Tensor | None = None
    position_index: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    tokens: list[list[str]] | None = None
    special_tokens_mask: torch.Tensor | None = None
    labels: dict[int, str] = field(default_factory=dict)
    mode: str = "attnlrp"
    positional: bool = True
    model_type: str = ""
    gamma: dict[str, float] = field(default_factory=dict)
    rules: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    image: torch.Tensor | None = None
    image_position: torch.Tensor | None = None
    image_special: torch.Tensor | None = None
    image_grid: torch.Tensor | None = None

    # ---- derived maps -------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.token.shape[0]

    @property
    def seq_len(self) -> int:
        return self.token.shape[-1]

    @property
    def position_by_offset(self) -> torch.Tensor | None:
        """Position relevance per layer and query-key offset, [B, L, D], or ``None`` where it was not computed.

        ``position_by_offset[b, l, n]`` is the position part of the relevance of every attention score of layer
        ``l`` whose query and key are ``offset_labels[b, n]`` tokens apart (``d = i - j``: ``0 .. T - 1`` for
        causal models), summed over heads (``position_by_offset_by_head`` [B, L, H, D] keeps them). Computed with
        ``LRPConfig(offsets=True)`` for rotary and ALiBi models (method.md 2, "Relevance per offset");
        ``content_by_offset`` holds the content part of the same scores (rotary models).
        """
        return self.extras.get("position_by_offset")

    def label_of(self, index: int) -> str | None:
        """The readable name of a class / token id, if known."""
        return self.labels.get(int(index))

    def __getattr__(self, name: str) -> Any:
        # family-specific maps read like fields (attr.patch_map); dataclass fields never reach here
        extras = self.__dict__.get("extras", {})
        if name in extras:
            return extras[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # ---- operations on rows -------------------------------------------------------------------------------

    def replace(self, **changes: Any) -> Attribution:
        """A copy with some fields changed (the dictionaries are copied, tensors shared)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise AttributionInputError(f"{type(self).__name__} has no field(s) {unknown}")
        changes.setdefault("labels", dict(self.labels))
        changes.setdefault("gamma", dict(self.gamma))
        changes.setdefault("rules", dict(self.rules))
        changes.setdefault("extras", dict(self.extras))
        return replace(self, **changes)

    def __getitem__(self, index: int | slice) -> Attribution:
        """The attribution of some rows of the batch.

        Tensor fields, ``tokens`` and extras with the batch as their leading axis are sliced with the rows;
        other extras (lists, dicts, scalars) are passed on unchanged.
        """
        if isinstance(index, bool) or not isinstance(index, int | slice):
            raise TypeError(f"rows are selected with an int or a slice, got {type(index).__name__}")
        if isinstance(index, int):
            if not -self.batch_size <= index < self.batch_size:
                raise IndexError(f"row {index} is out of range for a batch of {self.batch_size}")
            index %= self.batch_size
            index = slice(index, index + 1)
        batch = self.batch_size

        def take(x: Any) -> Any:
            return x[index] if _per_row(x, batch) else x

        changes = {
            f.name: take(getattr(self, f.name))
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        tokens = self.tokens[index] if self.tokens is not None else None
        extras = {k: take(v) for k, v in self.extras.items()}
        return self.replace(**changes, tokens=tokens, extras=extras)

    def rows(self) -> list[Attribution]:
        """One single-row attribution per row of the batch."""
        return [self[i] for i in range(self.batch_size)]

    def unpad(self) -> Attribution:
        """This single-row attribution without its padding positions (they hold exactly 0 relevance).

        Every per-position map loses the same positions: the fields with the sequence as last axis, their
        counterparts in ``extras`` (``position_abs`` [1, T], ``position_by_leaf`` [1, L, 2, T], ...) and
        ``tokens``; an encoder-decoder result's target prefix (``target_*`` extras) loses its own padding
        (``target_attention_mask``). ``position_index`` is re-counted among the remaining positions. Use
        ``[a.unpad() for a in attr.rows()]`` for a batch: its rows may keep different numbers of positions.
        """
        if self.batch_size != 1:
            raise AttributionStateError(
                f"unpad() takes a single row (this attribution has {self.batch_size}); use "
                "[row.unpad() for row in attr.rows()]"
            )
        changes: dict[str, Any] = {}
        extras = dict(self.extras)

        def recount(keep: torch.Tensor) -> None:
            if self.position_index is not None:
                pos = int(self.position_index[0])
                changes["position_index"] = keep[:pos].sum().reshape(1).to(self.position_index)

        target_mask = extras.get(_TARGET_PREFIX + "attention_mask")
        decoder_side = isinstance(extras.get(_TARGET_PREFIX + "token"), torch.Tensor)
        if isinstance(target_mask, torch.Tensor) and not bool(target_mask.all()):
            keep = target_mask[0].bool()
            _unpad_extras(extras, keep, _TARGET_PREFIX)
            if decoder_side:  # an encoder-decoder's explained position is a decoder position
                recount(keep)
        if self.attention_mask is not None and not bool(self.attention_mask.all()):
            keep = self.attention_mask[0].bool()
            for name in _SEQUENCE_FIELDS:
                value = getattr(self, name)
                if value is not None:
                    changes[name] = value[..., keep.to(value.device)]
            _unpad_extras(extras, keep, "")
            if self.tokens is not None:
                changes["tokens"] = [[t for t, k in zip(self.tokens[0], keep.tolist(), strict=True) if k]]
            if not decoder_side:
                recount(keep)
        return self.replace(**changes, extras=extras)

    @classmethod
    def stack(cls, rows: Sequence[Attribution]) -> Attribution:
        """One batch from several attributions (of the same rules and model type), right-padded to the longest.

        Padding positions get relevance 0, ``attention_mask`` 0 and, where the rows have ``tokens``, the empty
        string. Extras are kept where every row has a tensor of the same shape (stacked) or the same value.
        """
        rows = list(rows)
        if not rows:
            raise AttributionInputError("stack() needs at least one attribution")
        first = rows[0]
        for r in rows[1:]:
            if (r.mode, r.positional, r.model_type, r.gamma, r.rules) != (
                first.mode,
                first.positional,
                first.model_type,
                first.gamma,
                first.rules,
            ):
                raise AttributionInputError(
                    "stack() joins attributions made with the same rules and model type; got "
                    f"{(first.mode, first.positional, first.model_type)} and {(r.mode, r.positional, r.model_type)}"
                )
        length = max(r.seq_len for r in rows)

        def pad(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, length - x.shape[-1]))

        def cat(name: str, sequence: bool) -> torch.Tensor | None:
            values = [getattr(r, name) for r in rows]
            if all(v is None for v in values):
                return None
            if any(v is None for v in values):
                raise AttributionInputError(f"stack(): field {name!r} is set on some rows and not on others")
            if not sequence and len({tuple(v.shape[1:]) for v in values}) > 1:
                raise AttributionInputError(
                    f"stack(): field {name!r} has different shapes on different rows "
                    f"({sorted({tuple(v.shape) for v in values})}): images of different patch grids are not stacked"
                )
            return torch.cat([pad(v) if sequence else v for v in values])

        changes: dict[str, Any] = {}
        for name in _tensor_fields(cls):
            if name == "attention_mask":
                masks = [
                    r.attention_mask
                    if r.attention_mask is not None
                    else torch.ones_like(r.token, dtype=torch.long)
                    for r in rows
                ]
                changes[name] = torch.cat([pad(m) for m in masks])
            else:
                changes[name] = cat(name, name in _SEQUENCE_FIELDS)
        if all(r.tokens is not None for r in rows):
            changes["tokens"] = [t + [""] * (length - len(t)) for r in rows for t in r.tokens]
        else:
            changes["tokens"] = None
        labels: dict[int, str] = {}
        for r in rows:
            labels.update(r.labels)
        changes["labels"] = labels
        extras: dict[str, Any] = {}
        for key in first.extras:
            values = [r.extras.get(key) for r in rows]
            if all(isinstance(v, torch.Tensor) and v.shape[1:] == values[0].shape[1:] for v in values):
                extras[key] = torch.cat(values)
            elif all(_same(v, values[0]) for v in values):
                extras[key] = values[0]
        changes["extras"] = extras
        return first.replace(**changes)

    def to(self, device: str | torch.device) -> Attribution:
        """A copy with every tensor (fields and tensor extras) on ``device``, e.g. ``attr.to("cpu")``."""
        device = torch.device(device)  # a device only: a dtype would turn the integer ids into floats
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        extras = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.extras.items()}
        return self.replace(**moved, extras=extras)

    def __repr__(self) -> str:
        gap = ", ".join(f"{g:.4g}" for g in self.conservation_gap.tolist()[:4])
        gamma = f", gamma={self.gamma}" if self.gamma else ""
        gamma += f", rules={self.rules}" if self.rules else ""
        return (
            f"Attribution(model_type={self.model_type!r}, mode={self.mode!r}, positional={self.positional}{gamma}, "
            f"batch={self.batch_size}, seq_len={self.seq_len}, target={self.target.tolist()[:4]}, "
            f"conservation_gap=[{gap}])"
        )

    # Display and persistence live in hf_pelrp.viz and hf_pelrp.io; these methods only delegate (imported
    # lazily: the viewers pull in matplotlib and rich, which plain attribution does not need).

    def to_html(self, tokens: Any = None, path: str | None = None, **kwargs: Any) -> str:
        """Self-contained HTML view (see :func:`hf_pelrp.viz.to_html`); written to ``path`` if given.

        ``attr.to_html("report.html")`` writes the file too (a path ending in ``.html`` is not tokens), as
        :meth:`GenerationAttribution.to_html` does."""
        from .viz import to_html

        return to_html(self, tokens, path, **kwargs)

    def _repr_html_(self) -> str:
        from .viz import to_html

        return to_html(self, full_page=False)

    def show(self, tokens: Any = None, **kwargs: Any) -> None:
        """HTML in a notebook, a coloured table in a terminal (see :func:`hf_pelrp.viz.show`)."""
        from .viz import show

        show(self, tokens, **kwargs)

    def plot(self, image: Any = None, **kwargs: Any) -> Any:
        """A matplotlib figure: image overlays for vision models, bars for text (see :func:`hf_pelrp.viz.plot`)."""
        from .viz import plot

        return plot(self, image, **kwargs)

    def save_png(self, path: str, image: Any = None, **kwargs: Any) -> Any:
        """Write :meth:`plot` to ``path`` as PNG (see :func:`hf_pelrp.viz.save_png`); returns the path."""
        from .viz import save_png

        return save_png(self, path, image, **kwargs)

    def save(self, path: str) -> Any:
        """Write the attribution to ``path`` (safetensors + JSON metadata, no pickle); returns the path."""
        from .io import save_attribution

        return save_attribution(self, path)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> Attribution:
        """Read an attribution written by :meth:`save`; raises :class:`hf_pelrp.errors.AttributionFileError`
        for truncated, tampered or unknown files."""
        from .io import read_attribution

        return read_attribution(path, (cls,), device=device)


def load_attribution(
    path: str, device: str | torch.device = "cpu"
) -> Attribution | Seq2SeqAttribution | GenerationAttribution:
    """Read a result written by :meth:`Attribution.save` / :func:`hf_pelrp.save_attribution` as the class it
    was saved from (:class:`Attribution`, :class:`Seq2SeqAttribution` or :class:`GenerationAttribution`)."""
    from .io import read_attribution

    return read_attribution(path, (Attribution, GenerationAttribution), device=device)


def _unpad_extras(extras: dict[str, Any], keep: torch.Tensor, prefix: str) -> None:
    """Drop the positions ``keep`` excludes from the per-position extras named ``prefix + name`` (in place).

    ``name`` is a sequence field or a sequence extra (:data:`_SEQUENCE_EXTRAS`); the source side (no prefix)
    skips the ``target_`` maps, which run along the target prefix. ``prefix + "tokens"`` (lists of strings per
    row) is unpadded too.
    """
    names = {prefix + n for n in (*_SEQUENCE_FIELDS, *_SEQUENCE_EXTRAS)}
    for name, value in extras.items():
        if (
            name in names
            and isinstance(value, torch.Tensor)
            and value.dim() >= 2
            and value.shape[-1] == len(keep)
        ):
            extras[name] = value[..., keep.to(value.device)]
    tokens = extras.get(prefix + "tokens")
    if prefix and isinstance(tokens, list) and tokens and len(tokens[0]) == len(keep):
        extras[prefix + "tokens"] = [[t for t, k in zip(tokens[0], keep.tolist(), strict=True) if k]]


def _tensor_fields(cls: type) -> tuple[str, ...]:
    """The fields annotated as tensors (``from __future__ import annotations``: the types are strings)."""
    return tuple(f.name for f in fields(cls) if "torch.Tensor" in str(f.type))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor | np.ndarray) or isinstance(b, torch.Tensor | np.ndarray):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable values are simply not equal
        return False


@dataclass
class GenerationAttribution(_Relevance):
    """Relevance of every continuation token over the prompt and the tokens generated before it.

    Rows are continuation tokens, columns are the positions of ``input_ids`` (prompt + continuation). Row ``s``
    explains the logit of continuation token ``s`` read at position ``prompt_length + s - 1``: columns from
    ``prompt_length + s`` on are exactly 0 (causality).

    Attributes
    ----------
    token, position : FloatTensor [S, T]
        Token-content and position relevance (position summed over layers for rotary models).
    relevance : FloatTensor [S, T]
        ``token + position`` (+ ``segment``).
    position_by_layer : FloatTensor [S, L, T] or None
        Per-layer position relevance for rotary models.
    segment : FloatTensor [S, T] or None
        Token-type relevance, for models that have token types.
    target : LongTensor [S]
        The explained continuation token ids (= ``generated_ids``).
    target_value : FloatTensor [S] (or [1] with ``span_reduce``)
        The explained value per row: the logit, ``logit - logit(foil)`` with a foil, or their sum over the
        span with ``span_reduce="sum"``.
    conservation_gap : FloatTensor [rows]
        ``target_value - relevance.sum(-1)``.
    input_ids : LongTensor [T]
        Prompt followed by the continuation.
    prompt_length : int
        Number of prompt tokens ``P``; ``generated_ids = input_ids[P:]``.
    foil : LongTensor [S] or None
        The contrast token of each row, if any.
    span_reduce : str or None
        ``"sum"``: a single row explaining the sum over the continuation.
    tokens : list[str] or None
        Display strings of the ``T`` positions (decoded), where a tokenizer was at hand.
    special_tokens_mask : BoolTensor [T] or None
        True at special tokens, which reports may hide.
    labels : dict[int, str]
        Readable names of the explained (and foil) token ids.
    mode, positional, model_type, gamma, rules
        The rules and the architecture that produced the maps (as :class:`Attribution`).
    image, image_position, image_special, image_grid
        A vision-language model's image maps (as :class:`Attribution`), one row per continuation token.
    """

    token: torch.Tensor
    position: torch.Tensor
    target: torch.Tensor
    target_value: torch.Tensor
    input_ids: torch.Tensor
    prompt_length: int
    position_by_layer: torch.Tensor | None = None
    segment: torch.Tensor | None = None
    foil: torch.Tensor | None = None
    span_reduce: str | None = None
    tokens: list[str] | None = None
    special_tokens_mask: torch.Tensor | None = None
    labels: dict[int, str] = field(default_factory=dict)
    mode: str = "attnlrp"
    positional: bool = True
    model_type: str = ""
    gamma: dict[str, float] = field(default_factory=dict)
    rules: dict[str, Any] = field(default_factory=dict)
    image: torch.Tensor | None = None
    image_position: torch.Tensor | None = None
    image_special: torch.Tensor | None = None
    image_grid: torch.Tensor | None = None

    @property
    def generated_ids(self) -> torch.Tensor:
        """The continuation token ids, [S]."""
        return self.input_ids[self.prompt_length :]

    @property
    def explained_positions(self) -> torch.Tensor:
        """The position whose next-token logit each continuation token is read from, [S]."""
        steps = torch.arange(self.generated_ids.shape[0], device=self.input_ids.device)
        return self.prompt_length - 1 + steps

    def replace(self, **changes: Any) -> GenerationAttribution:
        """A copy with some fields changed."""
        changes.setdefault("labels", dict(self.labels))
        changes.setdefault("gamma", dict(self.gamma))
        changes.setdefault("rules", dict(self.rules))
        return replace(self, **changes)

    def to_attribution(self) -> Attribution:
        """The rows as a batched :class:`Attribution` (one row per continuation token), e.g. to render them
        with the :class:`Attribution` views. Row ``s`` sees the whole sequence as input, with
        ``position_index`` at the position its logit was read from.

        Raises
        ------
        AttributionStateError
            For a ``span_reduce`` result: its single row explains a sum, not one target id.
        """
        if self.span_reduce is not None:
            raise AttributionStateError(
                f"a span_reduce={self.span_reduce!r} result has one row for the whole continuation, not one "
                "target per row; read .token / .position / .relevance directly."
            )
        rows = self.token.shape[0]
        ids = self.input_ids[None].expand(rows, -1)
        return Attribution(
            token=self.token,
            position=self.position,
            target=self.target,
            target_value=self.target_value,
            position_by_layer=self.position_by_layer,
            segment=self.segment,
            foil=self.foil,
            position_index=self.explained_positions,
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            tokens=[list(self.tokens)] * rows if self.tokens is not None else None,
            special_tokens_mask=(
                self.special_tokens_mask[None].expand(rows, -1)
                if self.special_tokens_mask is not None
                else None
            ),
            labels=dict(self.labels),
            mode=self.mode,
            positional=self.positional,
            model_type=self.model_type,
            gamma=dict(self.gamma),
            rules=dict(self.rules),
            **{name: getattr(self, name) for name in IMAGE_MAPS},
        )

    # the target x source matrix views live in hf_pelrp.viz (imported lazily, as for Attribution)

    def to_html(self, path: str | None = None, **kwargs: Any) -> str:
        """The target x source matrix as a self-contained page (see :func:`hf_pelrp.viz.generation_html`)."""
        from .viz import generation_html

        return generation_html(self, path, **kwargs)

    def _repr_html_(self) -> str:
        from .viz import generation_html

        return generation_html(self, full_page=False)

    def show(self, **kwargs: Any) -> None:
        """The matrix in a notebook, a table in a terminal (see :func:`hf_pelrp.viz.show`)."""
        from .viz import show

        show(self, **kwargs)

    def plot(self, **kwargs: Any) -> Any:
        """The matrix as a matplotlib figure (see :func:`hf_pelrp.viz.generation_plot`)."""
        from .viz import generation_plot

        return generation_plot(self, **kwargs)

    def save_png(self, path: str, **kwargs: Any) -> Any:
        """Write :meth:`plot` to ``path`` (see :func:`hf_pelrp.viz.generation_png`); returns the path."""
        from .viz import generation_png

        return generation_png(self, path, **kwargs)

    def __repr__(self) -> str:
        gap = ", ".join(f"{g:.4g}" for g in self.conservation_gap.tolist()[:4])
        return (
            f"GenerationAttribution(model_type={self.model_type!r}, mode={self.mode!r}, "
            f"positional={self.positional}, prompt_length={self.prompt_length}, "
            f"generated={self.generated_ids.tolist()[:8]}, rows={self.token.shape[0]}, "
            f"span_reduce={self.span_reduce!r}, conservation_gap=[{gap}])"
        )


def labels_from(names: Mapping[Any, Any] | None) -> dict[int, str]:
    """``{int id: str name}`` from a mapping such as ``config.id2label`` (keys may be strings)."""
    out: dict[int, str] = {}
    for key, value in (names or {}).items():
        try:
            out[int(key)] = str(value)
        except (TypeError, ValueError):
            continue
    return out


@dataclass(repr=False)
class Seq2SeqAttribution(Attribution):
    """The explanation of a target token of an encoder-decoder model (T5, BART), over the source and the target
    prefix.

    The :class:`Attribution` fields keep their meaning for the **source** (the encoder input): ``token``,
    ``position``, ``position_by_layer``, ``relevance``, ``input_ids``, ``attention_mask``, ``tokens``.
    ``position_index`` is the decoder position whose logits were explained. The **target prefix** (the decoder
    input) has its maps in ``extras`` (readable as attributes):

    - ``target_token`` [B, T']: relevance of each decoder input token's content;
    - ``target_position`` [B, T'] (and, for biases inside attention, ``target_position_by_layer`` [B, L', T'],
      ``target_position_by_distance``, ...): relevance of the decoder's positions;
    - ``target_input_ids`` / ``target_attention_mask`` [B, T'] and, with a tokenizer, ``target_tokens``.

    Conservation covers both: ``target_value = relevance.sum(-1) + target_relevance.sum(-1) + conservation_gap``.
    """

    @property
    def target_relevance(self) -> torch.Tensor:
        """``target_token + target_position`` per target-prefix position, [B, T']."""
        token = self.extras.get("target_token")
        if token is None:
            return torch.zeros_like(self.target_value)[:, None]
        position = self.extras.get("target_position")
        return token if position is None else token + position

    @property
    def conservation_gap(self) -> torch.Tensor:
        """``target_value - relevance.sum(-1) - target_relevance.sum(-1)``, [B]."""
        return self.target_value - self.relevance.sum(-1) - self.target_relevance.sum(-1)

    def __repr__(self) -> str:
        return "Seq2Seq" + super().__repr__()
