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

from reference_absolute import F64, lrp_layer_norm, lrp_linear, safe_div, split_sum


@dataclass
class BiasReference:
    """Explicit relevance (float64): ``token`` [B, T], bias relevance per (layer, key) [B, L, T], per signed
    distance ``j - i`` [B, 2T - 1] (bin ``d + T - 1``), and the explained logit [B]."""

    token: torch.Tensor
    position_by_layer: torch.Tensor
    position_by_distance: torch.Tensor
    logit: torch.Tensor


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
        r_pairs = r_b.sum(0)  # [T, T]
        by_layer[layer] = r_pairs.sum(0)
        distance = (pos[None, :] - pos[:, None]) + seq - 1
        by_distance.index_add_(0, distance[allowed], r_pairs[allowed])
        r_qkv = _join_qkv(r_q, r_k, r_v, fam["layout"])
        r_n1 = lrp_linear(a["n1"], *blk["qkv"], r_qkv)
        r_x = r_xin + lrp_layer_norm(a["x"], a["n1"], a["w1"], a["s1"], r_n1)
    if ln0 is not None:
        r_x = lrp_layer_norm(t, ln0[0], ln0[1], ln0[2], r_x)
    return r_x.sum(-1), by_layer, by_distance, logits[tgt]


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
