"""The attribution engine: the one flow behind every entry point (the reversible :func:`lrp` context it runs in
lives in :mod:`hf_pelrp.context`).

Data flows one way (docs/architecture.md): resolve the rules once, check the inputs, attach the adapter's rules
to this model instance, run one forward pass, seed the explained logit(s) with gradient 1, run the backward
pass(es), read ``leaf * leaf.grad`` through the positional kind, build the result once. :func:`attribute`,
:func:`explain_continuation`, the pipeline, the CLI, the dataset runner and the evaluation all call
:func:`explain`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .adapters import adapter_for
from .config import LRPConfig, resolve_rules
from .context import LRPContext, is_busy, lrp  # noqa: F401  (hf_pelrp.engine.lrp: the public place)
from .errors import AttributionInputError, AttributionStateError
from .generation import continuation_inputs, greedy_continuation
from .heads import (
    CAUSAL_LM,
    SEQ2SEQ_LM,
    Request,
    explained_positions,
    resolve_target,
    select,
    target_id_of,
)
from .precision import half_precision_hint, watch_non_finite
from .result import Attribution, GenerationAttribution, Seq2SeqAttribution
from .tokens import display_token, display_tokens, special_ids

#: the maps every family has; anything else LRPContext.maps() returns goes to Attribution.extras
_CORE_MAPS = frozenset({"token", "position", "position_by_layer", "segment"})
SPAN_REDUCTIONS = ("sum",)


# ---- the one flow ----------------------------------------------------------------------------------------------


def _check_grad_mode() -> None:
    if torch.is_inference_mode_enabled():
        raise AttributionStateError(
            "hf_pelrp was called inside torch.inference_mode(): relevance is computed by a backward pass, which "
            "inference mode forbids (this is not a problem of the model). Call it outside the inference_mode block "
            "(torch.no_grad() around it is fine: attribution enables gradients itself)."
        )


def _plain(value: Any) -> Any:
    """Inference tensors (made under torch.inference_mode) cannot take part in autograd: use a normal copy."""
    if isinstance(value, torch.Tensor) and value.is_inference():
        return value.clone()
    return value


@dataclass(frozen=True)
class _Pass:
    """The maps of one explained pass, in the user's token order, one row per explained logit."""

    maps: dict[str, torch.Tensor | None]
    targets: torch.Tensor
    values: torch.Tensor
    foils: torch.Tensor | None
    positions: torch.Tensor | None
    inputs: dict[str, Any]
    attention_mask: torch.Tensor
    target_mask: torch.Tensor | None = None


def explain(
    model: torch.nn.Module,
    model_inputs: dict[str, Any],
    *,
    config: LRPConfig | str | None = None,
    mode: str | None = None,
    positional: bool | None = None,
    target: Any = None,
    foil: Any = None,
    position: Any = None,
    positions: torch.Tensor | None = None,
    mask_token_id: int | None = None,
    span_reduce: str | None = None,
    tokenizer: Any = None,
    gradient_checkpointing: bool | None = None,
    progress: bool = False,
) -> _Pass:
    """The whole attribution flow, shared by every entry point.

    Rules resolved once (:func:`hf_pelrp.config.resolve_rules`), inputs checked by the family's declaration,
    one forward pass inside :func:`lrp`, the explained logits read by the head kind, one backward pass per
    group of independent seeds (one per batch row: all rows at once; several positions of one row: one after
    the other over the same graph; ``span_reduce="sum"``: their sum), maps read by the positional kind, padding
    alignment undone, finiteness and cut-graph checks.
    """
    _check_grad_mode()
    if span_reduce is not None and span_reduce not in SPAN_REDUCTIONS:
        raise AttributionInputError(
            f"span_reduce must be one of {SPAN_REDUCTIONS} or None, got {span_reduce!r}"
        )
    cfg = resolve_rules(model, config, mode, positional)
    adapter = adapter_for(model)
    kind = adapter.head(model)
    prepared = adapter.validate_inputs(model, {k: _plain(v) for k, v in model_inputs.items()})
    inputs, mask, alignment = prepared.inputs, prepared.attention_mask, prepared.alignment
    if mask.numel() == 0:  # one check for every family's declaration (text, images, encoder-decoder)
        raise AttributionInputError(
            f"empty input (attention mask of shape {tuple(mask.shape)}): give at least one row with at least one "
            "token or image"
        )
    target = target_id_of(target, model, tokenizer, "target")
    foil = target_id_of(foil, model, tokenizer, "foil")
    if alignment is not None and position is not None:
        position = alignment.align_positions(explained_positions(position, mask, mask.shape[0])[:, None])[
            :, 0
        ]
    run_mask = inputs.get("attention_mask", mask)
    if "use_cache" in _forward_parameters(model):
        inputs = {**inputs, "use_cache": False}
    request = Request(position=position, positions=positions, mask_token_id=mask_token_id)
    # encoder-decoder models explain decoder positions: the head reads them from the target prefix's mask
    select_mask = prepared.target_mask if prepared.target_mask is not None else run_mask

    def forward_and_seeds(ctx: LRPContext):
        selection = select(model, kind, model, inputs, select_mask, request)
        ctx.check_attention_ran()
        logits = selection.logits
        targets = resolve_target(target, logits)
        values = logits.gather(-1, targets[..., None].to(logits.device)).squeeze(-1)
        foils = None
        if foil is not None:
            foils = resolve_target(foil, logits, "foil")
            values = values - logits.gather(-1, foils[..., None].to(logits.device)).squeeze(-1)
        return selection, targets, values, foils

    with lrp(model, config=cfg, gradient_checkpointing=gradient_checkpointing) as ctx, torch.enable_grad():
        selection, targets, values, foils = forward_and_seeds(ctx)
        count = values.shape[1]
        seeds = [values.sum(1)] if span_reduce == "sum" else [values[:, k] for k in range(count)]
        leaves = [leaf for leaf in ctx.leaves() if leaf.requires_grad]
        rows: list[dict[str, torch.Tensor | None]] = []
        iterator = seeds
        if progress and len(seeds) > 1:
            from tqdm.auto import tqdm

            iterator = tqdm(seeds, desc="explaining tokens", unit="token")
        for i, seed in enumerate(iterator):
            if not seed.requires_grad:
                raise _cut_graph_error(model)
            ctx.zero_grad()
            torch.autograd.backward(seed.sum(), inputs=leaves, retain_graph=i < len(seeds) - 1)
            token_leaf = ctx.store.additive.get("token")
            if token_leaf is not None and token_leaf.grad is None:
                raise _cut_graph_error(model)
            rows.append(ctx.maps())
        ctx.zero_grad()

    maps = _stack_rows(rows)
    if span_reduce == "sum":
        values = values.sum(1, keepdim=True)
    out_positions = selection.positions
    if alignment is not None:
        maps = {k: alignment.restore(v) if _is_sequence_map(k, v, mask) else v for k, v in maps.items()}
        # an encoder-decoder's explained positions are decoder positions: the source's alignment is not theirs
        if out_positions is not None and kind.name != SEQ2SEQ_LM:
            out_positions = alignment.restore_positions(out_positions)
    result = _Pass(
        maps=maps,
        targets=targets.detach(),
        values=values.detach(),
        foils=None if foils is None else foils.detach(),
        positions=None if out_positions is None else out_positions.detach(),
        inputs=inputs,
        attention_mask=mask,
        target_mask=prepared.target_mask,
    )

    def locate() -> str:
        with (
            lrp(model, config=cfg, gradient_checkpointing=False) as again,
            watch_non_finite(model) as watch,
            torch.enable_grad(),
        ):
            _, _, seeds_again, _ = forward_and_seeds(again)
            seeds_again.sum().backward()
        return watch.describe() + half_precision_hint(watch.dtype)

    _check_finite(result, model, locate)
    return result


def _forward_parameters(model: torch.nn.Module) -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(model.forward).parameters)


def _is_sequence_map(name: str, value: Any, mask: torch.Tensor) -> bool:
    # an encoder-decoder's target prefix is not source-aligned; offset bins (position_by_offset) are not positions
    if name.startswith("target_") or "offset" in name:
        return False
    return (
        isinstance(value, torch.Tensor)
        and value.dim() >= 2
        and value.shape[-1] == mask.shape[-1]
        and (name in _CORE_MAPS or value.shape[0] == mask.shape[0])
    )


def _stack_rows(rows: list[dict[str, torch.Tensor | None]]) -> dict[str, torch.Tensor | None]:
    """One backward pass per seed group: [B, ...] maps of each, stacked as [B * groups, ...] (for one row with
    several seeds, the rows are the seeds)."""
    if len(rows) == 1:
        return {k: None if v is None else v.detach() for k, v in rows[0].items()}
    out: dict[str, torch.Tensor | None] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        out[key] = None if values[0] is None else torch.cat([v.detach() for v in values])
    return out


def _cut_graph_error(model: torch.nn.Module) -> AttributionStateError:
    """The explained logit does not depend on the token leaf: refuse to report all-zero maps."""
    return AttributionStateError(
        f"no gradient reached the token embedding of {type(model).__name__}: something in the model (a hook "
        "running under torch.no_grad, a detached tensor, a custom forward) cut the backward pass, so every "
        "map would be 0. Attribute the unmodified transformers model."
    )


def _check_finite(result: _Pass, model: torch.nn.Module, locate: Callable[[], str] | None = None) -> None:
    """Raise if the relevance is NaN / inf; ``locate()`` re-runs the pass and names the module that overflowed."""
    maps = [v for v in result.maps.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if all(bool(torch.isfinite(m).all()) for m in maps) and bool(torch.isfinite(result.values).all()):
        return
    dtype = next(model.parameters()).dtype
    where = locate() if locate is not None else half_precision_hint(dtype).strip()
    raise AttributionStateError(
        f"relevance is not finite (NaN or inf) for {type(model).__name__} in {dtype}: {where}"
    )


def _gamma_of(cfg: LRPConfig) -> dict[str, float]:
    return {k: v for k in ("gamma_linear", "gamma_conv") if (v := getattr(cfg, k)) is not None}


def _labels(model: torch.nn.Module, tokenizer: Any, ids: list[int], vocabulary: bool) -> dict[int, str]:
    """Readable names of ``ids``: decoded tokens for LMs (with a tokenizer), else the model's class names."""
    if vocabulary:
        return {int(i): display_token(tokenizer, int(i)) for i in ids} if tokenizer is not None else {}
    names = getattr(getattr(model, "config", None), "id2label", None) or {}
    return {int(k): str(v) for k, v in names.items()}


# ---- entry points ------------------------------------------------------------------------------------------------


def attribute(
    model: torch.nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    target: int | str | torch.Tensor | None = None,
    mode: str | None = None,
    positional: bool | None = None,
    *,
    config: LRPConfig | str | None = None,
    inputs_embeds: torch.Tensor | None = None,
    position: int | torch.Tensor | None = None,
    mask_token_id: int | None = None,
    foil: int | str | torch.Tensor | None = None,
    tokenizer: Any = None,
    continuation_ids: torch.Tensor | None = None,
    generate: bool = False,
    max_new_tokens: int | None = None,
    span_reduce: str | None = None,
    gradient_checkpointing: bool | None = None,
    **model_inputs: Any,
) -> Attribution | GenerationAttribution:
    """Explain one logit per row with PE-LRP: one forward and one backward pass.

    Parameters
    ----------
    model
        A supported transformers model with a causal-LM, masked-LM, sequence- or image-classification head.
    input_ids : LongTensor [B, T]
        Token ids (or ``inputs_embeds`` [B, T, H], not both; ``pixel_values`` for image classifiers).
    attention_mask : LongTensor [B, T], optional
        1 for tokens, 0 for padding (left or right).
    target
        ``None``: the arg-max class / next token; an int or LongTensor [B]: the class id (classifiers) or
        vocabulary id (LMs); a string: a class label, or exactly one token of the vocabulary (``" Paris"``,
        with ``tokenizer=``).
    mode
        ``"attnlrp"`` or ``"cp"`` (attention probabilities constant), or a preset name. Default: the model's own
        default (:func:`hf_pelrp.from_pretrained`), else ``"attnlrp"``.
    positional
        ``True`` for PE-LRP (positions are leaves); ``False`` for the classic baseline. Default as ``mode``.
    config
        An :class:`LRPConfig` or a preset name (e.g. ``"vit-paper"``). A ``mode`` / ``positional`` that
        contradicts it is an error.
    position
        Causal LMs: the position whose next-token logit is explained (default: each row's last token).
        Masked LMs (required): the ``[MASK]`` position whose vocabulary logits are explained.
    mask_token_id
        Masked LMs with ``input_ids``: the tokenizer's ``mask_token_id``; the token at ``position`` must be it.
    foil
        Contrastive explanation: an id (or LongTensor [B], or a string like ``target``) whose logit is
        subtracted, so the explained value is ``logit(target) - logit(foil)`` (``Attribution.foil``).
    tokenizer
        Optional: turns string targets / foils into ids, and gives the result its display ``tokens``, the
        ``labels`` of the explained ids and the ``special_tokens_mask``.
    continuation_ids, generate, max_new_tokens, span_reduce
        Causal LMs: explain every token of a continuation of ``input_ids`` (given, or generated greedily with
        ``generate=True, max_new_tokens=N``); see :func:`explain_continuation`.
    gradient_checkpointing
        Recompute each block in the backward pass to save activation memory; the relevance is the same.
    **model_inputs
        Other inputs the family accepts (``position_ids``, ``token_type_ids``, ``pixel_values``,
        ``interpolate_pos_encoding``); anything else is refused with a clear error.

    Returns
    -------
    Attribution
        Token / position relevance [B, T], per-layer position relevance for rotary models, the explained
        target ids and logits, and the conservation gap.
    """
    if continuation_ids is not None or generate or span_reduce is not None or max_new_tokens is not None:
        if target is not None or position is not None:
            raise AttributionInputError(
                "target= and position= do not apply to a continuation: each continuation token is the target "
                "of the position before it. Use foil= for a contrastive explanation."
            )
        return explain_continuation(
            model,
            input_ids,
            continuation_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            generate=generate,
            max_new_tokens=max_new_tokens,
            foil=foil,
            span_reduce=span_reduce,
            mode=mode,
            positional=positional,
            config=config,
            tokenizer=tokenizer,
            gradient_checkpointing=gradient_checkpointing,
            **model_inputs,
        )
    cfg = resolve_rules(model, config, mode, positional)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "inputs_embeds": inputs_embeds,
        **model_inputs,
    }
    done = explain(
        model,
        inputs,
        config=cfg,
        target=target,
        foil=foil,
        position=position,
        mask_token_id=mask_token_id,
        tokenizer=tokenizer,
        gradient_checkpointing=gradient_checkpointing,
    )
    maps = done.maps
    kind = adapter_for(model).head(model)
    input_ids_out = as_user_ids(inputs.get("input_ids"), done.attention_mask)
    targets = done.targets[:, 0]
    foils = None if done.foils is None else done.foils[:, 0]
    ids = targets.tolist() + ([] if foils is None else foils.tolist())
    tokens = special = None
    if tokenizer is not None and input_ids_out is not None:
        tokens = [display_tokens(tokenizer, row) for row in input_ids_out.tolist()]
        specials = special_ids(tokenizer)
        special = torch.tensor(
            [[int(i) in specials for i in row] for row in input_ids_out.tolist()], dtype=torch.bool
        )
    token_map = maps["token"]
    extras = {k: v for k, v in maps.items() if k not in _CORE_MAPS}
    result_class = Attribution
    if getattr(model.config, "is_encoder_decoder", False):  # source maps + target-prefix maps
        result_class = Seq2SeqAttribution
        if "decoder_input_ids" in done.inputs:
            extras.update(_target_extras(done.inputs["decoder_input_ids"], done.target_mask, tokenizer))
    return result_class(
        token=token_map,
        position=maps["position"],
        position_by_layer=maps["position_by_layer"],
        segment=maps["segment"],
        foil=foils,
        target=targets,
        target_value=done.values[:, 0].to(token_map),
        position_index=None if done.positions is None else done.positions[:, 0],
        input_ids=input_ids_out,
        attention_mask=done.attention_mask,
        tokens=tokens,
        special_tokens_mask=special,
        labels=_labels(model, tokenizer, ids, kind.vocabulary_targets),
        mode=cfg.mode,
        positional=cfg.positional,
        model_type=model.config.model_type,
        gamma=_gamma_of(cfg),
        extras=extras,
    )


def _target_extras(ids: torch.Tensor, mask: torch.Tensor | None, tokenizer: Any) -> dict[str, Any]:
    """The target prefix of an encoder-decoder explanation, for display: ids, mask and (with a tokenizer) tokens."""
    ids = ids.detach()
    out: dict[str, Any] = {
        "target_input_ids": ids,
        "target_attention_mask": torch.ones_like(ids) if mask is None else mask.detach(),
    }
    if tokenizer is not None:
        out["target_tokens"] = [display_tokens(tokenizer, row) for row in ids.tolist()]
    return out


def as_user_ids(input_ids: Any, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The user's ``input_ids`` as a [B, T] tensor (for display), or ``None``."""
    if input_ids is None:
        return None
    ids = torch.as_tensor(input_ids)
    return ids.unsqueeze(0) if ids.dim() == 1 else ids


def _continuation_foil(foil: Any, steps: int) -> Any:
    """A continuation's foil: one id for every row, or one per continuation token (checked); strings pass."""
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


def explain_continuation(
    model: torch.nn.Module,
    input_ids: Any,
    continuation_ids: Any = None,
    *,
    attention_mask: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    generate: bool = False,
    max_new_tokens: int | None = None,
    foil: int | str | torch.Tensor | None = None,
    span_reduce: str | None = None,
    mode: str | None = None,
    positional: bool | None = None,
    config: LRPConfig | str | None = None,
    tokenizer: Any = None,
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
        Contrastive rows: an id, LongTensor [S] (one per continuation token) or a one-token string; each row
        explains ``logit(token) - logit(foil)``.
    span_reduce
        ``"sum"``: explain the sum of the (contrastive) logits of the whole continuation in one backward
        pass; the result has a single row.
    mode, positional, config
        The rules (see :func:`hf_pelrp.attribute`).
    tokenizer
        Optional: display tokens and labels of the result, string foils.
    progress
        Show a progress bar over the backward passes.
    gradient_checkpointing
        Recompute each block in the backward passes instead of keeping its activations (see :func:`lrp`).

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
    _check_grad_mode()
    cfg = resolve_rules(model, config, mode, positional)
    kind = adapter_for(model).head(model)
    if kind.name == SEQ2SEQ_LM:
        if inputs_embeds is not None:
            raise AttributionInputError(
                "explaining a continuation needs input_ids (token ids), not inputs_embeds"
            )
        return _explain_seq2seq_continuation(
            model,
            input_ids,
            continuation_ids,
            attention_mask=attention_mask,
            generate=generate,
            max_new_tokens=max_new_tokens,
            foil=foil,
            span_reduce=span_reduce,
            config=cfg,
            tokenizer=tokenizer,
            progress=progress,
            gradient_checkpointing=gradient_checkpointing,
            **model_inputs,
        )
    if kind.name != CAUSAL_LM:
        raise AttributionInputError(
            f"explaining a continuation needs a causal language model (*ForCausalLM), got {type(model).__name__}"
        )
    if inputs_embeds is not None:
        raise AttributionInputError(
            "explaining a continuation needs input_ids (token ids), not inputs_embeds"
        )
    if model_inputs:
        raise AttributionInputError(
            f"extra model inputs {sorted(model_inputs)} are not supported when explaining a continuation "
            "(positions are derived from the prompt and the continuation)"
        )
    device = next(model.parameters()).device
    if generate:
        if continuation_ids is not None:
            raise AttributionInputError("pass either continuation_ids or generate=True, not both")
    elif continuation_ids is None:
        raise AttributionInputError(
            "no continuation to explain: pass continuation_ids, or generate=True with max_new_tokens"
        )
    elif max_new_tokens is not None:
        raise AttributionInputError("max_new_tokens= only applies with generate=True")
    prompt, continuation = continuation_inputs(model, input_ids, attention_mask, continuation_ids, device)
    if generate:
        continuation = greedy_continuation(model, prompt, max_new_tokens)
        if continuation.numel() == 0:
            raise AttributionInputError("the model generated no new token: nothing to explain")
    full = torch.cat([prompt, continuation])[None]
    prompt_len, steps = prompt.shape[0], continuation.shape[0]
    positions = torch.arange(prompt_len - 1, prompt_len - 1 + steps, device=device)[None]
    foil = _continuation_foil(foil, steps)
    done = explain(
        model,
        {"input_ids": full, "attention_mask": torch.ones_like(full)},
        config=cfg,
        target=continuation[None],
        foil=foil,
        positions=positions,
        span_reduce=span_reduce,
        tokenizer=tokenizer,
        gradient_checkpointing=gradient_checkpointing,
        progress=progress,
    )
    maps = done.maps
    foils = None if done.foils is None else done.foils[0]
    ids = continuation.tolist() + ([] if foils is None else foils.tolist())
    return GenerationAttribution(
        token=maps["token"],
        position=maps["position"],
        position_by_layer=maps["position_by_layer"],
        segment=maps["segment"],
        target=done.targets[0],
        target_value=done.values[0].to(maps["token"]),
        input_ids=full[0].detach(),
        prompt_length=prompt_len,
        foil=foils,
        span_reduce=span_reduce,
        tokens=display_tokens(tokenizer, full[0].tolist()) if tokenizer is not None else None,
        special_tokens_mask=(
            torch.tensor([int(i) in special_ids(tokenizer) for i in full[0].tolist()], dtype=torch.bool)
            if tokenizer is not None
            else None
        ),
        labels=_labels(model, tokenizer, ids, True),
        mode=cfg.mode,
        positional=cfg.positional,
        model_type=model.config.model_type,
        gamma=_gamma_of(cfg),
    )


def _explain_seq2seq_continuation(
    model: torch.nn.Module,
    input_ids: Any,
    continuation_ids: Any = None,
    *,
    attention_mask: Any = None,
    generate: bool = False,
    max_new_tokens: int | None = None,
    foil: Any = None,
    span_reduce: str | None = None,
    config: LRPConfig,
    tokenizer: Any = None,
    progress: bool = False,
    gradient_checkpointing: bool | None = None,
    decoder_input_ids: Any = None,
    **model_inputs: Any,
) -> Seq2SeqAttribution:
    """Encoder-decoder models: explain each token of a target continuation (teacher forcing), one row per token.

    The decoder input is the target prefix (``decoder_input_ids``, default the decoder start token) followed by
    the continuation without its last token; row ``s`` explains continuation token ``s`` at the decoder position
    before it, over the source (the :class:`Seq2SeqAttribution` fields) and the target prefix (``target_*``
    extras: columns after the explained position are exactly 0). With ``generate=True`` the continuation is
    generated greedily from the source (``max_new_tokens``).
    """
    from .adapters.seq2seq import decoder_start_id

    if model_inputs:
        raise AttributionInputError(
            f"extra model inputs {sorted(model_inputs)} are not supported when explaining a continuation"
        )
    device = next(model.parameters()).device
    source = torch.as_tensor(input_ids, device=device)
    source = source[None] if source.dim() == 1 else source
    if source.shape[0] != 1:
        raise AttributionInputError(
            f"explaining a continuation takes one source sequence, got a batch of {source.shape[0]}"
        )
    mask = None if attention_mask is None else torch.as_tensor(attention_mask, device=device).reshape(1, -1)
    if mask is not None:
        source = source[:, mask[0].bool()]
    prefix = (
        torch.tensor([decoder_start_id(model)], device=device)
        if decoder_input_ids is None
        else torch.as_tensor(decoder_input_ids, device=device).reshape(-1)
    )
    if generate:
        if continuation_ids is not None:
            raise AttributionInputError("pass either continuation_ids or generate=True, not both")
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
    elif continuation_ids is None:
        raise AttributionInputError(
            "no continuation to explain: pass continuation_ids, or generate=True with max_new_tokens"
        )
    else:
        if max_new_tokens is not None:
            raise AttributionInputError("max_new_tokens= only applies with generate=True")
        continuation = torch.as_tensor(continuation_ids, device=device).reshape(-1)
        if continuation.numel() == 0:
            raise AttributionInputError("continuation_ids is empty: nothing to explain")
    steps = continuation.numel()
    decoder = torch.cat([prefix, continuation[:-1]])[None]
    positions = torch.arange(prefix.numel() - 1, prefix.numel() - 1 + steps, device=device)[None]
    foil = _continuation_foil(foil, steps)
    done = explain(
        model,
        {"input_ids": source, "decoder_input_ids": decoder},
        config=config,
        target=continuation[None],
        foil=foil,
        positions=positions,
        span_reduce=span_reduce,
        tokenizer=tokenizer,
        gradient_checkpointing=gradient_checkpointing,
        progress=progress,
    )
    maps = done.maps
    rows = maps["token"].shape[0]
    targets = continuation if span_reduce is None else continuation[-1:]
    foils = None if done.foils is None else done.foils[0][:rows]
    extras = {k: v for k, v in maps.items() if k not in _CORE_MAPS}
    extras.update(
        _target_extras(decoder.expand(rows, -1), torch.ones_like(decoder).expand(rows, -1), tokenizer)
    )
    ids = continuation.tolist() + ([] if foils is None else foils.tolist())
    source_rows = source.expand(rows, -1)
    tokens = None
    if tokenizer is not None:
        tokens = [display_tokens(tokenizer, source[0].tolist())] * rows
    return Seq2SeqAttribution(
        token=maps["token"],
        position=maps["position"],
        position_by_layer=maps["position_by_layer"],
        segment=maps["segment"],
        foil=foils,
        target=targets,
        target_value=done.values[0].to(maps["token"]),
        position_index=positions[0][:rows] if span_reduce is None else positions[0, -1:],
        input_ids=source_rows,
        attention_mask=torch.ones_like(source_rows),
        tokens=tokens,
        labels=_labels(model, tokenizer, ids, True),
        mode=config.mode,
        positional=config.positional,
        model_type=model.config.model_type,
        gamma=_gamma_of(config),
        extras=extras,
    )
