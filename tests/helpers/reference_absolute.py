"""A slow, explicit PE-LRP for GPT-2 and BERT with additive position embeddings, to check the fast path.

Plain float64 tensor math on the model's weights, one row at a time: a forward pass that keeps every
activation, then a backward sweep applying the formulas of method.md rule by rule. No autograd, no hooks and
no hf_pelrp code, so agreement with :func:`hf_pelrp.attribute` shows that the Gradient x Input formulation
computes the rules it claims to (method.md 3.7). Rules, with ``eps -> 0`` and ``0 / 0 := 0``:

- linear ``z = x W^T + b`` (epsilon rule): ``R_x = x * ((R_z / z) W)``; the bias absorbs its share;
- a sum ``z = a + b (+ c)`` (residual; the embedding sum ``e = t + p + s``): ``R_a = a / z * R_z``;
- LayerNorm (identity rule, AttnLRP Prop. 3.4): the scale ``s = 1 / std(x)`` is a constant, so
  ``y_k = sum_i w_k s (delta_ki - 1/D) x_i + b_k`` is linear and the epsilon rule gives
  ``R_x_i = x_i * sum_k w_k s (delta_ki - 1/D) R_y_k / y_k``;
- element-wise activation (GELU, tanh; identity rule): ``R_x = R_y``;
- ``A v`` and ``q k^T`` (epsilon + uniform rule, Prop. 3.3): each term ``a_i b_j`` of a sum ``z`` gets
  ``a_i b_j / z * R_z``, half to each factor (AttnLRP) or all to ``v`` and nothing to ``q``, ``k`` (CP-LRP);
- softmax (Prop. 3.1): ``R_S_ij = S_ij (R_A_ij - A_ij sum_j' R_A_ij')`` on allowed entries, 0 on masked ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

F64 = torch.float64


@dataclass
class ReferenceMaps:
    """Explicit relevance (float64, [B, T]) of the token, position and segment embeddings, and the logits."""

    token: torch.Tensor
    position: torch.Tensor
    segment: torch.Tensor
    logit: torch.Tensor


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` with ``x / 0 := 0`` (a zero output passes on no relevance)."""
    zero = b == 0
    return torch.where(zero, torch.zeros_like(a), a / torch.where(zero, torch.ones_like(b), b))


def lrp_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, r_out: torch.Tensor):
    """Epsilon rule of ``z = x W^T + b`` (``weight`` [out, in])."""
    z = x @ weight.T
    if bias is not None:
        z = z + bias
    return x * (safe_div(r_out, z) @ weight)


def layer_norm(x: torch.Tensor, ln) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``nn.LayerNorm`` in float64: returns ``(y, weight, scale)`` with the per-row scale ``1 / std``."""
    w, b = ln.weight.detach().to(F64), ln.bias.detach().to(F64)
    centred = x - x.mean(-1, keepdim=True)
    scale = 1.0 / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + ln.eps)
    return centred * scale * w + b, w, scale


def lrp_layer_norm(x, y, weight, scale, r_y):
    """Identity rule: epsilon rule on the LayerNorm with its scale frozen (a linear map with a bias)."""
    u = weight * safe_div(r_y, y)
    return x * scale * (u - u.mean(-1, keepdim=True))


def split_sum(terms: list[torch.Tensor], r_z: torch.Tensor) -> list[torch.Tensor]:
    """Epsilon rule of ``z = sum(terms)``: each term gets ``term / z * R_z``."""
    z = sum(terms)
    ratio = safe_div(r_z, z)
    return [t * ratio for t in terms]


def attention_forward(q, k, v, scaling, allowed):
    """``q, k, v`` [H, T, d]; returns scores ``S``, probabilities ``A`` (0 on masked entries) and ``A v``."""
    scores = scaling * (q @ k.transpose(1, 2))
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a query that sees no key: no output, no relevance
    return scores, probs, probs @ v


def lrp_attention(q, k, v, scaling, allowed, scores, probs, out, r_out, mode):
    """Relevance of ``q``, ``k``, ``v`` [H, T, d] from the relevance of ``out = softmax(S) v``."""
    # out[h, i, d] = sum_j A[h, i, j] v[h, j, d]: one term per j
    frac = probs[..., None] * v[:, None, :, :] * safe_div(r_out, out)[:, :, None, :]
    a_share, v_share = (0.5, 0.5) if mode == "attnlrp" else (0.0, 1.0)
    r_v = v_share * frac.sum(1)
    r_probs = a_share * frac.sum(-1)
    if mode != "attnlrp":
        return torch.zeros_like(q), torch.zeros_like(k), r_v
    r_s = scores * (r_probs - probs * r_probs.sum(-1, keepdim=True))
    r_s = torch.where(allowed, r_s, torch.zeros_like(r_s))
    # S[h, i, j] = scaling * sum_d q[h, i, d] k[h, j, d]
    terms = scaling * q[:, :, None, :] * k[:, None, :, :] * safe_div(r_s, scores)[..., None]
    return 0.5 * terms.sum(2), 0.5 * terms.sum(1), r_v


def _lin(module, conv1d: bool = False):
    w = module.weight.detach().to(F64)
    b = None if module.bias is None else module.bias.detach().to(F64)
    return (w.T if conv1d else w), b


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    return x.view(x.shape[0], n_heads, -1).transpose(0, 1)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _apply(lin, x):
    w, b = lin
    return x @ w.T + (0 if b is None else b)


# ----------------------------------------------------------------------------------------------------- GPT-2


def _gpt2_row(model, ids, mask, token_types, position, target, mode):
    base, cfg = model.transformer, model.config
    seq, n_heads = ids.shape[0], cfg.n_head
    pos_ids = (mask.cumsum(0) - 1).clamp(min=0) * mask
    t = base.wte.weight.detach().to(F64)[ids]
    p = base.wpe.weight.detach().to(F64)[pos_ids]
    s = base.wte.weight.detach().to(F64)[token_types] if token_types is not None else torch.zeros_like(t)
    allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool)) & mask.bool()[None, :]
    x = t + p + s
    acts = []
    for block in base.h:
        a = {"x": x}
        a["n1"], a["w1"], a["s1"] = layer_norm(x, block.ln_1)
        c_attn = _lin(block.attn.c_attn, conv1d=True)
        q, k, v = _apply(c_attn, a["n1"]).split(cfg.n_embd, dim=-1)
        a["q"], a["k"], a["v"] = _heads(q, n_heads), _heads(k, n_heads), _heads(v, n_heads)
        a["S"], a["A"], a["o"] = attention_forward(a["q"], a["k"], a["v"], block.attn.scaling, allowed)
        a["o_flat"] = _flat(a["o"])
        a["attn"] = _apply(_lin(block.attn.c_proj, conv1d=True), a["o_flat"])
        a["x1"] = x + a["attn"]
        a["n2"], a["w2"], a["s2"] = layer_norm(a["x1"], block.ln_2)
        a["f"] = _apply(_lin(block.mlp.c_fc, conv1d=True), a["n2"])
        a["g"] = block.mlp.act(a["f"])
        a["m"] = _apply(_lin(block.mlp.c_proj, conv1d=True), a["g"])
        x = a["x1"] + a["m"]
        a["x2"] = x
        acts.append(a)
    nf, wf, sf = layer_norm(x, base.ln_f)
    head = _lin(model.lm_head if hasattr(model, "lm_head") else model.score)
    logits = _apply(head, nf[position])
    tgt = int(logits.argmax()) if target is None else int(target)

    r_logits = torch.zeros_like(logits)
    r_logits[tgt] = logits[tgt]
    r_nf = torch.zeros_like(nf)
    r_nf[position] = lrp_linear(nf[position : position + 1], *head, r_logits[None])[0]
    r_x = lrp_layer_norm(x, nf, wf, sf, r_nf)
    for block, a in zip(reversed(base.h), reversed(acts), strict=True):
        r_x1, r_m = split_sum([a["x1"], a["m"]], r_x)
        r_g = lrp_linear(a["g"], *_lin(block.mlp.c_proj, conv1d=True), r_m)
        r_n2 = lrp_linear(a["n2"], *_lin(block.mlp.c_fc, conv1d=True), r_g)  # identity rule: R_f = R_g
        r_x1 = r_x1 + lrp_layer_norm(a["x1"], a["n2"], a["w2"], a["s2"], r_n2)
        r_xin, r_attn = split_sum([a["x"], a["attn"]], r_x1)
        r_o = _heads(lrp_linear(a["o_flat"], *_lin(block.attn.c_proj, conv1d=True), r_attn), n_heads)
        r_q, r_k, r_v = lrp_attention(
            a["q"], a["k"], a["v"], block.attn.scaling, allowed, a["S"], a["A"], a["o"], r_o, mode
        )
        r_qkv = torch.cat([_flat(r_q), _flat(r_k), _flat(r_v)], dim=-1)
        r_n1 = lrp_linear(a["n1"], *_lin(block.attn.c_attn, conv1d=True), r_qkv)
        r_x = r_xin + lrp_layer_norm(a["x"], a["n1"], a["w1"], a["s1"], r_n1)
    r_t, r_p, r_s = split_sum([t, p, s], r_x)
    return r_t.sum(-1), r_p.sum(-1), r_s.sum(-1), logits[tgt]


@torch.no_grad()
def gpt2_reference(
    model, input_ids, attention_mask, *, mode, target=None, position=None, token_type_ids=None
):
    """Explicit PE-LRP of a ``GPT2LMHeadModel`` / ``GPT2ForSequenceClassification``, row by row.

    ``position`` [B] (default: each row's last real token) is where the logit is read; position ids count
    real tokens only (as :func:`hf_pelrp.attribute` sets them).
    """
    rows = []
    for b in range(input_ids.shape[0]):
        mask = attention_mask[b].long()
        pos = int(position[b]) if position is not None else int(mask.nonzero().max())
        tt = None if token_type_ids is None else token_type_ids[b]
        tgt = None if target is None else target[b]
        rows.append(_gpt2_row(model, input_ids[b], mask, tt, pos, tgt, mode))
    return ReferenceMaps(*(torch.stack(col) for col in zip(*rows, strict=True)))


# ------------------------------------------------------------------------------------------------------ BERT


def _bert_row(model, ids, mask, token_types, position, target, mode):
    base, cfg = model.bert, model.config
    seq, n_heads = ids.shape[0], cfg.num_attention_heads
    emb = base.embeddings
    t = emb.word_embeddings.weight.detach().to(F64)[ids]
    p = emb.position_embeddings.weight.detach().to(F64)[torch.arange(seq)]
    s = emb.token_type_embeddings.weight.detach().to(F64)[token_types]
    allowed = mask.bool()[None, None, :].expand(1, seq, seq)
    e = t + s + p
    x, we, se = layer_norm(e, emb.LayerNorm)
    x_emb = x
    acts = []
    for layer in base.encoder.layer:
        att = layer.attention.self
        a = {"x": x}
        a["q"], a["k"], a["v"] = (
            _heads(_apply(_lin(m), x), n_heads) for m in (att.query, att.key, att.value)
        )
        a["S"], a["A"], a["o"] = attention_forward(a["q"], a["k"], a["v"], att.scaling, allowed)
        a["o_flat"] = _flat(a["o"])
        a["d"] = _apply(_lin(layer.attention.output.dense), a["o_flat"])
        a["h_in"] = a["d"] + x
        a["h"], a["wh"], a["sh"] = layer_norm(a["h_in"], layer.attention.output.LayerNorm)
        a["f"] = _apply(_lin(layer.intermediate.dense), a["h"])
        a["g"] = layer.intermediate.intermediate_act_fn(a["f"])
        a["m"] = _apply(_lin(layer.output.dense), a["g"])
        a["y_in"] = a["m"] + a["h"]
        x, a["wy"], a["sy"] = layer_norm(a["y_in"], layer.output.LayerNorm)
        a["y"] = x
        acts.append(a)

    r_x = torch.zeros_like(x)
    if hasattr(model, "cls"):  # masked LM: transform (dense, act, LayerNorm), decoder
        pred = model.cls.predictions
        h = _apply(_lin(pred.transform.dense), x[position])
        g = pred.transform.transform_act_fn(h)
        n, wn, sn = layer_norm(g, pred.transform.LayerNorm)
        dec = _lin(pred.decoder)
        logits = _apply(dec, n)
        tgt = int(logits.argmax()) if target is None else int(target)
        r_logits = torch.zeros_like(logits)
        r_logits[tgt] = logits[tgt]
        r_n = lrp_linear(n[None], *dec, r_logits[None])[0]
        r_g = lrp_layer_norm(g, n, wn, sn, r_n)
        r_x[position] = lrp_linear(x[position][None], *_lin(pred.transform.dense), r_g[None])[0]
    else:  # sequence classification: pooler (dense, tanh) on the first token, classifier
        pooler = _lin(base.pooler.dense)
        pooled = torch.tanh(_apply(pooler, x[0]))
        cls = _lin(model.classifier)
        logits = _apply(cls, pooled)
        tgt = int(logits.argmax()) if target is None else int(target)
        r_logits = torch.zeros_like(logits)
        r_logits[tgt] = logits[tgt]
        r_pooled = lrp_linear(pooled[None], *cls, r_logits[None])  # identity rule for tanh
        r_x[0] = lrp_linear(x[0][None], *pooler, r_pooled)[0]
    for layer, a in zip(reversed(base.encoder.layer), reversed(acts), strict=True):
        att = layer.attention.self
        r_y_in = lrp_layer_norm(a["y_in"], a["y"], a["wy"], a["sy"], r_x)
        r_m, r_h = split_sum([a["m"], a["h"]], r_y_in)
        r_g = lrp_linear(a["g"], *_lin(layer.output.dense), r_m)
        r_h = r_h + lrp_linear(a["h"], *_lin(layer.intermediate.dense), r_g)  # identity rule: R_f = R_g
        r_h_in = lrp_layer_norm(a["h_in"], a["h"], a["wh"], a["sh"], r_h)
        r_d, r_x = split_sum([a["d"], a["x"]], r_h_in)
        r_o = _heads(lrp_linear(a["o_flat"], *_lin(layer.attention.output.dense), r_d), n_heads)
        r_q, r_k, r_v = lrp_attention(
            a["q"], a["k"], a["v"], att.scaling, allowed, a["S"], a["A"], a["o"], r_o, mode
        )
        for m, r in ((att.query, r_q), (att.key, r_k), (att.value, r_v)):
            r_x = r_x + lrp_linear(a["x"], *_lin(m), _flat(r))
    r_e = lrp_layer_norm(e, x_emb, we, se, r_x)
    r_t, r_s, r_p = split_sum([t, s, p], r_e)
    return r_t.sum(-1), r_p.sum(-1), r_s.sum(-1), logits[tgt]


@torch.no_grad()
def bert_reference(
    model, input_ids, attention_mask, *, mode, target=None, position=None, token_type_ids=None
):
    """Explicit PE-LRP of a ``BertForSequenceClassification`` / ``BertForMaskedLM``, row by row.

    Position ids are ``0..T-1`` (BERT's default); ``position`` [B] is the ``[MASK]`` position for masked LMs.
    """
    rows = []
    for b in range(input_ids.shape[0]):
        tt = torch.zeros_like(input_ids[b]) if token_type_ids is None else token_type_ids[b]
        pos = None if position is None else int(position[b])
        tgt = None if target is None else target[b]
        rows.append(_bert_row(model, input_ids[b], attention_mask[b].long(), tt, pos, tgt, mode))
    return ReferenceMaps(*(torch.stack(col) for col in zip(*rows, strict=True)))
