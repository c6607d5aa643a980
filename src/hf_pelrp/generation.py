"""The inputs of a continuation explanation: the prompt and continuation ids, checked, and greedy generation.

:func:`hf_pelrp.explain_continuation` (in the engine) explains the continuation: prompt and continuation go
through the model in one forward pass; the logit of continuation token ``s`` is read at the position before
it, and each row is one backward pass from that logit over the shared graph, so row ``s`` equals explaining
token ``s`` alone from its prefix.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import AttributionInputError
from .inputs import as_batch


def _prompt_row(input_ids: Any, attention_mask: Any) -> torch.Tensor:
    """The prompt as a 1-D tensor of its real tokens (padding, if any, removed)."""
    ids = as_batch(input_ids, "input_ids")
    if ids.shape[0] != 1:
        raise AttributionInputError(
            f"explaining a continuation takes one prompt (batch of 1), got a batch of {ids.shape[0]}; "
            "call it once per prompt."
        )
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise AttributionInputError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.shape[1] == 0:
        raise AttributionInputError("empty prompt: give at least one token to continue from")
    row = ids[0]
    if attention_mask is not None:
        mask = as_batch(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise AttributionInputError(
                f"attention_mask has shape {tuple(mask.shape)} but input_ids has shape {tuple(ids.shape)}"
            )
        row = row[mask[0].to(row.device).bool()]
        if row.numel() == 0:
            raise AttributionInputError("attention_mask is all padding: nothing to continue from")
    return row


def _continuation_row(continuation_ids: Any, device: torch.device) -> torch.Tensor:
    cont = torch.as_tensor(continuation_ids)
    if cont.dim() == 2 and cont.shape[0] == 1:
        cont = cont[0]
    if cont.dim() != 1:
        raise AttributionInputError(
            f"continuation_ids must have shape [S] or [1, S], got {tuple(cont.shape)}"
        )
    if cont.is_floating_point() or cont.dtype == torch.bool:
        raise AttributionInputError(f"continuation_ids must be integer token ids, got dtype {cont.dtype}")
    if cont.numel() == 0:
        raise AttributionInputError("continuation_ids is empty: give at least one token to explain")
    return cont.to(device=device, dtype=torch.long)


def _check_vocabulary(model: torch.nn.Module, ids: torch.Tensor) -> None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = getattr(embeddings, "num_embeddings", None)
    if size is None:
        return
    bad = ids[(ids < 0) | (ids >= size)]
    if bad.numel():
        raise AttributionInputError(
            f"token id {int(bad[0])} is out of range: the model's vocabulary has {size} ids (0..{size - 1})"
        )


def greedy_continuation(
    model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int, **model_inputs: Any
) -> torch.Tensor:
    """The greedy continuation of a 1-D ``prompt`` (``model.generate`` with ``do_sample=False``), 1-D.

    Generation stops early at the model's end-of-sequence token (which is kept, and explained).
    ``model_inputs`` go to ``generate`` as they are: a vision-language model's ``pixel_values`` (and the
    keywords that come with them), the image the prompt's placeholder tokens stand for.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise AttributionInputError(
            f"generate=True needs max_new_tokens, a positive int (the number of tokens to generate and "
            f"explain), got {max_new_tokens!r}"
        )
    if not hasattr(model, "generate"):
        raise AttributionInputError(f"{type(model).__name__} has no generate() method")
    gen_cfg = getattr(model, "generation_config", None)
    pad = getattr(gen_cfg, "pad_token_id", None)
    if pad is None:
        pad = getattr(gen_cfg, "eos_token_id", None)
        if isinstance(pad, list):
            pad = pad[0] if pad else None
    # the flags, not model.eval() / train(): transformers' train() re-kernelizes a model with hub kernels on
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:
            m.training = False
        with torch.no_grad():
            out = model.generate(
                prompt[None],
                attention_mask=torch.ones_like(prompt)[None],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                **model_inputs,
            )
    finally:
        for m, training in flags:
            m.training = training
    return out[0, prompt.shape[0] :]


def continuation_inputs(
    model: torch.nn.Module,
    input_ids: Any,
    attention_mask: Any,
    continuation_ids: Any,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt (its real tokens) and the continuation (empty when it is to be generated) as 1-D id tensors
    on ``device``, checked: one prompt, integer ids inside the vocabulary, a non-empty continuation."""
    if input_ids is None:
        raise AttributionInputError("no prompt: pass input_ids")
    prompt = _prompt_row(input_ids, attention_mask).to(device)
    if continuation_ids is None:
        continuation = torch.zeros(0, dtype=torch.long, device=device)
    else:
        continuation = _continuation_row(continuation_ids, device)
    _check_vocabulary(model, torch.cat([prompt, continuation]))
    return prompt, continuation
