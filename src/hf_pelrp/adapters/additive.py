"""Building blocks shared by the adapters whose positions enter as additive embeddings (GPT-2, BERT family).

At ``e = t + p (+ s)`` PE-LRP splits the relevance of ``e`` in proportion to each addend (method.md section 2),
which in Gradient x Input form only needs each addend to be a leaf: ``R_t = t * g``, ``R_p = p * g``,
``R_s = s * g`` with ``g`` the gradient at ``e``. The rest is the identity rule on LayerNorm and element-wise
activations, also applied where a model calls the activation as a plain function rather than a module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import activations as hf_act

from ..errors import AttributionInputError, UnsupportedModelError
from ..hooks import Activation, Handles, HookRule, LeafStore, Norm, make_leaf
from ..inputs import as_batch
from ..rules import identity_rule, layer_norm_identity

#: element-wise activations with ``f(0) = 0`` for which the identity rule ``R_x = R_y`` is the AttnLRP rule
IDENTITY_RULE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    hf_act.GELUActivation,
    hf_act.NewGELUActivation,
    hf_act.FastGELUActivation,
    hf_act.QuickGELUActivation,
    hf_act.GELUTanh,
    hf_act.AccurateGELUActivation,
    hf_act.ClippedGELUActivation,
    hf_act.SiLUActivation,
    hf_act.MishActivation,
    hf_act.ReLUSquaredActivation,
    hf_act.LinearActivation,
    nn.GELU,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Hardswish,
)


def layer_norm_surrogate(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``nn.LayerNorm`` re-computed with the identity rule (:func:`hf_pelrp.rules.layer_norm_identity`)."""
    return layer_norm_identity(x, module.weight, module.bias, module.eps)


@dataclass
class AdditiveLeaf(HookRule):
    """Make an embedding module's output the leaf ``name`` of ``store``, one copy per batch row.

    Position (and default token-type) ids are often a shared ``[1, T]`` row broadcast over the batch; a
    ``[1, T, H]`` leaf would sum the gradient of all rows. The output is therefore expanded to the batch size
    of the ``"token"`` leaf, which every supported model creates first (word embedding or ``inputs_embeds``),
    before it becomes a leaf. The embedding table itself is never touched: the leaf is a fresh copy.
    """

    store: LeafStore
    name: str

    def attach(self, module: nn.Module) -> RemovableHandle:
        def hook(_module, _args, output):
            token = self.store.additive.get("token")
            if token is not None and output.shape[0] == 1 and token.shape[0] > 1:
                output = output.expand(token.shape[0], *output.shape[1:])
            leaf = make_leaf(output)
            self.store.additive[self.name] = leaf
            return leaf

        return module.register_forward_hook(hook)


@dataclass
class FunctionalActivation(HookRule):
    """Identity rule (AttnLRP Prop. 3.4) for an activation a model applies as a function between two modules.

    ``x = producer(...)``, ``y = f(x)`` (e.g. ``torch.tanh`` in RoBERTa's classification head, ``gelu`` in its
    LM head), then ``consumer(y)``: a forward hook remembers ``x``, a pre-hook on the consumer replaces ``y``
    by ``identity_rule(x, y)`` (same value, local gradient ``f(x) / x``). Only dropout (off in attribution)
    may sit between them; a shape mismatch means the layout is not the expected one and leaves ``y`` alone.
    """

    producer: nn.Module

    def attach(self, module: nn.Module) -> Handles:
        seen: dict[str, torch.Tensor] = {}

        def remember(_module, _args, output):
            seen["x"] = output

        def replace(_module, args):
            x = seen.pop("x", None)
            if x is None or not args or args[0].shape != x.shape:
                return None
            return (identity_rule(x, args[0]), *args[1:])

        return Handles(
            self.producer.register_forward_hook(remember), module.register_forward_pre_hook(replace)
        )


def norm_and_activation_rules(model: nn.Module) -> list[tuple[nn.Module, HookRule]]:
    """Identity rule on every ``nn.LayerNorm`` and every element-wise activation module of ``model``.

    The activations feed no product in these architectures, so their product factor is 1.
    """
    rules: list[tuple[nn.Module, HookRule]] = []
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            rules.append((module, Norm(layer_norm_surrogate)))
        elif isinstance(module, IDENTITY_RULE_ACTIVATIONS):
            rules.append((module, Activation(product_factor=1.0)))
    return rules


def check_activation(model: nn.Module, where: str, activation: object) -> None:
    """Refuse an MLP activation the identity rule does not cover (e.g. sigmoid, where ``f(0) != 0``)."""
    if not isinstance(activation, IDENTITY_RULE_ACTIVATIONS):
        raise UnsupportedModelError(
            f"{type(model).__name__}: the activation at {where} is {type(activation).__name__}, which has no "
            "LRP identity rule in hf_pelrp (supported: GELU variants, ReLU, SiLU, tanh, ...). Use a model with "
            "a supported hidden_act."
        )


def validate_ids(
    inputs: dict[str, Any], name: str, attention_mask: torch.Tensor, num_ids: int, what: str
) -> None:
    """Check ``inputs[name]`` (token-type or position ids): integer, shape [B, T], values in ``[0, num_ids)``.

    A [T] tensor or list is accepted for a single row and stored back as [1, T]. Raises
    :class:`AttributionInputError` naming the expected shape or range.
    """
    ids = inputs.get(name)
    if ids is None:
        return
    ids = as_batch(ids, name)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise AttributionInputError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    if ids.shape != attention_mask.shape:
        raise AttributionInputError(
            f"{name} has shape {tuple(ids.shape)} but the input has shape {tuple(attention_mask.shape)}: pass "
            f"one {what} id per token ([batch, seq_len]), e.g. the {name} the tokenizer returned with input_ids"
        )
    if ids.numel() and (ids.min() < 0 or ids.max() >= num_ids):
        bad = ids[(ids < 0) | (ids >= num_ids)][0].item()
        raise AttributionInputError(
            f"{name} holds {bad}, outside the model's {num_ids} {what} ids (0..{num_ids - 1})"
        )
    inputs[name] = ids.to(attention_mask.device)
