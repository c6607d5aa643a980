"""More encoder-decoders: PLBart (BART's layout, :func:`hf_pelrp.adapters.seq2seq.bart_like`) and Switch
Transformers (T5's layout, :func:`hf_pelrp.adapters.seq2seq.t5_like`, with top-1 mixtures of experts).

- ``plbart``: BART's layout (learned positions with offset 2, ``PLBartScaledWordEmbedding``: the token leaf is the
  scaled row, ``layernorm_embedding`` after the sum); its classification head is ``PLBartClassificationHead``.
- ``switch_transformers``: T5's layout (relative position buckets inside attention, RMS layer norms, ungated
  ``DenseActDense`` MLPs) where every ``encoder_sparse_step`` / ``decoder_sparse_step``-th block's MLP is a
  ``SwitchTransformersSparseMLP``: a top-1 router (``p = softmax(x W_r)``, the selected expert's ``max p`` is the
  routing weight) and experts that are T5 ``DenseActDense`` MLPs. The routed term ``p_e(x) * E_e(x)`` is a product
  of two relevance-carrying factors (method.md 2, "Mixture of experts"): the uniform rule (1/2 each) under
  AttnLRP, the routing weight a constant under CP-LRP, exactly as :mod:`hf_pelrp.adapters.moe`'s softmax routing.
  The weight's share flows on through ``max`` and the router's softmax (Gradient x Input, AttnLRP Prop. 3.1) and
  its linear map (epsilon). The selection and the expert capacity (tokens past an expert's capacity are
  dropped: their MLP output is 0, as in transformers) are constants of the forward pass; the capacity counts the
  tokens of a row in order, padding included, so a row padded past the capacity is routed (and explained) as
  the model routes it, which can differ from the unpadded row. The rules are hooks: the routing-weight argument
  of ``SwitchTransformersExperts`` and the output of each expert get their factor.

``mvp`` has BART's layout but its ``MvpAttention`` computes attention inline (no dispatch through transformers'
attention interface), so it is refused by name (:mod:`hf_pelrp.adapters.refusals`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ..config import LRPConfig
from ..hooks import Handles, HookRule, LeafStore, OutputGradient
from ..rules import scale_gradient
from .base import register_adapter
from .seq2seq import bart_like, t5_like

register_adapter(
    bart_like(
        "plbart",
        "PLBart",
        description="learned absolute (offset 2), encoder and decoder",
        modules=("PLBartScaledWordEmbedding",),
        tiny={"scale_embedding": True},
    )
)


@dataclass
class RoutingWeightFactor(HookRule):
    """Scale the gradient of the routing-weight argument (``args[2]``) of an experts module by ``factor``."""

    factor: float

    def attach(self, module: nn.Module, handles: Handles) -> None:
        def pre_hook(mod, args):
            if len(args) < 3:
                return None
            return (*args[:2], scale_gradient(args[2], self.factor), *args[3:])

        handles.append(module.register_forward_pre_hook(pre_hook))


def switch_routing_rules(
    model: nn.Module, config: LRPConfig, store: LeafStore
) -> list[tuple[nn.Module, HookRule]]:
    """The uniform rule at ``p_e(x) * E_e(x)`` of every sparse MLP (CP-LRP: ``p_e`` a constant)."""
    rules: list[tuple[nn.Module, HookRule]] = []
    for module in model.modules():
        if type(module).__name__ == "SwitchTransformersExperts":
            rules.append((module, RoutingWeightFactor(config.gate_factor)))
            rules.extend((expert, OutputGradient(config.up_factor)) for expert in module.values())
    return rules


def _top1_router(model: nn.Module) -> None:
    from ..errors import UnsupportedModelError

    for path, module in model.named_modules():
        if type(module).__name__ == "SwitchTransformersExperts" and not all(
            type(e).__name__ == "SwitchTransformersDenseActDense" for e in module.values()
        ):
            raise UnsupportedModelError(
                f"module {path!r}: experts other than SwitchTransformersDenseActDense are not declared"
            )


_SWITCH = t5_like(
    "switch_transformers",
    "SwitchTransformers",
    {"num_experts": 4, "expert_capacity": 64, "encoder_sparse_step": 1, "decoder_sparse_step": 1},
)
register_adapter(
    dataclasses.replace(
        _SWITCH,
        modules=(
            *_SWITCH.modules,
            "SwitchTransformersSparseMLP",
            "SwitchTransformersTop1Router",
            "SwitchTransformersExperts",
        ),
        heads=("seq2seq_lm",),
        extra_rules=switch_routing_rules,
        checks=(*_SWITCH.checks, _top1_router),
    )
)
