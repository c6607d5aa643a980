"""One explanation request: everything one call asks of the engine, resolved once.

Every entry point (:func:`hf_pelrp.attribute`, :func:`hf_pelrp.explain_continuation`, the pipeline, the CLI, the
dataset runner, Captum, Inseq and the evaluation) turns its arguments into an :class:`ExplanationRequest` and
hands it to :func:`hf_pelrp.engine.explain`. Building the request is where the rules are resolved
(:func:`hf_pelrp.config.resolve_rules`), the adapter and head kind are looked up, string targets become ids and a
continuation is checked (or generated): each exactly once per call. The engine never resolves any of these again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .adapters import Adapter, adapter_for
from .config import LRPConfig, resolve_rules
from .errors import AttributionInputError, AttributionStateError
from .generation import continuation_inputs, greedy_continuation
from .heads import CAUSAL_LM, MASKED_LM, SEQ2SEQ_LM, HeadKind, target_id_of

#: the ways several explained logits of one row may be reduced to one
SPAN_REDUCTIONS = ("sum",)


@dataclass(frozen=True)
class Continuation:
    """A continuation explained token by token (teacher forcing).

    Attributes
    ----------
    tokens
        The explained continuation ids [S].
    positions
        [1, S]: the position whose logit explains each token (the position before it).
    sequence
        Decoder-only models: the prompt followed by the continuation [1, P + S]. Encoder-decoder models: the
        decoder input, the target prefix followed by the continuation without its last token.
    prompt_length
        Decoder-only models: ``P``, the number of prompt tokens; encoder-decoder models: the prefix length.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    sequence: torch.Tensor
    prompt_length: int


@dataclass(frozen=True)
class ExplanationRequest:
    """What one call explains, and with which rules, resolved once.

    Attributes
    ----------
    model
        The model explained.
    inputs
        The model inputs, as the family takes them (``input_ids``, ``attention_mask``, ``inputs_embeds``,
        ``pixel_values``, ``decoder_input_ids``, ...). ``None`` values are dropped by the family's input check.
    rules
        The resolved :class:`LRPConfig`.
    adapter, kind
        The model's declaration and head kind (looked up once).
    target, foil
        The explained id(s) and the contrastive id(s), already ids (a string was turned into one), or ``None``.
    position
        Causal LMs: the position explained (default the last token); masked LMs: the ``[MASK]`` position.
    mask_token_id
        Masked LMs with ``input_ids``: the id the token at ``position`` must be.
    continuation
        A continuation explained token by token (:class:`Continuation`), or ``None``: one logit per row.
    span_reduce
        ``"sum"``: explain the sum of the continuation's logits in one backward pass.
    tokenizer
        Display tokens and labels of the result (optional).
    gradient_checkpointing, progress
        How to run: recompute blocks in the backward pass; show a progress bar over several backward passes.
    """

    model: torch.nn.Module
    inputs: dict[str, Any]
    rules: LRPConfig
    adapter: Adapter
    kind: HeadKind
    target: Any = None
    foil: Any = None
    position: Any = None
    mask_token_id: int | None = None
    continuation: Continuation | None = None
    span_reduce: str | None = None
    tokenizer: Any = field(default=None, compare=False)
    gradient_checkpointing: bool | None = None
    progress: bool = False

    def with_inputs(self, inputs: dict[str, Any], target: Any = None) -> ExplanationRequest:
        """The same request (rules, adapter, options) for other inputs: a batch loop resolves once."""
        return replace(self, inputs=inputs, target=target)


#: keyword arguments of a single request that say what to explain and how (the rest are model inputs)
REQUEST_OPTIONS = ("config", "foil", "position", "mask_token_id", "tokenizer", "gradient_checkpointing")


def split_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``kwargs`` of a front end as (options of :func:`single_request`, model inputs)."""
    options = {k: v for k, v in kwargs.items() if k in REQUEST_OPTIONS}
    return options, {k: v for k, v in kwargs.items() if k not in REQUEST_OPTIONS}


def check_grad_mode() -> None:
    """Refuse ``torch.inference_mode()``: relevance is computed by a backward pass."""
    if torch.is_inference_mode_enabled():
        raise AttributionStateError(
            "hf_pelrp was called inside torch.inference_mode(): relevance is computed by a backward pass, which "
            "inference mode forbids (this is not a problem of the model). Call it outside the inference_mode block "
            "(torch.no_grad() around it is fine: attribution enables gradients itself)."
        )


def single_request(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    *,
    config: LRPConfig | str | None = None,
    mode: str | None = None,
    positional: bool | None = None,
    target: Any = None,
    foil: Any = None,
    position: Any = None,
    mask_token_id: int | None = None,
    tokenizer: Any = None,
    gradient_checkpointing: bool | None = None,
) -> ExplanationRequest:
    """The request of one explained logit per row (:func:`hf_pelrp.attribute`).

    ``config`` / ``mode`` / ``positional`` are resolved here, once (:func:`hf_pelrp.config.resolve_rules`);
    a masked LM without ``mask_token_id`` takes the tokenizer's.
    """
    check_grad_mode()
    rules = resolve_rules(model, config, mode, positional)
    adapter = adapter_for(model)
    kind = adapter.head(model)
    if mask_token_id is None and kind.name == MASKED_LM and tokenizer is not None:
        mask_token_id = getattr(tokenizer, "mask_token_id", None)
    return ExplanationRequest(
        model=model,
        inputs=dict(inputs),
        rules=rules,
        adapter=adapter,
        kind=kind,
        target=target_id_of(target, model, tokenizer, "target"),
        foil=target_id_of(foil, model, tokenizer, "foil"),
        position=position,
        mask_token_id=mask_token_id,
        tokenizer=tokenizer,
        gradient_checkpointing=gradient_checkpointing,
    )


def continuation_request(
    model: torch.nn.Module,
    input_ids: Any,
    continuation_ids: Any = None,
    *,
    attention_mask: Any = None,
    generate: bool = False,
    max_new_tokens: int | None = None,
    foil: Any = None,
    span_reduce: str | None = None,
    config: LRPConfig | str | None = None,
    mode: str | None = None,
    positional: bool | None = None,
    tokenizer: Any = None,
    progress: bool = False,
    gradient_checkpointing: bool | None = None,
    decoder_input_ids: Any = None,
    **model_inputs: Any,
) -> ExplanationRequest:
    """The request of a continuation explained token by token (:func:`hf_pelrp.explain_continuation`).

    Decoder-only models: the prompt's real tokens followed by the continuation, in one sequence. Encoder-decoder
    models: the source, and the decoder input ``decoder_input_ids`` (default: the decoder start token) followed by
    the continuation without its last token. With ``generate=True`` the continuation is generated greedily here.
    """
    check_grad_mode()
    rules = resolve_rules(model, config, mode, positional)
    adapter = adapter_for(model)
    kind = adapter.head(model)
    if kind.name not in (CAUSAL_LM, SEQ2SEQ_LM):
        raise AttributionInputError(
            "explaining a continuation needs a causal language model (*ForCausalLM) or an encoder-decoder LM, "
            f"got {type(model).__name__}"
        )
    if "inputs_embeds" in model_inputs and model_inputs["inputs_embeds"] is not None:
        raise AttributionInputError(
            "explaining a continuation needs input_ids (token ids), not inputs_embeds"
        )
    images = _image_inputs(model, adapter, model_inputs)
    extra = sorted(k for k, v in model_inputs.items() if v is not None and k not in images)
    if extra:
        raise AttributionInputError(
            f"extra model inputs {extra} are not supported when explaining a continuation "
            "(positions are derived from the prompt and the continuation)"
        )
    if decoder_input_ids is not None and kind.name != SEQ2SEQ_LM:
        raise AttributionInputError("decoder_input_ids= only applies to encoder-decoder models")
    if span_reduce is not None and span_reduce not in SPAN_REDUCTIONS:
        raise AttributionInputError(
            f"span_reduce must be one of {SPAN_REDUCTIONS} or None, got {span_reduce!r}"
        )
    if generate and continuation_ids is not None:
        raise AttributionInputError("pass either continuation_ids or generate=True, not both")
    if not generate and continuation_ids is None:
        raise AttributionInputError(
            "no continuation to explain: pass continuation_ids, or generate=True with max_new_tokens"
        )
    if not generate and max_new_tokens is not None:
        raise AttributionInputError("max_new_tokens= only applies with generate=True")
    device = next(model.parameters()).device
    if kind.name == SEQ2SEQ_LM:
        inputs, continuation = _seq2seq_continuation(
            model,
            input_ids,
            continuation_ids,
            attention_mask,
            generate,
            max_new_tokens,
            decoder_input_ids,
            device,
        )
    else:
        inputs, continuation = _decoder_continuation(
            model,
            input_ids,
            continuation_ids,
            attention_mask,
            generate,
            max_new_tokens,
            device,
            images,
            adapter,
        )
    return ExplanationRequest(
        model=model,
        inputs=inputs,
        rules=rules,
        adapter=adapter,
        kind=kind,
        target=continuation.tokens[None],
        foil=_continuation_foil(target_id_of(foil, model, tokenizer, "foil"), continuation.tokens.numel()),
        continuation=continuation,
        span_reduce=span_reduce,
        tokenizer=tokenizer,
        gradient_checkpointing=gradient_checkpointing,
        progress=progress,
    )


def _decoder_continuation(
    model: torch.nn.Module,
    input_ids: Any,
    continuation_ids: Any,
    attention_mask: Any,
    generate: bool,
    max_new_tokens: int | None,
    device: torch.device,
    images: dict[str, Any] | None = None,
    adapter: Adapter | None = None,
) -> tuple[dict[str, Any], Continuation]:
    prompt, continuation = continuation_inputs(model, input_ids, attention_mask, continuation_ids, device)
    images = _prompt_image_inputs(images or {}, input_ids, attention_mask, device)
    if images and adapter is not None:
        # the prompt and its image checked before anything runs (generate() would fail on a wrong image size
        # or placeholder count with an error of its own, deep in the vision tower)
        adapter.validate_inputs(model, {"input_ids": prompt[None], **images})
    if generate:
        continuation = greedy_continuation(model, prompt, max_new_tokens, **images)
        if continuation.numel() == 0:
            raise AttributionInputError("the model generated no new token: nothing to explain")
    full = torch.cat([prompt, continuation])[None]
    prompt_len, steps = prompt.shape[0], continuation.shape[0]
    positions = torch.arange(prompt_len - 1, prompt_len - 1 + steps, device=device)[None]
    inputs = {"input_ids": full, "attention_mask": torch.ones_like(full)}
    inputs.update(_extend_image_inputs(images, prompt_len, steps))
    return inputs, Continuation(continuation, positions, full, prompt_len)


def _image_inputs(model: torch.nn.Module, adapter: Adapter, model_inputs: dict[str, Any]) -> dict[str, Any]:
    """The image inputs of a continuation of a vision-language model: ``pixel_values`` and the keywords its
    declaration says come with images (``image_keys``, e.g. Gemma 3's ``token_type_ids``), given (not None).

    Raises
    ------
    AttributionInputError
        Images for a model without a vision tower hf_pelrp explains.
    """
    if model_inputs.get("pixel_values") is None:
        return {}
    if getattr(adapter, "vision", None) is None:
        raise AttributionInputError(
            f"pixel_values= was given, but {type(model).__name__} has no vision tower hf_pelrp explains "
            "(it is a text-only model here): explain the text alone, without pixel_values"
        )
    keys = ("pixel_values", *getattr(adapter.inputs, "image_keys", ()))
    return {k: model_inputs[k] for k in keys if model_inputs.get(k) is not None}


def _prompt_image_inputs(
    images: dict[str, Any], input_ids: Any, attention_mask: Any, device: torch.device
) -> dict[str, Any]:
    """The image inputs on ``device``; those laid over the prompt's tokens ([1, T], like ``token_type_ids``) keep
    the prompt's real tokens only, as the prompt does (padding removed)."""
    if not images:
        return {}
    length = torch.as_tensor(input_ids).shape[-1]
    keep = None if attention_mask is None else torch.as_tensor(attention_mask).reshape(-1).bool()
    out = {}
    for key, value in images.items():
        value = torch.as_tensor(value, device=device) if not isinstance(value, torch.Tensor) else value
        value = value.to(device)
        if _per_token(key, value, length) and keep is not None:
            value = value[:, keep.to(device)]
        out[key] = value
    return out


def _per_token(key: str, value: torch.Tensor, length: int) -> bool:
    # by name, not by shape alone: a grid such as image_grid_thw [1, 3] must not pass for a 3-token prompt's map
    return key.endswith("token_type_ids") and value.dim() == 2 and value.shape == (1, length)


def _extend_image_inputs(images: dict[str, Any], prompt_len: int, steps: int) -> dict[str, Any]:
    """Per-token image inputs over prompt + continuation: continuation tokens are text, so they get 0 (the
    text value of ``token_type_ids`` / ``mm_token_type_ids``); the rest (pixels, grids) is unchanged."""
    out = {}
    for key, value in images.items():
        if _per_token(key, value, prompt_len):
            value = torch.cat([value, value.new_zeros(1, steps)], dim=1)
        out[key] = value
    return out


def _seq2seq_continuation(
    model: torch.nn.Module,
    input_ids: Any,
    continuation_ids: Any,
    attention_mask: Any,
    generate: bool,
    max_new_tokens: int | None,
    decoder_input_ids: Any,
    device: torch.device,
) -> tuple[dict[str, Any], Continuation]:
    from .adapters.seq2seq import decoder_start_id

    source = torch.as_tensor(input_ids, device=device)
    source = source[None] if source.dim() == 1 else source
    if source.shape[0] != 1:
        raise AttributionInputError(
            f"explaining a continuation takes one source sequence, got a batch of {source.shape[0]}"
        )
    if attention_mask is not None:
        source = source[:, torch.as_tensor(attention_mask, device=device).reshape(-1).bool()]
    prefix = (
        torch.tensor([decoder_start_id(model)], device=device)
        if decoder_input_ids is None
        else torch.as_tensor(decoder_input_ids, device=device).reshape(-1)
    )
    if generate:
        with torch.no_grad():
            out = model.generate(
                input_ids=source,
                decoder_input_ids=prefix[None],
                max_new_tokens=max_new_tokens or 20,
                do_sample=False,
                num_beams=1,
            )
        continuation = out[0, prefix.numel() :]
        if continuation.numel() == 0:
            raise AttributionInputError("the model generated no new token: nothing to explain")
    else:
        continuation = torch.as_tensor(continuation_ids, device=device).reshape(-1)
        if continuation.numel() == 0:
            raise AttributionInputError("continuation_ids is empty: nothing to explain")
    steps = continuation.numel()
    decoder = torch.cat([prefix, continuation[:-1]])[None]
    positions = torch.arange(prefix.numel() - 1, prefix.numel() - 1 + steps, device=device)[None]
    inputs = {"input_ids": source, "decoder_input_ids": decoder}
    return inputs, Continuation(continuation, positions, decoder, prefix.numel())


def _continuation_foil(foil: Any, steps: int) -> Any:
    """A continuation's foil: one id for every row, or one per continuation token (checked)."""
    if isinstance(foil, torch.Tensor | list | tuple):
        ids = torch.as_tensor(foil).reshape(-1)
        if ids.numel() == 1 and not ids.is_floating_point():
            return int(ids)
        if ids.numel() != steps:
            raise AttributionInputError(
                f"foil must be one id or one per continuation token ({steps}), got {ids.numel()}"
            )
        return ids
    return foil
