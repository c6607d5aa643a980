"""Declarative, reversible module rules: each applies one primitive of :mod:`hf_pelrp.rules` through a torch hook.

A rule object says *what* happens to a module's output (or inputs) in the backward pass; ``attach(module,
handles)`` registers its hooks and appends each handle to ``handles`` in the same statement that registers it,
so that an interrupt (``KeyboardInterrupt``) between two statements never leaves a hook nobody can remove.
Hooks (not replaced ``forward`` methods, not patched classes) keep every change scoped to one model instance,
undoable, and composable with accelerate's own per-module hooks.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .devices import weights_on_device
from .errors import UnsupportedModelError
from .rules import gamma_rule, identity_rule, residual_rule, scale_gradient, straight_through


@dataclass
class LeafStore:
    """The leaves of the relevance computation created during the most recent forward pass.

    ``additive`` maps a name (``"token"``, ``"position"``, ``"segment"``, ...) to a [B, T, ...] leaf whose
    relevance is summed over its trailing axes; ``layers`` maps a layer index to that layer's own named leaves
    (rotary ``"cos"`` / ``"sin"``, an attention ``"bias"``); ``aux`` holds tensors a positional kind or an
    adapter needs for its own maps (e.g. the pixels behind a ViT's patch tokens), not leaves of the pass.
    """

    additive: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    aux: dict[str, object] = field(default_factory=dict)

    def clear(self) -> None:
        self.additive.clear()
        self.layers.clear()
        self.aux.clear()

    def tensors(self) -> list[torch.Tensor]:
        """Every leaf, additive ones first."""
        leaves = list(self.additive.values())
        for named in self.layers.values():
            leaves.extend(named.values())
        return leaves

    @property
    def batch_size(self) -> int | None:
        token = self.additive.get("token")
        return None if token is None else token.shape[0]


def make_leaf(x: torch.Tensor) -> torch.Tensor:
    """A fresh leaf with the value of ``x`` that accumulates gradient (its own memory, never a view)."""
    return x.detach().clone().requires_grad_(True)


class Handles(list):
    """Hook handles removed as one; ``remove()`` (no argument) may be called any number of times.

    A ``list`` so that ``handles.append(module.register_...(hook))`` is a single step with no Python frame of
    its own: an interrupt cannot fall between registering a hook and recording its handle.
    """

    def remove(self) -> None:  # type: ignore[override]
        while self:
            self[-1].remove()
            self.pop()


class HookRule(ABC):
    """A rule applied to one module through hooks; subclasses implement :meth:`attach`."""

    @abstractmethod
    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        """Register the hooks on ``module``, appending each handle to ``handles`` as it is registered."""


@dataclass
class OutputGradient(HookRule):
    """Scale the gradient of the module's output by ``factor`` (0 = stop-gradient).

    Used on one factor of a relevance-carrying product, e.g. the up projection of a gated MLP (uniform rule,
    AttnLRP Prop. 3.2: ``factor = 1/2``; CP-LRP keeps the full gradient). ``channels`` restricts the factor
    to a slice of the last axis (a fused ``gate_up_proj`` whose second half is the up projection).
    """

    factor: float
    channels: slice | None = None

    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        def hook(_module, _args, output):
            if self.channels is None:
                return scale_gradient(output, self.factor)
            factors = torch.ones(output.shape[-1], dtype=output.dtype, device=output.device)
            factors[self.channels] = self.factor
            return scale_gradient(output, factors)

        handles.append(module.register_forward_hook(hook))


@dataclass
class Activation(HookRule):
    """Identity rule for an element-wise activation (AttnLRP Prop. 3.4), then a factor for the product it feeds.

    ``product_factor`` is 1/2 for the activated gate of a gated MLP (uniform rule), 0 for the CP-LRP constant
    gate, 1 for an activation that feeds no product (GPT-2, BERT).
    """

    product_factor: float = 1.0

    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        def hook(_module, args, output):
            return identity_rule(args[0].to(output.device), output, self.product_factor)

        handles.append(module.register_forward_hook(hook))


@dataclass
class Norm(HookRule):
    """Identity rule for a normalisation layer (AttnLRP Prop. 3.4): its scale is a constant of the backward.

    ``surrogate(module, x)`` re-computes the layer with the scale detached; the module's own output is kept
    as the forward value (:func:`hf_pelrp.rules.straight_through`), so outputs stay bit-identical. The
    surrogate must reproduce the output (up to rounding): if it does not, the declared surrogate is not the
    function this class computes (a ``(1 + w)`` norm declared as ``w * x / std``) and the rule refuses, naming
    the module, instead of propagating relevance through the wrong function. The comparison is made once per
    module and state (its parameters, settings and dtypes: see ``_REPRODUCED``), not at every forward pass.
    """

    surrogate: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    name: str = ""

    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        def hook(mod, args, output):
            x = args[0]
            if not x.requires_grad:
                return output
            x = x.to(output.device)
            # under accelerate offload the weights are back on `meta` once the module's forward has returned
            with weights_on_device(mod):
                surrogate = self.surrogate(mod, x)
                state = _norm_state(mod, self.surrogate, x, output)
            if _REPRODUCED.get(mod) != state:
                where = self.name or type(mod).__name__
                if check_reproduces(surrogate, output, where, "norm surrogate"):
                    _REPRODUCED[mod] = state
            return straight_through(output, surrogate.to(output.dtype))

        handles.append(module.register_forward_hook(hook))


#: norm modules whose declared surrogate has reproduced their output, with the state it was proven in. The
#: comparison costs a reduction and a device sync per norm and forward pass (about a tenth of a small model's
#: attribution); a surrogate that reproduces a module once reproduces it for every input, as long as the
#: surrogate, the module's parameters, buffers and settings and the dtypes stay what they were. Any change of
#: those (weights loaded or edited in place: their version counter moves; a cast; a move) checks again, and a
#: failed check is never remembered: a wrong declaration stays an error. Weakly keyed: no module is kept alive.
_REPRODUCED: weakref.WeakKeyDictionary[torch.nn.Module, tuple] = weakref.WeakKeyDictionary()

#: the setting types of a module's own attributes that the surrogate check depends on (a tuple: isinstance with
#: a tuple is faster than with a union, and this runs at every norm of every forward pass)
_SETTING_TYPES = (int, float, str, bool, type(None))


def _norm_state(module: torch.nn.Module, surrogate: Callable, x: torch.Tensor, output: torch.Tensor) -> tuple:
    """What the surrogate check of ``module`` depends on besides the input values (see ``_REPRODUCED``)."""
    own = module.__dict__
    tensors = (*own["_parameters"].values(), *own["_buffers"].values())
    return (
        surrogate,
        x.dtype,
        output.dtype,
        output.device,
        tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors if t is not None),
        tuple((k, v) for k, v in own.items() if isinstance(v, _SETTING_TYPES)),
    )


def check_reproduces(value: torch.Tensor, reference: torch.Tensor, where: str, what: str) -> bool:
    """Raise :class:`UnsupportedModelError` unless ``value`` equals ``reference`` up to rounding.

    The tolerance is that of float32 at least (norms compute their statistics in float32 even in float64
    models), relative to the largest output: far below the difference a wrongly declared function makes.
    Returns whether the comparison was made (``False``: ``reference`` is not finite, nothing was proven).
    """
    with torch.no_grad():
        a, b = value.detach().to(reference.dtype), reference.detach()
        if b.is_floating_point() and not bool(torch.isfinite(b).all()):
            return False  # an overflow: the engine's finiteness check names the module, with advice
        if a.shape != b.shape:
            ok = False
        else:
            eps = torch.finfo(b.dtype).eps if b.is_floating_point() else 0.0
            scale = b.abs().amax().clamp(min=1.0)
            tol = max(16 * eps, 1e-5)
            ok = bool(((a - b).abs().amax() <= tol * scale).item()) if a.numel() else True
    if not ok:
        raise UnsupportedModelError(
            f"the {what} declared for {where} does not reproduce the module's output: the adapter declaration "
            "does not describe this module (e.g. a (1 + w) RMSNorm declared as w * x / std). Fix the declaration "
            "(and run hf_pelrp.check_adapter) before attributing this model."
        )
    return True


@dataclass
class EmbeddingLeaf(HookRule):
    """Make the output of an embedding module a leaf of ``store`` — the one rule for every additive input part.

    The k-th call of the module in one forward pass becomes the leaf ``names[k]`` (GPT-2 embeds tokens and,
    when given, token types with one table: ``names=("token", "segment")``; a name already taken, e.g. a
    ``"token"`` leaf made from ``inputs_embeds``, moves the call on to the next name). With ``per_row`` a
    ``[1, T, H]`` output (position ids shared by the batch) is expanded to the batch of the token leaf first,
    so each row gets its own leaf and its own map. The module's table is never modified: the leaf is a copy.
    Only calls during the model's own forward pass make leaves (a caller that embeds other ids with the same
    module between passes leaves the leaves alone).
    """

    store: LeafStore
    names: tuple[str, ...] = ("token",)
    per_row: bool = True

    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        def hook(_module, _args, output):
            if not self.store.aux.get("in_forward"):
                return None  # called outside the model's forward (e.g. a caller embedding ids itself)
            name = next((n for n in self.names if n not in self.store.additive), None)
            if name is None:
                raise UnsupportedModelError(
                    f"{type(_module).__name__} was called more often in one forward pass than its declared "
                    f"leaves {self.names}: the adapter declaration does not describe this model."
                )
            batch = self.store.batch_size
            if self.per_row and batch is not None and output.shape[0] == 1 and batch > 1:
                output = output.expand(batch, *output.shape[1:])
            leaf = make_leaf(output)
            self.store.additive[name] = leaf
            return leaf

        handles.append(module.register_forward_hook(hook))


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
    type (the vision adapters: ``LRPConfig.gamma_linear`` on MLP and head linears, ``gamma_conv`` on the patch
    convolution).
    """

    gamma: float

    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        layer_map = layer_map_of(module)

        def hook(mod, args, output):
            with weights_on_device(mod):  # accelerate offload: weights are on `meta` after the forward
                return gamma_rule(
                    args[0].to(output.device), output, mod.weight, mod.bias, self.gamma, layer_map
                )

        handles.append(module.register_forward_hook(hook))


@dataclass
class FunctionalActivation(HookRule):
    """Identity rule (AttnLRP Prop. 3.4) for an activation a model applies as a function between two modules.

    ``x = producer(...)``, ``y = f(x)`` (e.g. ``torch.tanh`` in RoBERTa's classification head, ``gelu`` in its
    LM head), then ``consumer(y)``: a forward hook remembers ``x``, a pre-hook on the consumer (the module this
    rule is attached to) replaces ``y`` by ``identity_rule(x, y)`` (same value, local gradient ``f(x) / x``).
    Only dropout (off in attribution) may sit between them; a shape mismatch means the layout is not the
    expected one and is refused.
    """

    producer: torch.nn.Module

    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        seen: dict[str, torch.Tensor] = {}

        def remember(_module, _args, output):
            seen["x"] = output

        def replace(_module, args):
            x = seen.pop("x", None)
            if x is None or not args:
                return None
            if args[0].shape != x.shape:
                raise UnsupportedModelError(
                    f"{type(_module).__name__} receives a tensor of shape {tuple(args[0].shape)} from "
                    f"{type(self.producer).__name__} ({tuple(x.shape)}): not the element-wise activation the "
                    "adapter declares between them."
                )
            return (identity_rule(x, args[0]), *args[1:])

        handles.append(self.producer.register_forward_hook(remember))
        handles.append(module.register_forward_pre_hook(replace))


@dataclass
class ClippedOutput(HookRule):
    """Identity rule (AttnLRP Prop. 3.4) for a clip ``clamp(y, -limit, limit)`` a model applies in place to the
    module's output (OLMo's ``clip_qkv`` on the q, k, v projections; method.md 1, "Clipped projections").

    Clipping is an element-wise activation: ``R_y = R_clip(y)``, i.e. the local gradient ``clip(y) / y``. The
    hook returns the already clipped output with that gradient (a fresh tensor: the model's in-place clamp
    modifies it), so the model's own clamp is a no-op in value, and its gradient (1 inside the closed interval
    ``[-limit, limit]``, where every value now lies) passes the ratio on unchanged. Plain autograd would give
    the clipped entries gradient 0 and lose their relevance.
    """

    limit: float

    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        def hook(_module, _args, output):
            clipped = output.clamp(min=-self.limit, max=self.limit)
            return identity_rule(output, clipped).clone()

        handles.append(module.register_forward_hook(hook))


@dataclass
class OutputActivation(HookRule):
    """Identity rule (AttnLRP Prop. 3.4) for an element-wise activation a model applies as a function to the
    output of ``producer`` as the last step of its forward: ``output.<field> = f(producer(x))``.

    Gemma 2's final-logit soft-capping ``logits = c * tanh(lm_head(h) / c)`` is the case in point (method.md
    "soft-capping"). A forward hook on ``producer`` remembers ``z``; a forward hook on the module this rule is
    attached to (the model) replaces ``y = output.<field>`` by ``identity_rule(z, y)``: the same value, local
    gradient ``f(z) / z`` instead of ``f'(z)`` (so ``R_z = R_y``: the explained capped logit is conserved). A
    ``y`` of another shape than ``z`` is not an element-wise function of it and is refused.
    """

    producer: torch.nn.Module
    field: str = "logits"

    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        seen: dict[str, torch.Tensor] = {}

        def remember(_module, _args, output):
            seen["z"] = output

        def replace(_module, _args, output):
            z = seen.pop("z", None)
            if z is None:
                return None
            y = getattr(output, self.field, None)
            if not isinstance(y, torch.Tensor):
                raise UnsupportedModelError(
                    f"{type(_module).__name__} returned no `{self.field}` field (return_dict=False?): the identity "
                    f"rule of the activation after {type(self.producer).__name__} cannot be applied; call the model "
                    "with return_dict=True inside hf_pelrp.lrp()."
                )
            if y.shape != z.shape:
                raise UnsupportedModelError(
                    f"{type(_module).__name__}.{self.field} has shape {tuple(y.shape)} but "
                    f"{type(self.producer).__name__} returned {tuple(z.shape)}: not the element-wise activation "
                    "the adapter declares between them."
                )
            setattr(output, self.field, identity_rule(z.to(y.device), y))
            return output

        handles.append(self.producer.register_forward_hook(remember))
        handles.append(module.register_forward_hook(replace))


#: the block child that normalises the stream between a pre-norm block's two residual additions (LLaMA
#: layout, GPT-2); a block without one of these names has no layout the residual rule knows
_SECOND_NORMS = ("post_attention_layernorm", "ln_2")


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@dataclass
class ResidualGamma(HookRule):
    """ResLRP's residual rule (:func:`hf_pelrp.rules.residual_rule`) at both additions of a pre-norm block.

    The block computes ``y1 = x + attention(norm1(x))`` and ``y2 = y1 + mlp(norm2(y1))`` inside its own forward
    (transformers' ``hidden_states = residual + hidden_states``), so the additions are reached through hooks on
    this one block instance: a pre-hook remembers ``x``, forward hooks on ``attention`` and ``mlp`` remember
    their outputs, a pre-hook on ``norm`` gives ``norm2`` the rule's ``y1`` (same value), and a forward hook on
    the block returns the rule's ``y2`` (same value) as its output. Each addition is checked to be the sum of
    the tensors remembered (a block with another layout, e.g. a norm after the attention output, is refused,
    not explained with a wrong rule). Nothing is patched; removing the handles restores the block.
    """

    gamma: float
    attention: torch.nn.Module
    norm: torch.nn.Module
    mlp: torch.nn.Module
    name: str = ""

    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        seen: dict[str, torch.Tensor] = {}
        where = self.name or type(module).__name__

        def start(_module, args, kwargs):
            seen.clear()
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor):
                seen["x"] = x

        def attention_out(_module, _args, output):
            seen["b1"] = _first(output)

        def norm_in(_module, args):
            x, b1 = seen.get("x"), seen.pop("b1", None)
            if x is None or b1 is None or not args:
                raise UnsupportedModelError(
                    f"{where}: the residual rule found no attention output before its norm"
                )
            check_reproduces(x + b1, args[0], where, "first residual addition (x + attention)")
            seen["y1"] = residual_rule((x, b1), args[0], self.gamma)
            return (seen["y1"], *args[1:])

        def mlp_out(_module, _args, output):
            seen["b2"] = output

        def end(_module, _args, output):
            y1, b2 = seen.pop("y1", None), seen.pop("b2", None)
            seen.clear()
            if y1 is None or b2 is None:
                raise UnsupportedModelError(
                    f"{where}: the residual rule did not see both branches of the block"
                )
            y2 = _first(output)
            check_reproduces(y1 + b2, y2, where, "second residual addition (y1 + mlp)")
            y2 = residual_rule((y1, b2), y2, self.gamma)
            return (y2, *output[1:]) if isinstance(output, tuple) else y2

        handles.append(module.register_forward_pre_hook(start, with_kwargs=True))
        handles.append(self.attention.register_forward_hook(attention_out))
        handles.append(self.norm.register_forward_pre_hook(norm_in))
        handles.append(self.mlp.register_forward_hook(mlp_out))
        handles.append(module.register_forward_hook(end))


def residual_rules(
    blocks: list[torch.nn.Module], attentions: list[torch.nn.Module], gamma: float
) -> list[tuple[torch.nn.Module, HookRule]]:
    """One :class:`ResidualGamma` per pre-norm block (LLaMA layout or GPT-2: an ``mlp`` child and a second norm
    named as in ``_SECOND_NORMS``); any other block layout is refused by name."""
    rules: list[tuple[torch.nn.Module, HookRule]] = []
    for i, (block, attention) in enumerate(zip(blocks, attentions, strict=True)):
        norm = next(
            (
                getattr(block, n)
                for n in _SECOND_NORMS
                if isinstance(getattr(block, n, None), torch.nn.Module)
            ),
            None,
        )
        mlp = getattr(block, "mlp", None)
        if norm is None or not isinstance(mlp, torch.nn.Module):
            raise UnsupportedModelError(
                f"residual_gamma: block {i} ({type(block).__name__}) is not a pre-norm block with an `mlp` and a "
                f"second norm named one of {_SECOND_NORMS}; the residual rule supports the LLaMA and GPT-2 block "
                "layouts. Use residual_gamma=None for this model."
            )
        rules.append(
            (block, ResidualGamma(gamma, attention, norm, mlp, name=f"block {i} ({type(block).__name__})"))
        )
    return rules
