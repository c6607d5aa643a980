"""The ``"lrp"`` attention implementation: SDPA with the AttnLRP / CP-LRP gradient factors on q, k and v.

Registered once with transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` under the name
``"lrp"`` (a new name: no existing entry is touched). Selecting it with ``attn_implementation="lrp"`` gives
exactly SDPA's outputs. Inside an attribution context each attention module carries its gradient factors
(see :func:`attention_rule`); the kernel stays SDPA (flash / memory-efficient where torch picks them), so no
N x N attention matrix is kept for the backward pass beyond what the kernel itself keeps.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .offsets import OffsetRecorder, Rotation, rotary_leaf_gradient
from .rules import identity_rule, scale_gradient, softmax_rule

LRP_ATTENTION = "lrp"


@dataclass
class AttentionRule:
    """Gradient factors applied to the (already position-encoded) q, k and v of one attention module.

    AttnLRP: q, k get 1/4 and v 1/2 (epsilon + uniform rule at ``A V``: 1/2 to A and to v; then at ``Q K^T``:
    1/2 of A's share to q and to k, Prop. 3.3; the softmax between them is plain Gradient x Input).
    CP-LRP: q, k get 0 (attention probabilities constant) and v gets 1.

    ``scores`` is the factor of the gradient reaching the attention scores ``s = q k^T * scale + b`` (A's share
    at ``A V``: 1/2 under AttnLRP, 0 under CP-LRP). It applies to a positional bias ``b`` made a leaf (ALiBi,
    relative position biases, method.md 2 "Positions inside attention"): the sum is an epsilon split, so
    ``R_b = b * g_s`` with ``g_s`` the gradient at the scores; q and k get ``scores / 2`` each (their ``q``,
    ``k`` factors).

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
    scores: float = 0.5
    rotary: float = 1.0
    rotated: tuple[int, str] | None = None
    calls: int = 0
    #: whether the module must run in every forward pass (a VLM's vision tower runs only when the prompt holds an
    #: image: its rules are checked by the family's maps instead)
    required: bool = True
    #: the softmax rule (:func:`hf_pelrp.rules.softmax_rule`); anything but ``"gxi"`` runs the eager path
    softmax: str = "gxi"
    softmax_eps: float = 0.0
    #: ``f(module, position_bias, query) -> leaf``: makes the ``position_bias`` the module passes to the attention
    #: interface a leaf (T5 / UMT5 compute it inside the module, so only the interface sees it with its batch)
    bias_leaf: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    #: set at each forward pass when relevance per offset is asked for (``LRPConfig(offsets=True)``): the
    #: backward hook of the attention output that splits each score's relevance (hf_pelrp.offsets)
    offsets: OffsetRecorder | None = None
    #: set at each forward pass by the rotary leaves when the model got detached ``(cos, sin)``
    #: (:class:`hf_pelrp.positions.RotaryLeaves`): the leaves whose gradient q and k give in the backward pass
    rotary_leaves: Rotation | None = None

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


#: the attention modules inside an attribution context and their factors (per module, weakly held)
ATTENTION_RULES: weakref.WeakKeyDictionary[torch.nn.Module, AttentionRule] = weakref.WeakKeyDictionary()
_RULES = ATTENTION_RULES


def set_attention_rule(module: torch.nn.Module, rule: AttentionRule | None) -> None:
    """Attach (or with ``None`` remove) the gradient factors of one attention module."""
    if rule is None:
        _RULES.pop(module, None)
    else:
        _RULES[module] = rule


def attention_rule(module: torch.nn.Module) -> AttentionRule | None:
    """The gradient factors attached to ``module``, or ``None`` outside an attribution context."""
    return _RULES.get(module)


#: keyword arguments of the attention interface that change its arithmetic in ways this implementation does not
#: reproduce (attention sinks): refused rather than silently ignored
_UNSUPPORTED_KWARGS = ("s_aux", "sinks")


def lrp_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Scaled-dot-product attention with LRP gradient factors; forward identical to ``"sdpa"``.

    Attention logit soft-capping (``softcap=``, Gemma 2), which SDPA does not support, runs through
    :func:`eager_attention` (exact, but it keeps the N x N scores for the backward pass). A float mask or a
    ``position_bias`` that requires grad (a positional bias made a leaf) gets the ``scores`` factor.
    """
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"the 'lrp' attention does not support {name}= (attention sinks); this model cannot be attributed yet"
            )
    rule = _RULES.get(module)
    plain = (query, key, value, attention_mask)  # the recorder re-computes the scores from the forward values
    if rule is not None:
        rule.calls += 1
        if rule.rotary_leaves is not None:
            length = rule.rotary_leaves.cos.shape[-2]
            if query.shape[-2] != length or key.shape[-2] != length:
                raise RuntimeError(
                    f"{type(module).__name__}: q / k of {query.shape[-2]} / {key.shape[-2]} positions reach the "
                    f"'lrp' attention, but the rotary leaves have {length}; keys from a cache need the in-graph "
                    "leaves (hf_pelrp.positions.rotary_leaves_in_graph())"
                )
            # the leaves get the gradient reaching q_rot and k_rot (after the q / k factors), as in the graph;
            # the factor and the leaves' gradient in one node
            query = rotary_leaf_gradient(query, rule.rotary_leaves, rule.channel_factors(rule.q, query))
            key = rotary_leaf_gradient(key, rule.rotary_leaves, rule.channel_factors(rule.k, key))
        else:
            query = scale_gradient(query, rule.channel_factors(rule.q, query))
            key = scale_gradient(key, rule.channel_factors(rule.k, key))
        value = scale_gradient(value, rule.v)
        if attention_mask is not None and attention_mask.requires_grad:
            attention_mask = scale_gradient(attention_mask, rule.scores)
        bias = kwargs.get("position_bias")
        if bias is not None and rule.bias_leaf is not None:
            bias = kwargs["position_bias"] = rule.bias_leaf(module, bias, query)
        if bias is not None and bias.requires_grad:
            kwargs["position_bias"] = scale_gradient(bias, rule.scores)
    if rule is not None and rule.softmax != "gxi":
        # the conservative softmax rules need the written-out scores: N x N per head kept for the backward pass
        kwargs["softmax"] = functools.partial(softmax_rule, rule=rule.softmax, eps=rule.softmax_eps)
        return eager_attention(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("softcap") is not None:
        output, weights = eager_attention(module, query, key, value, attention_mask, **kwargs)
    else:
        output, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if rule is not None and rule.offsets is not None:
        output = rule.offsets.watch(module, output, *plain, rule.scores, kwargs)
    return output, weights


def eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    softmax: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention written out (as transformers' eager implementations compute it), with logit soft-capping.

    ``s = q k^T * scaling``; soft-capping ``c * tanh(s / c)`` is an element-wise activation and gets the
    identity rule (AttnLRP Prop. 3.4, method.md "soft-capping"); then the mask, a float32 softmax (its rule is
    Gradient x Input, or ``softmax(scores, probs)``: a relevance rule of :func:`hf_pelrp.rules.softmax_rule`)
    and ``A V``. The N x N scores are kept for the backward pass: memory grows with the
    square of the sequence length for the layers that need this path.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = repeat_kv(key, groups)
        value = repeat_kv(value, groups)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        # the identity rule needs the capped value only: no graph (and no extra N x N tensor) for tanh
        with torch.no_grad():
            capped = torch.tanh(scores / softcap) * softcap
        scores = identity_rule(scores, capped) if scores.requires_grad else capped
    scores, value = _apply_mask(module, scores, value, attention_mask, kwargs.get("is_causal"))
    bias = kwargs.get("position_bias")
    if bias is not None:
        scores = scores + bias
    probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
    if softmax is not None:
        probs = softmax(scores, probs)
    probs = probs.to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, None


def _apply_mask(
    module: torch.nn.Module,
    scores: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_causal: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask of the ``"lrp"`` attention (built by ``sdpa_mask``) applied to written-out scores, as SDPA applies it.

    ``sdpa_mask`` gives a boolean mask (True = attend: causal, sliding window and padding together) or
    ``None`` where SDPA's own ``is_causal`` flag does the masking (no padding, and a sliding window longer
    than the input); an additive float mask (a positional bias made a leaf) is added. Masked scores become
    the dtype's minimum (at most float32's), as in transformers' eager attention: their probabilities are
    exactly 0.
    """
    kv_len = scores.shape[-1]
    if attention_mask is None:
        q_len = scores.shape[-2]
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not (causal and q_len > 1):
            return scores, value
        if kv_len > q_len:  # SDPA's is_causal is aligned top-left: transformers crops the keys to the queries
            scores, value = scores[..., :q_len], value[..., :q_len, :]
            kv_len = q_len
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril()
        return scores.masked_fill(~allowed, _masked_score(scores.dtype)), value
    mask = attention_mask[..., :kv_len]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, _masked_score(scores.dtype)), value
    return scores + mask, value


def _masked_score(dtype: torch.dtype) -> float:
    """The score of a masked entry: the dtype's minimum, but finite in the float32 softmax (a float64 minimum
    would become -inf there, and a padding query that sees no key would turn its whole row into NaN)."""
    return max(torch.finfo(dtype).min, torch.finfo(torch.float32).min)


AttentionInterface.register(LRP_ATTENTION, lrp_attention_forward)
AttentionMaskInterface.register(LRP_ATTENTION, sdpa_mask)
