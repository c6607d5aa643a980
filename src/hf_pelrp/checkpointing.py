"""Gradient checkpointing during attribution: recompute each transformer block in the backward pass.

transformers only checkpoints a layer when ``layer.gradient_checkpointing and layer.training``; attribution runs
in eval semantics (no dropout), so the model's own checkpointing is inactive there. Here each block's forward
is wrapped, for the duration of one ``lrp()`` context, in non-reentrant :func:`torch.utils.checkpoint.checkpoint`:
only the block inputs are kept, everything inside is recomputed when the backward pass reaches the block.

Why the rules survive the recomputation: with ``use_reentrant=False`` the backward pass runs through the graph
of the *original* forward (the recomputation only refills its saved tensors), so every rule acts exactly once;
the rule hooks of the sub-modules re-run deterministically, and :class:`hf_pelrp.hooks.RotaryLeaves` hands the
recomputed block the leaves it created in the first pass instead of new ones.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterable

import torch
from torch.utils.checkpoint import checkpoint

#: keyword arguments of transformers blocks that write to a KV cache: a recomputation would write twice
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _restore_forward(module: torch.nn.Module) -> types.SimpleNamespace:
    """A handle whose ``remove()`` puts back the block's instance-level ``forward`` (accelerate's dispatch
    wrapper, if any, else none): a built-in call, so restoring runs no line of this package."""
    previous = module.__dict__.get("forward")
    if previous is None:
        return types.SimpleNamespace(remove=functools.partial(module.__dict__.pop, "forward", None))
    return types.SimpleNamespace(remove=functools.partial(module.__dict__.__setitem__, "forward", previous))


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        for key in _CACHE_KWARGS:
            if kwargs.get(key) is not None:
                kwargs[key] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def checkpoint_layers(layers: Iterable[torch.nn.Module], handles: list | None = None) -> list:
    """Run each of ``layers`` under non-reentrant activation checkpointing until the handles are removed.

    The block's own forward (or accelerate's dispatch wrapper around it) is what is recomputed, so module hooks
    on the block itself stay outside the checkpoint and hooks on its sub-modules run again in the
    recomputation. KV-cache arguments are dropped (a recomputation would append to the cache twice). Each
    handle is appended to ``handles`` (if given) *before* its block is changed, so an interrupt never leaves a
    changed block without its handle.
    """
    handles = [] if handles is None else handles
    for layer in layers:
        handles.append(_restore_forward(layer))
        layer.__dict__["forward"] = _checkpointed(layer.forward)
    return handles


def wants_checkpointing(
    model: torch.nn.Module, requested: bool | None, modules: list[torch.nn.Module] | None = None
) -> bool:
    """``requested`` if given, else whether the user enabled checkpointing on the model
    (``model.gradient_checkpointing_enable()``).

    The test of transformers' ``is_activation_checkpointing`` (some module with a true ``gradient_checkpointing``),
    read from the modules' own dicts and classes: ``hasattr`` on a module without the attribute raises inside
    ``nn.Module.__getattr__``, which on a small model costs more than the rest of an attribution's set-up.
    ``modules``: ``list(model.modules())`` where the caller has it."""
    if requested is not None:
        return bool(requested)
    if not any(hasattr(type(model), n) for n in ("is_activation_checkpointing", "is_gradient_checkpointing")):
        return False
    mods = model.modules() if modules is None else modules
    return any(
        bool(m.__dict__.get("gradient_checkpointing", getattr(type(m), "gradient_checkpointing", False)))
        for m in mods
    )
