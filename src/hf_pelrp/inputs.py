"""Validation of the text inputs of an attribution: shapes, padding, empty input, exclusive arguments."""

from __future__ import annotations

from typing import Any

import torch

from .errors import AttributionInputError


def as_batch(x: Any, name: str) -> torch.Tensor | None:
    """``x`` as a [B, T] tensor (a [T] tensor or list becomes one row); ``None`` stays ``None``."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise AttributionInputError(f"{name} must have shape [batch, seq_len], got {tuple(x.shape)}")
    return x


def validate_text_inputs(
    input_ids: Any, inputs_embeds: torch.Tensor | None, attention_mask: Any
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Check token inputs and return ``(input_ids, inputs_embeds, attention_mask)`` with a [B, T] mask.

    Raises :class:`AttributionInputError` for: both or neither of ``input_ids`` / ``inputs_embeds``, an empty
    batch or sequence, a mask of another shape, a row that is all padding.
    """
    if input_ids is not None and inputs_embeds is not None:
        raise AttributionInputError("pass either input_ids or inputs_embeds, not both")
    if input_ids is None and inputs_embeds is None:
        raise AttributionInputError("no input: pass input_ids (or inputs_embeds)")
    input_ids = as_batch(input_ids, "input_ids")
    if input_ids is not None and (input_ids.is_floating_point() or input_ids.dtype == torch.bool):
        raise AttributionInputError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if inputs_embeds is not None and inputs_embeds.dim() != 3:
        raise AttributionInputError(
            f"inputs_embeds must have shape [batch, seq_len, hidden], got {tuple(inputs_embeds.shape)}"
        )
    ref = input_ids if input_ids is not None else inputs_embeds
    batch, seq_len = ref.shape[0], ref.shape[1]
    if batch == 0 or seq_len == 0:
        raise AttributionInputError(
            f"empty input (batch {batch}, sequence length {seq_len}): give at least one token"
        )
    if attention_mask is None:
        attention_mask = torch.ones(batch, seq_len, dtype=torch.long, device=ref.device)
    attention_mask = as_batch(attention_mask, "attention_mask")
    if attention_mask.shape != (batch, seq_len):
        raise AttributionInputError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the input has shape {(batch, seq_len)}"
        )
    empty_rows = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty_rows:
        raise AttributionInputError(
            f"row(s) {empty_rows} of attention_mask are all padding: nothing to explain"
        )
    return input_ids, inputs_embeds, attention_mask
