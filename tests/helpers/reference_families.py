"""A slow, explicit, layer-by-layer PE-LRP for the LLaMA-layout variants, used to check their declarations.

Covers what ``reference_lrp.py`` (LLaMA) does not: q / k norms per head (Qwen3), over the whole projection
(OLMo 2) and as a per-head LayerNorm without bias (Cohere); norms after attention and MLP (OLMo 2); a parallel
attention + MLP block (Cohere); LayerNorms with and without weight / bias (StarCoder2, OLMo, Cohere); constant
multipliers (Granite's embedding, residual, attention and logit multipliers, Cohere's ``logit_scale``);
biases everywhere and an ungated MLP (StarCoder2); a fused ``gate_up_proj`` and ``qkv_proj`` and partial
rotary (Phi-3); NoPE layers (SmolLM3); interleaved rotary pairs (Cohere); clipped q, k, v (OLMo).

Everything is plain float64 tensor math on the weights of the model: one forward pass that keeps every
activation (mirroring the float32 statistics of transformers' norms, so that the forward values are the
model's), then one backward sweep that applies the rules of method.md one by one. No autograd, no hooks and
no code of hf_pelrp. Rules, with ``eps -> 0`` and ``0 / 0 := 0``:

- linear ``z = x W^T + b`` and any sum (residuals, the parallel block, the two rotation terms): epsilon rule,
  ``R_x = x * ((R_z / z) W)``, ``R_a = a / z * R_z``; biases absorb their share;
- scaling by a constant ``y = c x`` (multipliers, ``logits / logits_scaling``): ``R_x = R_y``;
- norms (identity rule, AttnLRP Prop. 3.4): the normalising scale ``s`` is a constant, so the norm is the
  linear map ``y = w s (x - mean(x)) + b`` (RMSNorm: without the mean) and the epsilon rule gives
  ``R_x[j] = x[j] s (w[j] r[j] - mean_d(w[d] r[d]))`` with ``r = R_y / y`` (no mean term for RMSNorm);
- element-wise activations and the q / k / v clip (identity rule): ``R_x = R_y``;
- products (gated MLP ``act(gate) * up``, the rotation terms ``q * cos``, ``rotate(q) * sin``, ``q k^T``,
  ``A v``): uniform rule, half of each elementary term's relevance to each factor;
- softmax (AttnLRP Prop. 3.1): ``R_S = S (R_A - A sum_j R_A)`` on allowed entries;
- CP-LRP: attention probabilities and the MLP gate are constants; ``positional=False``: cos / sin are
  constants (the rotation gives all to q, k); a NoPE layer has no rotation at all;
- partial rotary: the rotation acts on the first ``rotary_dim`` channels only, the others pass unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

F64 = torch.float64


@dataclass
class ReferenceMaps:
    """Explicit relevance maps (float64): token [B, T], position_by_layer [B, L, T]; the explained logits."""

    token: torch.Tensor
    position_by_layer: torch.Tensor
    logit: torch.Tensor
    target: torch.Tensor

    @property
    def position(self) -> torch.Tensor:
        return self.position_by_layer.sum(1)


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` with ``0 / 0 := 0``."""
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def linear(x, wb):
    w, b = wb
    z = x @ w.T
    return z if b is None else z + b


def lrp_linear(x, wb, r_out):
    """Epsilon rule of ``z = x W^T + b``."""
    return x * (safe_div(r_out, linear(x, wb)) @ wb[0])


# ---- norms: the model's forward value and the frozen-scale linear map of the identity rule -----------------


@dataclass
class NormSpec:
    #: "rms": w * x / rms (float32 statistics); "olmo": F.layer_norm of x.float(); "cohere": LayerNorm written
    #: out in float32; "ln": nn.LayerNorm (in the model's precision)
    kind: str
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def norm_forward(x: torch.Tensor, spec: NormSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, s)``: the model's output (its own float32 statistics) and the exact float64 scale ``s``."""
    if spec.kind == "rms":
        x32 = x.float()
        y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + spec.eps)).to(F64) * spec.weight
        return y, torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + spec.eps)
    centred = x - x.mean(-1, keepdim=True)
    s = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + spec.eps)
    if spec.kind == "olmo":
        return F.layer_norm(x.float(), x.shape[-1:], None, None, spec.eps).to(F64), s
    if spec.kind == "cohere":  # statistics and weight in float32
        x32 = x.float()
        c32 = x32 - x32.mean(-1, keepdim=True)
        y32 = c32 * torch.rsqrt(c32.pow(2).mean(-1, keepdim=True) + spec.eps)
        return (spec.weight.float() * y32).to(F64), s
    y = F.layer_norm(x, x.shape[-1:], spec.weight, spec.bias, spec.eps)
    return y, s


def lrp_norm(x, y, s, spec: NormSpec, r_y):
    """Epsilon rule of the frozen-scale map ``y = w s (x - mean x) + b`` (RMSNorm: no mean)."""
    g = safe_div(r_y, y) * s
    if spec.weight is not None:
        g = g * spec.weight
    if spec.kind != "rms":
        g = g - g.mean(-1, keepdim=True)
    return x * g


# ---- rotary ---------------------------------------------------------------------------------------------------


def rotate(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``rotate_half``: halves ``(x1, x2) -> (-x2, x1)``, or interleaved pairs ``(x0, x1) -> (-x1, x0)``."""
    if layout == "half":
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def unrotate_relevance(r: torch.Tensor, layout: str) -> torch.Tensor:
    """Relevance of the entries of ``rotate(q)`` sent back to the entries of ``q`` they came from."""
    if layout == "half":
        h = r.shape[-1] // 2
        return torch.cat((r[..., h:], r[..., :h]), dim=-1)
    return r.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def rotary_tables(pos_ids, inv_freq, scaling, layout):
    freqs = pos_ids[:, None].float() * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), -1) if layout == "half" else torch.repeat_interleave(freqs, 2, dim=-1)
    return (emb.cos() * scaling).to(F64), (emb.sin() * scaling).to(F64)


def rotation_forward(q, cos, sin, layout, float32_input):
    """``q_rot = q * cos + rotate(q) * sin`` on the first ``cos.shape[-1]`` channels; the rest pass."""
    if float32_input:  # Cohere rotates q.float()
        q = q.float().to(F64)
    d = cos.shape[-1]
    rot, rest = q[..., :d], q[..., d:]
    return torch.cat((rot * cos + rotate(rot, layout) * sin, rest), -1)


def lrp_rotation(q, cos, sin, r_out, layout, positional, float32_input):
    """Relevance of the rotation to q and (summed over heads) to cos and sin."""
    qin = q.float().to(F64) if float32_input else q
    d = cos.shape[-1]
    rot = qin[..., :d]
    t_cos, t_sin = rot * cos, rotate(rot, layout) * sin
    z = t_cos + t_sin
    r_cos_term = t_cos * safe_div(r_out[..., :d], z)
    r_sin_term = t_sin * safe_div(r_out[..., :d], z)
    share = 0.5 if positional else 1.0
    r_rot = share * r_cos_term + unrotate_relevance(share * r_sin_term, layout)
    r_qin = torch.cat((r_rot, r_out[..., d:]), -1)
    r_q = q * safe_div(r_qin, qin)  # the float32 cast (Cohere): a map with value ratio qin / q
    if not positional:
        return r_q, torch.zeros_like(cos)
    return r_q, (0.5 * r_cos_term).sum(0) + (0.5 * r_sin_term).sum(0)


# ---- the model's weights --------------------------------------------------------------------------------------


def _lin(m, rows=None):
    w = m.weight.detach().to(F64)
    b = None if m.bias is None else m.bias.detach().to(F64)
    if rows is not None:
        w = w[rows]
        b = None if b is None else b[rows]
    return w, b


def _norm(module) -> NormSpec:
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    weight = None if weight is None else weight.detach().to(F64)
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().to(F64)
    if name.endswith("RMSNorm"):
        return NormSpec("rms", weight, None, module.variance_epsilon)
    if name == "OlmoLayerNorm":
        return NormSpec("olmo", None, None, 1e-5)
    if name == "CohereLayerNorm":
        return NormSpec("cohere", weight, None, module.variance_epsilon)
    if isinstance(module, torch.nn.LayerNorm):
        return NormSpec("ln", weight, bias, module.eps)
    raise ValueError(f"no reference for {name}")


ACTS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _weights(model) -> dict:
    base, cfg = model.model, model.config
    model_type = cfg.model_type
    layers = []
    for layer in base.layers:
        att, mlp = layer.self_attn, layer.mlp
        hd = att.head_dim
        n_q, n_kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        lw = {"head_dim": hd, "scaling": att.scaling, "use_rope": bool(getattr(att, "use_rope", True))}
        if hasattr(att, "qkv_proj"):  # Phi-3
            lw["q"] = _lin(att.qkv_proj, slice(0, n_q))
            lw["k"] = _lin(att.qkv_proj, slice(n_q, n_q + n_kv))
            lw["v"] = _lin(att.qkv_proj, slice(n_q + n_kv, None))
        else:
            lw["q"], lw["k"], lw["v"] = _lin(att.q_proj), _lin(att.k_proj), _lin(att.v_proj)
        lw["o"] = _lin(att.o_proj)
        has_qk_norm = hasattr(att, "q_norm") and getattr(att, "use_qk_norm", True)
        lw["q_norm"] = _norm(att.q_norm) if has_qk_norm else None
        lw["k_norm"] = _norm(att.k_norm) if has_qk_norm else None
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: the first half is the gate
            inter = mlp.gate_up_proj.out_features // 2
            lw["gate"], lw["up"] = (
                _lin(mlp.gate_up_proj, slice(0, inter)),
                _lin(mlp.gate_up_proj, slice(inter, None)),
            )
            lw["down"] = _lin(mlp.down_proj)
        elif hasattr(mlp, "c_fc"):  # StarCoder2: ungated
            lw["gate"], lw["up"], lw["down"] = _lin(mlp.c_fc), None, _lin(mlp.c_proj)
        else:
            lw["gate"], lw["up"], lw["down"] = _lin(mlp.gate_proj), _lin(mlp.up_proj), _lin(mlp.down_proj)
        for key in ("input_layernorm", "post_attention_layernorm", "post_feedforward_layernorm"):
            lw[key] = _norm(getattr(layer, key)) if hasattr(layer, key) else None
        layers.append(lw)
    block = {"olmo2": "post", "cohere": "parallel"}.get(model_type, "pre")
    return {
        "block": block,
        "embed": base.embed_tokens.weight.detach().to(F64),
        "layers": layers,
        "norm": _norm(base.norm),
        "lm_head": _lin(model.lm_head),
        "n_heads": cfg.num_attention_heads,
        "n_kv": cfg.num_key_value_heads,
        "act": ACTS[cfg.hidden_act],
        "inv_freq": base.rotary_emb.inv_freq.detach(),
        "attention_scaling": float(base.rotary_emb.attention_scaling),
        "qk_norm_flat": model_type == "olmo2",
        "layout": "interleaved" if model_type == "cohere" else "half",
        "rotate_float32": model_type == "cohere",
        "embedding_multiplier": float(getattr(cfg, "embedding_multiplier", 1.0)),
        "residual_multiplier": float(getattr(cfg, "residual_multiplier", 1.0)),
        "logit_factor": 1.0
        / float(getattr(cfg, "logits_scaling", 1.0))
        * float(getattr(cfg, "logit_scale", 1.0)),
        "clip": getattr(cfg, "clip_qkv", None),
    }


# ---- one row ------------------------------------------------------------------------------------------------


def _heads(x, n, hd):
    return x.view(x.shape[0], n, hd).transpose(0, 1)


def _flat(r):
    return r.transpose(0, 1).reshape(r.shape[1], -1)


def _attention_forward(w, lw, n, cos, sin, allowed):
    seq, hd = n.shape[0], lw["head_dim"]
    a = {"n": n}
    q, k, v = linear(n, lw["q"]), linear(n, lw["k"]), linear(n, lw["v"])
    a["q_lin"], a["k_lin"], a["v_lin"] = q, k, v
    if w["clip"] is not None:
        c = w["clip"]
        q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
    a["q_pre"], a["k_pre"] = q, k  # before the q / k norm
    if lw["q_norm"] is not None:
        if w["qk_norm_flat"]:  # OLMo 2: over the whole projection
            (q, a["sq"]), (k, a["sk"]) = norm_forward(q, lw["q_norm"]), norm_forward(k, lw["k_norm"])
        else:  # per head (Qwen3 [hd], Cohere [heads, hd])
            qh, kh = q.view(seq, w["n_heads"], hd), k.view(seq, w["n_kv"], hd)
            (qn, a["sq"]), (kn, a["sk"]) = norm_forward(qh, lw["q_norm"]), norm_forward(kh, lw["k_norm"])
            q, k = qn.reshape(seq, -1), kn.reshape(seq, -1)
    a["qn"], a["kn"] = q, k
    a["q"], a["k"], a["v"] = _heads(q, w["n_heads"], hd), _heads(k, w["n_kv"], hd), _heads(v, w["n_kv"], hd)
    if lw["use_rope"]:
        a["qr"] = rotation_forward(a["q"], cos, sin, w["layout"], w["rotate_float32"])
        a["kr"] = rotation_forward(a["k"], cos, sin, w["layout"], w["rotate_float32"])
    else:
        a["qr"], a["kr"] = a["q"], a["k"]
    group = w["n_heads"] // w["n_kv"]
    kr, vh = a["kr"].repeat_interleave(group, 0), a["v"].repeat_interleave(group, 0)
    scores = lw["scaling"] * (a["qr"] @ kr.transpose(1, 2))
    probs = torch.nan_to_num(torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1), nan=0.0)
    a["S"], a["A"] = scores, probs
    a["o"] = probs @ vh
    a["o_flat"] = _flat(a["o"])
    a["out"] = linear(a["o_flat"], lw["o"])
    return a


def _attention_relevance(w, lw, a, cos, sin, allowed, r_out, attnlrp, positional):
    """Relevance of the attention output to its input ``n`` and (per position) to cos / sin."""
    seq, hd = a["n"].shape[0], lw["head_dim"]
    n_heads, n_kv = w["n_heads"], w["n_kv"]
    group = n_heads // n_kv
    r_o = _heads(lrp_linear(a["o_flat"], lw["o"], r_out), n_heads, hd)
    vh = a["v"].repeat_interleave(group, 0)
    frac = a["A"][..., None] * vh[:, None, :, :] * safe_div(r_o, a["o"])[:, :, None, :]
    a_share, v_share = (0.5, 0.5) if attnlrp else (0.0, 1.0)
    r_probs = a_share * frac.sum(-1)
    r_v = (v_share * frac.sum(1)).view(n_kv, group, seq, hd).sum(1)
    r_q, r_k = torch.zeros_like(a["q"]), torch.zeros_like(a["k"])
    position = torch.zeros(seq, dtype=F64)
    if attnlrp:
        s, p = a["S"], a["A"]
        r_s = torch.where(allowed, s * (r_probs - p * r_probs.sum(-1, keepdim=True)), torch.zeros_like(s))
        kr = a["kr"].repeat_interleave(group, 0)
        terms = lw["scaling"] * a["qr"][:, :, None, :] * kr[:, None, :, :]
        frac = terms * safe_div(r_s, s)[..., None]
        r_qr = 0.5 * frac.sum(2)
        r_kr = (0.5 * frac.sum(1)).view(n_kv, group, seq, hd).sum(1)
        if lw["use_rope"]:
            args = (w["layout"], positional, w["rotate_float32"])
            r_q, pos_q = lrp_rotation(a["q"], cos, sin, r_qr, *args)
            r_k, pos_k = lrp_rotation(a["k"], cos, sin, r_kr, *args)
            position = (pos_q + pos_k).sum(-1)
        else:
            r_q, r_k = r_qr, r_kr
    r_qn, r_kn, r_vl = _flat(r_q), _flat(r_k), _flat(r_v)
    if lw["q_norm"] is not None:
        if w["qk_norm_flat"]:
            r_qn = lrp_norm(a["q_pre"], a["qn"], a["sq"], lw["q_norm"], r_qn)
            r_kn = lrp_norm(a["k_pre"], a["kn"], a["sk"], lw["k_norm"], r_kn)
        else:
            qh, kh = a["q_pre"].view(seq, n_heads, hd), a["k_pre"].view(seq, n_kv, hd)
            qn, kn = a["qn"].view(seq, n_heads, hd), a["kn"].view(seq, n_kv, hd)
            r_qn = lrp_norm(qh, qn, a["sq"], lw["q_norm"], r_qn.view(seq, n_heads, hd)).reshape(seq, -1)
            r_kn = lrp_norm(kh, kn, a["sk"], lw["k_norm"], r_kn.view(seq, n_kv, hd)).reshape(seq, -1)
    # the clip is an element-wise activation: identity rule, R_x = R_y
    r_n = (
        lrp_linear(a["n"], lw["q"], r_qn)
        + lrp_linear(a["n"], lw["k"], r_kn)
        + lrp_linear(a["n"], lw["v"], r_vl)
    )
    return r_n, position


def _mlp_forward(w, lw, n):
    m = {"n": n, "gate": linear(n, lw["gate"])}
    m["act"] = w["act"](m["gate"])
    m["up"] = None if lw["up"] is None else linear(n, lw["up"])
    m["prod"] = m["act"] if m["up"] is None else m["act"] * m["up"]
    m["out"] = linear(m["prod"], lw["down"])
    return m


def _mlp_relevance(lw, m, r_out, attnlrp):
    r_prod = lrp_linear(m["prod"], lw["down"], r_out)
    if m["up"] is None:
        return lrp_linear(m["n"], lw["gate"], r_prod)  # identity rule on the activation
    r_act, r_up = (0.5 * r_prod, 0.5 * r_prod) if attnlrp else (torch.zeros_like(r_prod), r_prod)
    return lrp_linear(m["n"], lw["gate"], r_act) + lrp_linear(m["n"], lw["up"], r_up)


def _explain_row(w, ids, mask, position, target, mode, positional):
    seq = ids.shape[0]
    attnlrp = mode == "attnlrp"
    pos_ids = (mask.long().cumsum(0) - 1).clamp(min=0) * mask.long()
    allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool)) & mask.bool()[None, :]
    cos, sin = rotary_tables(pos_ids, w["inv_freq"], w["attention_scaling"], w["layout"])
    rm = w["residual_multiplier"]

    # ---- forward
    e = w["embed"][ids]
    x = e * w["embedding_multiplier"]
    acts = []
    for lw in w["layers"]:
        s = {"x": x}
        if w["block"] == "pre":
            s["n1"], s["s1"] = norm_forward(x, lw["input_layernorm"])
            s["att"] = _attention_forward(w, lw, s["n1"], cos, sin, allowed)
            s["x1"] = x + rm * s["att"]["out"]
            s["n2"], s["s2"] = norm_forward(s["x1"], lw["post_attention_layernorm"])
            s["mlp"] = _mlp_forward(w, lw, s["n2"])
            x = s["x1"] + rm * s["mlp"]["out"]
        elif w["block"] == "post":
            s["att"] = _attention_forward(w, lw, x, cos, sin, allowed)
            s["pa"], s["spa"] = norm_forward(s["att"]["out"], lw["post_attention_layernorm"])
            s["x1"] = x + s["pa"]
            s["mlp"] = _mlp_forward(w, lw, s["x1"])
            s["pf"], s["spf"] = norm_forward(s["mlp"]["out"], lw["post_feedforward_layernorm"])
            x = s["x1"] + s["pf"]
        else:  # parallel
            s["n1"], s["s1"] = norm_forward(x, lw["input_layernorm"])
            s["att"] = _attention_forward(w, lw, s["n1"], cos, sin, allowed)
            s["mlp"] = _mlp_forward(w, lw, s["n1"])
            x = x + s["att"]["out"] + s["mlp"]["out"]
        s["x2"] = x
        acts.append(s)
    nf, sf = norm_forward(x, w["norm"])
    z = linear(nf[position : position + 1], w["lm_head"])[0]
    logits = z * w["logit_factor"]
    tgt = int(logits.argmax()) if target is None else int(target)

    # ---- relevance sweep
    r_z = torch.zeros_like(z)
    r_z[tgt] = logits[tgt]  # constant scaling of the logit: R_z = R_logit
    r_nf = torch.zeros_like(nf)
    r_nf[position] = lrp_linear(nf[position : position + 1], w["lm_head"], r_z[None])[0]
    r_x = lrp_norm(x, nf, sf, w["norm"], r_nf)
    by_layer = torch.zeros(len(acts), seq, dtype=F64)
    for li in reversed(range(len(acts))):
        s, lw = acts[li], w["layers"][li]
        att, mlp = s["att"], s["mlp"]
        if w["block"] == "pre":
            r_x1 = s["x1"] * safe_div(r_x, s["x2"])
            r_mlp = rm * mlp["out"] * safe_div(r_x, s["x2"])  # then R through the constant rm unchanged
            r_x1 = r_x1 + lrp_norm(
                s["x1"],
                s["n2"],
                s["s2"],
                lw["post_attention_layernorm"],
                _mlp_relevance(lw, mlp, r_mlp, attnlrp),
            )
            r_xin = s["x"] * safe_div(r_x1, s["x1"])
            r_att = rm * att["out"] * safe_div(r_x1, s["x1"])
            r_n1, by_layer[li] = _attention_relevance(
                w, lw, att, cos, sin, allowed, r_att, attnlrp, positional
            )
            r_x = r_xin + lrp_norm(s["x"], s["n1"], s["s1"], lw["input_layernorm"], r_n1)
        elif w["block"] == "post":
            r_x1 = s["x1"] * safe_div(r_x, s["x2"])
            r_pf = s["pf"] * safe_div(r_x, s["x2"])
            r_mo = lrp_norm(mlp["out"], s["pf"], s["spf"], lw["post_feedforward_layernorm"], r_pf)
            r_x1 = r_x1 + _mlp_relevance(lw, mlp, r_mo, attnlrp)
            r_xin = s["x"] * safe_div(r_x1, s["x1"])
            r_pa = s["pa"] * safe_div(r_x1, s["x1"])
            r_ao = lrp_norm(att["out"], s["pa"], s["spa"], lw["post_attention_layernorm"], r_pa)
            r_n, by_layer[li] = _attention_relevance(w, lw, att, cos, sin, allowed, r_ao, attnlrp, positional)
            r_x = r_xin + r_n
        else:
            ratio = safe_div(r_x, s["x2"])
            r_xin = s["x"] * ratio
            r_n1, by_layer[li] = _attention_relevance(
                w, lw, att, cos, sin, allowed, att["out"] * ratio, attnlrp, positional
            )
            r_n1 = r_n1 + _mlp_relevance(lw, mlp, mlp["out"] * ratio, attnlrp)
            r_x = r_xin + lrp_norm(s["x"], s["n1"], s["s1"], lw["input_layernorm"], r_n1)
    # h_0 = embedding_multiplier * e: constant scaling, R_e = R_h0
    return r_x.sum(-1), by_layer, logits[tgt], tgt


@torch.no_grad()
def reference_family_lrp(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    target: torch.Tensor | None = None,
    mode: str = "attnlrp",
    positional: bool = True,
) -> ReferenceMaps:
    """Explicit PE-LRP of a ``*ForCausalLM`` of the families above, explaining each row's last real token."""
    w = _weights(model)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    tokens, by_layer, logits, targets = [], [], [], []
    for b in range(input_ids.shape[0]):
        mask = attention_mask[b]
        pos = int(mask.nonzero().max())
        tgt = None if target is None else int(target[b])
        tok, pbl, logit, t = _explain_row(w, input_ids[b], mask, pos, tgt, mode, positional)
        tokens.append(tok)
        by_layer.append(pbl)
        logits.append(logit)
        targets.append(t)
    return ReferenceMaps(
        token=torch.stack(tokens),
        position_by_layer=torch.stack(by_layer),
        logit=torch.stack(logits),
        target=torch.tensor(targets),
    )
