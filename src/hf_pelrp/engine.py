"""The attribution engine: the one flow behind every entry point (the reversible :func:`lrp` context it runs in
lives in :mod:`hf_pelrp.context`).

Data flows one way (docs/architecture.md): an entry point builds one :class:`~hf_pelrp.request.ExplanationRequest`
(rules resolved, adapter and head looked up, targets turned into ids, a continuation checked or generated: once),
and :func:`explain` runs it: check the inputs, attach the adapter's rules to this model instance, run one forward
pass, seed the explained logit(s) with gradient 1, run the backward pass(es), read ``leaf * leaf.grad`` through
the positional kind, and build the result in one place (:func:`build_result`). :func:`attribute`,
:func:`explain_continuation`, the pipeline, the CLI, the dataset runner, Captum, Inseq and the evaluation all
end in :func:`explain`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import LRPConfig
from .context import LRPContext, is_busy, lrp  # noqa: F401  (hf_pelrp.engine.lrp: the public place)
from .errors import AttributionInputError, AttributionStateError
from .heads import SEQ2SEQ_LM, Request, explained_positions, resolve_target, select
from .precision import half_precision_hint, watch_non_finite
from .request import (
    SPAN_REDUCTIONS,  # noqa: F401  (kept importable from the engine)
    ExplanationRequest,
    continuation_request,
    single_request,
)
from .result import IMAGE_MAPS, Attribution, GenerationAttribution, Seq2SeqAttribution
from .tokens import display_token, display_tokens, special_ids

#: the maps every family has; anything else LRPContext.maps() returns goes to Attribution.extras
_CORE_MAPS = frozenset({"token", "position", "position_by_layer", "segment"})


# ---- the one flow ----------------------------------------------------------------------------------------------


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


def _run(request: ExplanationRequest) -> _Pass:
    """The whole attribution flow of one request.

    Inputs checked by the family's declaration, one forward pass inside :func:`lrp`, the explained logits read
    by the head kind, one backward pass per group of independent seeds (one per batch row: all rows at once;
    several positions of one row: one after the other over the same graph; ``span_reduce="sum"``: their sum),
    maps read by the positional kind, padding alignment undone, finiteness and cut-graph checks. Nothing here
    resolves rules, adapters or targets again: the request holds them.
    """
    model, kind, cfg = request.model, request.kind, request.rules
    prepared = request.adapter.validate_inputs(model, {k: _plain(v) for k, v in request.inputs.items()})
    inputs, mask, alignment = prepared.inputs, prepared.attention_mask, prepared.alignment
    if mask.numel() == 0:  # one check for every family's declaration (text, images, encoder-decoder)
        raise AttributionInputError(
            f"empty input (attention mask of shape {tuple(mask.shape)}): give at least one row with at least one "
            "token or image"
        )
    target, foil, position = request.target, request.foil, request.position
    if alignment is not None and position is not None:
        position = alignment.align_positions(explained_positions(position, mask, mask.shape[0])[:, None])[
            :, 0
        ]
    run_mask = inputs.get("attention_mask", mask)
    if "use_cache" in _forward_parameters(model):
        inputs = {**inputs, "use_cache": False}
    positions = None if request.continuation is None else request.continuation.positions
    head_request = Request(position=position, positions=positions, mask_token_id=request.mask_token_id)
    span_reduce = request.span_reduce
    # encoder-decoder models explain decoder positions: the head reads them from the target prefix's mask
    select_mask = prepared.target_mask if prepared.target_mask is not None else run_mask

    def forward_and_seeds(ctx: LRPContext):
        selection = select(model, kind, model, inputs, select_mask, head_request)
        ctx.check_attention_ran()
        logits = selection.logits
        targets = resolve_target(target, logits)
        values = logits.gather(-1, targets[..., None].to(logits.device)).squeeze(-1)
        foils = None
        if foil is not None:
            foils = resolve_target(foil, logits, "foil")
            values = values - logits.gather(-1, foils[..., None].to(logits.device)).squeeze(-1)
        return selection, targets, values, foils

    with (
        lrp(model, config=cfg, gradient_checkpointing=request.gradient_checkpointing) as ctx,
        torch.enable_grad(),
    ):
        selection, targets, values, foils = forward_and_seeds(ctx)
        count = values.shape[1]
        seeds = [values.sum(1)] if span_reduce == "sum" else [values[:, k] for k in range(count)]
        leaves = [leaf for leaf in ctx.leaves() if leaf.requires_grad]
        rows: list[dict[str, torch.Tensor | None]] = []
        iterator = seeds
        if request.progress and len(seeds) > 1:
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
    if name.startswith(("target_", "image")) or "offset" in name:
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


def _settings_of(cfg: LRPConfig) -> dict[str, Any]:
    """The settings of ``cfg`` besides mode, positional and Gamma that differ from LRPConfig's defaults: what a
    result must say about the rules beyond its mode (a preset like ``attnlrp-conservative``)."""
    default = LRPConfig(mode=cfg.mode)
    skip = {"mode", "positional", "gamma_linear", "gamma_conv"}
    return {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in skip and getattr(cfg, f.name) != getattr(default, f.name)
    }


def _labels(model: torch.nn.Module, tokenizer: Any, ids: list[int], vocabulary: bool) -> dict[int, str]:
    """Readable names of ``ids``: decoded tokens for LMs (with a tokenizer), else the model's class names."""
    if vocabulary:
        return {int(i): display_token(tokenizer, int(i)) for i in ids} if tokenizer is not None else {}
    names = getattr(getattr(model, "config", None), "id2label", None) or {}
    return {int(k): str(v) for k, v in names.items()}


# ---- the one result builder --------------------------------------------------------------------------------------


def explain(request: ExplanationRequest) -> Attribution | GenerationAttribution | Seq2SeqAttribution:
    """Run one :class:`~hf_pelrp.request.ExplanationRequest` and build its result: the one flow of every entry
    point (:func:`attribute`, :func:`explain_continuation`, the pipeline, the CLI, the dataset runner, Captum,
    Inseq, the evaluation)."""
    return build_result(request, _run(request))


def build_result(
    request: ExplanationRequest, done: _Pass
) -> Attribution | GenerationAttribution | Seq2SeqAttribution:
    """The one place a result is built, from the request and the maps of its pass.

    One explained logit per row: :class:`Attribution` (:class:`Seq2SeqAttribution` for encoder-decoder models,
    with the target prefix's maps in ``extras``). A continuation: :class:`GenerationAttribution` (decoder-only),
    or :class:`Seq2SeqAttribution` with one row per continuation token (encoder-decoder).
    """
    model, cfg, tokenizer, cont = request.model, request.rules, request.tokenizer, request.continuation
    maps = done.maps
    token_map = maps["token"]
    rows = token_map.shape[0]
    if cont is None:
        targets = done.targets[:, 0]
        foils = None if done.foils is None else done.foils[:, 0]
        values = done.values[:, 0]
    else:  # one row of the pass, one row per continuation token (or one with span_reduce)
        targets = cont.tokens if request.span_reduce is None else cont.tokens[-1:]
        foils = None if done.foils is None else done.foils[0]
        if request.kind.name == SEQ2SEQ_LM and foils is not None:  # one per row (span_reduce: one row)
            foils = foils[:rows]
        values = done.values[0]
    ids = targets.tolist() + ([] if foils is None else foils.tolist())
    common: dict[str, Any] = {
        "token": token_map,
        "position": maps["position"],
        "position_by_layer": maps["position_by_layer"],
        "segment": maps["segment"],
        "foil": foils,
        "target_value": values.to(token_map),
        "labels": _labels(model, tokenizer, ids, request.kind.vocabulary_targets),
        "mode": cfg.mode,
        "positional": cfg.positional,
        "model_type": model.config.model_type,
        "gamma": _gamma_of(cfg),
        "rules": _settings_of(cfg),
        **{name: maps.get(name) for name in IMAGE_MAPS},
    }
    extras = {k: v for k, v in maps.items() if k not in _CORE_MAPS and k not in IMAGE_MAPS}
    if cont is not None and request.kind.name != SEQ2SEQ_LM:
        full = cont.sequence[0].detach()
        return GenerationAttribution(
            **common,
            target=done.targets[0],
            input_ids=full,
            prompt_length=cont.prompt_length,
            span_reduce=request.span_reduce,
            tokens=display_tokens(tokenizer, full.tolist()) if tokenizer is not None else None,
            special_tokens_mask=_special_mask([full.tolist()], tokenizer)[0]
            if tokenizer is not None
            else None,
        )
    if (
        cont is not None
    ):  # encoder-decoder continuation: the source repeated per row, the decoder input as extras
        source = request.inputs["input_ids"].expand(rows, -1)
        decoder = cont.sequence.expand(rows, -1)
        extras.update(_target_extras(decoder, torch.ones_like(decoder), tokenizer))
        return Seq2SeqAttribution(
            **common,
            target=targets,
            position_index=cont.positions[0][:rows]
            if request.span_reduce is None
            else cont.positions[0, -1:],
            input_ids=source,
            attention_mask=torch.ones_like(source),
            tokens=[display_tokens(tokenizer, source[0].tolist())] * rows if tokenizer is not None else None,
            extras=extras,
        )
    input_ids = as_user_ids(request.inputs.get("input_ids"), done.attention_mask)
    tokens = special = None
    if tokenizer is not None and input_ids is not None:
        tokens = [display_tokens(tokenizer, row) for row in input_ids.tolist()]
        special = _special_mask(input_ids.tolist(), tokenizer)
    result_class = Attribution
    if getattr(model.config, "is_encoder_decoder", False):  # source maps + target-prefix maps
        result_class = Seq2SeqAttribution
        if "decoder_input_ids" in done.inputs:
            extras.update(_target_extras(done.inputs["decoder_input_ids"], done.target_mask, tokenizer))
    return result_class(
        **common,
        target=targets,
        position_index=None if done.positions is None else done.positions[:, 0],
        input_ids=input_ids,
        attention_mask=done.attention_mask,
        tokens=tokens,
        special_tokens_mask=special,
        extras=extras,
    )


def _special_mask(rows: list[list[int]], tokenizer: Any) -> torch.Tensor:
    specials = special_ids(tokenizer)
    return torch.tensor([[int(i) in specials for i in row] for row in rows], dtype=torch.bool)


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


# ---- entry points ------------------------------------------------------------------------------------------------

#: parameters ``attribute`` took before 0.x and still accepts for one release, with what replaces them
_CONTINUATION_ARGS = ("continuation_ids", "generate", "max_new_tokens", "span_reduce")
_DEPRECATED = {
    "mode": "config= (a preset name such as config='cp', or config=LRPConfig(mode=..., positional=...))",
    "positional": "config=LRPConfig(positional=...) (or a preset name)",
    "mask_token_id": "tokenizer= (its mask_token_id is used)",
    "gradient_checkpointing": "model.gradient_checkpointing_enable() before the call (attribution follows it)",
    **{
        name: "hf_pelrp.explain_continuation(model, input_ids, continuation_ids, ...)"
        for name in _CONTINUATION_ARGS
    },
}


def _pop_deprecated(where: str, kwargs: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Take the deprecated ``names`` out of ``kwargs``, warning once per call with their replacements."""
    given = {name: kwargs.pop(name) for name in names if name in kwargs}
    if given:
        advice = "; ".join(f"{name}= -> {_DEPRECATED[name]}" for name in given)
        warnings.warn(
            f"{where}({', '.join(f'{n}=' for n in given)}) is deprecated and will be removed in the next "
            f"release: {advice}",
            FutureWarning,
            stacklevel=3,
        )
    return given


def attribute(
    model: torch.nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    target: int | str | torch.Tensor | None = None,
    *,
    config: LRPConfig | str | None = None,
    position: int | torch.Tensor | None = None,
    foil: int | str | torch.Tensor | None = None,
    tokenizer: Any = None,
    **model_inputs: Any,
) -> Attribution:
    """Explain one logit per row with PE-LRP: one forward and one backward pass.

    Parameters
    ----------
    model
        A supported transformers model with a causal-LM, masked-LM, sequence- or image-classification or
        encoder-decoder head.
    input_ids : LongTensor [B, T]
        Token ids (or ``inputs_embeds=`` [B, T, H], not both; ``pixel_values=`` for image classifiers and, with
        the image placeholders in ``input_ids``, for vision-language models).
    attention_mask : LongTensor [B, T], optional
        1 for tokens, 0 for padding (left or right).
    target
        ``None``: the arg-max class / next token; an int or LongTensor [B]: the class id (classifiers) or
        vocabulary id (LMs); a string: a class label, or exactly one token of the vocabulary (``" Paris"``,
        with ``tokenizer=``).
    config
        The rules: an :class:`LRPConfig` or a preset name (``"attnlrp"``, ``"cp"``, ``"vit-paper"``). Default:
        the model's own default (:func:`hf_pelrp.from_pretrained`), else AttnLRP with positions (PE-LRP);
        ``LRPConfig(positional=False)`` is the classic baseline.
    position
        Causal LMs: the position whose next-token logit is explained (default: each row's last token).
        Masked LMs (required): the ``[MASK]`` position whose vocabulary logits are explained.
    foil
        Contrastive explanation: an id (or LongTensor [B], or a string like ``target``) whose logit is
        subtracted, so the explained value is ``logit(target) - logit(foil)`` (``Attribution.foil``).
    tokenizer
        Optional: turns string targets / foils into ids, gives masked LMs the ``[MASK]`` id to check, and gives
        the result its display ``tokens``, the ``labels`` of the explained ids and the ``special_tokens_mask``.
    **model_inputs
        Other inputs the family accepts (``inputs_embeds``, ``position_ids``, ``token_type_ids``,
        ``pixel_values``, ``decoder_input_ids``, ``interpolate_pos_encoding``); anything else is refused with a
        clear error. Deprecated, for one release (a ``FutureWarning`` names the replacement): ``mode=`` /
        ``positional=`` (use ``config=``), ``mask_token_id=`` (use ``tokenizer=``), ``gradient_checkpointing=``
        (``model.gradient_checkpointing_enable()``), ``continuation_ids=`` / ``generate=`` /
        ``max_new_tokens=`` / ``span_reduce=`` (use :func:`explain_continuation`).

    Returns
    -------
    Attribution
        Token / position relevance [B, T], per-layer position relevance for rotary models, the explained
        target ids and logits, and the conservation gap (:class:`Seq2SeqAttribution` for encoder-decoder models);
        for a vision-language model with an image, also ``image`` / ``image_position`` [B, P], ``image_special``
        [B] and ``image_grid`` [B, 2].
    """
    old = _pop_deprecated("attribute", model_inputs, tuple(_DEPRECATED))
    if old.get("generate") or any(old.get(n) is not None for n in _CONTINUATION_ARGS if n != "generate"):
        if target is not None or position is not None:
            raise AttributionInputError(
                "target= and position= do not apply to a continuation: each continuation token is the target "
                "of the position before it. Use foil= for a contrastive explanation."
            )
        return explain_continuation(  # type: ignore[return-value]  (the deprecated form returns what it did)
            model,
            input_ids,
            old.get("continuation_ids"),
            attention_mask=attention_mask,
            generate=bool(old.get("generate", False)),
            max_new_tokens=old.get("max_new_tokens"),
            foil=foil,
            span_reduce=old.get("span_reduce"),
            config=_rules_of(model, config, old),
            tokenizer=tokenizer,
            gradient_checkpointing=old.get("gradient_checkpointing"),
            **model_inputs,
        )
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **model_inputs}
    request = single_request(
        model,
        inputs,
        config=config,
        mode=old.get("mode"),
        positional=old.get("positional"),
        target=target,
        foil=foil,
        position=position,
        mask_token_id=old.get("mask_token_id"),
        tokenizer=tokenizer,
        gradient_checkpointing=old.get("gradient_checkpointing"),
    )
    return explain(request)  # type: ignore[return-value]  (a single request builds an Attribution)


def _rules_of(model: torch.nn.Module, config: LRPConfig | str | None, old: dict[str, Any]) -> Any:
    """``config`` with the deprecated ``mode`` / ``positional`` folded in, by the one precedence rule."""
    if old.get("mode") is None and old.get("positional") is None:
        return config
    from .config import resolve_rules

    return resolve_rules(model, config, old.get("mode"), old.get("positional"))


def explain_continuation(
    model: torch.nn.Module,
    input_ids: Any,
    continuation_ids: Any = None,
    *,
    attention_mask: Any = None,
    generate: bool = False,
    max_new_tokens: int | None = None,
    foil: int | str | torch.Tensor | None = None,
    span_reduce: str | None = None,
    config: LRPConfig | str | None = None,
    tokenizer: Any = None,
    progress: bool = False,
    gradient_checkpointing: bool | None = None,
    **model_inputs: Any,
) -> GenerationAttribution | Seq2SeqAttribution:
    """Explain each token of a continuation of one prompt (teacher forcing), or of a greedy generation.

    One forward pass over ``prompt + continuation`` with the LRP rules attached, then one backward pass per
    continuation token from its logit (read at the position before it), over the same graph. Row ``s`` is
    therefore what :func:`hf_pelrp.attribute` gives for ``target = continuation[s]`` on the prefix
    ``prompt + continuation[:s]``, padded with zeros to the full length.

    Parameters
    ----------
    model
        A supported causal LM (``*ForCausalLM``), or an encoder-decoder LM (T5, BART): then ``input_ids`` is the
        source, the continuation is the target (after ``decoder_input_ids=``, default the decoder start token)
        and the result a :class:`Seq2SeqAttribution` with one row per continuation token.
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
    config
        The rules (see :func:`hf_pelrp.attribute`); ``mode=`` / ``positional=`` still work for one release,
        with a ``FutureWarning``.
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
    old = _pop_deprecated("explain_continuation", model_inputs, ("mode", "positional"))
    request = continuation_request(
        model,
        input_ids,
        continuation_ids,
        attention_mask=attention_mask,
        generate=generate,
        max_new_tokens=max_new_tokens,
        foil=foil,
        span_reduce=span_reduce,
        config=config,
        mode=old.get("mode"),
        positional=old.get("positional"),
        tokenizer=tokenizer,
        progress=progress,
        gradient_checkpointing=gradient_checkpointing,
        **model_inputs,
    )
    return explain(request)  # type: ignore[return-value]
