"""LLaMA-family adapter (``llama``, ``mistral``, ``qwen2``): RMSNorm, SiLU-gated MLP, rotary positions, GQA.

Rules (method.md sections 1-2): identity rule on every RMSNorm and on the gate activation, uniform rule on
``act(gate) * up``, the ``"lrp"`` attention implementation for ``Q K^T`` / ``A V``, and with
``positional=True`` per-layer ``(cos, sin)`` leaves with the 1/2 split at the rotation.
"""

from __future__ import annotations

from typing import Any

import torch

from ..attention import AttentionRule
from ..config import LRPConfig
from ..errors import AttributionInputError, UnsupportedModelError
from ..hooks import Activation, EmbeddingLeaf, HookRule, LeafStore, Norm, OutputGradient, RotaryLeaves
from ..rules import rms_norm_identity
from .base import Adapter, register_adapter


def _rms_norm_surrogate(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    return module.weight * rms_norm_identity(x, eps).to(x.dtype)


def causal_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so a left-padded row sees the positions of the unpadded row."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


def check_rotary_length(model: torch.nn.Module, position_ids: torch.Tensor) -> None:
    """Refuse positions beyond ``config.max_position_embeddings``: rotary embeddings would extrapolate silently
    into a regime the model never saw, and the explanation would describe that, not the model."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None or position_ids.numel() == 0:
        return
    longest = int(position_ids.max()) + 1
    if longest > limit:
        raise AttributionInputError(
            f"the input reaches position {longest} but {type(model).__name__} supports at most {limit} positions "
            "(config.max_position_embeddings): truncate the input (tokenizer(..., truncation=True, "
            f"max_length={limit})) or split it into windows."
        )


class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2")
    positional_kind = "rotary"
    additive_leaves = ("token",)

    def _base(self, model: torch.nn.Module) -> torch.nn.Module:
        base = getattr(model, "model", model)
        if not hasattr(base, "layers") or not hasattr(base, "embed_tokens"):
            raise UnsupportedModelError(
                f"{type(model).__name__} does not have the LLaMA layout (model.layers, model.embed_tokens) the "
                f"{model.config.model_type!r} adapter expects."
            )
        return base

    def layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return list(self._base(model).layers)

    def check_model(self, model: torch.nn.Module) -> None:
        super().check_model(model)
        for i, layer in enumerate(self.layers(model)):
            mlp = getattr(layer, "mlp", None)
            missing = [n for n in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(mlp, n)]
            if missing or not hasattr(layer, "self_attn"):
                raise UnsupportedModelError(
                    f"layer {i} of {type(model).__name__} is not a LLaMA-style block (missing "
                    f"{', '.join(missing) or 'self_attn'}); mixture-of-experts and other variants need their own adapter."
                )

    def module_rules(
        self, model: torch.nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[torch.nn.Module, HookRule]]:
        base = self._base(model)
        rules: list[tuple[torch.nn.Module, HookRule]] = [(base.embed_tokens, EmbeddingLeaf(store, "token"))]
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                rules.append((module, Norm(_rms_norm_surrogate)))
        for i, layer in enumerate(base.layers):
            rules.append((layer.mlp.act_fn, Activation(product_factor=config.gate_factor)))
            rules.append((layer.mlp.up_proj, OutputGradient(config.up_factor)))
            if config.positional:
                rules.append((layer.self_attn, RotaryLeaves(store, i)))
        return rules

    def attention_rules(
        self, model: torch.nn.Module, config: LRPConfig
    ) -> list[tuple[torch.nn.Module, AttentionRule]]:
        qk = config.qk_factor
        if config.positional:
            # q_rot = q * cos + rotate_half(q) * sin: uniform rule on each product halves the gradient again
            qk *= 0.5
        rule = AttentionRule(q=qk, k=qk, v=config.v_factor)
        return [(layer.self_attn, rule) for layer in self.layers(model)]

    def validate_inputs(
        self, model: torch.nn.Module, inputs: dict[str, Any]
    ) -> tuple[dict[str, Any], torch.Tensor]:
        inputs, mask = super().validate_inputs(model, inputs)
        check_rotary_length(model, inputs["position_ids"])
        return inputs, mask

    def prepare_inputs(self, model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs = dict(inputs)
        mask = inputs.get("attention_mask")
        if inputs.get("position_ids") is None and mask is not None and mask.dim() == 2:
            inputs["position_ids"] = causal_position_ids(mask)
        return inputs


register_adapter(LlamaAdapter())
