"""Explaining a continuation of a causal LM: one relevance row per generated token, by teacher forcing.

The prompt and the continuation go through the model in one forward pass (inside :func:`hf_pelrp.lrp`); the
logit of continuation token ``s`` is read at the position before it, and each row is one backward pass from
that logit over the shared graph (``retain_graph``), so row ``s`` equals explaining token ``s`` alone from its
prefix. Contrastive rows (``logit(target) - logit(foil)``) and the sum over the whole span (one backward) are
options.
"""

from __future__ import annotations

from typing import Any

import torch

from .adapters import adapter_for
from .config import LRPConfig, model_default_config, resolve_config
from .engine import _check_finite, lrp
from .errors import AttributionInputError
from .inputs import as_batch
from .result import GenerationAttribution
from .targets import CAUSAL_LM, accepts_logits_to_keep, head_kind, resolve_target

SPAN_REDUCTIONS = ("sum",)


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


def greedy_continuation(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The greedy continuation of a 1-D ``prompt`` (``model.generate`` with ``do_sample=False``), 1-D.

    Generation stops early at the model's end-of-sequence token (which is kept, and explained).
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
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model.generate(
                prompt[None],
                attention_mask=torch.ones_like(prompt)[None],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
            )
    finally:
        model.train(was_training)
    return out[0, prompt.shape[0] :]


def explain_continuation(
    model: torch.nn.Module,
    input_ids: Any,
    continuation_ids: Any = None,
    *,
    attention_mask: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    generate: bool = False,
    max_new_tokens: int | None = None,
    foil: int | torch.Tensor | None = None,
    span_reduce: str | None = None,
    mode: str | None = None,
    positional: bool | None = None,
    config: LRPConfig | None = None,
    progress: bool = False,
    gradient_checkpointing: bool | None = None,
    **model_inputs: Any,
) -> GenerationAttribution:
    """Explain each token of a continuation of one prompt (teacher forcing), or of a greedy generation.

    One forward pass over ``prompt + continuation`` with the LRP rules attached, then one backward pass per
    continuation token from its logit (read at the position before it), over the same graph. Row ``s`` is
    therefore what :func:`hf_pelrp.attribute` gives for ``target = continuation[s]`` on the prefix
    ``prompt + continuation[:s]``, padded with zeros to the full length.

    Parameters
    ----------
    model
        A supported causal LM (``*ForCausalLM``).
    input_ids : LongTensor [T] or [1, T]
        The prompt (one sequence; padding marked in ``attention_mask`` is removed).
    continuation_ids : LongTensor [S] or [1, S], optional
        The tokens to explain. Exactly one of ``continuation_ids`` and ``generate=True``.
    generate, max_new_tokens
        Generate ``max_new_tokens`` tokens greedily (stopping early at end-of-sequence), then explain them.
    foil
        Contrastive rows: an id, or LongTensor [S] (one per continuation token); each row explains
        ``logit(token) - logit(foil)``.
    span_reduce
        ``"sum"``: explain the sum of the (contrastive) logits of the whole continuation in one backward
        pass; the result has a single row.
    mode, positional, config
        The rules (see :func:`hf_pelrp.attribute`); default: the model's own defaults, else AttnLRP with
        positions.
    progress
        Show a progress bar over the backward passes.
    gradient_checkpointing
        Recompute each block in the backward passes instead of keeping its activations (see
        :func:`hf_pelrp.lrp`); default: on when ``model.gradient_checkpointing_enable()`` was called.

    Returns
    -------
    GenerationAttribution
        Matrices [S, P + S] (or [1, P + S] with ``span_reduce``), the explained values and their gaps.

    Raises
    ------
    AttributionInputError
        Not a causal LM, a batch of several prompts, both or neither of ``continuation_ids`` and
        ``generate``, an unknown ``span_reduce``, out-of-range ids.
    """
    cfg = config if config is not None else resolve_config(model_default_config(model), mode, positional)
    adapter = adapter_for(model)
    if head_kind(model) != CAUSAL_LM:
        raise AttributionInputError(
            f"explaining a continuation needs a causal language model (*ForCausalLM), got {type(model).__name__}"
        )
    if inputs_embeds is not None:
        raise AttributionInputError(
            "explaining a continuation needs input_ids (token ids), not inputs_embeds"
        )
    if input_ids is None:
        raise AttributionInputError("no prompt: pass input_ids")
    if model_inputs:
        raise AttributionInputError(
            f"extra model inputs {sorted(model_inputs)} are not supported when explaining a continuation "
            "(positions are derived from the prompt and the continuation)"
        )
    if span_reduce is not None and span_reduce not in SPAN_REDUCTIONS:
        raise AttributionInputError(
            f"span_reduce must be one of {SPAN_REDUCTIONS} or None, got {span_reduce!r}"
        )
    device = next(model.parameters()).device
    prompt = _prompt_row(input_ids, attention_mask).to(device)
    if generate:
        if continuation_ids is not None:
            raise AttributionInputError("pass either continuation_ids or generate=True, not both")
        continuation = greedy_continuation(model, prompt, max_new_tokens)
    elif continuation_ids is None:
        raise AttributionInputError(
            "no continuation to explain: pass continuation_ids, or generate=True with max_new_tokens"
        )
    else:
        continuation = _continuation_row(continuation_ids, device)
    if continuation.numel() == 0:
        raise AttributionInputError("the model generated no new token: nothing to explain")

    full = torch.cat([prompt, continuation])[None]
    _check_vocabulary(model, full)
    prompt_len, steps = prompt.shape[0], continuation.shape[0]
    positions = torch.arange(prompt_len - 1, prompt_len - 1 + steps, device=device)
    inputs, _ = adapter.validate_inputs(model, {"input_ids": full, "attention_mask": torch.ones_like(full)})

    with (
        lrp(model, config=cfg, gradient_checkpointing=gradient_checkpointing) as ctx,
        torch.enable_grad(),
    ):
        if accepts_logits_to_keep(model):
            # only the continuation's positions go through the (vocabulary-sized) LM head
            logits = model(**inputs, logits_to_keep=positions[None]).logits[0]
        else:
            logits = model(**inputs).logits[0, positions]
        targets = resolve_target(continuation, logits)
        values = logits.gather(1, targets[:, None]).squeeze(1)
        foil_ids = None
        if foil is not None:
            foil_ids = resolve_target(foil, logits)
            values = values - logits.gather(1, foil_ids[:, None]).squeeze(1)
        leaves = [leaf for leaf in ctx.leaves() if leaf.requires_grad]
        seeds = [values.sum()] if span_reduce == "sum" else list(values)
        rows: list[dict[str, torch.Tensor | None]] = []
        iterator = seeds
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(seeds, desc="explaining tokens", unit="token")
        for i, seed in enumerate(iterator):
            ctx.zero_grad()
            torch.autograd.backward(seed, inputs=leaves, retain_graph=i < len(seeds) - 1)
            rows.append(ctx.maps())
        ctx.zero_grad()

    def stack(key: str) -> torch.Tensor | None:
        if rows[0][key] is None:
            return None
        return torch.cat([r[key] for r in rows]).detach()

    explained = values.detach().float()
    result = GenerationAttribution(
        token=stack("token"),
        position=stack("position"),
        position_by_layer=stack("position_by_layer"),
        target=targets.detach(),
        target_value=explained.sum()[None] if span_reduce == "sum" else explained,
        input_ids=full[0].detach(),
        prompt_length=prompt_len,
        foil=None if foil_ids is None else foil_ids.detach(),
        span_reduce=span_reduce,
        mode=cfg.mode,
        positional=cfg.positional,
        model_type=model.config.model_type,
    )
    _check_finite(result, model)
    return result
