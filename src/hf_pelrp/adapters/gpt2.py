"""GPT-2 adapter (``gpt2``): learned absolute positions ``wte + wpe``, LayerNorm, NewGELU MLP, fused ``c_attn``.

Rules (method.md sections 1-2): the ``Conv1D`` layers follow the epsilon rule (plain Gradient x Input, nothing
to attach), the identity rule on every LayerNorm and on the MLP activation, the ``"lrp"`` attention for
``Q K^T`` / ``A V`` (gradient factors ``config.qk_factor`` on q, k and ``config.v_factor`` on v; no rotary halving), and at
``e = wte(ids) + wpe(pos) (+ wte(token_type_ids))`` the leaves ``"token"``, ``"position"`` (only with
``positional=True``; otherwise the position embedding is a constant that absorbs its relevance, visible in the
conservation gap) and ``"segment"`` (GPT-2 embeds optional ``token_type_ids`` with the token table ``wte``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..attention import AttentionRule
from ..config import LRPConfig
from ..errors import UnsupportedModelError
from ..hooks import HookRule, LeafStore, make_leaf
from .additive import AdditiveLeaf, check_activation, norm_and_activation_rules, validate_ids
from .base import Adapter, register_adapter
from .llama import causal_position_ids


@dataclass
class _TokenTableLeaf(HookRule):
    """Leaves for GPT-2's ``wte``, which embeds the tokens and, when given, the token types too.

    The first call of a forward pass (the tokens) becomes ``"token"``; a call after a ``"token"`` leaf exists
    (``wte(token_type_ids)``, or the only call when the tokens come as ``inputs_embeds``) becomes ``"segment"``.
    """

    store: LeafStore

    def attach(self, module: nn.Module) -> RemovableHandle:
        def hook(_module, _args, output):
            name = "segment" if "token" in self.store.additive else "token"
            leaf = make_leaf(output)
            self.store.additive[name] = leaf
            return leaf

        return module.register_forward_hook(hook)


class GPT2Adapter(Adapter):
    model_types = ("gpt2",)
    positional_kind = "absolute"
    additive_leaves = ("token", "position", "segment")

    def _base(self, model: nn.Module) -> nn.Module:
        base = getattr(model, "transformer", model)
        if not all(hasattr(base, n) for n in ("wte", "wpe", "h")):
            raise UnsupportedModelError(
                f"{type(model).__name__} does not have the GPT-2 layout (transformer.wte, transformer.wpe, "
                "transformer.h) the 'gpt2' adapter expects."
            )
        return base

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self._base(model).h)

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        if getattr(model.config, "add_cross_attention", False) or any(
            hasattr(block, "crossattention") for block in self.layers(model)
        ):
            raise UnsupportedModelError(
                f"{type(model).__name__} has cross-attention layers (add_cross_attention=True, e.g. the decoder "
                "of an EncoderDecoderModel): relevance flowing into encoder_hidden_states would be lost and "
                "conservation broken. hf_pelrp supports GPT-2 as a stand-alone decoder; load it without "
                "add_cross_attention."
            )
        for i, block in enumerate(self.layers(model)):
            if not hasattr(block, "attn") or not hasattr(getattr(block, "mlp", None), "act"):
                raise UnsupportedModelError(f"block {i} of {type(model).__name__} is not a GPT-2 block")
            check_activation(model, f"transformer.h.{i}.mlp.act", block.mlp.act)

    def module_rules(
        self, model: nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[nn.Module, HookRule]]:
        base = self._base(model)
        rules: list[tuple[nn.Module, HookRule]] = [(base.wte, _TokenTableLeaf(store))]
        if config.positional:
            rules.append((base.wpe, AdditiveLeaf(store, "position")))
        rules.extend(norm_and_activation_rules(model))
        return rules

    def attention_rules(self, model: nn.Module, config: LRPConfig) -> list[tuple[nn.Module, AttentionRule]]:
        rule = AttentionRule(q=config.qk_factor, k=config.qk_factor, v=config.v_factor)
        return [(block.attn, rule) for block in self.layers(model)]

    def validate_inputs(
        self, model: nn.Module, inputs: dict[str, Any]
    ) -> tuple[dict[str, Any], torch.Tensor]:
        inputs, mask = super().validate_inputs(model, inputs)
        validate_ids(inputs, "token_type_ids", mask, model.config.vocab_size, "token-type")
        validate_ids(inputs, "position_ids", mask, model.config.n_positions, "position")
        return inputs, mask

    def prepare_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        # Position ids counted over real tokens only: a left-padded row gets the positions of the row alone.
        inputs = dict(inputs)
        mask = inputs.get("attention_mask")
        if inputs.get("position_ids") is None and mask is not None and mask.dim() == 2:
            inputs["position_ids"] = causal_position_ids(mask)
        # one forward pass needs no key/value cache; a cache filled twice breaks gradient checkpointing's
        # recomputation (GPT-2 hands the cache to its blocks even then)
        inputs.setdefault("use_cache", False)
        return inputs


register_adapter(GPT2Adapter())
