"""The reversible patching of one model instance: :func:`lrp` and the :class:`LRPContext` it returns.

The set-up records an undo step before every change it makes (and makes the claim on the model and its undo in
one statement); the tear-down runs built-in or library calls only. So an interrupt at any line of the set-up or
the tear-down, an exception, or two threads racing for one model leave the model exactly as it was.
"""

from __future__ import annotations

import collections
import copy
import functools
import itertools
import operator
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch
from transformers import PretrainedConfig

from .adapters import adapter_for
from .adapters.base import Adapter
from .attention import ATTENTION_RULES, LRP_ATTENTION, AttentionRule, set_attention_rule
from .checkpointing import checkpoint_layers, wants_checkpointing
from .config import LRPConfig, resolve_rules
from .errors import AttributionStateError, UnsupportedModelError
from .hooks import Handles, LeafStore, make_leaf, residual_rules
from .hub_kernels import kernel_forwards
from .rules import relevance_of

#: the key, in a model's own __dict__, of the token of the lrp() context that holds it
_BUSY_KEY = "_hf_pelrp_busy"


class LRPContext(ExitStack):
    """What :func:`lrp` returns: the patched model, its rules and the leaves of the latest forward pass.

    A context manager (``with hf_pelrp.lrp(model) as ctx:``): after ``model(...)`` and a backward pass from any
    scalar inside the block, :meth:`maps` returns the token / position / segment relevance of that backward
    pass. Relevance at hidden layers can be read the same way: ``h.retain_grad()`` on
    ``output.hidden_states[l]`` before the backward, then ``h * h.grad``.

    Leaving the block runs the undo steps recorded during the set-up. It is an :class:`contextlib.ExitStack`
    whose steps are built-in or library calls (``dict.__setitem__``, ``Tensor.requires_grad_``,
    ``RemovableHandle.remove``, ...), so the tear-down runs no line of hf_pelrp's own code that an interrupt
    could split; if the block is left without ``__exit__`` being called (an interrupt on the ``with`` line
    itself), the context restores the model when it is garbage-collected.
    """

    # no __init__ of its own: ExitStack's (library code) makes a complete object in one step, and lrp() sets
    # these fields inside its try
    model: torch.nn.Module
    adapter: Adapter
    config: LRPConfig
    store: LeafStore
    _attention: list[AttentionRule]

    # the fallback of an interrupted exit: contextlib's own close(), no frame of this package
    __del__ = ExitStack.close

    def leaves(self) -> list[torch.Tensor]:
        """Every leaf (token, additive positions, per-layer positional leaves) of the latest forward pass."""
        return self.store.tensors()

    def zero_grad(self) -> None:
        """Forget the gradients of the leaves (before a second backward pass on the same forward)."""
        for leaf in self.leaves():
            leaf.grad = None

    def maps(self) -> dict[str, torch.Tensor | None]:
        """Relevance per position of the latest backward pass: ``token``, ``position``, ``position_by_layer``
        ([B, L, T] where every layer has its own positional leaves), ``segment`` and family-specific extras
        ([B, T] tensors in float32, float64 for float64 models)."""
        additive = self.store.additive
        if "token" not in additive:
            raise AttributionStateError("no forward pass has run inside this hf_pelrp.lrp() context yet")
        token = relevance_of(additive["token"])
        result: dict[str, torch.Tensor | None] = {"token": token, "segment": None, "position_by_layer": None}
        result.update(self.adapter.positions.read(self.store, token, self.adapter.num_layers(self.model)))
        if "segment" in additive:
            result["segment"] = relevance_of(additive["segment"]).to(token).expand_as(token)
        result.update(self.adapter.family_maps(self.model, self.store, result))
        return result

    def check_attention_ran(self) -> None:
        """Refuse when an attention module with rules did not run through the ``"lrp"`` attention."""
        idle = [i for i, rule in enumerate(self._attention) if rule.calls == 0 and rule.required]
        if idle:
            raise AttributionStateError(
                f"the attention of layer(s) {idle} of {type(self.model).__name__} did not run through hf_pelrp's "
                "'lrp' attention implementation (a custom or eager attention path), so the attention rules were "
                "not applied and the maps would be wrong. Load the model without a custom attention kernel."
            )


def is_busy(model: torch.nn.Module) -> bool:
    """Whether ``model`` is inside an :func:`lrp` context (in any thread)."""
    return _BUSY_KEY in vars(model)


def _claim(model: torch.nn.Module, ctx: LRPContext) -> None:
    """Mark ``model`` busy, atomically: a second thread (or a nested call) is refused, never let through.

    ``dict.setdefault`` on the model's own ``__dict__`` is one atomic step under the GIL (no lock: a lock held
    when an interrupt arrives between its acquisition and its release stays held forever), and the release is
    recorded in the same statement as a successful claim, so no interrupt can fall between them.
    """
    token, own = object(), vars(model)
    # one physical line: a line boundary (an interrupt point) between the claim and its undo would leak it
    claimed = own.setdefault(_BUSY_KEY, token) is token and bool(ctx.callback(own.pop, _BUSY_KEY, None))  # fmt: skip
    if not claimed:
        raise AttributionStateError(
            f"this {type(model).__name__} is already inside an hf_pelrp.lrp() context (or an attribute() call, "
            "maybe in another thread); nested or concurrent attribution on one model is not possible: wait for "
            "the other one or use a copy of the model (copy.deepcopy) per thread."
        )


def _config_swaps(modules: list[torch.nn.Module]) -> list[tuple[dict, PretrainedConfig, PretrainedConfig]]:
    """For every module of this instance (``modules``: all of them) that holds a config: (its ``__dict__``, the config, a copy selecting
    the ``"lrp"`` attention). Copies (not the shared config object) keep the change to this model: two models
    built from one config object stay independent."""
    copies: dict[int, PretrainedConfig] = {}
    swaps = []
    for module in modules:
        cfg = module.__dict__.get("config")
        if not isinstance(cfg, PretrainedConfig):
            continue
        if id(cfg) not in copies:
            new = copy.copy(cfg)
            new._attn_implementation_internal = LRP_ATTENTION
            copies[id(cfg)] = new
        swaps.append((module.__dict__, cfg, copies[id(cfg)]))
    return swaps


def _each(function: Callable[..., Any], arguments: list[tuple]) -> Callable[[], Any]:
    """A no-argument call of ``function(*a)`` for every ``a`` of ``arguments``, iterated by C code (no Python
    frame of this package runs when it is called)."""
    return functools.partial(collections.deque, itertools.starmap(function, arguments), 0)


def _make_start_forward(store: LeafStore, rules: list[AttentionRule]) -> Callable:
    """The model's forward pre-hook: a fresh store, counters reset, ``inputs_embeds`` made the token leaf.

    It holds the store and the rules, not the context, so the context is never kept alive by the model."""

    def start_forward(_module, args, kwargs):
        store.clear()
        store.aux["in_forward"] = True
        for rule in rules:
            rule.calls = 0
            rule.rotated = None
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None:
            leaf = make_leaf(embeds)
            store.additive["token"] = leaf
            return args, {**kwargs, "inputs_embeds": leaf}
        return None

    return start_forward


def _end_forward(store: LeafStore, _module, _args, _output) -> None:
    # embedding calls after the model's forward (a caller embedding other ids itself) make no leaves
    store.aux["in_forward"] = False


def lrp(
    model: torch.nn.Module,
    mode: str | None = None,
    positional: bool | None = None,
    *,
    config: LRPConfig | str | None = None,
    gradient_checkpointing: bool | None = None,
) -> LRPContext:
    """Attach the LRP rules to ``model``; use as ``with hf_pelrp.lrp(model) as ctx: ...``.

    Inside, the model's forward outputs are unchanged, but its backward pass computes LRP relevance: after
    ``logit.backward()``, ``ctx.maps()`` holds token and position relevance. Leaving the block (normally, by an
    exception or by an interrupt at any point of the set-up or the tear-down) removes every hook and rule,
    restores the attention implementation, the config objects, the train / eval state of every module and the
    ``requires_grad`` flags: the model is exactly as it was. Inside, parameters do not require gradients (a
    backward pass there never touches ``param.grad``).

    Parameters
    ----------
    model
        A transformers model of a supported type (see :func:`hf_pelrp.supported_model_types`).
    mode
        ``"attnlrp"`` or ``"cp"``, or a preset name (``"vit-paper"``, see :data:`hf_pelrp.config.PRESETS`).
    positional
        Make positional tensors leaves (default ``True``).
    config
        An :class:`LRPConfig` or a preset name. Explicit ``config`` / ``mode`` / ``positional`` win over the
        model's own default rules (:func:`hf_pelrp.enable_attribution`); ``config`` together with a ``mode`` or
        ``positional`` that contradicts it is an error.
    gradient_checkpointing
        Recompute each transformer block in the backward pass (non-reentrant activation checkpointing, eval
        semantics) instead of keeping its activations: the same relevance for a fraction of the memory, at
        the cost of one more forward pass. Default ``None``: on when the user called
        ``model.gradient_checkpointing_enable()``.

    Raises
    ------
    UnsupportedModelError
        The model type has no adapter, the model is not what its declaration covers, or a module's forward
        was replaced on the instance by something other than a hub kernel (hub kernels are switched off for the
        duration of the block and put back exactly).
    AttributionStateError
        The model is already inside an ``lrp()`` context (in this thread or another one).
    """
    cfg = resolve_rules(model, config, mode, positional)
    adapter = adapter_for(model)
    adapter.check_model(model)
    adapter.check_config(model, cfg)
    _check_remedies(model, adapter, cfg, gradient_checkpointing)
    ctx = LRPContext()
    # Every undo step is recorded before its change and is harmless if the change has not happened yet; the
    # return is inside the try, so an interrupt at any line of the set-up closes the context.
    try:
        ctx.model, ctx.adapter, ctx.config, ctx.store, ctx._attention = model, adapter, cfg, LeafStore(), []
        _claim(model, ctx)
        store = ctx.store
        for part in (store.additive, store.layers, store.aux):  # the leaves go with the context
            ctx.callback(part.clear)
        handles = Handles()
        # every hook registered below is removed by its own handle; the iteration runs in C
        ctx.callback(collections.deque, map(operator.methodcaller("remove"), handles), 0)
        modules = list(model.modules())
        # the flags in the modules' own dicts (where nn.Module keeps them): Module.__setattr__'s checks cost more
        # than the rest of the set-up on a small model
        ctx.callback(_each(operator.setitem, [(m.__dict__, "training", m.training) for m in modules]))
        # hub kernels: the modules' own torch forwards run inside the block, the kernels' bindings come back
        kernels = kernel_forwards(model, modules)
        ctx.callback(_each(operator.setitem, [(k.own, k.key, k.kernel) for k in kernels]))
        for k in kernels:
            if k.torch is None:
                del k.own[k.key]
            else:
                k.own[k.key] = k.torch
        # the modified backward pass defines no parameter gradients: freeze the parameters so that a backward
        # pass inside the block cannot write LRP-modified values into param.grad
        flags = [(p, p.requires_grad) for p in model.parameters()]
        ctx.callback(_each(torch.Tensor.requires_grad_, flags))
        for p, _ in flags:
            p.requires_grad_(False)
        rules = adapter.attention_rules(model, cfg)
        for _, rule in rules:
            rule.softmax, rule.softmax_eps = cfg.softmax, cfg.softmax_eps
        ctx._attention = [rule for _, rule in rules]
        start = _make_start_forward(store, ctx._attention)
        handles.append(model.register_forward_pre_hook(start, with_kwargs=True))
        handles.append(model.register_forward_hook(functools.partial(_end_forward, store)))
        for module, rule in adapter.module_rules(model, cfg, store):
            rule.attach(module, handles)
        if cfg.residual_gamma is not None:
            blocks, attentions = adapter.blocks(model), adapter.attention_modules(model)
            for module, rule in residual_rules(blocks, attentions, cfg.residual_gamma):
                rule.attach(module, handles)
        if wants_checkpointing(model, gradient_checkpointing, modules):
            checkpoint_layers(adapter.blocks(model), handles)
        ctx.callback(_each(ATTENTION_RULES.pop, [(module, None) for module, _ in rules]))
        for module, rule in rules:
            set_attention_rule(module, rule)
        if adapter.attention_interface:  # inline attention (BLOOM, MPT, ...) keeps its own implementation
            swaps = _config_swaps(modules)
            ctx.callback(_each(operator.setitem, [(where, "config", old) for where, old, _ in swaps]))
            for where, _, new in swaps:
                where["config"] = new
        # the flags, not model.eval(): transformers' train() / eval() re-kernelize a model with use_kernels on
        _each(operator.setitem, [(m.__dict__, "training", False) for m in modules])()
        return ctx
    except BaseException:
        ctx.close()
        raise


def _check_remedies(
    model: Any, adapter: Adapter, cfg: LRPConfig, gradient_checkpointing: bool | None
) -> None:
    """Refuse a conservative softmax or residual rule (docs/method.md) where it would not be applied."""
    if cfg.softmax != "gxi" and not adapter.attention_interface:
        raise UnsupportedModelError(
            f"softmax={cfg.softmax!r} needs the 'lrp' attention implementation, but {type(model).__name__}'s "
            "attention is written inline (its own kernel keeps AttnLRP's softmax rule): use softmax='gxi'."
        )
    if cfg.residual_gamma is not None and wants_checkpointing(model, gradient_checkpointing):
        raise UnsupportedModelError(
            "residual_gamma does not combine with gradient checkpointing (the recomputed blocks would rebuild "
            "the residual rule's state): pass gradient_checkpointing=False or residual_gamma=None."
        )
