"""The ``"lrp"`` attention implementation: SDPA with the AttnLRP / CP-LRP gradient factors on q, k and v.

Registered once with transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` under the name
``"lrp"`` (a new name: no existing entry is touched). Selecting it with ``attn_implementation="lrp"`` gives
exactly SDPA's outputs. Inside an attribution context each attention module carries its gradient factors
(see :func:`attention_rule`); the kernel stays SDPA (flash / memory-efficient where torch picks them), so no
N x N attention matrix is kept for the backward pass beyond what the kernel itself keeps.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .rules import scale_gradient

LRP_ATTENTION = "lrp"


@dataclass
class AttentionRule:
    """Gradient factors applied to the (already position-encoded) q, k and v of one attention module.

    AttnLRP: q, k get 1/4 and v 1/2 (epsilon + uniform rule at ``A V``: 1/2 to A and to v; then at ``Q K^T``:
    1/2 of A's share to q and to k, Prop. 3.3; the softmax between them is plain Gradient x Input).
    CP-LRP: q, k get 0 (attention probabilities constant) and v gets 1.

    With rotary positions made leaves, the rotated channels of q and k get ``rotary`` (1/2: the uniform rule
    at ``q * cos`` and ``rotate(q) * sin``, method.md 2) on top; which channels rotate (``rotated``: how many,
    and whether they are the ``"first"`` or ``"last"`` channels of a head) is recorded by the rotary leaves at
    each forward pass, so that a partially rotary head keeps the full factor on its pass-through channels.
    ``calls`` counts the forward calls, so the engine can tell that the module really ran through this
    implementation.
    """

    q: float
    k: float
    v: float
    rotary: float = 1.0
    rotated: tuple[int, str] | None = None
    calls: int = 0

    def channel_factors(self, base: float, x: torch.Tensor) -> float | torch.Tensor:
        """``base`` for every channel of ``x`` [..., D], times ``rotary`` on the rotated ones."""
        if self.rotary == 1.0 or self.rotated is None or base == 0.0:
            return base
        count, where = self.rotated
        dim = x.shape[-1]
        if count >= dim:
            return base * self.rotary
        factors = torch.full((dim,), base, dtype=torch.float32)
        if where == "first":
            factors[:count] *= self.rotary
        else:
            factors[dim - count :] *= self.rotary
        return factors


_RULES: weakref.WeakKeyDictionary[torch.nn.Module, AttentionRule] = weakref.WeakKeyDictionary()


def set_attention_rule(module: torch.nn.Module, rule: AttentionRule | None) -> None:
    """Attach (or with ``None`` remove) the gradient factors of one attention module."""
    if rule is None:
        _RULES.pop(module, None)
    else:
        _RULES[module] = rule


def attention_rule(module: torch.nn.Module) -> AttentionRule | None:
    """The gradient factors attached to ``module``, or ``None`` outside an attribution context."""
    return _RULES.get(module)


def lrp_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Scaled-dot-product attention with LRP gradient factors; forward identical to ``"sdpa"``."""
    rule = _RULES.get(module)
    if rule is not None:
        rule.calls += 1
        query = scale_gradient(query, rule.channel_factors(rule.q, query))
        key = scale_gradient(key, rule.channel_factors(rule.k, key))
        value = scale_gradient(value, rule.v)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(LRP_ATTENTION, lrp_attention_forward)
AttentionMaskInterface.register(LRP_ATTENTION, sdpa_mask)
