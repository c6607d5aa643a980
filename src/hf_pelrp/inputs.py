"""Checking and completing the inputs of an attribution, as a family declares them.

A family's adapter declares its inputs with :class:`TextInputs` (token families) or :class:`ImageInputs`
(vision); :meth:`validate` turns the user's keyword arguments into the model's inputs and the attention mask,
or raises :class:`~hf_pelrp.errors.AttributionInputError` naming what is wrong and what to do. Nothing the
model would silently swallow (a misspelt keyword, ``labels=``, ``return_dict=False``) reaches it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import AttributionInputError
from .heads import SEQUENCE_CLASSIFICATION, check_pooled_position, head_of

#: keywords that make no sense for one explained forward pass, with the reason given to the user
_REFUSED = {
    "labels": "a loss is not explained; the target is chosen with target= (and foil=)",
    "return_dict": "the attribution reads named outputs itself",
    "logits_to_keep": "the explained position is chosen with position=",
    "num_logits_to_keep": "the explained position is chosen with position=",
    "past_key_values": "a key/value cache would hide the prompt from the relevance computation",
    "cache": "a key/value cache would hide the prompt from the relevance computation",
    "output_attentions": "use hf_pelrp.lrp() and read the outputs yourself",
    "output_hidden_states": "use hf_pelrp.lrp() and read the outputs yourself",
    "head_mask": "masked heads are not supported",
}


def as_batch(x: Any, name: str) -> torch.Tensor | None:
    """``x`` as a [B, T] tensor (a [T] tensor or list becomes one row); ``None`` stays ``None``."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise AttributionInputError(
                f"{name} must be a tensor (or a list of ints), got {type(x).__name__}"
            ) from err
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise AttributionInputError(f"{name} must have shape [batch, seq_len], got {tuple(x.shape)}")
    return x


def _check_not_meta(name: str, x: torch.Tensor | None) -> None:
    if x is not None and x.device.type == "meta":
        raise AttributionInputError(
            f"{name} is on the meta device (no data): pass real tensors (e.g. the tokenizer's output)"
        )


def check_unknown_inputs(inputs: dict[str, Any], accepted: Iterable[str], model: torch.nn.Module) -> None:
    """Refuse keywords the attribution does not use: the model's ``**kwargs`` would silently swallow them."""
    accepted = set(accepted)
    for key in inputs:
        if key in accepted:
            continue
        if key in _REFUSED:
            raise AttributionInputError(f"{key}= is not accepted by hf_pelrp.attribute: {_REFUSED[key]}")
        if key == "position_ids":
            # ALiBi, relative biases, T5 buckets, BART's own counting: the model's forward ignores the ids (or
            # has no such argument), so accepting them would give the same maps whatever they say
            raise AttributionInputError(
                f"position_ids= is not accepted for {type(model).__name__}: the model computes its positions "
                "itself (from the sequence and the attention_mask) and does not read position_ids, so they "
                "would change nothing. Drop position_ids; to move tokens, change input_ids / attention_mask."
            )
        raise AttributionInputError(
            f"unknown keyword argument {key!r} for {type(model).__name__}: hf_pelrp.attribute accepts "
            f"{', '.join(sorted(accepted))} as model inputs (besides target=, foil=, position=, mode=, ...). "
            "Check the spelling."
        )


def validate_mask(attention_mask: Any, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """A [B, T] long mask of 0 / 1 (a bool mask is converted); refuses other values and all-padding rows."""
    if attention_mask is None:
        return torch.ones(batch, seq_len, dtype=torch.long, device=device)
    mask = as_batch(attention_mask, "attention_mask")
    _check_not_meta("attention_mask", mask)
    if mask.shape != (batch, seq_len):
        raise AttributionInputError(
            f"attention_mask has shape {tuple(mask.shape)} but the input has shape {(batch, seq_len)}"
        )
    if mask.dtype != torch.bool:
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            value = mask[bad][0].item()
            raise AttributionInputError(
                f"attention_mask must hold 1 for tokens and 0 for padding, got the value {value!r}: pass the "
                "tokenizer's mask (an additive float mask or a 4-D mask is not accepted)"
            )
    mask = mask.long()
    empty_rows = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty_rows:
        raise AttributionInputError(
            f"row(s) {empty_rows} of attention_mask are all padding: nothing to explain"
        )
    return mask


def count_position_ids(
    attention_mask: torch.Tensor, offset: int = 0, pad_value: int | None = None
) -> torch.Tensor:
    """Position ids that count only real tokens (``offset, offset + 1, ...``), so that a left-padded row sees
    the positions of the unpadded row; padding positions get ``pad_value`` (default ``offset``)."""
    mask = attention_mask.long()
    counted = (mask.cumsum(-1) - 1).clamp(min=0) + offset
    pad = offset if pad_value is None else pad_value
    return torch.where(mask.bool(), counted, torch.full_like(counted, pad))


def causal_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """:func:`count_position_ids` from 0 with padding at 0 (the LLaMA / GPT-2 convention)."""
    return count_position_ids(attention_mask)


def scaled_rotary_limit(config: Any) -> int | None:
    """The longest input a rotary model is meant to run on (transformers 5 ``config.rope_parameters``).

    transformers takes ``max_position_embeddings`` as the scaled context of ``yarn``, ``llama3`` and
    ``longrope`` (it checks ``factor = max_position_embeddings / original_max_position_embeddings``) and as
    the pretraining context that ``dynamic`` scaling grows beyond; scaling added to a config afterwards
    (``rope_parameters={"rope_type": "yarn", "factor": 4}`` on a 32k model) leaves it unchanged. So, per
    ``rope_type``:

    - ``default`` (and types that do not lengthen the context, e.g. ``proportional``): ``max_position_embeddings``;
    - ``dynamic``: ``max_position_embeddings * factor`` (dynamic NTK rescales the frequencies past
      ``max_position_embeddings``, up to the factor the config names);
    - ``linear``, ``yarn``, ``llama3``, ``longrope``: the longer of ``max_position_embeddings`` and
      ``original_max_position_embeddings * factor`` (the original context defaults to
      ``max_position_embeddings``; a ``longrope`` without ``factor`` is scaled to ``max_position_embeddings``).

    Parameters nested by layer type (Gemma 3: ``{"full_attention": {...}, "sliding_attention": {...}}``) give
    the shortest of their limits: the model is meant to run where every layer type is.
    """
    limit = getattr(config, "max_position_embeddings", None)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if limit is None or not isinstance(params, dict):
        return limit
    # the keys transformers nests rope parameters under (its `nested_rope_parameter_keys`)
    labels = getattr(config, "_rope_type_labels", None) or getattr(config, "layer_types", None) or ()
    nested = [p for key, p in params.items() if key in labels]
    if nested:
        limits = [_rope_limit(p, limit, config) for p in nested if isinstance(p, dict)]
        return min(limits) if limits else limit
    return _rope_limit(params, limit, config)


#: rope types whose ``factor`` lengthens the context a model is meant to run on
_SCALED_ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")


def _rope_limit(params: dict, limit: int, config: Any) -> int:
    """The limit of one flat ``rope_parameters`` dict (see :func:`scaled_rotary_limit`)."""
    kind = params.get("rope_type", params.get("type", "default"))
    factor = params.get("factor")
    if kind not in _SCALED_ROPE_TYPES or not isinstance(factor, int | float) or isinstance(factor, bool):
        return limit
    if kind == "dynamic":
        original = limit  # transformers' dynamic NTK grows from max_position_embeddings, whatever else is set
    else:
        original = params.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None
        )
        original = original or limit
    return max(limit, int(math.floor(original * float(factor))))


@dataclass
class Alignment:
    """Moves every row's real tokens to the front (right padding) and back.

    Encoders read their first token (CLS) and number positions from 0, so a left-padded (or holed) row would
    be a different input. The attribution runs on the aligned batch; :meth:`restore` puts maps back at the
    positions the user gave, with padding at exactly 0.
    """

    order: torch.Tensor  # [B, T]: aligned position j holds original position order[b, j]

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Alignment | None:
        """``None`` when every row already is a right-padded prefix."""
        mask = attention_mask.bool()
        lengths = mask.sum(-1, keepdim=True)
        prefix = torch.arange(mask.shape[-1], device=mask.device)[None] < lengths
        if bool((prefix == mask).all()):
            return None
        # stable sort: real tokens (key 0) first in their order, then padding (key 1)
        order = torch.sort((~mask).long(), dim=-1, stable=True).indices
        return cls(order)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Reorder the sequence axis (axis 1) of a [B, T, ...] tensor."""
        index = self.order.to(x.device)
        index = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
        return torch.gather(x, 1, index)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`apply` on the last axis of a [B, ..., T] map."""
        out = torch.zeros_like(x)
        index = self.order.to(x.device)
        index = index.reshape(index.shape[0], *([1] * (x.dim() - 2)), index.shape[1]).expand_as(x)
        return out.scatter(-1, index, x)

    def restore_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Map aligned positions [B, ...] back to the user's positions."""
        return torch.gather(
            self.order.to(positions.device), 1, positions.reshape(positions.shape[0], -1)
        ).reshape(positions.shape)

    def align_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Map the user's positions [B, ...] to aligned ones."""
        inverse = torch.argsort(self.order, dim=-1).to(positions.device)
        return torch.gather(inverse, 1, positions.reshape(positions.shape[0], -1)).reshape(positions.shape)


@dataclass(frozen=True)
class Prepared:
    """Validated inputs: the model's keyword arguments, the [B, T] attention mask and an optional alignment;
    encoder-decoder inputs also carry the [B, T'] mask of the target prefix (the decoder input)."""

    inputs: dict[str, Any]
    attention_mask: torch.Tensor
    alignment: Alignment | None = None
    target_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class TextInputs:
    """How a token family's inputs are checked and completed.

    Parameters
    ----------
    position_ids
        ``"count"``: position ids are counted over real tokens from ``position_offset`` (a left-padded row sees
        the positions of the row alone), and the user's ``position_ids`` are accepted and passed on; ``None``:
        the model computes its positions itself and does not read ``position_ids`` (ALiBi, relative biases,
        BART's decoder), so the user's are refused with a reason rather than silently ignored.
    position_offset
        First position id (RoBERTa: ``padding_idx + 1``, with padding at ``padding_idx``); a callable of the config.
    max_positions
        The longest input, as a callable of the config (learned tables: ``max_position_embeddings``; rotary:
        :func:`scaled_rotary_limit`); ``None`` for no limit.
    token_types
        The config attribute holding the number of token types (``"type_vocab_size"``; GPT-2 embeds token types
        with its vocabulary: ``"vocab_size"``); ``None`` for families without token types.
    padding
        ``"any"``: left and right padding work as they are (causal models with counted positions);
        ``"right"``: the family reads its first token and numbers positions from it, so other paddings are
        aligned internally (:class:`Alignment`).
    extra
        Further model keywords the family accepts.
    last_token_pooling
        Whether the family's sequence classifier reads its logits at the last token that is not
        ``config.pad_token_id`` (decoder classifiers); ``None``: the families with ``padding="any"`` (the causal
        ones). Such classifiers get :func:`hf_pelrp.heads.check_pooled_position` on the user's layout, and an
        aligned batch gets ``config.pad_token_id`` at its padding, so the pooled token is the one the model
        reads on the user's input.
    """

    position_ids: str | None = "count"
    position_offset: int | Callable[[Any], int] = 0
    max_positions: Callable[[Any], int | None] | None = None
    token_types: str | None = None
    padding: str = "any"
    extra: tuple[str, ...] = ()
    last_token_pooling: bool | None = None
    kind: str = "text"

    @property
    def pools_last_token(self) -> bool:
        """See ``last_token_pooling``."""
        return self.padding == "any" if self.last_token_pooling is None else self.last_token_pooling

    def accepted(self) -> tuple[str, ...]:
        # use_cache is accepted and ignored: attribution runs one forward pass without a cache
        keys = ("input_ids", "inputs_embeds", "attention_mask", "use_cache")
        if self.position_ids is not None:
            keys += ("position_ids",)
        if self.token_types is not None:
            keys += ("token_type_ids",)
        return keys + self.extra

    def validate(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Prepared:
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if self.token_types is None and "token_type_ids" in inputs:
            raise AttributionInputError(
                f"{type(model).__name__} has no token types: drop token_type_ids (call the tokenizer with "
                "return_token_type_ids=False)"
            )
        check_unknown_inputs(inputs, self.accepted(), model)
        inputs.pop("use_cache", None)
        input_ids = as_batch(inputs.pop("input_ids", None), "input_ids")
        embeds = inputs.pop("inputs_embeds", None)
        if input_ids is not None and embeds is not None:
            raise AttributionInputError("pass either input_ids or inputs_embeds, not both")
        if input_ids is None and embeds is None:
            raise AttributionInputError("no input: pass input_ids (or inputs_embeds)")
        table = model.get_input_embeddings()
        if input_ids is not None:
            _check_not_meta("input_ids", input_ids)
            if input_ids.is_floating_point() or input_ids.dtype == torch.bool or input_ids.is_complex():
                raise AttributionInputError(
                    f"input_ids must be integer token ids, got dtype {input_ids.dtype}"
                )
            size = getattr(table, "num_embeddings", None)
            if size is not None and input_ids.numel():
                bad = input_ids[(input_ids < 0) | (input_ids >= size)]
                if bad.numel():
                    raise AttributionInputError(
                        f"token id {int(bad[0])} is out of range: the model's vocabulary has {size} ids "
                        f"(0..{size - 1}); was the input made with this model's tokenizer?"
                    )
            ref = input_ids
        else:
            if not isinstance(embeds, torch.Tensor):
                raise AttributionInputError(f"inputs_embeds must be a tensor, got {type(embeds).__name__}")
            _check_not_meta("inputs_embeds", embeds)
            if embeds.dim() != 3:
                raise AttributionInputError(
                    f"inputs_embeds must have shape [batch, seq_len, hidden], got {tuple(embeds.shape)}"
                )
            width = getattr(table, "embedding_dim", None)
            if width is not None and embeds.shape[-1] != width:
                raise AttributionInputError(
                    f"inputs_embeds has hidden size {embeds.shape[-1]} but {type(model).__name__} embeds tokens in "
                    f"{width} dimensions"
                )
            dtype = getattr(getattr(table, "weight", None), "dtype", None)
            if not embeds.is_floating_point() or (dtype is not None and embeds.dtype != dtype):
                raise AttributionInputError(
                    f"inputs_embeds has dtype {embeds.dtype} but the model computes in {dtype}: cast it with "
                    ".to(model.dtype)"
                )
            ref = embeds
        batch, seq_len = ref.shape[0], ref.shape[1]
        if batch == 0 or seq_len == 0:
            raise AttributionInputError(
                f"empty input (batch {batch}, sequence length {seq_len}): give at least one token"
            )
        mask = validate_mask(inputs.pop("attention_mask", None), batch, seq_len, ref.device)
        out: dict[str, Any] = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": embeds}
        out["attention_mask"] = mask.to(ref.device)
        config = model.config
        if self.token_types is not None and "token_type_ids" in inputs:
            types = getattr(config, self.token_types, None) or 1
            out["token_type_ids"] = _validate_ids(
                inputs.pop("token_type_ids"), "token_type_ids", mask, types, "token-type"
            )
        offset = self.position_offset(config) if callable(self.position_offset) else self.position_offset
        limit = self.max_positions(config) if self.max_positions is not None else None
        alignment = Alignment.of(mask) if self.padding == "right" else None
        if "position_ids" in inputs:
            bound = limit + offset if limit is not None else 2**62
            out["position_ids"] = _validate_ids(
                inputs.pop("position_ids"), "position_ids", mask, bound, "position"
            )
            if alignment is not None:
                raise AttributionInputError(
                    f"{type(model).__name__} reads the first token of each row, so hf_pelrp moves left padding to "
                    "the right internally; with explicit position_ids it cannot: pad on the right"
                )
        else:
            real = int(mask.sum(-1).max())
            if limit is not None and real > limit:
                raise AttributionInputError(
                    f"the input has {real} tokens but {type(model).__name__} supports at most {limit} positions: "
                    f"truncate the input (tokenizer(..., truncation=True, max_length={limit})) or split it into windows."
                )
            if self.position_ids == "count":
                pad = getattr(config, "pad_token_id", 0) if offset else 0
                aligned_mask = mask if alignment is None else alignment.apply(mask)
                out["position_ids"] = count_position_ids(aligned_mask, offset, pad).to(ref.device)
        for key in self.extra:
            if key in inputs:
                out[key] = inputs.pop(key)
        pooled = self.pools_last_token and head_of(model).name == SEQUENCE_CLASSIFICATION
        if pooled:
            # where the model reads its logits on the user's layout (before any alignment)
            check_pooled_position(model, out, mask)
        if alignment is not None:
            for key in ("input_ids", "inputs_embeds", "attention_mask", "token_type_ids"):
                if key in out:
                    out[key] = alignment.apply(out[key])
            if pooled:
                out["input_ids"] = _pad_aligned(model, out.get("input_ids"), out["attention_mask"])
        return Prepared(out, mask, alignment)


def _pad_aligned(
    model: torch.nn.Module, ids: torch.Tensor | None, aligned_mask: torch.Tensor
) -> torch.Tensor:
    """The aligned ``input_ids`` of a last-token classifier with ``config.pad_token_id`` at every padding position.

    The model finds its pooled token as the last one that is not the pad id. On the user's (left-padded) layout
    that is the last real token whatever the padding holds (:func:`check_pooled_position` has refused the
    rest); once the alignment has moved the padding to the end, only the pad id there keeps it so. Padding is
    masked, so its ids change nothing else. Without input_ids (or a pad id) the model reads the last position,
    which after the alignment is padding: refused.
    """
    config = model.config
    get_text = getattr(config, "get_text_config", None)
    pad_id = getattr(get_text() if callable(get_text) else config, "pad_token_id", None)
    if ids is None or pad_id is None:
        what = "inputs_embeds" if ids is None else "input_ids with config.pad_token_id=None"
        raise AttributionInputError(
            f"{type(model).__name__} reads its logits at the last position when it cannot find padding by "
            f"config.pad_token_id ({what}); hf_pelrp runs this family right-padded (it moves left padding to the "
            "right), where that position is padding. Pass input_ids padded with config.pad_token_id (and set it "
            "when it is None), or explain the rows one at a time without padding."
        )
    return torch.where(aligned_mask.bool(), ids, torch.full_like(ids, pad_id))


def _validate_ids(ids: Any, name: str, attention_mask: torch.Tensor, num_ids: int, what: str) -> torch.Tensor:
    """Token-type or position ids: integer, shape [B, T], values in ``[0, num_ids)``."""
    ids = as_batch(ids, name)
    _check_not_meta(name, ids)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise AttributionInputError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    if ids.shape != attention_mask.shape:
        raise AttributionInputError(
            f"{name} has shape {tuple(ids.shape)} but the input has shape {tuple(attention_mask.shape)}: pass "
            f"one {what} id per token ([batch, seq_len]), e.g. the {name} the tokenizer returned with input_ids"
        )
    if ids.numel() and (ids.min() < 0 or ids.max() >= num_ids):
        bad = ids[(ids < 0) | (ids >= num_ids)][0].item()
        raise AttributionInputError(
            f"{name} holds {bad}, outside the model's {num_ids} {what} ids (0..{num_ids - 1})"
        )
    return ids.to(attention_mask.device)
