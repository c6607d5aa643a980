"""The adapter protocol and the registry that finds an adapter by ``config.model_type``.

An adapter knows one family of architectures: which modules get which rule, where positions enter, how the
inputs are prepared. Everything else (the context, seeding, reading relevance) is shared in the engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..attention import AttentionRule
from ..config import LRPConfig
from ..devices import check_dispatch_hooks
from ..errors import UnsupportedModelError
from ..hooks import HookRule, LeafStore
from ..inputs import validate_text_inputs

_REGISTRY: dict[str, Adapter] = {}

# Architectures whose positions enter as relative biases inside attention; positional maps of these would be
# silently empty, so they are refused by name until an adapter exists.
RELATIVE_POSITION_MODEL_TYPES = frozenset(
    {
        "t5",
        "mt5",
        "umt5",
        "longt5",
        "deberta",
        "deberta-v2",
        "transfo-xl",
        "xlnet",
        "funnel",
        "swin",
        "swinv2",
    }
)


class Adapter(ABC):
    """What differs between architecture families.

    Subclasses set ``model_types`` and ``positional_kind`` (``"rotary"`` or ``"absolute"``) and implement
    :meth:`module_rules`, :meth:`attention_rules` and :meth:`layers`.
    """

    model_types: tuple[str, ...] = ()
    positional_kind: str = ""
    #: names of the additive leaves this family produces, in the order they are reported
    additive_leaves: tuple[str, ...] = ("token",)
    #: the :class:`LRPConfig` Gamma fields this family applies (``"gamma_linear"``, ``"gamma_conv"``); a
    #: configuration that sets another one is refused rather than silently run with the epsilon rule
    gamma_fields: frozenset[str] = frozenset()

    @abstractmethod
    def module_rules(
        self, model: torch.nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[torch.nn.Module, HookRule]]:
        """The (module, rule) pairs to attach for this configuration."""

    @abstractmethod
    def attention_rules(
        self, model: torch.nn.Module, config: LRPConfig
    ) -> list[tuple[torch.nn.Module, AttentionRule]]:
        """The attention modules and the gradient factors each gets."""

    @abstractmethod
    def layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The transformer blocks, in order (for per-layer maps and checks)."""

    def check_config(self, model: torch.nn.Module, config: LRPConfig) -> None:
        """Raise :class:`UnsupportedModelError` if ``config`` asks for rules this family does not apply."""
        unsupported = [
            name
            for name in ("gamma_linear", "gamma_conv")
            if getattr(config, name) is not None and name not in self.gamma_fields
        ]
        if unsupported:
            supported = ", ".join(sorted(self.gamma_fields)) or "none"
            raise UnsupportedModelError(
                f"LRPConfig sets {', '.join(unsupported)}, but the {type(self).__name__} "
                f"({getattr(getattr(model, 'config', None), 'model_type', '?')}) does not apply that Gamma rule "
                f"(Gamma fields it applies: {supported}); the result would silently use the epsilon rule. "
                "Set those fields to None (or pick a preset meant for this architecture, e.g. 'attnlrp' / 'cp')."
            )

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` if the model was modified in a way the rules cannot see through."""
        if getattr(model, "use_kernels", False) or getattr(model, "_use_kernels", False):
            raise UnsupportedModelError(
                f"{type(model).__name__} was loaded with use_kernels=True: hub kernels replace the norm, MLP and "
                "attention modules the LRP rules are attached to. Reload the model without use_kernels (or call "
                "model.set_use_kernels(False)) before attributing."
            )
        for name, module in model.named_modules():
            replaced = module.__dict__.get("forward")
            # accelerate's dispatch hooks keep the original forward as `_old_forward` and call it: those are fine
            if replaced is not None and not hasattr(module, "_hf_hook"):
                raise UnsupportedModelError(
                    f"module {name or type(model).__name__!r} ({type(module).__name__}) has its forward replaced on "
                    "the instance (hub kernels, torch.compile or another patching library); the LRP rules need the "
                    "original transformers modules. Load a fresh model without that patch."
                )
        check_dispatch_hooks(model)

    def validate_inputs(
        self, model: torch.nn.Module, inputs: dict[str, Any]
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """Check the user's inputs and return ``(model inputs, attention mask [B, T])``.

        The default handles token inputs (``input_ids`` or ``inputs_embeds``, ``attention_mask``); ``None``
        entries are dropped. Vision adapters override it for ``pixel_values``.
        """
        inputs = {k: v for k, v in inputs.items() if v is not None}
        input_ids, inputs_embeds, mask = validate_text_inputs(
            inputs.pop("input_ids", None),
            inputs.pop("inputs_embeds", None),
            inputs.pop("attention_mask", None),
        )
        if input_ids is not None:
            inputs["input_ids"] = input_ids
        else:
            inputs["inputs_embeds"] = inputs_embeds
        inputs["attention_mask"] = mask
        return self.prepare_inputs(model, inputs), mask

    def prepare_inputs(self, model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """Fill in model inputs the family needs for a padded batch (e.g. position ids); returns a new dict."""
        return dict(inputs)

    def num_layers(self, model: torch.nn.Module) -> int:
        return len(self.layers(model))

    def extra_maps(
        self, model: torch.nn.Module, store: LeafStore, maps: dict[str, torch.Tensor | None]
    ) -> dict[str, torch.Tensor]:
        """Family-specific maps derived after the backward pass (vision: ``patch_map``, ``pixel_map``).

        ``maps`` holds the standard ``token`` / ``position`` / ... maps already read from ``store``. They end up
        in :attr:`hf_pelrp.Attribution.extras`. The default adds nothing.
        """
        return {}


def register_adapter(adapter: Adapter) -> Adapter:
    """Register ``adapter`` for each of its ``model_types`` (a later registration replaces an earlier one)."""
    if not adapter.model_types:
        raise ValueError(f"{type(adapter).__name__} declares no model_types")
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values that have an adapter."""
    return sorted(_REGISTRY)


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter registered for ``model.config.model_type``; raises :class:`UnsupportedModelError` otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no config.model_type; hf_pelrp explains transformers PreTrainedModel "
            f"instances of the supported types: {', '.join(supported_model_types())}."
        )
    if model_type in RELATIVE_POSITION_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} encodes positions as relative attention biases, which hf_pelrp does not "
            "support yet (its positional maps would be silently empty). Supported model types: "
            f"{', '.join(supported_model_types())}."
        )
    adapter = _REGISTRY.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported by hf_pelrp. Supported model "
            f"types: {', '.join(supported_model_types())}. New architectures are added with "
            "hf_pelrp.register_adapter()."
        )
    return adapter
