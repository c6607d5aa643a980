"""A slow, explicit float64 LRP of ONE attention module with its rotary variant, used to check the fast path.

Plain tensor math on the module's weights (no autograd, no hooks, no hf_pelrp code): a forward pass that
keeps every activation, then a backward sweep applying the rules of method.md one by one, with ``eps -> 0``
and ``0 / 0 := 0`` (the helpers of :mod:`reference_lrp`):

- q, k, v projections and the output projection (epsilon rule): ``R_x = x * ((R_z / z) W)``, biases absorb
  their share; a fused ``q k v`` projection is the same linear map split by rows, which the epsilon rule
  treats output by output, so splitting it changes nothing;
- the rotation of the first ``rotary_dim`` channels of each head (partial rotary; method.md "Rotary
  variants"): ``q_rot = q_r * cos + rotate(q_r) * sin`` with ``rotate`` = ``rotate_half`` (LLaMA, GPT-NeoX,
  Phi, StableLM) or ``rotate_every_two`` (GPT-J: pairs (0, 1), (2, 3), ...). Epsilon rule over the two
  terms, uniform rule (1/2, 1/2) inside each product; the pass-through channels ``q[rotary_dim:]`` are
  copied, so their relevance goes to q entirely. GPT-J's cos / sin have ``rotary_dim / 2`` channels, each
  used for the two channels of its pair: a leaf's relevance is the sum over both;
- optional per-head ``(1 + w)`` RMSNorms of q and k before the rotation (Gemma 3's ``q_norm`` / ``k_norm``;
  identity rule: the normalising scale ``s`` is a constant, ``R_q = q * ((1 + w) s) * R_qn / qn``);
- ``S = scaling * q k^T`` (epsilon + uniform: each term ``q_d k_d`` gives half to q and half to k), optional
  soft-capping ``S_c = c * tanh(S / c)`` (identity rule: ``R_S = R_Sc`` element-wise), then the causal mask;
- softmax (AttnLRP Prop. 3.1): ``R_S = S (R_A - A sum_j R_A)`` on the allowed entries; the probabilities are
  computed as the model computes them (Gemma 2's eager attention: a float32 softmax), so that the model's own
  rounding is not counted as a disagreement;
- ``A V`` (epsilon + uniform): each term ``A_ij v_jd`` gives half to A and half to v; GQA key / value heads
  collect the relevance of every query head that shares them.

``whole_head_half=True`` applies the rotary 1/2 to every channel of the head (the wrong rule for partial
rotary), so that tests can show that it is measurably wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helpers.reference_lrp import F64, lrp_linear, rotate_half, safe_div, unrotate_relevance


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """GPT-J's rotation: ``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``."""
    out = torch.empty_like(x)
    out[..., 0::2] = -x[..., 1::2]
    out[..., 1::2] = x[..., 0::2]
    return out


def unrotate_every_two(r: torch.Tensor) -> torch.Tensor:
    """Relevance of the entries of ``rotate_every_two(q)`` sent back to the entries of ``q`` they came from."""
    out = torch.empty_like(r)
    out[..., 1::2] = r[..., 0::2]
    out[..., 0::2] = r[..., 1::2]
    return out


@dataclass
class AttentionWeights:
    """One attention module in float64: ``q = x Wq^T + bq`` (all heads), the same for k and v, ``out = o Wo^T + bo``."""

    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    n_heads: int
    n_kv: int
    head_dim: int
    scaling: float
    rotary_dim: int
    layout: str = "half"  # "half" or "interleaved"
    softcap: float | None = None
    float32_softmax: bool = False
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None  # (w_q, w_k, eps) of (1 + w) RMSNorms


@dataclass
class AttentionRelevance:
    """Relevance of the module's input [T, hidden] and of its rotary leaves, as the model's leaves are shaped
    (cos, sin: [T, width]; q and k sides and all heads summed)."""

    x: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


def _linear(x, w, b):
    z = x @ w.T
    return z if b is None else z + b


def _norm_one_plus(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma's RMSNorm as the model computes it (float32) and the exact float64 scale ``(1 + w) / rms(x)``."""
    x32 = x.float()
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).to(F64)
    return y, (1.0 + weight) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _expand(t: torch.Tensor, layout: str) -> torch.Tensor:
    """cos / sin as they multiply the rotated channels ([T, rotary_dim])."""
    return t.repeat_interleave(2, -1) if layout == "interleaved" else t


def _collapse(r: torch.Tensor, layout: str) -> torch.Tensor:
    """Relevance of the expanded cos / sin [T, rotary_dim] back to the leaf's channels."""
    return r.view(*r.shape[:-1], -1, 2).sum(-1) if layout == "interleaved" else r


def _rotation(q, cos, sin, layout):
    rot = rotate_every_two if layout == "interleaved" else rotate_half
    return q * cos + rot(q) * sin, rot


def _lrp_rotation(q, cos, sin, r_rot, layout, whole_head_half, rotary_dim):
    """Relevance of ``q_full = cat(q_r * cos + rotate(q_r) * sin, q_pass)`` ([heads, T, head_dim]) to q, cos
    and sin (cos / sin [T, rotary_dim], summed over heads)."""
    unrot = unrotate_every_two if layout == "interleaved" else unrotate_relevance
    q_r = q[..., :rotary_dim]
    t_cos = q_r * cos
    t_sin = _rotation(q_r, cos, sin, layout)[1](q_r) * sin
    z = t_cos + t_sin
    r_cos_term = t_cos * safe_div(r_rot[..., :rotary_dim], z)
    r_sin_term = t_sin * safe_div(r_rot[..., :rotary_dim], z)
    r_q = torch.zeros_like(q)
    r_q[..., :rotary_dim] = 0.5 * r_cos_term + unrot(0.5 * r_sin_term)
    r_q[..., rotary_dim:] = (0.5 if whole_head_half else 1.0) * r_rot[..., rotary_dim:]
    return r_q, 0.5 * r_cos_term.sum(0), 0.5 * r_sin_term.sum(0)


@torch.no_grad()
def reference_attention_lrp(
    w: AttentionWeights,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    r_out: torch.Tensor,
    *,
    mode: str = "attnlrp",
    whole_head_half: bool = False,
) -> AttentionRelevance:
    """Explicit LRP of one causal attention module for one row.

    ``x`` [T, hidden] is the module's input, ``cos`` / ``sin`` the rotary tensors as the model passes them
    ([T, rotary_dim], or [T, rotary_dim / 2] for the interleaved layout), ``r_out`` [T, hidden] the relevance
    of the module's output. Positions are always leaves (``positional=True``).
    """
    seq, hd, r = x.shape[0], w.head_dim, w.rotary_dim
    group = w.n_heads // w.n_kv
    c, s = _expand(cos, w.layout), _expand(sin, w.layout)
    allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool))

    # ---- forward, keeping every activation
    q = _linear(x, w.wq, w.bq).view(seq, w.n_heads, hd).transpose(0, 1)
    k = _linear(x, w.wk, w.bk).view(seq, w.n_kv, hd).transpose(0, 1)
    v = _linear(x, w.wv, w.bv).view(seq, w.n_kv, hd).transpose(0, 1)
    q_in, k_in = q, k
    if w.qk_norm is not None:
        (q, q_scale), (k, k_scale) = (
            _norm_one_plus(q_in, w.qk_norm[0], w.qk_norm[2]),
            _norm_one_plus(k_in, w.qk_norm[1], w.qk_norm[2]),
        )
    qr = torch.cat((_rotation(q[..., :r], c, s, w.layout)[0], q[..., r:]), -1)
    kr = torch.cat((_rotation(k[..., :r], c, s, w.layout)[0], k[..., r:]), -1)
    kh, vh = kr.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    raw = w.scaling * (qr @ kh.transpose(1, 2))
    scores = w.softcap * torch.tanh(raw / w.softcap) if w.softcap is not None else raw
    masked = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(masked.float() if w.float32_softmax else masked, -1).to(F64)
    o = probs @ vh
    o_flat = o.transpose(0, 1).reshape(seq, w.n_heads * hd)

    # ---- relevance sweep
    r_o = lrp_linear(o_flat, w.wo, w.bo, r_out).view(seq, w.n_heads, hd).transpose(0, 1)
    frac = probs[..., None] * vh[:, None, :, :] * safe_div(r_o, o)[:, :, None, :]
    a_share, v_share = (0.5, 0.5) if mode == "attnlrp" else (0.0, 1.0)
    r_probs = a_share * frac.sum(-1)
    r_v = (v_share * frac.sum(1)).view(w.n_kv, group, seq, hd).sum(1)
    r_q, r_k = torch.zeros_like(q), torch.zeros_like(k)  # CP: q, k (and so cos, sin) receive nothing
    r_cos = torch.zeros(seq, r, dtype=F64)
    r_sin = torch.zeros(seq, r, dtype=F64)
    if mode == "attnlrp":
        r_scores = scores * (r_probs - probs * r_probs.sum(-1, keepdim=True))
        r_raw = torch.where(allowed, r_scores, torch.zeros_like(r_scores))  # soft-cap: identity rule
        terms = w.scaling * qr[:, :, None, :] * kh[:, None, :, :]
        frac = terms * safe_div(r_raw, raw)[..., None]
        r_qr = 0.5 * frac.sum(2)
        r_kr = (0.5 * frac.sum(1)).view(w.n_kv, group, seq, hd).sum(1)
        r_q, r_cos_q, r_sin_q = _lrp_rotation(q, c, s, r_qr, w.layout, whole_head_half, r)
        r_k, r_cos_k, r_sin_k = _lrp_rotation(k, c, s, r_kr, w.layout, whole_head_half, r)
        r_cos, r_sin = r_cos_q + r_cos_k, r_sin_q + r_sin_k
        if w.qk_norm is not None:  # identity rule: the normalising scale is a constant
            r_q = q_in * q_scale * safe_div(r_q, q)
            r_k = k_in * k_scale * safe_div(r_k, k)

    def flat(t):
        return t.transpose(0, 1).reshape(seq, -1)

    r_x = (
        lrp_linear(x, w.wq, w.bq, flat(r_q))
        + lrp_linear(x, w.wk, w.bk, flat(r_k))
        + lrp_linear(x, w.wv, w.bv, flat(r_v))
    )
    return AttentionRelevance(x=r_x, cos=_collapse(r_cos, w.layout), sin=_collapse(r_sin, w.layout))
