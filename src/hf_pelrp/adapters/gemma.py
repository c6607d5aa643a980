"""Gemma decoders (``gemma``, ``gemma2``, ``gemma3_text``): the LLaMA layout with Gemma's own arithmetic.

What differs from LLaMA, and the rule each part gets (method.md sections 1-2 and "Mixture of experts and
soft-capping"):

- ``(1 + w) * x / rms(x)`` RMSNorms (statistics and weight in float32, cast at the end): the identity rule
  through :func:`~hf_pelrp.adapters.norms.rms_norm_one_plus` (checked against the module's output at every
  call). Gemma 2 / 3 add a norm after the attention and after the MLP of each block; Gemma 3 normalises q
  and k per head (``q_norm`` / ``k_norm``, the same class) before the rotation.
- ``sqrt(hidden_size)`` embedding scale: the scaled word embedding multiplies its lookup by a constant
  inside the module, so the ``"token"`` leaf is the scaled embedding (a constant scaling: the epsilon rule
  passes relevance through it unchanged).
- GeGLU MLP ``gelu_tanh(gate) * up``: identity rule on the activation, uniform rule on the product.
- Gemma 2 attention logit soft-capping ``c * tanh(s / c)``: the ``"lrp"`` attention's exact eager path
  (identity rule on the cap; it keeps the N x N scores of each layer for the backward pass).
- final-logit soft-capping ``c * tanh(z / c)`` (Gemma 2, optional in Gemma 3): an element-wise activation
  the causal-LM head applies as a function after ``lm_head``: identity rule
  (:class:`~hf_pelrp.hooks.OutputActivation` through ``extra_rules``).
- sliding-window and global layers alternate (``config.layer_types``): the ``"lrp"`` attention receives the
  mask transformers builds for each layer type, so both kinds are exact.
"""

from __future__ import annotations

from torch import nn

from ..config import LRPConfig
from ..hooks import HookRule, LeafStore, OutputActivation
from .base import register_adapter
from .llama import llama_like
from .norms import rms_norm_one_plus

#: Gemma's head_dim and query_pre_attn_scalar default to 256: the tiny instance sets both small (and a larger
#: initialisation, so that attention is not uniform and positions carry visible relevance);
#: a window of 3 on 6 tokens makes the sliding-window mask differ from the causal one
_TINY_GEMMA = {"head_dim": 8, "query_pre_attn_scalar": 8, "initializer_range": 0.05}
_TINY_ALTERNATING = {
    **_TINY_GEMMA,
    "layer_types": ["sliding_attention", "full_attention"],
    "sliding_window": 3,
}


def final_logit_softcap(
    model: nn.Module, config: LRPConfig, store: LeafStore
) -> list[tuple[nn.Module, HookRule]]:
    """The identity rule on ``logits = c * tanh(lm_head(h) / c)`` where the model soft-caps its logits."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    head = getattr(model, "lm_head", None)
    if cap is None or head is None:
        return []
    return [(model, OutputActivation(head, field="logits"))]


GEMMA = register_adapter(
    llama_like(("gemma",), "Gemma", norms={"GemmaRMSNorm": rms_norm_one_plus}, tiny=_TINY_GEMMA, name="gemma")
)
GEMMA2 = register_adapter(
    llama_like(
        ("gemma2",),
        "Gemma2",
        norms={"Gemma2RMSNorm": rms_norm_one_plus},
        extra_rules=final_logit_softcap,
        tiny={**_TINY_ALTERNATING, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0},
        name="gemma2",
    )
)
GEMMA3_TEXT = register_adapter(
    llama_like(
        ("gemma3_text",),
        "Gemma3",
        norms={"Gemma3RMSNorm": rms_norm_one_plus},
        modules=("Gemma3TextModel", "Gemma3TextForSequenceClassification"),
        extra_rules=final_logit_softcap,
        tiny={**_TINY_ALTERNATING, "final_logit_softcapping": 3.0},
        name="gemma3_text",
    )
)
