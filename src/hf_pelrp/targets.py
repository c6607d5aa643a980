"""Which logit is explained: head kinds, the explained position of causal LMs, target ids and their checks."""

from __future__ import annotations

import inspect

import torch

from .errors import AttributionInputError

CAUSAL_LM = "causal_lm"
SEQUENCE_CLASSIFICATION = "sequence_classification"
MASKED_LM = "masked_lm"
IMAGE_CLASSIFICATION = "image_classification"


def head_kind(model: torch.nn.Module) -> str:
    """The kind of output head, from the class name (``*ForCausalLM``, ``*LMHeadModel``, ...)."""
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return CAUSAL_LM
    if name.endswith("ForSequenceClassification"):
        return SEQUENCE_CLASSIFICATION
    if name.endswith("ForMaskedLM"):
        return MASKED_LM
    if "ForImageClassification" in name:
        return IMAGE_CLASSIFICATION
    raise AttributionInputError(
        f"{name} has no supported output head. hf_pelrp explains *ForCausalLM / *LMHeadModel, "
        "*ForSequenceClassification, *ForMaskedLM and *ForImageClassification models; for a bare encoder, "
        "use hf_pelrp.lrp(model) and seed the backward pass yourself."
    )


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row (works for left and right padding)."""
    steps = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (steps * (attention_mask != 0)).argmax(-1)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def explained_positions(
    position: int | torch.Tensor | None, attention_mask: torch.Tensor, batch: int
) -> torch.Tensor:
    """The sequence position whose next-token logit is explained, per row ([B] long)."""
    seq_len = attention_mask.shape[-1]
    if position is None:
        return last_token_positions(attention_mask)
    pos = torch.as_tensor(position, dtype=torch.long, device=attention_mask.device)
    if pos.dim() == 0:
        pos = pos.expand(batch)
    if pos.shape != (batch,):
        raise AttributionInputError(
            f"position must be an int or a LongTensor of shape [{batch}], got {tuple(pos.shape)}"
        )
    pos = torch.where(pos < 0, pos + seq_len, pos)
    if (pos < 0).any() or (pos >= seq_len).any():
        raise AttributionInputError(f"position {position} is outside the sequence of length {seq_len}")
    if not attention_mask.gather(1, pos[:, None]).bool().all():
        raise AttributionInputError(f"position {position} points at a padding token; explain a real token")
    return pos


def masked_positions(
    position: int | torch.Tensor | None,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    mask_token_id: int | None,
) -> torch.Tensor:
    """The ``[MASK]`` position whose vocabulary logits a masked LM explains, per row ([B] long).

    ``position`` is required (an int or one index per row). With ``input_ids`` the token there must be
    ``mask_token_id`` (the tokenizer's ``mask_token_id``: model configs do not store it); with
    ``inputs_embeds`` there is no token to check and ``mask_token_id`` is not needed.
    """
    if position is None:
        raise AttributionInputError(
            "a masked language model explains the prediction at one [MASK] token: pass position= (an int, or one "
            "index per row), e.g. position=(input_ids == tokenizer.mask_token_id).nonzero()[:, 1]"
        )
    pos = explained_positions(position, attention_mask, attention_mask.shape[0])
    if input_ids is None:
        return pos
    if mask_token_id is None:
        raise AttributionInputError(
            "pass mask_token_id=tokenizer.mask_token_id: the model config does not store the [MASK] id, and "
            "the explained position must be checked to hold a mask token"
        )
    tokens = input_ids.gather(1, pos[:, None].to(input_ids.device)).squeeze(1)
    wrong = (tokens != mask_token_id).nonzero().flatten().tolist()
    if wrong:
        row = wrong[0]
        raise AttributionInputError(
            f"position {pos[row].item()} of row {row} holds token id {tokens[row].item()}, not the mask token "
            f"{mask_token_id}: a masked LM predicts the token at a [MASK] position; name one (or mask that token)"
        )
    return pos


def resolve_target(target: int | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """Target ids [B] from ``target`` (None = argmax) with range and batch-size checks; logits are [B, C]."""
    batch, num = logits.shape
    if target is None:
        return logits.detach().argmax(-1)
    if isinstance(target, bool) or not isinstance(target, int | torch.Tensor):
        raise AttributionInputError(
            f"target must be None, an int or a LongTensor of shape [{batch}], got {target!r}"
        )
    t = torch.as_tensor(target, device=logits.device)
    if t.is_floating_point():
        raise AttributionInputError("target must hold integer class / token ids, got a floating-point tensor")
    t = t.long()
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise AttributionInputError(
            f"target has shape {tuple(t.shape)} but the batch has {batch} rows; pass one id per row or a single int"
        )
    if (t < 0).any() or (t >= num).any():
        bad = t[(t < 0) | (t >= num)][0].item()
        raise AttributionInputError(
            f"target id {bad} is out of range: the model has {num} outputs (ids 0..{num - 1})"
        )
    return t
