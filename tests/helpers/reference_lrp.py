"""A slow, explicit, layer-by-layer PE-LRP for LLaMA-family causal LMs, used to check the fast path.

Everything here is plain float64 tensor math on the weights of the model: one forward pass that keeps every
activation, then one backward sweep that applies the formulas of method.md rule by rule. No autograd, no hooks
and no code of hf_pelrp is used, so an agreement with :func:`hf_pelrp.attribute` means that the Gradient x
Input formulation of the fast path computes the rules it claims to (method.md 3.7).

The rules, with ``eps -> 0`` and ``0 / 0 := 0``:

- linear layer ``z = x W^T + b`` (epsilon rule): ``R_x = x * ((R_z / z) W)``; a bias absorbs its share;
- a sum ``z = a + b`` (residual, the two terms of the rotation): ``R_a = a / z * R_z`` (epsilon rule);
- RMSNorm (identity rule, AttnLRP Prop. 3.4): the normalising scale ``s`` is a constant, the layer is the
  element-wise linear map ``y = (w * s) * x`` and the epsilon rule gives ``R_x = x * (w * s) * R_y / y``
  (``= R_y`` in exact arithmetic; written this way so that the model's own float32 rounding of ``y`` does
  not count as a disagreement);
- SiLU (identity rule): ``R_gate = R_act``;
- a product of two relevance-carrying factors (gated MLP, each rotation term ``q * cos`` and
  ``rotate_half(q) * sin``, ``q k^T``, ``A v``) (uniform rule, Prop. 3.2 / 3.3): each elementary term
  ``t = a_i b_j`` gets ``t / z * R_z`` (epsilon rule over the terms of the sum ``z``), half of it goes to each
  factor;
- softmax (AttnLRP Prop. 3.1): ``R_S_ij = S_ij (R_A_ij - A_ij sum_j' R_A_ij')`` on the allowed (unmasked)
  entries, 0 on masked ones;
- CP-LRP: the attention probabilities and the MLP gate are constants (``A v`` gives all to ``v``,
  ``act(gate) * up`` all to ``up``), so q, k, cos and sin receive nothing;
- ``positional=False``: cos and sin are constants, the rotation is a linear map of q (k): each term gives
  all its relevance to q (k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

F64 = torch.float64


@dataclass
class ReferenceMaps:
    """Explicit relevance maps (float64): token [B, T], position_by_layer [B, L, T], position [B, T].

    ``softmax_absorbed`` [B] is the relevance the softmax rule did not pass on, summed over layers and heads
    (``sum R_A - sum R_S`` at each softmax): in a bias-free model it is the whole conservation gap.
    """

    token: torch.Tensor
    position_by_layer: torch.Tensor
    logit: torch.Tensor
    target: torch.Tensor
    softmax_absorbed: torch.Tensor
    #: per row, layer, head and pair [B, L, H, T, T]: the relevance of each attention score ``R_S``, the score
    #: ``S`` and its content part ``C = scaling * (a q) . (a k)`` (q, k unrotated, ``a`` the attention scaling)
    score_relevance: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    content_scores: torch.Tensor | None = None

    @property
    def position(self) -> torch.Tensor:
        return self.position_by_layer.sum(1)


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` with ``0 / 0 := 0`` (the epsilon rule with eps -> 0; a zero output passes on no relevance)."""
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def lrp_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, r_out: torch.Tensor):
    """Epsilon rule of ``z = x W^T + b``: ``R_x[n, j] = sum_i x[n, j] W[i, j] R_z[n, i] / z[n, i]``."""
    z = x @ weight.T
    if bias is not None:
        z = z + bias
    return x * (safe_div(r_out, z) @ weight)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``rotate_half`` of the LLaMA rotary embedding: ``(x1, x2) -> (-x2, x1)`` on the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def unrotate_relevance(r: torch.Tensor) -> torch.Tensor:
    """Relevance of the entries of ``rotate_half(q)`` sent back to the entries of ``q`` they came from.

    ``rotate_half(q)[d] = -q[d + h]`` for ``d < h`` and ``q[d - h]`` otherwise (``h`` = half the head size):
    a relevance is attributed to the factor, whatever its sign.
    """
    half = r.shape[-1] // 2
    return torch.cat((r[..., half:], r[..., :half]), dim=-1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of transformers' LLaMA RMSNorm (statistics in float32, as the model computes them) and the
    exact float64 scale ``w * rsqrt(mean(x^2) + eps)`` of the frozen-scale linear map."""
    x32 = x.float()
    y = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(F64)
    scale = weight * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y, scale


def _lrp_rms_norm(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, r_y: torch.Tensor) -> torch.Tensor:
    return x * scale * safe_div(r_y, y)


def _rotary(position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float):
    """cos and sin of the rotary embedding, computed in float32 as the model does, then float64."""
    freqs = position_ids[:, None].float() * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(F64), (emb.sin() * attention_scaling).to(F64)


def _lrp_rotation(q, cos, sin, r_rot, positional):
    """Relevance of ``q_rot = q * cos + rotate_half(q) * sin`` (all [heads, T, d]) to q, cos and sin.

    Epsilon rule over the two terms, then the uniform rule inside each product (``positional=True``) or all
    of each term to q (``positional=False``). Returns ``(R_q, R_cos [T, d], R_sin [T, d])``.
    """
    t_cos = q * cos
    t_sin = rotate_half(q) * sin
    z = t_cos + t_sin
    r_cos_term = t_cos * safe_div(r_rot, z)
    r_sin_term = t_sin * safe_div(r_rot, z)
    share = 0.5 if positional else 1.0
    r_q = share * r_cos_term + unrotate_relevance(share * r_sin_term)
    if not positional:
        return r_q, torch.zeros_like(cos), torch.zeros_like(sin)
    return r_q, 0.5 * r_cos_term.sum(0), 0.5 * r_sin_term.sum(0)


def _heads_to_flat(r: torch.Tensor) -> torch.Tensor:
    """[heads, T, d] -> [T, heads * d], the layout of the projection's output."""
    return r.transpose(0, 1).reshape(r.shape[1], -1)


def _weights(model) -> dict:
    base = model.model
    cfg = model.config

    def lin(m):
        return m.weight.detach().to(F64), None if m.bias is None else m.bias.detach().to(F64)

    layers = []
    for layer in base.layers:
        att, mlp = layer.self_attn, layer.mlp
        layers.append(
            {
                "ln1": (
                    layer.input_layernorm.weight.detach().to(F64),
                    layer.input_layernorm.variance_epsilon,
                ),
                "ln2": (
                    layer.post_attention_layernorm.weight.detach().to(F64),
                    layer.post_attention_layernorm.variance_epsilon,
                ),
                "q": lin(att.q_proj),
                "k": lin(att.k_proj),
                "v": lin(att.v_proj),
                "o": lin(att.o_proj),
                "gate": lin(mlp.gate_proj),
                "up": lin(mlp.up_proj),
                "down": lin(mlp.down_proj),
                "head_dim": att.head_dim,
                "scaling": att.scaling,
            }
        )
    if cfg.hidden_act != "silu":
        raise ValueError("the reference implements the SiLU-gated MLP only")
    return {
        "embed": base.embed_tokens.weight.detach().to(F64),
        "layers": layers,
        "norm": (base.norm.weight.detach().to(F64), base.norm.variance_epsilon),
        "lm_head": lin(model.lm_head),
        "n_heads": cfg.num_attention_heads,
        "n_kv": cfg.num_key_value_heads,
        "inv_freq": base.rotary_emb.inv_freq.detach(),
        "attention_scaling": float(base.rotary_emb.attention_scaling),
    }


def _explain_row(w, ids, mask, position, target, mode, positional, embeds=None, keep=None):
    """Explicit forward and relevance sweep of one row; returns (token [T], position_by_layer [L, T], logit,
    target id, relevance absorbed by the softmax rule).

    ``embeds`` [T, D]: the input embeddings to use instead of the table's rows (a vision-language model's image
    features at its placeholders); ``keep``: a dict that receives the relevance of every input embedding
    channel, ``keep["r_x"]`` [T, D]."""
    seq = ids.shape[0]
    n_heads, n_kv = w["n_heads"], w["n_kv"]
    group = n_heads // n_kv
    pos_ids = (mask.long().cumsum(0) - 1).clamp(min=0) * mask.long()
    allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool)) & mask.bool()[None, :]
    cos, sin = _rotary(pos_ids, w["inv_freq"], w["attention_scaling"])
    attnlrp = mode == "attnlrp"

    # ---- forward, keeping every activation
    x = w["embed"][ids] if embeds is None else embeds
    acts = []
    for lw in w["layers"]:
        a = {"x": x}
        hd = lw["head_dim"]
        a["n1"], a["s1"] = _rms_norm(x, *lw["ln1"])
        q = a["n1"] @ lw["q"][0].T + (0 if lw["q"][1] is None else lw["q"][1])
        k = a["n1"] @ lw["k"][0].T + (0 if lw["k"][1] is None else lw["k"][1])
        v = a["n1"] @ lw["v"][0].T + (0 if lw["v"][1] is None else lw["v"][1])
        a["q"] = q.view(seq, n_heads, hd).transpose(0, 1)
        a["k"] = k.view(seq, n_kv, hd).transpose(0, 1)
        a["v"] = v.view(seq, n_kv, hd).transpose(0, 1)
        a["qr"] = a["q"] * cos + rotate_half(a["q"]) * sin
        a["kr"] = a["k"] * cos + rotate_half(a["k"]) * sin
        kr = a["kr"].repeat_interleave(group, 0)
        vh = a["v"].repeat_interleave(group, 0)
        scores = lw["scaling"] * (a["qr"] @ kr.transpose(1, 2))
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        probs = torch.nan_to_num(probs, nan=0.0)  # a padding query sees no key: no output, no relevance
        a["S"], a["A"] = scores, probs
        a["o"] = probs @ vh
        a["o_flat"] = a["o"].transpose(0, 1).reshape(seq, n_heads * hd)
        attn = a["o_flat"] @ lw["o"][0].T + (0 if lw["o"][1] is None else lw["o"][1])
        a["attn"] = attn
        x1 = x + attn
        a["x1"] = x1
        a["n2"], a["s2"] = _rms_norm(x1, *lw["ln2"])
        gate = a["n2"] @ lw["gate"][0].T + (0 if lw["gate"][1] is None else lw["gate"][1])
        up = a["n2"] @ lw["up"][0].T + (0 if lw["up"][1] is None else lw["up"][1])
        a["gate"], a["up"] = gate, up
        a["act"] = torch.nn.functional.silu(gate)
        a["prod"] = a["act"] * up
        mlp = a["prod"] @ lw["down"][0].T + (0 if lw["down"][1] is None else lw["down"][1])
        a["mlp"] = mlp
        x = x1 + mlp
        a["x2"] = x
        acts.append(a)
    nf, sf = _rms_norm(x, *w["norm"])
    head_w, head_b = w["lm_head"]
    logits = nf[position] @ head_w.T + (0 if head_b is None else head_b)
    tgt = int(logits.argmax()) if target is None else int(target)

    # ---- relevance sweep: the explained logit is its own relevance (seed 1 in gradient form)
    r_logits = torch.zeros_like(logits)
    r_logits[tgt] = logits[tgt]
    r_nf = torch.zeros_like(nf)
    r_nf[position] = lrp_linear(nf[position : position + 1], head_w, head_b, r_logits[None])[0]
    r_x = _lrp_rms_norm(x, nf, sf, r_nf)
    pos_by_layer = torch.zeros(len(acts), seq, dtype=F64)
    absorbed = torch.zeros((), dtype=F64)
    r_scores = torch.zeros(len(acts), n_heads, seq, seq, dtype=F64)
    contents = torch.zeros_like(r_scores)
    for li in reversed(range(len(acts))):
        a, lw = acts[li], w["layers"][li]
        hd = lw["head_dim"]
        # residual x2 = x1 + mlp
        r_x1 = a["x1"] * safe_div(r_x, a["x2"])
        r_mlp = a["mlp"] * safe_div(r_x, a["x2"])
        r_prod = lrp_linear(a["prod"], *lw["down"], r_mlp)
        # act(gate) * up: element-wise product, one term per element
        r_act, r_up = (0.5 * r_prod, 0.5 * r_prod) if attnlrp else (torch.zeros_like(r_prod), r_prod)
        r_gate = r_act  # identity rule for SiLU
        r_n2 = lrp_linear(a["n2"], *lw["gate"], r_gate) + lrp_linear(a["n2"], *lw["up"], r_up)
        r_x1 = r_x1 + _lrp_rms_norm(a["x1"], a["n2"], a["s2"], r_n2)
        # residual x1 = x + attn
        r_xin = a["x"] * safe_div(r_x1, a["x1"])
        r_attn = a["attn"] * safe_div(r_x1, a["x1"])
        r_o = lrp_linear(a["o_flat"], *lw["o"], r_attn).view(seq, n_heads, hd).transpose(0, 1)
        # o[h, i, d] = sum_j A[h, i, j] v[h, j, d]
        vh = a["v"].repeat_interleave(group, 0)
        frac = a["A"][..., None] * vh[:, None, :, :] * safe_div(r_o, a["o"])[:, :, None, :]
        a_share, v_share = (0.5, 0.5) if attnlrp else (0.0, 1.0)
        r_probs = a_share * frac.sum(-1)
        r_vh = v_share * frac.sum(1)
        r_v = r_vh.view(n_kv, group, seq, hd).sum(1)
        r_q = torch.zeros_like(a["q"])
        r_k = torch.zeros_like(a["k"])
        if attnlrp:
            s, p = a["S"], a["A"]
            r_s = s * (r_probs - p * r_probs.sum(-1, keepdim=True))
            r_s = torch.where(allowed, r_s, torch.zeros_like(r_s))
            absorbed = absorbed + r_probs.sum() - r_s.sum()
            r_scores[li] = r_s
            kr = a["kr"].repeat_interleave(group, 0)
            # S[h, i, j] = scaling * sum_d qr[h, i, d] kr[h, j, d]
            terms = lw["scaling"] * a["qr"][:, :, None, :] * kr[:, None, :, :]
            frac = terms * safe_div(r_s, s)[..., None]
            r_qr = 0.5 * frac.sum(2)
            r_kr = (0.5 * frac.sum(1)).view(n_kv, group, seq, hd).sum(1)
            r_q, r_cos_q, r_sin_q = _lrp_rotation(a["q"], cos, sin, r_qr, positional)
            r_k, r_cos_k, r_sin_k = _lrp_rotation(a["k"], cos, sin, r_kr, positional)
            pos_by_layer[li] = (r_cos_q + r_cos_k + r_sin_q + r_sin_k).sum(-1)
        r_n1 = (
            lrp_linear(a["n1"], *lw["q"], _heads_to_flat(r_q))
            + lrp_linear(a["n1"], *lw["k"], _heads_to_flat(r_k))
            + lrp_linear(a["n1"], *lw["v"], _heads_to_flat(r_v))
        )
        r_x = r_xin + _lrp_rms_norm(a["x"], a["n1"], a["s1"], r_n1)
        scale = w["attention_scaling"]
        k_plain = (scale * a["k"]).repeat_interleave(group, 0)
        contents[li] = lw["scaling"] * ((scale * a["q"]) @ k_plain.transpose(1, 2))
    scores = torch.stack([a["S"] for a in acts])
    if keep is not None:
        keep["r_x"] = r_x
    return r_x.sum(-1), pos_by_layer, logits[tgt], tgt, absorbed, (r_scores, scores, contents)


@torch.no_grad()
def reference_lrp(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    target: torch.Tensor | None = None,
    position: torch.Tensor | None = None,
    mode: str = "attnlrp",
    positional: bool = True,
) -> ReferenceMaps:
    """Explicit PE-LRP of a LLaMA-family ``*ForCausalLM`` (one row at a time).

    ``position`` (default: each row's last real token) is the position whose next-token logit is explained,
    ``target`` (default: its arg-max) the vocabulary id. Left and right padding are handled through
    ``attention_mask``; position ids count real tokens only.
    """
    w = _weights(model)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    tokens, by_layer, logits, targets, absorbed, pairs = [], [], [], [], [], []
    for b in range(input_ids.shape[0]):
        mask = attention_mask[b]
        pos = int(position[b]) if position is not None else int(mask.nonzero().max())
        tgt = None if target is None else int(target[b])
        tok, pbl, logit, t, lost, parts = _explain_row(w, input_ids[b], mask, pos, tgt, mode, positional)
        pairs.append(parts)
        tokens.append(tok)
        by_layer.append(pbl)
        logits.append(logit)
        targets.append(t)
        absorbed.append(lost)
    return ReferenceMaps(
        token=torch.stack(tokens),
        position_by_layer=torch.stack(by_layer),
        logit=torch.stack(logits),
        target=torch.tensor(targets),
        softmax_absorbed=torch.stack(absorbed),
        score_relevance=torch.stack([p[0] for p in pairs]),
        scores=torch.stack([p[1] for p in pairs]),
        content_scores=torch.stack([p[2] for p in pairs]),
    )
