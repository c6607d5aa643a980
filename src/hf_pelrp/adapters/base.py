"""The adapter declaration and the registry that finds it by ``config.model_type``.

An adapter is mostly data (docs/architecture.md): which module classes are norms and with which surrogate,
which are element-wise activations, where the gated products are, which modules are attention, which embeddings
are leaves, the positional kind, and how inputs are checked. :meth:`Adapter.module_rules` turns the declaration
into the rules for one model instance; :meth:`Adapter.check_model` refuses everything it does not cover: a
module class the declaration does not name (its forward may do arithmetic the rules do not know), a norm
without a surrogate, an activation without an identity rule, an attention module that does not dispatch
through transformers' attention interface. :func:`hf_pelrp.check_adapter` proves the rest on a tiny random
instance.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import sys
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..attention import AttentionRule
from ..config import LRPConfig
from ..devices import check_dispatch_hooks
from ..errors import UnsupportedModelError
from ..heads import HeadKind, head_of
from ..hooks import (
    Activation,
    EmbeddingLeaf,
    FunctionalActivation,
    Gamma,
    HookRule,
    LeafStore,
    Norm,
    OutputGradient,
)
from ..hub_kernels import is_kernel_forward
from ..inputs import Prepared, TextInputs
from ..modules import find_module, find_optional
from ..positions import PositionalKind, PositionalSite, Rotary, offsets_request
from .norms import ACTIVATIONS, is_activation_like, is_norm_like

#: module classes whose computation is one the rules already cover without a hook: linear maps and
#: convolutions (epsilon rule = plain gradient), lookups (embeddings: leaves or declared constants),
#: dropout (off in eval), and containers that only hold other modules
PRIMITIVES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Identity,
    nn.ModuleList,
    nn.ModuleDict,
    nn.Sequential,
    nn.modules.loss._Loss,  # used only with labels=, which attribution refuses
)
_PRIMITIVE_NAMES = frozenset({"Conv1D"})  # transformers' GPT-2 style linear layer

Surrogate = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GatedProduct:
    """``act(gate(x)) * up(x)`` inside each block: the uniform rule gives each factor half (AttnLRP Prop. 3.2);
    CP-LRP makes the activated gate a constant.

    ``act`` and ``up`` are block-relative module paths; ``up_channels`` = ``"second_half"`` for a fused
    ``gate_up_proj`` whose second half is the up projection (the first half feeds ``act``). ``optional``: blocks
    without the ``act`` module are skipped (families that mix dense and mixture-of-experts blocks: the gated MLP
    sits at ``mlp`` in some blocks and at ``mlp.shared_expert`` in others).
    """

    act: str
    up: str
    up_channels: str | None = None
    optional: bool = False


@dataclass(frozen=True)
class FunctionalActivationSite:
    """An activation a model applies as a plain function between two modules (model-relative paths, ``*``
    allowed): ``consumer(f(producer(x)))``."""

    producer: str
    consumer: str


class Experts(Protocol):
    """A mixture-of-experts declaration (:class:`hf_pelrp.adapters.moe.MixtureOfExperts` and its variants): the
    rules of the experts, routers and gates, and the refusal of a model whose experts it does not describe."""

    def __call__(
        self, model: nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[nn.Module, HookRule]]: ...

    def check(self, model: nn.Module) -> None: ...


@dataclass(frozen=True)
class Adapter:
    """The declaration of one architecture family.

    Parameters
    ----------
    model_types
        The ``config.model_type`` values it explains.
    layers
        Path (from ``model.base_model``) of the list of transformer blocks.
    attention
        Path (from each block) of the attention module that calls transformers' attention interface.
    embeddings
        Base-model paths of the input embedding modules and the leaves their outputs become, e.g.
        ``{"embed_tokens": ("token",)}``; GPT-2 embeds token types with its token table:
        ``{"wte": ("token", "segment")}``.
    positions
        The positional kind (:mod:`hf_pelrp.positions`).
    norms
        Class name -> surrogate (:mod:`hf_pelrp.adapters.norms`) of every normalisation class.
    modules
        Class names (``fnmatch`` patterns allowed) of the remaining modules, whose computation the declaration
        covers: the model and head classes, blocks, MLPs, attention and rotary-embedding modules.
    gated
        The gated products of each block.
    functional
        Activations applied as functions between two modules.
    constants
        Base-model paths of embedding tables that are constants of the forward pass (absorb relevance).
    gamma
        For vision families: which module paths (model-relative, ``*`` allowed) the ``gamma_linear`` /
        ``gamma_conv`` fields of :class:`LRPConfig` apply to.
    vision_options
        The fields of :data:`hf_pelrp.config.VISION_OPTIONS` (``patch_rule``, ``logit_contrast``,
        ``position_reference``) the family applies; setting another one is refused.
    inputs
        How inputs are checked (:class:`hf_pelrp.inputs.TextInputs`, or an image declaration).
    heads
        The head kinds the family supports (``None``: whatever :mod:`hf_pelrp.heads` recognises).
    experts
        The mixture-of-experts part (:class:`hf_pelrp.adapters.moe.MixtureOfExperts` or a variant): called like
        ``extra_rules`` for its rules, and its ``check(model)`` runs with ``checks``.
    extra_rules
        Rules no declaration field expresses: ``f(model, config, store) -> [(module, rule), ...]``.
    extra_maps
        Family-specific maps after the backward pass: ``f(model, store, maps) -> {name: tensor}``.
    checks
        Further refusals: ``f(model)`` raising :class:`UnsupportedModelError`.
    tiny
        Config overrides giving a tiny instance for :func:`hf_pelrp.check_adapter`.
    attention_interface
        Whether the attention modules call transformers' attention interface (default). Families whose attention
        is written inline (BLOOM, MPT, Falcon with ALiBi, DeBERTa, SwinV2) set ``False``: their attention modules
        get no :class:`AttentionRule` (the ``"lrp"`` attention would never run), the attention implementation is
        left as it is, and ``extra_rules`` apply the same factors with hooks
        (:mod:`hf_pelrp.inline_attention`).
    """

    model_types: tuple[str, ...]
    layers: str
    attention: str
    embeddings: Mapping[str, tuple[str, ...]]
    positions: PositionalKind
    norms: Mapping[str, Surrogate] = field(default_factory=dict)
    modules: tuple[str, ...] = ()
    gated: tuple[GatedProduct, ...] = ()
    functional: tuple[FunctionalActivationSite, ...] = ()
    constants: tuple[str, ...] = ()
    gamma: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    vision_options: tuple[str, ...] = ()
    inputs: Any = field(default_factory=TextInputs)
    heads: tuple[str, ...] | None = None
    experts: Experts | None = None
    extra_rules: Callable[[nn.Module, LRPConfig, LeafStore], list[tuple[nn.Module, HookRule]]] | None = None
    extra_maps: Callable[[nn.Module, LeafStore, dict[str, Any]], dict[str, torch.Tensor]] | None = None
    checks: tuple[Callable[[nn.Module], None], ...] = ()
    tiny: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    attention_interface: bool = True

    # ---- structure ----------------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return self.name or "/".join(self.model_types)

    def base(self, model: nn.Module) -> nn.Module:
        return getattr(model, "base_model", model)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks, in order."""
        return list(find_module(self.base(model), self.layers))

    def num_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The attention module of each block."""
        return [find_module(block, self.attention) for block in self.blocks(model)]

    def positional_site(self, model: nn.Module) -> PositionalSite:
        """Where this model's positional tensors enter, read off the declaration (for tools that intervene on
        positions, e.g. the evaluation's position flipping)."""
        kind = self.positions
        modules = tuple(find_module(self.base(model), path) for path in _positional_paths(kind))
        attention: tuple[nn.Module, ...] = ()
        keyword, names, scaling = "", (), 1.0
        if kind.inside_attention:
            attention = tuple(self.attention_modules(model))
        if isinstance(kind, Rotary):
            keyword, names = kind.keyword, tuple(kind.names)
            rotary = next(
                (m for m in model.modules() if hasattr(m, "attention_scaling") and hasattr(m, "inv_freq")),
                None,
            )
            scaling = float(getattr(rotary, "attention_scaling", 1.0))
        return PositionalSite(kind.name, modules, attention, keyword, names, scaling)

    def head(self, model: nn.Module) -> HeadKind:
        kind = head_of(model)
        if self.heads is not None and kind.name not in self.heads:
            raise UnsupportedModelError(
                f"{type(model).__name__}: the {self.label} adapter explains {', '.join(self.heads)} heads, not "
                f"{kind.name}."
            )
        return kind

    # ---- refusals -----------------------------------------------------------------------------------------

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` for anything the declaration does not cover.

        The structural checks (every module covered, attention dispatch, no replaced forward) are a function of
        the module tree alone: they are remembered per model instance and tree (paths and classes), so a second
        attribution of the same model skips them; any change of the tree checks again. A model with an instance
        forward or an accelerate hook is checked in full every time, and the declaration's own ``checks`` (which
        may read the config) always run.
        """
        tree = _tree(model)
        checked = _CHECKED.get(model)
        checks = self.checks if self.experts is None else (self.experts.check, *self.checks)
        if tree is not None and checked is not None and checked[0] is self and checked[1] == tree:
            for check in checks:
                check(model)
            return
        self._check_structure(model)
        for check in checks:
            check(model)
        if tree is not None:
            _CHECKED[model] = (self, tree)

    def _check_structure(self, model: nn.Module) -> None:
        # hub kernels (on by default in from_pretrained since transformers 5.25) are fine: lrp() runs the
        # modules' own torch forwards for the duration of the attribution (hf_pelrp.hub_kernels)
        for path, module in model.named_modules():
            replaced = module.__dict__.get("forward")
            # accelerate's dispatch hooks keep the original forward as `_old_forward` and call it: those are fine
            if replaced is not None and not hasattr(module, "_hf_hook") and not is_kernel_forward(module):
                raise UnsupportedModelError(
                    f"module {path or type(model).__name__!r} ({type(module).__name__}) has its forward replaced on "
                    "the instance (torch.compile or another patching library, not a hub kernel); the LRP rules "
                    "need the original transformers modules. Load a fresh model without that patch."
                )
        params = list(model.parameters())
        if (
            params
            and all(p.device.type == "meta" for p in params)
            and not any(hasattr(m, "_hf_hook") for m in model.modules())
        ):
            raise UnsupportedModelError(
                f"{type(model).__name__} has its weights on the meta device (no data): load the weights "
                "(from_pretrained, or to_empty + load_state_dict) before attributing."
            )
        check_dispatch_hooks(model)
        if self.attention_interface:
            inline = sorted(
                {type(m).__name__ for m in self.attention_modules(model) if not _dispatches(type(m))}
            )
            if inline:
                raise UnsupportedModelError(
                    f"{type(model).__name__}'s attention ({', '.join(inline)}) does not dispatch through "
                    "transformers' AttentionInterface (or its source cannot be read), so the LRP attention rules "
                    "cannot be attached to it."
                )
        self._check_coverage(model)

    def _check_coverage(self, model: nn.Module) -> None:
        leaves = {find_optional(self.base(model), p) for p in (*self.embeddings, *self.constants)}
        leaves |= {find_optional(self.base(model), p) for p in _positional_paths(self.positions)}
        leaves.discard(None)
        declared = self.modules
        for path, module in model.named_modules():
            cls = type(module)
            name = cls.__name__
            where = f"module {path or '<model>'!r} ({name}) of {type(model).__name__}"
            if name in self.norms:
                continue
            if isinstance(module, nn.Embedding):
                if module not in leaves:
                    raise UnsupportedModelError(
                        f"{where} is an embedding table the {self.label} adapter does not declare as a leaf or "
                        "a constant: its relevance would be lost silently. Unknown = refused."
                    )
                continue
            if isinstance(module, PRIMITIVES) or name in _PRIMITIVE_NAMES:
                continue
            if isinstance(module, ACTIVATIONS):
                continue
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in declared):
                continue
            if is_norm_like(module):
                raise UnsupportedModelError(
                    f"{where} is a normalisation layer with no declared surrogate in the {self.label} adapter "
                    "(its identity rule depends on what exactly it computes: w * x / std, (1 + w) * x / std, "
                    "LayerNorm with or without bias). Declare it in the adapter's norms."
                )
            if is_activation_like(module):
                raise UnsupportedModelError(
                    f"{where} is an activation without an LRP identity rule in hf_pelrp (supported: GELU "
                    "variants, ReLU, SiLU, tanh, ...); its relevance would not be conserved. Use a model with a "
                    "supported hidden_act."
                )
            raise UnsupportedModelError(
                f"{where} is not covered by the {self.label} adapter declaration: hf_pelrp cannot tell which "
                "rule its forward needs (a variant of the architecture?). Unknown = refused; a new declaration "
                "plus hf_pelrp.check_adapter adds it."
            )

    def check_config(self, model: nn.Module, config: LRPConfig) -> None:
        """Refuse configuration fields this family does not apply (a Gamma rule it has no layers for)."""
        self._check_vision_options(model, config)
        unsupported = [
            name
            for name in ("gamma_linear", "gamma_conv")
            if getattr(config, name) is not None and name not in self.gamma
        ]
        if config.offsets:
            reason = self.positions.offsets_refusal(self.attention_interface)
            if reason is not None:
                raise UnsupportedModelError(
                    f"relevance per offset (LRPConfig(offsets=True)) is not available for the {self.label} adapter "
                    f"({getattr(getattr(model, 'config', None), 'model_type', '?')}): {reason}. It exists for rotary "
                    "and ALiBi models; use offsets=False here (position and position_by_layer are still given)."
                )
        if unsupported:
            supported = ", ".join(sorted(self.gamma)) or "none"
            raise UnsupportedModelError(
                f"LRPConfig sets {', '.join(unsupported)}, but the {self.label} adapter "
                f"({getattr(getattr(model, 'config', None), 'model_type', '?')}) does not apply that Gamma rule "
                f"(Gamma fields it applies: {supported}); the result would silently use the epsilon rule. "
                "Set those fields to None (or pick a preset meant for this architecture, e.g. 'attnlrp' / 'cp')."
            )

    def _check_vision_options(self, model: nn.Module, config: LRPConfig) -> None:
        from ..config import VISION_OPTIONS

        unapplied = [
            name
            for name in VISION_OPTIONS
            if getattr(config, name, None) is not None and name not in self.vision_options
        ]
        if unapplied:
            raise UnsupportedModelError(
                f"LRPConfig sets {', '.join(unapplied)}, but the {self.label} adapter "
                f"({getattr(getattr(model, 'config', None), 'model_type', '?')}) does not apply "
                f"{'it' if len(unapplied) == 1 else 'them'} (they are vision options of the ViT / DeiT / DINOv2 "
                "adapters); the result would silently ignore them. Set them to None."
            )

    # ---- the rules ----------------------------------------------------------------------------------------

    def module_rules(
        self, model: nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[nn.Module, HookRule]]:
        """The (module, rule) pairs of this declaration for ``config`` (model already checked)."""
        base = self.base(model)
        rules: list[tuple[nn.Module, HookRule]] = []
        for path, names in self.embeddings.items():
            rules.append((find_module(base, path), EmbeddingLeaf(store, tuple(names))))
        blocks = self.blocks(model)
        if config.offsets:
            rules.append((model, offsets_request(store, config.offset_chunk)))
        if config.positional:
            rules.extend(self.positions.rules(model, blocks, self.attention_modules(model), store))
        gates: dict[nn.Module, float] = {}
        for block in blocks:
            for product in self.gated:
                if product.optional and find_optional(block, product.act) is None:
                    continue
                act = find_module(block, product.act)
                if not isinstance(act, ACTIVATIONS):
                    raise UnsupportedModelError(
                        f"the gate activation {product.act!r} of {type(model).__name__} is {type(act).__name__}, "
                        "which has no LRP identity rule in hf_pelrp; use a model with a supported hidden_act."
                    )
                gates[act] = config.gate_factor
                up = find_module(block, product.up)
                channels = slice(None) if product.up_channels is None else _second_half(up)
                rules.append(
                    (up, OutputGradient(config.up_factor, channels if product.up_channels else None))
                )
        for path, module in model.named_modules():
            name = type(module).__name__
            if name in self.norms:
                rules.append((module, Norm(self.norms[name], name=f"{path} ({name})")))
            elif isinstance(module, ACTIVATIONS):
                rules.append((module, Activation(product_factor=gates.get(module, 1.0))))
        for site in self.functional:
            for producer, consumer in _matching_pairs(model, site):
                rules.append((consumer, FunctionalActivation(producer)))
        for field_name, patterns in self.gamma.items():
            gamma = getattr(config, field_name)
            if gamma is None:
                continue
            for path, module in model.named_modules():
                if any(fnmatch.fnmatchcase(path, p) for p in patterns):
                    rules.append((module, Gamma(gamma)))
        if self.experts is not None:
            rules.extend(self.experts(model, config, store))
        if self.extra_rules is not None:
            rules.extend(self.extra_rules(model, config, store))
        return rules

    def attention_rules(self, model: nn.Module, config: LRPConfig) -> list[tuple[nn.Module, AttentionRule]]:
        """One :class:`AttentionRule` per attention module (its own object: rotary leaves record on it); none for
        families whose attention is written inline (``attention_interface=False``)."""
        if not self.attention_interface:
            return []
        return [
            (
                module,
                self.positions.attention_rule(
                    AttentionRule(config.qk_factor, config.qk_factor, config.v_factor, config.scores_factor),
                    config,
                ),
            )
            for module in self.attention_modules(model)
        ]

    def family_maps(
        self, model: nn.Module, store: LeafStore, maps: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The family-specific maps of the latest backward pass (``extra_maps``; a VLM adds its image maps)."""
        return {} if self.extra_maps is None else dict(self.extra_maps(model, store, maps))

    def validate_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> Prepared:
        """Check the user's model inputs (see :mod:`hf_pelrp.inputs`)."""
        return self.inputs.validate(model, inputs)


def _second_half(module: nn.Module) -> slice:
    width = getattr(module, "out_features", None)
    if width is None or width % 2:
        raise UnsupportedModelError(
            f"{type(module).__name__} is declared as a fused gate/up projection but has {width} outputs"
        )
    return slice(width // 2, None)


#: models whose structural checks passed, with the adapter and the module tree they passed for (weakly keyed:
#: no model is kept alive; the value holds paths and classes only)
_CHECKED: weakref.WeakKeyDictionary[nn.Module, tuple[Adapter, tuple]] = weakref.WeakKeyDictionary()


def _tree(model: nn.Module) -> tuple | None:
    """The module tree of ``model`` as (path, class) pairs, or ``None`` where a module carries an instance forward
    or an accelerate hook (hub kernels, offload: what those bind can change without the tree changing)."""
    tree = []
    for path, module in model.named_modules():
        own = module.__dict__
        if "forward" in own or "_hf_hook" in own or "_old_forward" in own:
            return None
        tree.append((path, type(module)))
    first = next(model.parameters(), None)
    if first is None or first.is_meta:  # weights on meta: the full check refuses (or accepts an offload hook)
        return None
    return tuple(tree)


@functools.cache
def _dispatches(attention_class: type) -> bool:
    """Whether the module that defines ``attention_class`` calls transformers' attention interface: the heuristic
    of transformers' own ``_can_set_attn_implementation``, asked of the attention's module rather than of the
    model's, so that a head class defined in a notebook around transformers' layers is judged by those layers.
    (Whether every layer's attention really ran through it is checked at each forward.)"""
    try:
        code = inspect.getsource(sys.modules[attention_class.__module__])
    except (KeyError, OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS.get_interface(" in code


def _positional_paths(kind: PositionalKind) -> tuple[str, ...]:
    modules = getattr(kind, "modules", None)
    return tuple(modules) if isinstance(modules, Mapping) else ()


def _matching_pairs(model: nn.Module, site: FunctionalActivationSite) -> list[tuple[nn.Module, nn.Module]]:
    named = dict(model.named_modules())
    pairs = []
    for path, consumer in named.items():
        if not fnmatch.fnmatchcase(path, site.consumer):
            continue
        # the producer shares the consumer's parent (e.g. classifier.dense -> classifier.out_proj)
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        producer_path = site.producer.replace("*", parent, 1) if "*" in site.producer else site.producer
        producer = named.get(producer_path)
        if producer is not None:
            pairs.append((producer, consumer))
    return pairs


# ---- registry ------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Adapter] = {}
#: model types refused by name, with the reason
_REFUSED: dict[str, str] = {}
#: declarations inferred for model types with none (:mod:`hf_pelrp.adapters.infer`), after (or while) they are
#: proven by check_adapter; never listed by supported_model_types()
_INFERRED: dict[str, Adapter] = {}
#: ``f(model) -> Adapter`` inferring (and proving) a declaration, or raising UnsupportedModelError naming what
#: it cannot place; installed by :mod:`hf_pelrp.adapters.infer`
_INFERENCE: list[Callable[[nn.Module], Adapter]] = []


#: model types whose declaration depends on the configuration: ``model_type -> (choose, variants)``, where
#: ``choose(config)`` returns one of ``variants`` (or raises UnsupportedModelError); the type's registered adapter
#: is its default (listed, documented), check_adapter proves every variant
_VARIANTS: dict[str, tuple[Callable[[Any], Adapter], tuple[Adapter, ...]]] = {}


def register_variants(
    model_type: str, choose: Callable[[Any], Adapter], variants: tuple[Adapter, ...]
) -> None:
    """Make the declaration of ``model_type`` config-aware: :func:`adapter_for` returns ``choose(model.config)``
    (one of ``variants``, each declaring ``model_type``), :func:`adapter_variants` lists them all for
    check_adapter. ``model_type`` must already have its default adapter registered."""
    if model_type not in _REGISTRY:
        raise ValueError(f"register the default adapter of {model_type!r} before its variants")
    if not variants or any(not isinstance(v, Adapter) or model_type not in v.model_types for v in variants):
        raise ValueError(f"the variants of {model_type!r} must be Adapter declarations of that model type")
    _VARIANTS[model_type] = (choose, tuple(variants))


def adapter_variants(model_type: str) -> tuple[Adapter, ...]:
    """Every declaration of ``model_type``: its config-aware variants, or its one adapter."""
    if model_type in _VARIANTS and _REGISTRY.get(model_type) is not None:
        return _VARIANTS[model_type][1]
    return (adapter_for_type(model_type),)


def adapter_for_config(model_type: str, config: Any) -> Adapter:
    """The declaration of ``model_type`` for ``config`` (a config-aware type's chosen variant)."""
    adapter = adapter_for_type(model_type)
    entry = _VARIANTS.get(model_type)
    if entry is None or config is None or _REGISTRY.get(model_type) is not adapter:
        return adapter
    chosen = entry[0](config)
    if chosen not in entry[1]:
        raise UnsupportedModelError(f"the variant chosen for {model_type!r} is not one of its declarations")
    return chosen


def register_adapter(adapter: Adapter) -> Adapter:
    """Register ``adapter`` for each of its ``model_types`` (a later registration replaces an earlier one)."""
    if not isinstance(adapter, Adapter):
        raise TypeError(
            f"register_adapter takes an hf_pelrp.Adapter declaration, got {type(adapter).__name__}"
        )
    if not adapter.model_types:
        raise ValueError("the adapter declares no model_types")
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
        _REFUSED.pop(model_type, None)
        _VARIANTS.pop(model_type, None)  # a new declaration replaces the type's variants too
    return adapter


def refuse_model_type(model_type: str, reason: str) -> None:
    """Refuse ``model_type`` with ``reason`` (instead of the generic "not supported")."""
    if model_type not in _REGISTRY:
        _REFUSED[model_type] = reason


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values that have an adapter."""
    return sorted(_REGISTRY)


def refused_model_types() -> dict[str, str]:
    """Model types refused by name, with the reason."""
    return dict(sorted(_REFUSED.items()))


def adapter_for_type(model_type: str) -> Adapter:
    """The adapter registered for ``model_type``; :class:`UnsupportedModelError` otherwise."""
    adapter = _REGISTRY.get(model_type)
    if adapter is None and model_type not in _REFUSED:
        adapter = _INFERRED.get(model_type)  # explicit refusals stay refusals
    if adapter is not None:
        return adapter
    if model_type in _REFUSED:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported by hf_pelrp: {_REFUSED[model_type]} Supported model "
            f"types: {', '.join(supported_model_types())}."
        )
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported by hf_pelrp. Supported model types: "
        f"{', '.join(supported_model_types())}. New architectures are added with hf_pelrp.register_adapter() "
        "and checked with hf_pelrp.check_adapter()."
    )


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter registered for ``model.config.model_type``; raises :class:`UnsupportedModelError` otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no config.model_type; hf_pelrp explains transformers PreTrainedModel "
            f"instances of the supported types: {', '.join(supported_model_types())}."
        )
    if model_type not in _REGISTRY and model_type not in _REFUSED and _INFERENCE:
        # no declaration: infer one from the module tree and config, proven by check_adapter (explicit
        # refusals stay refusals)
        try:
            return _INFERENCE[0](model)
        except UnsupportedModelError as err:
            raise UnsupportedModelError(
                f"model type {model_type!r} ({type(model).__name__}) is not supported by hf_pelrp. Supported "
                f"model types: {', '.join(supported_model_types())}. No declaration could be inferred either: "
                f"{err}"
            ) from None
    try:
        return adapter_for_config(model_type, config)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(
            str(err).replace(f"{model_type!r}", f"{model_type!r} ({type(model).__name__})", 1)
        ) from None
