"""The attribution engine: the reversible :func:`lrp` context and the one-call :func:`attribute`.

Data flows one way: pick the adapter, attach its rules to this model instance, run one forward, seed the
explained logit with gradient 1, run one backward, read ``leaf * leaf.grad`` (method.md section 1).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from transformers import PretrainedConfig

from .adapters import adapter_for
from .adapters.base import Adapter
from .attention import LRP_ATTENTION, set_attention_rule
from .checkpointing import checkpoint_layers, wants_checkpointing
from .config import LRPConfig, model_default_config, resolve_config
from .errors import AttributionInputError, AttributionStateError, UnsupportedModelError
from .hooks import LeafStore, make_leaf
from .precision import half_precision_hint, watch_non_finite
from .result import Attribution
from .rules import relevance_of
from .targets import (
    CAUSAL_LM,
    IMAGE_CLASSIFICATION,
    MASKED_LM,
    SEQUENCE_CLASSIFICATION,
    accepts_logits_to_keep,
    explained_positions,
    head_kind,
    masked_positions,
    resolve_target,
)

if TYPE_CHECKING:
    from .generation import GenerationAttribution

_ACTIVE: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
#: the maps every family has; anything else LRPContext.maps() returns goes to Attribution.extras
_CORE_MAPS = frozenset({"token", "position", "position_by_layer", "segment"})


class LRPContext:
    """What :func:`lrp` yields: the patched model, its rules and the leaves of the latest forward pass.

    After ``model(...)`` and a backward pass from any scalar inside the context, :meth:`maps` returns the
    token / position / segment relevance of that backward pass. Relevance at hidden layers can be read the
    same way: ``h.retain_grad()`` on ``output.hidden_states[l]`` before the backward, then ``h * h.grad``.
    """

    def __init__(self, model: torch.nn.Module, adapter: Adapter, config: LRPConfig, store: LeafStore):
        self.model = model
        self.adapter = adapter
        self.config = config
        self.store = store

    def leaves(self) -> list[torch.Tensor]:
        """Every leaf (token, additive positions, per-layer cos/sin) of the latest forward pass."""
        return self.store.tensors()

    def zero_grad(self) -> None:
        """Forget the gradients of the leaves (before a second backward pass on the same forward)."""
        for leaf in self.leaves():
            leaf.grad = None

    def maps(self) -> dict[str, torch.Tensor | None]:
        """Relevance per position of the latest backward pass: ``token``, ``position``, ``position_by_layer``,
        ``segment`` ([B, T] float32 tensors, ``position_by_layer`` [B, L, T] for rotary models)."""
        additive = self.store.additive
        if "token" not in additive:
            raise AttributionStateError("no forward pass has run inside this hf_pelrp.lrp() context yet")
        token = relevance_of(additive["token"])
        result: dict[str, torch.Tensor | None] = {"token": token, "segment": None, "position_by_layer": None}
        if self.adapter.positional_kind == "rotary":
            num_layers = self.adapter.num_layers(self.model)
            by_layer = torch.zeros(token.shape[0], num_layers, token.shape[1], device=token.device)
            for layer, (cos, sin) in self.store.rotary.items():
                by_layer[:, layer] = (relevance_of(cos) + relevance_of(sin)).to(token.device).expand_as(token)
            result["position_by_layer"] = by_layer
            result["position"] = by_layer.sum(1)
        else:
            pos = additive.get("position")
            result["position"] = (
                relevance_of(pos).to(token.device).expand_as(token)
                if pos is not None
                else torch.zeros_like(token)
            )
        if "segment" in additive:
            result["segment"] = relevance_of(additive["segment"]).to(token.device).expand_as(token)
        # family-specific maps (vision: patch_map, pixel_map), built from the maps above
        result.update(self.adapter.extra_maps(self.model, self.store, result))
        return result


def _lrp_configs(model: torch.nn.Module) -> list[tuple[torch.nn.Module, PretrainedConfig]]:
    """Point every module of this instance that holds a config at a copy selecting the ``"lrp"`` attention.

    Copies (not the shared config object) keep the change to this model: two models built from one config
    object stay independent. Returns what to put back.
    """
    copies: dict[int, PretrainedConfig] = {}
    swapped = []
    for module in model.modules():
        cfg = module.__dict__.get("config")
        if not isinstance(cfg, PretrainedConfig):
            continue
        if id(cfg) not in copies:
            new = copy.copy(cfg)
            new._attn_implementation_internal = LRP_ATTENTION
            copies[id(cfg)] = new
        swapped.append((module, cfg))
        module.__dict__["config"] = copies[id(cfg)]
    return swapped


def _check_attention_interface(model: torch.nn.Module) -> None:
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        raise UnsupportedModelError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, so "
            "the LRP attention rules cannot be attached to it."
        )


@contextmanager
def lrp(
    model: torch.nn.Module,
    mode: str | None = None,
    positional: bool | None = None,
    *,
    config: LRPConfig | str | None = None,
    gradient_checkpointing: bool | None = None,
) -> Iterator[LRPContext]:
    """Attach the LRP rules to ``model`` for the duration of a ``with`` block.

    Inside, the model's forward outputs are unchanged, but its backward pass computes LRP relevance: after
    ``logit.backward()``, ``ctx.maps()`` holds token and position relevance. Leaving the block (normally or by
    an exception) removes every hook and rule, restores the attention implementation and the train / eval
    state of every module: the model is exactly as it was. Inside, parameters do not require gradients (a
    backward pass there never touches ``param.grad``); their ``requires_grad`` flags are restored on exit.

    Parameters
    ----------
    model
        A transformers model of a supported type (see :func:`hf_pelrp.supported_model_types`).
    mode
        ``"attnlrp"`` (default) or ``"cp"``, or a preset name (``"vit-paper"``, see
        :data:`hf_pelrp.config.PRESETS`), which replaces ``config``.
    positional
        Make positional tensors leaves (default ``True``).
    config
        An :class:`LRPConfig` or a preset name (``mode`` / ``positional`` override its fields).
    gradient_checkpointing
        Recompute each transformer block in the backward pass (non-reentrant activation checkpointing, eval
        semantics) instead of keeping its activations: the same relevance for a fraction of the memory, at
        the cost of one more forward pass. Default ``None``: on when the user called
        ``model.gradient_checkpointing_enable()``.

    Raises
    ------
    UnsupportedModelError
        The model type has no adapter, or the model was modified (hub kernels) in a way the rules cannot see.
    AttributionStateError
        The model is already inside an ``lrp()`` context.
    """
    # a model loaded with hf_pelrp.from_pretrained(..., mode=...) carries its own default rules
    cfg = resolve_config(config if config is not None else model_default_config(model), mode, positional)
    if model in _ACTIVE:
        raise AttributionStateError(
            f"this {type(model).__name__} is already inside an hf_pelrp.lrp() context (or an attribute() call); "
            "nested attribution on one model is not possible: leave the outer context first."
        )
    adapter = adapter_for(model)
    adapter.check_model(model)
    adapter.check_config(model, cfg)
    _check_attention_interface(model)

    store = LeafStore()
    handles = []
    attention_modules: list[torch.nn.Module] = []
    swapped: list[tuple[torch.nn.Module, PretrainedConfig]] = []
    training = {m: m.training for m in model.modules()}
    # the modified backward pass defines no parameter gradients: freeze the parameters so that a backward
    # pass inside the block cannot write LRP-modified values into param.grad
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    _ACTIVE.add(model)
    try:
        for p, _ in requires_grad:
            p.requires_grad_(False)

        def start_forward(_module, args, kwargs):
            store.clear()
            embeds = kwargs.get("inputs_embeds")
            if embeds is not None:
                leaf = make_leaf(embeds)
                store.additive["token"] = leaf
                return args, {**kwargs, "inputs_embeds": leaf}
            return None

        handles.append(model.register_forward_pre_hook(start_forward, with_kwargs=True))
        for module, rule in adapter.module_rules(model, cfg, store):
            handles.append(rule.attach(module))
        if wants_checkpointing(model, gradient_checkpointing):
            handles.extend(checkpoint_layers(adapter.layers(model)))
        for module, rule in adapter.attention_rules(model, cfg):
            set_attention_rule(module, rule)
            attention_modules.append(module)
        swapped = _lrp_configs(model)
        model.eval()
        yield LRPContext(model, adapter, cfg, store)
    finally:
        for handle in reversed(handles):
            handle.remove()
        for module in attention_modules:
            set_attention_rule(module, None)
        for module, cfg_obj in swapped:
            module.__dict__["config"] = cfg_obj
        for module, was_training in training.items():
            module.training = was_training
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        store.clear()
        _ACTIVE.discard(model)


def _explained_logits(
    model: torch.nn.Module,
    kind: str,
    inputs: dict[str, Any],
    attention_mask: torch.Tensor,
    position,
    mask_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the forward pass; return the [B, C] logits to explain and, for causal / masked LMs, their positions."""
    if kind == CAUSAL_LM:
        batch = attention_mask.shape[0]
        positions = explained_positions(position, attention_mask, batch)
        if accepts_logits_to_keep(model):
            # only the explained positions go through the (vocabulary-sized) LM head
            logits = model(**inputs, logits_to_keep=positions[:, None]).logits[:, 0]
        else:
            logits = model(**inputs).logits
            logits = logits[torch.arange(batch, device=logits.device), positions.to(logits.device)]
        return logits, positions
    if kind == MASKED_LM:
        positions = masked_positions(position, inputs.get("input_ids"), attention_mask, mask_token_id)
        logits = model(**inputs).logits
        batch = torch.arange(logits.shape[0], device=logits.device)
        return logits[batch, positions.to(logits.device)], positions
    if position is not None:
        raise AttributionInputError("position= is only meaningful for causal and masked language models")
    if kind in (SEQUENCE_CLASSIFICATION, IMAGE_CLASSIFICATION):
        # DeiTForImageClassificationWithTeacher's logits are the mean of its two heads: a linear map, so the
        # seed's relevance splits between the heads by the epsilon rule with nothing else to do
        return model(**inputs).logits, None
    raise AttributionInputError(
        f"{type(model).__name__}: heads of kind {kind!r} are not supported by attribute() yet"
    )


def attribute(
    model: torch.nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    target: int | torch.Tensor | None = None,
    mode: str | None = None,
    positional: bool | None = None,
    *,
    config: LRPConfig | str | None = None,
    inputs_embeds: torch.Tensor | None = None,
    position: int | torch.Tensor | None = None,
    mask_token_id: int | None = None,
    foil: int | torch.Tensor | None = None,
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
        A supported transformers model with a causal-LM, masked-LM or sequence-classification head.
    input_ids : LongTensor [B, T]
        Token ids (or ``inputs_embeds`` [B, T, H], not both).
    attention_mask : LongTensor [B, T], optional
        1 for tokens, 0 for padding (left or right).
    target
        ``None``: the arg-max class / next token; an int or LongTensor [B]: the class id (classifiers) or
        vocabulary id (LMs) to explain.
    mode
        ``"attnlrp"`` or ``"cp"`` (attention probabilities constant). Default: the model's own default
        (:func:`hf_pelrp.from_pretrained`), else ``"attnlrp"``.
    positional
        ``True`` for PE-LRP (positions are leaves); ``False`` for the classic baseline. Default as ``mode``
        (``True``).
    config
        An :class:`LRPConfig` or a preset name (e.g. ``"vit-paper"``: CP attention, Gamma rules); when given,
        its fields are used and ``mode`` / ``positional`` are ignored. ``mode`` may name a preset too.
    position
        Causal LMs: the position whose next-token logit is explained (default: each row's last token).
        Masked LMs (required): the ``[MASK]`` position whose vocabulary logits are explained.
    mask_token_id
        Masked LMs with ``input_ids``: the tokenizer's ``mask_token_id`` (model configs do not store it); the
        token at ``position`` must be this id.
    foil
        Contrastive explanation: an id (or LongTensor [B]) whose logit is subtracted, so the explained value
        is ``logit(target) - logit(foil)`` (stored in ``Attribution.foil``).
    continuation_ids, generate, max_new_tokens, span_reduce
        Causal LMs: explain every token of a continuation of ``input_ids`` (given, or generated greedily with
        ``generate=True, max_new_tokens=N``) by teacher forcing; ``span_reduce="sum"`` explains the sum of
        the continuation's logits in one backward pass. Returns a
        :class:`hf_pelrp.generation.GenerationAttribution` (see :func:`hf_pelrp.generation.explain_continuation`).
    gradient_checkpointing
        Recompute each block in the backward pass to save activation memory (long contexts); the relevance is
        the same. Default: on when ``model.gradient_checkpointing_enable()`` was called (see :func:`lrp`).
    **model_inputs
        Passed on to the model's forward (e.g. ``position_ids``).

    Returns
    -------
    Attribution
        Token / position relevance [B, T], per-layer position relevance for rotary models, the explained
        target ids and logits, and the conservation gap.
    """
    if config is not None:
        cfg = resolve_config(config, None, None)
    else:
        cfg = resolve_config(model_default_config(model), mode, positional)
    if continuation_ids is not None or generate or span_reduce is not None:
        # imported here: generation builds on this module (lrp, the frozen parameters), not the reverse
        from .generation import explain_continuation

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
            config=cfg,
            gradient_checkpointing=gradient_checkpointing,
            **model_inputs,
        )
    adapter = adapter_for(model)
    kind = head_kind(model)
    inputs, attention_mask = adapter.validate_inputs(
        model,
        {
            "input_ids": input_ids,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            **model_inputs,
        },
    )
    input_ids = inputs.get("input_ids")
    with (
        lrp(model, config=cfg, gradient_checkpointing=gradient_checkpointing) as ctx,
        torch.enable_grad(),
    ):
        logits, positions = _explained_logits(model, kind, inputs, attention_mask, position, mask_token_id)
        target_ids = resolve_target(target, logits)
        seed = logits.gather(1, target_ids[:, None].to(logits.device)).squeeze(1)
        extras = {}
        foil_ids = None
        if foil is not None:
            foil_ids = resolve_target(foil, logits)
            seed = seed - logits.gather(1, foil_ids[:, None].to(logits.device)).squeeze(1)
        leaves = [leaf for leaf in ctx.leaves() if leaf.requires_grad]
        if not seed.requires_grad:
            raise _cut_graph_error(model)
        torch.autograd.backward(seed.sum(), inputs=leaves)
        token_leaf = ctx.store.additive.get("token")
        if token_leaf is not None and token_leaf.grad is None:
            raise _cut_graph_error(model)
        maps = ctx.maps()
        extras.update({k: v for k, v in maps.items() if k not in _CORE_MAPS})
    result = Attribution(
        token=maps["token"],
        position=maps["position"],
        position_by_layer=maps["position_by_layer"],
        segment=maps["segment"],
        foil=None if foil_ids is None else foil_ids.detach(),
        target=target_ids.detach(),
        target_value=seed.detach().float().to(maps["token"].device),
        position_index=positions,
        input_ids=input_ids,
        attention_mask=attention_mask,
        mode=cfg.mode,
        positional=cfg.positional,
        model_type=model.config.model_type,
        gamma={k: v for k in ("gamma_linear", "gamma_conv") if (v := getattr(cfg, k)) is not None},
        extras=extras,
    )

    def locate() -> str:
        with (
            lrp(model, config=cfg, gradient_checkpointing=False),
            watch_non_finite(model) as watch,
            torch.enable_grad(),
        ):
            again, _ = _explained_logits(model, kind, inputs, attention_mask, position, mask_token_id)
            again.gather(1, target_ids[:, None].to(again.device)).sum().backward()
        return watch.describe() + half_precision_hint(watch.dtype)

    _check_finite(result, model, locate)
    return result


def _cut_graph_error(model: torch.nn.Module) -> AttributionStateError:
    """The explained logit does not depend on the token leaf: refuse to report all-zero maps."""
    return AttributionStateError(
        f"no gradient reached the token embedding of {type(model).__name__}: something in the model (a hook "
        "running under torch.no_grad, a detached tensor, a custom forward) cut the backward pass, so every "
        "map would be 0. Attribute the unmodified transformers model."
    )


def _check_finite(
    result: Attribution, model: torch.nn.Module, locate: Callable[[], str] | None = None
) -> None:
    """Raise if the relevance is NaN / inf; ``locate()`` re-runs the pass and names the module that overflowed."""
    if torch.isfinite(result.relevance).all() and torch.isfinite(result.target_value).all():
        return
    dtype = next(model.parameters()).dtype
    where = locate() if locate is not None else half_precision_hint(dtype).strip()
    raise AttributionStateError(
        f"relevance is not finite (NaN or inf) for {type(model).__name__} in {dtype}: {where}"
    )
