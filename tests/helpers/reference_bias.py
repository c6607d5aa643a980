"""A slow, explicit PE-LRP for attention with a positional bias (ALiBi decoders), to check the fast path.

Plain float64 tensor math on the model's weights, one row at a time: a forward pass that keeps every
activation, then a backward sweep applying the formulas of method.md rule by rule. No autograd, no hooks and no
hf_pelrp code. The rules are those of reference_absolute.py (epsilon rule for linear maps and sums, identity
rule for LayerNorm and GELU, uniform rule for ``q k^T`` and ``A v``, the softmax rule), plus the one this file is
about (method.md 2, "Positions inside attention"):

- scores ``S_ij = c q_i . k_j + b_ij`` with the ALiBi bias ``b_ij = m_h (pos_j - pos_i)`` (slopes computed here
  from the ALiBi paper's formula, not taken from the model): the softmax rule gives
  ``R_S = S (R_A - A sum_j R_A)`` on allowed entries, then the epsilon rule over the two addends gives
  ``R_b = b / S * R_S`` and ``R_qk = c q k^T / S * R_S``, whose terms ``c q_id k_jd`` give half to each factor.
- CP-LRP: ``A`` is a constant, so ``q``, ``k`` and ``b`` get nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from helpers.reference_absolute import F64, lrp_layer_norm, lrp_linear, safe_div, split_sum


@dataclass
class BiasReference:
    """Explicit relevance (float64): ``token`` [B, T], bias relevance per (layer, key) [B, L, T], per signed
    distance ``j - i`` [B, 2T - 1] (bin ``d + T - 1``), and the explained logit [B]."""

    token: torch.Tensor
    position_by_layer: torch.Tensor
    position_by_distance: torch.Tensor
    logit: torch.Tensor
    #: ALiBi decoders: the bias relevance ``R_b`` and the score relevance ``R_S`` of every pair [B, L, H, T, T]
    bias_pairs: torch.Tensor | None = None
    score_pairs: torch.Tensor | None = None


def alibi_slopes(heads: int, bias_max: float = 8.0, mpt: bool = False) -> torch.Tensor:
    """ALiBi slopes (Press et al. 2022): ``2^(-bias_max h / n)`` for ``n`` heads, ``n`` a power of two; other head
    counts interleave the slopes of the next power of two (MPT) or append odd slopes of the doubled count (BLOOM)."""
    if mpt:
        n = 2 ** math.ceil(math.log2(heads))
        slopes = [2 ** (-(bias_max / n) * (h + 1)) for h in range(n)]
        if n != heads:
            slopes = (slopes[1::2] + slopes[::2])[:heads]
        return torch.tensor(slopes, dtype=F64)
    n = 2 ** math.floor(math.log2(heads))
    slopes = [2 ** (-(bias_max / n) * (h + 1)) for h in range(n)]
    if n != heads:
        extra = [2 ** (-(bias_max / (2 * n)) * (h + 1)) for h in range(0, 2 * (heads - n), 2)]
        slopes += extra
    return torch.tensor(slopes, dtype=F64)


def biased_attention(q, k, v, scaling, bias, allowed):
    """``q, k, v`` [H, T, d], ``bias`` [H, T, T]: scores, probabilities (0 on masked entries) and ``A v``."""
    scores = scaling * (q @ k.transpose(1, 2)) + bias
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    probs = torch.nan_to_num(probs, nan=0.0)
    return scores, probs, probs @ v


def lrp_biased_attention(q, k, v, scaling, bias, allowed, scores, probs, out, r_out, mode):
    """Relevance of ``q``, ``k``, ``v`` [H, T, d] and of the bias [H, T, T] from the relevance of ``A v``."""
    frac = probs[..., None] * v[:, None, :, :] * safe_div(r_out, out)[:, :, None, :]
    a_share, v_share = (0.5, 0.5) if mode == "attnlrp" else (0.0, 1.0)
    r_v = v_share * frac.sum(1)
    if mode != "attnlrp":
        return torch.zeros_like(q), torch.zeros_like(k), r_v, torch.zeros_like(scores)
    r_probs = a_share * frac.sum(-1)
    r_s = scores * (r_probs - probs * r_probs.sum(-1, keepdim=True))
    r_s = torch.where(allowed, r_s, torch.zeros_like(r_s))
    qk = scores - bias
    r_qk, r_bias = split_sum([qk, bias], r_s)
    terms = scaling * q[:, :, None, :] * k[:, None, :, :] * safe_div(r_qk, qk)[..., None]
    return 0.5 * terms.sum(2), 0.5 * terms.sum(1), r_v, r_bias


def _lin(module):
    w = module.weight.detach().to(F64)
    b = None if getattr(module, "bias", None) is None else module.bias.detach().to(F64)
    return w, b


def _apply(lin, x):
    w, b = lin
    return x @ w.T + (0 if b is None else b)


def _ln(x, module):
    """LayerNorm in float64, also without a bias (MPT)."""
    w = module.weight.detach().to(F64)
    b = None if module.bias is None else module.bias.detach().to(F64)
    centred = x - x.mean(-1, keepdim=True)
    scale = 1.0 / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + module.eps)
    return centred * scale * w + (0 if b is None else b), w, scale


def _split_qkv(x, layout, heads, dim):
    """q, k, v [H, T, d] from a fused projection output [T, 3 H d]; and the inverse for relevance."""
    seq = x.shape[0]
    if layout == "interleaved":
        parts = x.view(seq, heads, 3, dim)
        return [parts[:, :, i].transpose(0, 1) for i in range(3)]
    return [p.view(seq, heads, dim).transpose(0, 1) for p in x.split(heads * dim, dim=-1)]


def _join_qkv(q, k, v, layout):
    heads, seq, dim = q.shape
    if layout == "interleaved":
        return torch.stack([q, k, v], dim=2).permute(1, 0, 2, 3).reshape(seq, heads * 3 * dim)
    return torch.cat([t.transpose(0, 1).reshape(seq, heads * dim) for t in (q, k, v)], dim=-1)


def _family(model):
    """Weights and layout of a BLOOM / Falcon-RW / MPT model, read by hand from its modules."""
    kind = model.config.model_type
    base = model.base_model
    if kind == "bloom":
        blocks = [
            dict(
                ln1=b.input_layernorm,
                qkv=_lin(b.self_attention.query_key_value),
                dense=_lin(b.self_attention.dense),
                ln2=b.post_attention_layernorm,
                up=_lin(b.mlp.dense_h_to_4h),
                down=_lin(b.mlp.dense_4h_to_h),
            )
            for b in base.h
        ]
        heads = model.config.n_head
        return dict(
            embed=base.word_embeddings, embed_ln=base.word_embeddings_layernorm, blocks=blocks, final=base.ln_f,
            heads=heads, layout="interleaved", slopes=alibi_slopes(heads), bias_scale=1.0,
        )  # fmt: skip
    if kind == "falcon":
        blocks = [
            dict(
                ln1=b.input_layernorm,
                qkv=_lin(b.self_attention.query_key_value),
                dense=_lin(b.self_attention.dense),
                ln2=b.post_attention_layernorm,
                up=_lin(b.mlp.dense_h_to_4h),
                down=_lin(b.mlp.dense_4h_to_h),
            )
            for b in base.h
        ]
        heads = model.config.num_attention_heads
        dim = model.config.hidden_size // heads
        return dict(
            embed=base.word_embeddings, embed_ln=None, blocks=blocks, final=base.ln_f, heads=heads,
            layout="interleaved", slopes=alibi_slopes(heads), bias_scale=1.0 / math.sqrt(dim),
        )  # fmt: skip
    if kind == "mpt":
        blocks = [
            dict(
                ln1=b.norm_1,
                qkv=_lin(b.attn.Wqkv),
                dense=_lin(b.attn.out_proj),
                ln2=b.norm_2,
                up=_lin(b.ffn.up_proj),
                down=_lin(b.ffn.down_proj),
            )
            for b in base.blocks
        ]
        heads = model.config.n_heads
        return dict(
            embed=base.wte, embed_ln=None, blocks=blocks, final=base.norm_f, heads=heads, layout="chunked",
            slopes=alibi_slopes(heads, model.config.attn_config.alibi_bias_max, mpt=True), bias_scale=1.0,
        )  # fmt: skip
    raise ValueError(kind)


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _bloom_gelu(x):
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def _row(model, fam, ids, mask, position, target, mode):
    seq = ids.shape[0]
    heads = fam["heads"]
    hidden = model.config.hidden_size
    dim = hidden // heads
    act = _bloom_gelu if model.config.model_type == "bloom" else _gelu
    pos = (mask.cumsum(0) - 1).clamp(min=0)
    allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool)) & mask.bool()[None, :] & mask.bool()[:, None]
    bias = (
        fam["bias_scale"] * fam["slopes"][:, None, None] * (pos[None, None, :] - pos[None, :, None]).to(F64)
    )
    bias = torch.where(allowed, bias, torch.zeros_like(bias))
    t = fam["embed"].weight.detach().to(F64)[ids]
    x, ln0 = t, None
    if fam["embed_ln"] is not None:
        ln0 = _ln(t, fam["embed_ln"])
        x = ln0[0]
    acts = []
    for blk in fam["blocks"]:
        a = {"x": x}
        a["n1"], a["w1"], a["s1"] = _ln(x, blk["ln1"])
        a["qkv"] = _apply(blk["qkv"], a["n1"])
        a["q"], a["k"], a["v"] = _split_qkv(a["qkv"], fam["layout"], heads, dim)
        a["S"], a["A"], a["o"] = biased_attention(a["q"], a["k"], a["v"], 1.0 / math.sqrt(dim), bias, allowed)
        a["o_flat"] = a["o"].transpose(0, 1).reshape(seq, hidden)
        a["attn"] = _apply(blk["dense"], a["o_flat"])
        a["x1"] = x + a["attn"]
        a["n2"], a["w2"], a["s2"] = _ln(a["x1"], blk["ln2"])
        a["f"] = _apply(blk["up"], a["n2"])
        a["g"] = act(a["f"])
        a["m"] = _apply(blk["down"], a["g"])
        x = a["x1"] + a["m"]
        acts.append(a)
    nf, wf, sf = _ln(x, fam["final"])
    head = _lin(model.lm_head if hasattr(model, "lm_head") else model.score)
    logits = _apply(head, nf[position])
    tgt = int(logits.argmax()) if target is None else int(target)

    r_logits = torch.zeros_like(logits)
    r_logits[tgt] = logits[tgt]
    r_nf = torch.zeros_like(nf)
    r_nf[position] = lrp_linear(nf[position : position + 1], *head, r_logits[None])[0]
    r_x = lrp_layer_norm(x, nf, wf, sf, r_nf)
    by_layer = torch.zeros(len(acts), seq, dtype=F64)
    by_distance = torch.zeros(2 * seq - 1, dtype=F64)
    bias_pairs = torch.zeros(len(acts), heads, seq, seq, dtype=F64)
    score_pairs = torch.zeros_like(bias_pairs)
    for layer in reversed(range(len(acts))):
        blk, a = fam["blocks"][layer], acts[layer]
        r_x1, r_m = split_sum([a["x1"], a["m"]], r_x)
        r_g = lrp_linear(a["g"], *blk["down"], r_m)
        r_n2 = lrp_linear(a["n2"], *blk["up"], r_g)  # identity rule at the GELU: R_f = R_g
        r_x1 = r_x1 + lrp_layer_norm(a["x1"], a["n2"], a["w2"], a["s2"], r_n2)
        r_xin, r_attn = split_sum([a["x"], a["attn"]], r_x1)
        r_o = lrp_linear(a["o_flat"], *blk["dense"], r_attn).view(seq, heads, dim).transpose(0, 1)
        r_q, r_k, r_v, r_b = lrp_biased_attention(
            a["q"], a["k"], a["v"], 1.0 / math.sqrt(dim), bias, allowed, a["S"], a["A"], a["o"], r_o, mode
        )
        bias_pairs[layer] = r_b
        if mode == "attnlrp":  # the softmax rule's R_S, as lrp_biased_attention computes it
            frac = a["A"][..., None] * a["v"][:, None, :, :] * safe_div(r_o, a["o"])[:, :, None, :]
            r_probs = 0.5 * frac.sum(-1)
            r_s = a["S"] * (r_probs - a["A"] * r_probs.sum(-1, keepdim=True))
            score_pairs[layer] = torch.where(allowed, r_s, torch.zeros_like(r_s))
        r_pairs = r_b.sum(0)  # [T, T]
        by_layer[layer] = r_pairs.sum(0)
        distance = (pos[None, :] - pos[:, None]) + seq - 1
        by_distance.index_add_(0, distance[allowed], r_pairs[allowed])
        r_qkv = _join_qkv(r_q, r_k, r_v, fam["layout"])
        r_n1 = lrp_linear(a["n1"], *blk["qkv"], r_qkv)
        r_x = r_xin + lrp_layer_norm(a["x"], a["n1"], a["w1"], a["s1"], r_n1)
    if ln0 is not None:
        r_x = lrp_layer_norm(t, ln0[0], ln0[1], ln0[2], r_x)
    return r_x.sum(-1), by_layer, by_distance, logits[tgt], bias_pairs, score_pairs


@torch.no_grad()
def alibi_reference(model, input_ids, attention_mask, *, mode, target=None, position=None) -> BiasReference:
    """Explicit PE-LRP of a BLOOM / Falcon-RW / MPT causal LM or sequence classifier, row by row.

    ``position`` [B] (default: each row's last real token) is where the logit is read.
    """
    fam = _family(model)
    rows = []
    for b in range(input_ids.shape[0]):
        mask = attention_mask[b].long()
        pos = int(position[b]) if position is not None else int(mask.nonzero().max())
        tgt = None if target is None else target[b]
        rows.append(_row(model, fam, input_ids[b], mask, pos, tgt, mode))
    return BiasReference(*(torch.stack(col) for col in zip(*rows, strict=True)))


# ------------------------------------------------------------------------------------------------------ BEiT


def beit_relative_index(window: tuple[int, int]) -> torch.Tensor:
    """BEiT's table entry of each (query, key) pair of ``[CLS, patches]``, computed here from its definition:
    patches ``(y, x)`` and ``(y', x')`` use entry ``(y - y' + Wh - 1) (2 Ww - 1) + (x - x' + Ww - 1)``; with
    ``E = (2 Wh - 1)(2 Ww - 1)``: CLS to patch ``E``, patch to CLS ``E + 1``, CLS to CLS ``E + 2``."""
    wh, ww = window
    coords = [(y, x) for y in range(wh) for x in range(ww)]
    entries = (2 * wh - 1) * (2 * ww - 1)
    n = len(coords) + 1
    index = torch.zeros(n, n, dtype=torch.long)
    for i, (y, x) in enumerate(coords, start=1):
        for j, (y2, x2) in enumerate(coords, start=1):
            index[i, j] = (y - y2 + wh - 1) * (2 * ww - 1) + (x - x2 + ww - 1)
    index[0, 1:] = entries
    index[1:, 0] = entries + 1
    index[0, 0] = entries + 2
    return index


def _beit_row(model, pixels, target, mode):
    base, cfg = model.beit, model.config
    heads = cfg.num_attention_heads
    hidden = cfg.hidden_size
    dim = hidden // heads
    emb = base.embeddings
    conv = emb.patch_embeddings.projection
    patches = torch.nn.functional.conv2d(
        pixels[None], conv.weight.detach().to(F64), conv.bias.detach().to(F64), stride=conv.stride
    )
    grid = patches.shape[-2:]
    patches = patches.flatten(2).transpose(1, 2)[0]
    t = torch.cat([emb.cls_token.detach().to(F64)[0], patches])
    seq = t.shape[0]
    index = beit_relative_index(tuple(grid))
    allowed = torch.ones(seq, seq, dtype=torch.bool)
    x = t
    acts = []
    for layer in base.layers:
        a = {"x": x}
        table = layer.relative_position_bias.relative_position_bias_table.detach().to(F64)
        bias = table[index].permute(2, 0, 1)  # [H, T, T]
        a["n1"], a["w1"], a["s1"] = _ln(x, layer.layernorm_before)
        att = layer.attention
        q = _apply(_lin(att.q_proj), a["n1"]).view(seq, heads, dim).transpose(0, 1)
        k = _apply(_lin(att.k_proj), a["n1"]).view(seq, heads, dim).transpose(0, 1)
        v = _apply(_lin(att.v_proj), a["n1"]).view(seq, heads, dim).transpose(0, 1)
        a["q"], a["k"], a["v"], a["bias"] = q, k, v, bias
        a["S"], a["A"], a["o"] = biased_attention(q, k, v, dim**-0.5, bias, allowed)
        a["o_flat"] = a["o"].transpose(0, 1).reshape(seq, hidden)
        lam1 = layer.lambda_1.detach().to(F64)
        a["attn"] = lam1 * _apply(_lin(att.o_proj), a["o_flat"])
        a["x1"] = x + a["attn"]
        a["n2"], a["w2"], a["s2"] = _ln(a["x1"], layer.layernorm_after)
        a["f"] = _apply(_lin(layer.mlp.fc1), a["n2"])
        a["g"] = layer.mlp.activation_fn(a["f"])
        lam2 = layer.lambda_2.detach().to(F64)
        a["m"] = lam2 * _apply(_lin(layer.mlp.fc2), a["g"])
        x = a["x1"] + a["m"]
        acts.append(a)
    mean = x[1:].mean(0)
    pooled, wp, sp = _ln(mean, base.pooler.layernorm)
    head = _lin(model.classifier)
    logits = _apply(head, pooled)
    tgt = int(logits.argmax()) if target is None else int(target)
    r_logits = torch.zeros_like(logits)
    r_logits[tgt] = logits[tgt]
    r_pooled = lrp_linear(pooled[None], *head, r_logits[None])[0]
    r_mean = lrp_layer_norm(mean, pooled, wp, sp, r_pooled)
    r_x = torch.zeros_like(x)
    r_x[1:] = (x[1:] / (seq - 1)) * safe_div(r_mean, mean)  # epsilon rule of the mean over patches
    by_layer = torch.zeros(len(acts), seq, dtype=F64)
    entries = int(index.max()) + 1
    by_entry = torch.zeros(entries, dtype=F64)
    for li in reversed(range(len(acts))):
        layer, a = base.layers[li], acts[li]
        att = layer.attention
        r_x1, r_m = split_sum([a["x1"], a["m"]], r_x)  # lambda * h: a constant factor passes R unchanged
        r_g = lrp_linear(a["g"], *_lin(layer.mlp.fc2), r_m)
        r_n2 = lrp_linear(a["n2"], *_lin(layer.mlp.fc1), r_g)
        r_x1 = r_x1 + lrp_layer_norm(a["x1"], a["n2"], a["w2"], a["s2"], r_n2)
        r_xin, r_attn = split_sum([a["x"], a["attn"]], r_x1)
        r_o = lrp_linear(a["o_flat"], *_lin(att.o_proj), r_attn).view(seq, heads, dim).transpose(0, 1)
        r_q, r_k, r_v, r_b = lrp_biased_attention(
            a["q"], a["k"], a["v"], dim**-0.5, a["bias"], allowed, a["S"], a["A"], a["o"], r_o, mode
        )
        pairs = r_b.sum(0)
        by_layer[li] = pairs.sum(0)
        by_entry.index_add_(0, index.flatten(), pairs.flatten())
        flat = [t.transpose(0, 1).reshape(seq, hidden) for t in (r_q, r_k, r_v)]
        r_n1 = (
            lrp_linear(a["n1"], *_lin(att.q_proj), flat[0])
            + lrp_linear(a["n1"], *_lin(att.k_proj), flat[1])
            + lrp_linear(a["n1"], *_lin(att.v_proj), flat[2])
        )
        r_x = r_xin + lrp_layer_norm(a["x"], a["n1"], a["w1"], a["s1"], r_n1)
    return r_x.sum(-1), by_layer, by_entry, logits[tgt]


@torch.no_grad()
def beit_reference(model, pixel_values, *, mode, target=None) -> BiasReference:
    """Explicit PE-LRP of a ``BeitForImageClassification`` (relative position bias, mean pooling), per image;
    ``position_by_distance`` is per table entry (:func:`beit_relative_index`)."""
    rows = []
    for b in range(pixel_values.shape[0]):
        tgt = None if target is None else target[b]
        rows.append(_beit_row(model, pixel_values[b].to(F64), tgt, mode))
    return BiasReference(*(torch.stack(col) for col in zip(*rows, strict=True)))


# -------------------------------------------------------------------------------------------------------- T5


def t5_bucket(
    relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's relative-position bucket of ``j - i`` (Raffel et al. 2020): exact buckets for small distances, then
    logarithmic ones up to ``max_distance``; bidirectional (encoder) buckets use half of the range per sign."""
    out = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        out = out + (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    large = (
        exact
        + (
            torch.log(distance.double().clamp(min=1) / exact)
            / math.log(max_distance / exact)
            * (num_buckets - exact)
        ).long()
    )
    large = large.clamp(max=num_buckets - 1)
    return out + torch.where(distance < exact, distance, large)


def _rms(x, module):
    """T5's RMSNorm; like the model, the statistic is taken in float32 (so that the logits agree beyond 1e-7)."""
    w = module.weight.detach().to(F64)
    variance = x.float().pow(2).mean(-1, keepdim=True)
    scale = torch.rsqrt(variance + module.variance_epsilon).to(F64)
    return x * scale * w, w, scale


def _lrp_rms(x, y, w, scale, r_y):
    """Identity rule of ``y = w * s * x`` (``s`` frozen): a diagonal linear map."""
    return x * w * scale * safe_div(r_y, y)


def _t5_attention_forward(att, xq, xkv, bias, allowed):
    heads, dim = att.n_heads, att.key_value_proj_dim
    q = (xq @ att.q.weight.detach().to(F64).T).view(-1, heads, dim).transpose(0, 1)
    k = (xkv @ att.k.weight.detach().to(F64).T).view(-1, heads, dim).transpose(0, 1)
    v = (xkv @ att.v.weight.detach().to(F64).T).view(-1, heads, dim).transpose(0, 1)
    scores, probs, out = biased_attention(q, k, v, 1.0, bias, allowed)
    flat = out.transpose(0, 1).reshape(xq.shape[0], heads * dim)
    return dict(
        q=q, k=k, v=v, S=scores, A=probs, o=out, flat=flat, out=flat @ att.o.weight.detach().to(F64).T
    )


def _t5_attention_lrp(att, a, xq, xkv, bias, allowed, r_out, mode):
    heads, dim = att.n_heads, att.key_value_proj_dim
    r_flat = lrp_linear(a["flat"], att.o.weight.detach().to(F64), None, r_out)
    r_o = r_flat.view(-1, heads, dim).transpose(0, 1)
    r_q, r_k, r_v, r_b = lrp_biased_attention(
        a["q"], a["k"], a["v"], 1.0, bias, allowed, a["S"], a["A"], a["o"], r_o, mode
    )
    flat = [t.transpose(0, 1).reshape(t.shape[1], heads * dim) for t in (r_q, r_k, r_v)]
    r_xq = lrp_linear(xq, att.q.weight.detach().to(F64), None, flat[0])
    r_xkv = lrp_linear(xkv, att.k.weight.detach().to(F64), None, flat[1]) + lrp_linear(
        xkv, att.v.weight.detach().to(F64), None, flat[2]
    )
    return r_xq, r_xkv, r_b.sum(0)


def _t5_ff_forward(ff, x):
    n, w, s = _rms(x, ff.layer_norm)
    h = n @ ff.DenseReluDense.wi.weight.detach().to(F64).T
    g = torch.relu(h)
    m = g @ ff.DenseReluDense.wo.weight.detach().to(F64).T
    return dict(x=x, n=n, w=w, s=s, g=g, m=m, y=x + m)


def _t5_ff_lrp(ff, a, r_y):
    r_x, r_m = split_sum([a["x"], a["m"]], r_y)
    r_g = lrp_linear(a["g"], ff.DenseReluDense.wo.weight.detach().to(F64), None, r_m)
    r_n = lrp_linear(a["n"], ff.DenseReluDense.wi.weight.detach().to(F64), None, r_g)  # identity rule at ReLU
    return r_x + _lrp_rms(a["x"], a["n"], a["w"], a["s"], r_n)


def _t5_bias(att, length, bidirectional):
    steps = torch.arange(length)
    buckets = t5_bucket(
        steps[None, :] - steps[:, None], bidirectional, att.relative_attention_num_buckets,
        att.relative_attention_max_distance,
    )  # fmt: skip
    table = att.relative_attention_bias.weight.detach().to(F64)
    return table[buckets].permute(2, 0, 1), buckets


def _t5_row(model, src, tgt, position, target, mode):
    emb = model.shared.weight.detach().to(F64)
    enc, dec = model.encoder, model.decoder
    s_len, t_len = src.shape[0], tgt.shape[0]
    ones_src = torch.ones(s_len, s_len, dtype=torch.bool)
    causal = torch.tril(torch.ones(t_len, t_len, dtype=torch.bool))
    cross = torch.ones(t_len, s_len, dtype=torch.bool)
    enc_bias, enc_buckets = _t5_bias(enc.block[0].layer[0].SelfAttention, s_len, True)
    dec_bias, dec_buckets = _t5_bias(dec.block[0].layer[0].SelfAttention, t_len, False)
    zero_cross = torch.zeros(1, t_len, s_len, dtype=F64)
    x_src = emb[src]
    x = x_src
    enc_acts = []
    for block in enc.block:
        sa = block.layer[0]
        n, w, s = _rms(x, sa.layer_norm)
        a = _t5_attention_forward(sa.SelfAttention, n, n, enc_bias, ones_src)
        a.update(x=x, n=n, w=w, s=s)
        x1 = x + a["out"]
        f = _t5_ff_forward(block.layer[1], x1)
        enc_acts.append((a, x1, f))
        x = f["y"]
    h, wh, sh = _rms(x, enc.final_layer_norm)
    x_tgt = emb[tgt]
    y = x_tgt
    dec_acts = []
    for block in dec.block:
        sa, ca = block.layer[0], block.layer[1]
        n, w, s = _rms(y, sa.layer_norm)
        a = _t5_attention_forward(sa.SelfAttention, n, n, dec_bias, causal)
        a.update(x=y, n=n, w=w, s=s)
        y1 = y + a["out"]
        n2, w2, s2 = _rms(y1, ca.layer_norm)
        c = _t5_attention_forward(ca.EncDecAttention, n2, h, zero_cross, cross)
        c.update(x=y1, n=n2, w=w2, s=s2)
        y2 = y1 + c["out"]
        f = _t5_ff_forward(block.layer[2], y2)
        dec_acts.append((a, y1, c, y2, f))
        y = f["y"]
    out, wo, so = _rms(y, dec.final_layer_norm)
    scaled = out * model.model_dim**-0.5
    head = model.lm_head.weight.detach().to(F64)
    logits = scaled[position] @ head.T
    tgt_id = int(logits.argmax()) if target is None else int(target)
    r_logits = torch.zeros_like(logits)
    r_logits[tgt_id] = logits[tgt_id]
    r_out = torch.zeros_like(out)
    r_out[position] = lrp_linear(scaled[position : position + 1], head, None, r_logits[None])[0]
    r_y = _lrp_rms(y, out, wo, so, r_out)
    r_h = torch.zeros_like(h)
    n_dec, n_enc = len(dec_acts), len(enc_acts)
    target_by_layer = torch.zeros(n_dec, t_len, dtype=F64)
    target_by_bucket = torch.zeros(
        dec.block[0].layer[0].SelfAttention.relative_attention_num_buckets, dtype=F64
    )
    for li in reversed(range(n_dec)):
        block = dec.block[li]
        a, y1, c, y2, f = dec_acts[li]
        r_y2 = _t5_ff_lrp(block.layer[2], f, r_y)
        r_y1, r_c = split_sum([y1, c["out"]], r_y2)
        r_n2, r_hc, _ = _t5_attention_lrp(
            block.layer[1].EncDecAttention, c, c["n"], h, zero_cross, cross, r_c, mode
        )
        r_h = r_h + r_hc
        r_y1 = r_y1 + _lrp_rms(y1, c["n"], c["w"], c["s"], r_n2)
        r_yin, r_a = split_sum([a["x"], a["out"]], r_y1)
        r_n, r_n_kv, pairs = _t5_attention_lrp(
            block.layer[0].SelfAttention, a, a["n"], a["n"], dec_bias, causal, r_a, mode
        )
        target_by_layer[li] = pairs.sum(0)
        target_by_bucket.index_add_(0, dec_buckets[causal], pairs[causal])
        r_y = r_yin + _lrp_rms(a["x"], a["n"], a["w"], a["s"], r_n + r_n_kv)
    r_x = _lrp_rms(x, h, wh, sh, r_h)
    by_layer = torch.zeros(n_enc, s_len, dtype=F64)
    by_bucket = torch.zeros(enc.block[0].layer[0].SelfAttention.relative_attention_num_buckets, dtype=F64)
    for li in reversed(range(n_enc)):
        block = enc.block[li]
        a, x1, f = enc_acts[li]
        r_x1 = _t5_ff_lrp(block.layer[1], f, r_x)
        r_xin, r_a = split_sum([a["x"], a["out"]], r_x1)
        r_n, r_n_kv, pairs = _t5_attention_lrp(
            block.layer[0].SelfAttention, a, a["n"], a["n"], enc_bias, ones_src, r_a, mode
        )
        by_layer[li] = pairs.sum(0)
        by_bucket.index_add_(0, enc_buckets.flatten(), pairs.flatten())
        r_x = r_xin + _lrp_rms(a["x"], a["n"], a["w"], a["s"], r_n + r_n_kv)
    return dict(
        token=r_x.sum(-1), position_by_layer=by_layer, position_by_distance=by_bucket, logit=logits[tgt_id],
        target_token=r_y.sum(-1), target_position_by_layer=target_by_layer,
        target_position_by_distance=target_by_bucket,
    )  # fmt: skip


@torch.no_grad()
def t5_reference(model, input_ids, decoder_input_ids, *, mode, target=None, position=None) -> dict:
    """Explicit PE-LRP of a ``T5ForConditionalGeneration`` (ReLU feed-forward, unpadded rows): source maps
    (``token``, ``position_by_layer``, ``position_by_distance`` per bucket) and target-prefix maps
    (``target_*``), per row, stacked."""
    rows = []
    for b in range(input_ids.shape[0]):
        pos = decoder_input_ids.shape[1] - 1 if position is None else int(position[b])
        rows.append(
            _t5_row(
                model, input_ids[b], decoder_input_ids[b], pos, None if target is None else target[b], mode
            )
        )
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# ------------------------------------------------------------------------------------------------- DeBERTa-v2


def deberta_bucket(relative: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """DeBERTa's log-bucketed relative position of ``i - j`` (exact below ``bucket_size / 2``)."""
    sign = torch.sign(relative)
    mid = bucket_size // 2
    small = (relative < mid) & (relative > -mid)
    absolute = torch.where(small, torch.full_like(relative, mid - 1), relative.abs()).double()
    log_pos = torch.ceil(torch.log(absolute / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    return torch.where(absolute <= mid, relative.double(), log_pos * sign).long()


def _post_ln(x, module):
    return _ln(x, module)


def _deberta_row(model, ids, target, mode):
    base, cfg = model.deberta, model.config
    heads = cfg.num_attention_heads
    hidden = cfg.hidden_size
    dim = hidden // heads
    seq = ids.shape[0]
    emb = base.embeddings
    t = emb.word_embeddings.weight.detach().to(F64)[ids]
    x, w0, s0 = _ln(t, emb.LayerNorm)
    e_in = t
    enc = base.encoder
    rel, _, _ = _ln(enc.rel_embeddings.weight.detach().to(F64), enc.LayerNorm)
    span = cfg.position_buckets
    rel = rel[: 2 * span]
    steps = torch.arange(seq)
    bucket = deberta_bucket(steps[:, None] - steps[None, :], cfg.position_buckets, cfg.max_relative_positions)
    c2p_index = (bucket + span).clamp(0, 2 * span - 1)  # [i, j]: P^k row for query i, key j
    p2c_index = (-bucket.T + span).clamp(
        0, 2 * span - 1
    )  # [i, j]: P^q row of d(j, i), key j seen from query i
    scale = math.sqrt(dim * 3)
    acts = []
    for layer in enc.layer:
        att = layer.attention.self
        a = {"x": x}
        q = _apply(_lin(att.query_proj), x).view(seq, heads, dim).transpose(0, 1)
        k = _apply(_lin(att.key_proj), x).view(seq, heads, dim).transpose(0, 1)
        v = _apply(_lin(att.value_proj), x).view(seq, heads, dim).transpose(0, 1)
        pk = _apply(_lin(att.key_proj), rel).view(-1, heads, dim).transpose(0, 1)  # share_att_key
        pq = _apply(_lin(att.query_proj), rel).view(-1, heads, dim).transpose(0, 1)
        qk = q @ k.transpose(1, 2) / scale
        c2p = torch.einsum("hid,hijd->hij", q, pk[:, c2p_index]) / scale
        p2c = torch.einsum("hjd,hijd->hij", k, pq[:, p2c_index]) / scale
        scores = qk + c2p + p2c
        probs = torch.softmax(scores, -1)
        out = probs @ v
        a.update(q=q, k=k, v=v, pk=pk, pq=pq, qk=qk, c2p=c2p, p2c=p2c, S=scores, A=probs, o=out)
        a["o_flat"] = out.transpose(0, 1).reshape(seq, hidden)
        a["d"] = _apply(_lin(layer.attention.output.dense), a["o_flat"])
        a["sum1"] = a["d"] + x
        a["x1"], a["w1"], a["s1"] = _ln(a["sum1"], layer.attention.output.LayerNorm)
        a["f"] = _apply(_lin(layer.intermediate.dense), a["x1"])
        a["g"] = layer.intermediate.intermediate_act_fn(a["f"])
        a["m"] = _apply(_lin(layer.output.dense), a["g"])
        a["sum2"] = a["m"] + a["x1"]
        x, a["w2"], a["s2"] = _ln(a["sum2"], layer.output.LayerNorm)
        a["y"] = x
        acts.append(a)
    pooler = _lin(model.pooler.dense)
    pooled = _apply(pooler, x[0])
    act = torch.nn.functional.gelu(pooled)
    head = _lin(model.classifier)
    logits = _apply(head, act)
    tgt = int(logits.argmax()) if target is None else int(target)
    r_logits = torch.zeros_like(logits)
    r_logits[tgt] = logits[tgt]
    r_act = lrp_linear(act[None], *head, r_logits[None])[0]
    r_x = torch.zeros_like(x)
    r_x[0] = lrp_linear(x[:1], *pooler, r_act[None])[0]  # identity rule at the pooler's GELU
    by_layer = torch.zeros(len(acts), seq, dtype=F64)
    by_distance = torch.zeros(2 * seq - 1, dtype=F64)
    distance = steps[None, :] - steps[:, None] + seq - 1
    for li in reversed(range(len(acts))):
        layer, a = enc.layer[li], acts[li]
        att = layer.attention.self
        r_sum2 = lrp_layer_norm(a["sum2"], a["y"], a["w2"], a["s2"], r_x)
        r_m, r_x1 = split_sum([a["m"], a["x1"]], r_sum2)
        r_g = lrp_linear(a["g"], *_lin(layer.output.dense), r_m)
        r_x1 = r_x1 + lrp_linear(a["x1"], *_lin(layer.intermediate.dense), r_g)
        r_sum1 = lrp_layer_norm(a["sum1"], a["x1"], a["w1"], a["s1"], r_x1)
        r_d, r_xin = split_sum([a["d"], a["x"]], r_sum1)
        r_o = (
            lrp_linear(a["o_flat"], *_lin(layer.attention.output.dense), r_d)
            .view(seq, heads, dim)
            .transpose(0, 1)
        )
        frac = a["A"][..., None] * a["v"][:, None] * safe_div(r_o, a["o"])[:, :, None]
        a_share, v_share = (0.5, 0.5) if mode == "attnlrp" else (0.0, 1.0)
        r_v = v_share * frac.sum(1)
        r_q = torch.zeros_like(a["q"])
        r_k = torch.zeros_like(a["k"])
        if mode == "attnlrp":
            r_probs = a_share * frac.sum(-1)
            r_s = a["S"] * (r_probs - a["A"] * r_probs.sum(-1, keepdim=True))
            r_qk, r_c2p, r_p2c = split_sum([a["qk"], a["c2p"], a["p2c"]], r_s)
            terms = a["q"][:, :, None] * a["k"][:, None] / scale * safe_div(r_qk, a["qk"])[..., None]
            r_q = 0.5 * terms.sum(2)
            r_k = 0.5 * terms.sum(1)
            pk_ij = a["pk"][:, c2p_index]
            r_q = r_q + 0.5 * (a["q"][:, :, None] * pk_ij / scale * safe_div(r_c2p, a["c2p"])[..., None]).sum(
                2
            )
            pq_ij = a["pq"][:, p2c_index]
            r_k = r_k + 0.5 * (a["k"][:, None] * pq_ij / scale * safe_div(r_p2c, a["p2c"])[..., None]).sum(1)
            pairs = 0.5 * (r_c2p + r_p2c).sum(0)
            by_layer[li] = pairs.sum(0)
            by_distance.index_add_(0, distance.flatten(), pairs.flatten())
        flat = [t.transpose(0, 1).reshape(seq, hidden) for t in (r_q, r_k, r_v)]
        r_x = (
            r_xin
            + lrp_linear(a["x"], *_lin(att.query_proj), flat[0])
            + lrp_linear(a["x"], *_lin(att.key_proj), flat[1])
            + lrp_linear(a["x"], *_lin(att.value_proj), flat[2])
        )
    r_t = lrp_layer_norm(e_in, acts[0]["x"], w0, s0, r_x)
    return r_t.sum(-1), by_layer, by_distance, logits[tgt]


@torch.no_grad()
def deberta_reference(model, input_ids, *, mode, target=None) -> BiasReference:
    """Explicit PE-LRP of a ``DebertaV2ForSequenceClassification`` (c2p + p2c, shared attention keys, layer-normed
    relative embeddings, no token types, unpadded rows): the position leaf of a pair is the position half of its
    c2p and p2c terms."""
    rows = []
    for b in range(input_ids.shape[0]):
        rows.append(_deberta_row(model, input_ids[b], None if target is None else target[b], mode))
    return BiasReference(*(torch.stack(col) for col in zip(*rows, strict=True)))
