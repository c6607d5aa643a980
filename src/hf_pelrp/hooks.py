"""Declarative, reversible module rules: each applies one primitive of :mod:`hf_pelrp.rules` through a torch hook.

A rule object says *what* happens to a module's output (or inputs) in the backward pass; ``attach`` returns a
``RemovableHandle``. Hooks (not replaced ``forward`` methods, not patched classes) keep every change scoped to
one model instance, undoable, and composable with accelerate's own per-module hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.hooks import RemovableHandle

from .devices import execution_device, weights_on_device
from .rules import gamma_rule, identity_rule, scale_gradient, straight_through


@dataclass
class LeafStore:
    """The leaves of the relevance computation created during the most recent forward pass.

    ``additive`` maps a name (``"token"``, ``"position"``, ``"segment"``, ...) to the output of an embedding
    module made a leaf; ``rotary`` maps a layer index to its own ``(cos, sin)`` leaves; ``aux`` holds tensors
    an adapter needs for its own maps (e.g. the pixels behind a ViT's patch tokens), not leaves of the pass.
    """

    additive: dict[str, torch.Tensor] = field(default_factory=dict)
    rotary: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.additive.clear()
        self.rotary.clear()
        self.aux.clear()

    def tensors(self) -> list[torch.Tensor]:
        leaves = list(self.additive.values())
        for cos, sin in self.rotary.values():
            leaves.extend((cos, sin))
        return leaves


def make_leaf(x: torch.Tensor) -> torch.Tensor:
    """A fresh leaf with the value of ``x`` that accumulates gradient (its own memory, never a view)."""
    return x.detach().clone().requires_grad_(True)


class Handles:
    """Several hook handles removed as one (what :meth:`HookRule.attach` returns for a multi-hook rule)."""

    def __init__(self, *handles: RemovableHandle):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class HookRule(ABC):
    """A rule applied to one module through a hook; subclasses implement :meth:`attach`."""

    @abstractmethod
    def attach(self, module: torch.nn.Module) -> RemovableHandle:
        """Register the hook on ``module`` and return its handle."""


@dataclass
class OutputGradient(HookRule):
    """Scale the gradient of the module's output by ``factor`` (0 = stop-gradient).

    Used on one factor of a relevance-carrying product, e.g. the up projection of a gated MLP (uniform rule,
    AttnLRP Prop. 3.2: ``factor = 1/2``; CP-LRP keeps the full gradient).
    """

    factor: float

    def attach(self, module: torch.nn.Module) -> RemovableHandle:
        def hook(_module, _args, output):
            return scale_gradient(output, self.factor)

        return module.register_forward_hook(hook)


@dataclass
class Activation(HookRule):
    """Identity rule for an element-wise activation (AttnLRP Prop. 3.4), then a factor for the product it feeds.

    ``product_factor`` is 1/2 for the activated gate of a gated MLP (uniform rule), 0 for the CP-LRP constant
    gate, 1 for an activation that feeds no product (GPT-2, BERT).
    """

    product_factor: float = 1.0

    def attach(self, module: torch.nn.Module) -> RemovableHandle:
        def hook(_module, args, output):
            return scale_gradient(identity_rule(args[0].to(output.device), output), self.product_factor)

        return module.register_forward_hook(hook)


@dataclass
class Norm(HookRule):
    """Identity rule for a normalisation layer (AttnLRP Prop. 3.4): its scale is a constant of the backward.

    ``surrogate(module, x)`` re-computes the layer with the scale detached; the module's own output is kept
    as the forward value (:func:`hf_pelrp.rules.straight_through`), so outputs stay bit-identical.
    """

    surrogate: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]

    def attach(self, module: torch.nn.Module) -> RemovableHandle:
        def hook(mod, args, output):
            x = args[0]
            if not x.requires_grad:
                return output
            # under accelerate offload the weights are back on `meta` once the module's forward has returned
            with weights_on_device(mod):
                return straight_through(output, self.surrogate(mod, x.to(output.device)))

        return module.register_forward_hook(hook)


@dataclass
class EmbeddingLeaf(HookRule):
    """Make the module's output a leaf named ``name`` in ``store`` (token, position or segment embedding)."""

    store: LeafStore
    name: str

    def attach(self, module: torch.nn.Module) -> RemovableHandle:
        def hook(_module, _args, output):
            leaf = make_leaf(output)
            self.store.additive[self.name] = leaf
            return leaf

        return module.register_forward_hook(hook)


@dataclass
class RotaryLeaves(HookRule):
    """Give one attention layer its own ``(cos, sin)`` leaves (PE-LRP, method.md section 2).

    A forward pre-hook replaces the ``position_embeddings`` keyword of the attention module by fresh leaves
    stored under ``layer``; re-running the same layer within one forward (gradient-checkpointing
    recomputation) reuses them, so no leaf is created twice.
    """

    store: LeafStore
    layer: int
    keyword: str = "position_embeddings"

    def attach(self, module: torch.nn.Module) -> RemovableHandle:
        def hook(_module, args, kwargs):
            pe = kwargs.get(self.keyword)
            if pe is None:
                return None
            cos, sin = pe
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is not None and cos.shape[0] == 1 and hidden.shape[0] > 1:
                # shared position ids: give every row its own copy, so maps are per row
                cos = cos.expand(hidden.shape[0], *cos.shape[1:])
                sin = sin.expand(hidden.shape[0], *sin.shape[1:])
            # the leaves live where their layer computes (device_map models: each layer's own device)
            device = execution_device(_module) or cos.device
            cos, sin = cos.to(device), sin.to(device)
            existing = self.store.rotary.get(self.layer)
            if existing is None or existing[0].shape != cos.shape or existing[0].device != cos.device:
                existing = (make_leaf(cos), make_leaf(sin))
                self.store.rotary[self.layer] = existing
            kwargs = dict(kwargs)
            kwargs[self.keyword] = existing
            return args, kwargs

        return module.register_forward_pre_hook(hook, with_kwargs=True)


def layer_map_of(
    module: torch.nn.Module,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """``module`` as a function ``f(x, weight, bias)`` of its parameters, for the parameter-modifying rules.

    Supports ``nn.Linear``, ``nn.Conv1d/2d/3d`` (the module's own stride, padding, dilation and groups) and
    transformers' ``Conv1D`` (GPT-2: ``x @ W + b`` with ``W`` stored as [in, out]).
    """
    if isinstance(module, torch.nn.Linear):
        return torch.nn.functional.linear
    if isinstance(module, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d):
        return module._conv_forward
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):

        def conv1d_gpt2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            out = x @ weight
            return out + bias if bias is not None else out

        return conv1d_gpt2
    raise TypeError(
        f"the Gamma rule applies to Linear, Conv1d/2d/3d and Conv1D layers, not to {type(module).__name__}"
    )


@dataclass
class Gamma(HookRule):
    """Generalised LRP-Gamma rule (:func:`hf_pelrp.rules.gamma_rule`) on a linear or convolution layer.

    The forward value is the module's own output; only the backward pass changes. Adapters opt in per layer
    type (the vision adapter: ``LRPConfig.gamma_linear`` on MLP and head linears, ``gamma_conv`` on the patch
    convolution).
    """

    gamma: float

    def attach(self, module: torch.nn.Module) -> RemovableHandle:
        layer_map = layer_map_of(module)

        def hook(mod, args, output):
            with weights_on_device(mod):  # accelerate offload: weights are on `meta` after the forward
                return gamma_rule(
                    args[0].to(output.device), output, mod.weight, mod.bias, self.gamma, layer_map
                )

        return module.register_forward_hook(hook)
