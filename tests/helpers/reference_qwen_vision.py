"""A slow, explicit float64 LRP of the Qwen2-VL / Qwen2.5-VL vision tower, to check the fast path.

Plain tensor math on the tower's weights (no autograd, no hooks, no hf_pelrp code), in the image processor's
patch order throughout: where the model splits q / k / v per image (Qwen2-VL, Qwen2.5-VL's full-attention
blocks) or per window of 2 x 2 merge units (Qwen2.5-VL, on patches it reorders with ``window_index``), the
reference attends over all patches with an explicit mask ``allowed[i, j]`` (same image / same window, worked out
from each patch's grid coordinates by loops), so the reordering and the chunking of the model are not reused.

The rules (method.md, eps -> 0, ``0 / 0 := 0``):

- patch embedding: the Conv3d whose kernel is the whole patch is a bias-free linear map; its output is the
  ``image_token`` leaf (relevance summed per patch);
- linear maps (epsilon rule), residual sums (epsilon rule over the terms), LayerNorm / RMSNorm (identity rule:
  the normalising scale is a constant), activations (identity rule), the gated product ``act(gate) * up`` of
  Qwen2.5-VL (uniform rule: 1/2 each under AttnLRP, all to ``up`` under CP-LRP);
- attention: ``A V`` (AttnLRP: epsilon + uniform, 1/2 to A and to v; CP: all to v), softmax (``R_S = S (R_A - A
  sum_j R_A)``), ``S = scaling q k^T`` (1/2 to q and to k per term), the 2-D rotation ``q_rot = q cos +
  rotate_half(q) sin`` (epsilon over the two terms, uniform 1/2 in each product: half to q, half to cos / sin).
  The rotation is computed in float32 as the model computes it (its ``apply_rotary_pos_emb_vision``), so the
  model's own rounding is not counted as a disagreement;
- the patch merger: its norm, the view of 4 consecutive patches (one merge unit) as one row, Linear-GELU-Linear.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from helpers.reference_lrp import F64, lrp_linear, rotate_half, safe_div, unrotate_relevance


@dataclass
class VisionReference:
    """``token`` [patches] (the processor's order), ``position_by_block`` [blocks, patches]."""

    token: torch.Tensor
    position_by_block: torch.Tensor


def processor_coordinates(h: int, w: int, merge: int) -> list[tuple[int, int]]:
    """(row, column) of each patch of one image in the processor's order: merge units in raster order, the
    ``merge x merge`` patches of a unit in raster order inside it."""
    out = []
    for bh, bw in itertools.product(range(h // merge), range(w // merge)):
        for dh, dw in itertools.product(range(merge), range(merge)):
            out.append((bh * merge + dh, bw * merge + dw))
    return out


def _allowed(images: int, coords: list[tuple[int, int]], window: int | None) -> torch.Tensor:
    """Which patch attends to which: same image, and (window blocks) the same window of merge units."""
    per = len(coords)
    n = images * per
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i, j in itertools.product(range(n), range(n)):
        if i // per != j // per:
            continue
        if window is None:
            allowed[i, j] = True
            continue
        (hi, wi), (hj, wj) = coords[i % per], coords[j % per]
        allowed[i, j] = (hi // window, wi // window) == (hj // window, wj // window)
    return allowed


def _layer_norm(x, module):
    mean = x.mean(-1, keepdim=True)
    std = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + module.eps)
    return (x - mean) / std * module.weight + module.bias, module.weight / std


def _lrp_layer_norm(x, y, scale, r_y):
    c = safe_div(r_y, y) * scale
    return x * (c - c.mean(-1, keepdim=True))


def _rms_norm(x, module):
    x32 = x.float()
    y = module.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(
        F64
    )
    return y, module.weight * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)


def _lrp_rms_norm(x, y, scale, r_y):
    return x * scale * safe_div(r_y, y)


def _norm(x, module):
    return _layer_norm(x, module) if isinstance(module, torch.nn.LayerNorm) else _rms_norm(x, module)


def _lrp_norm(x, y, scale, r_y, module):
    if isinstance(module, torch.nn.LayerNorm):
        return _lrp_layer_norm(x, y, scale, r_y)
    return _lrp_rms_norm(x, y, scale, r_y)


def _lin(module):
    return module.weight.detach().to(F64), None if module.bias is None else module.bias.detach().to(F64)


def _apply(module, x):
    w, b = _lin(module)
    return x @ w.T + (0 if b is None else b)


def _lrp_apply(module, x, r):
    w, b = _lin(module)
    return lrp_linear(x, w, b, r)


def _rotary(coords, images, inv_freq):
    """cos / sin [patches, head_dim] from each patch's (row, column), computed in float32 as the model does."""
    pos = torch.tensor(coords * images, dtype=torch.float32)  # [patches, 2]
    freqs = pos[..., None] * inv_freq.float()  # [patches, 2, f]
    hw = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
    emb = torch.cat([hw, hw], dim=-1)
    return emb.cos(), emb.sin()


def _attention_block(att, x, cos, sin, allowed, r_out, mode):
    """Forward of one vision attention (float64, the rotation in float32) and the relevance of its input x,
    and of cos / sin (each [patches, head_dim], q and k sides and all heads together)."""
    n = x.shape[0]
    heads = att.num_heads
    qkv = _apply(att.qkv, x).reshape(n, 3, heads, -1)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [n, H, d]
    c, s = cos[:, None, :], sin[:, None, :]
    qr = (q.float() * c + rotate_half(q.float()) * s).to(F64)
    kr = (k.float() * c + rotate_half(k.float()) * s).to(F64)
    scores = torch.einsum("ihd,jhd->hij", qr, kr) * att.scaling
    masked = scores.masked_fill(~allowed, float("-inf"))
    probs = masked.softmax(-1)
    o = torch.einsum("hij,jhd->ihd", probs, v)
    out = _apply(att.proj, o.reshape(n, -1))
    # backward
    r_o = _lrp_apply(att.proj, o.reshape(n, -1), r_out).reshape(n, heads, -1)
    ratio = safe_div(r_o, o)  # [i, h, d]
    terms = torch.einsum("hij,jhd,ihd->hijd", probs, v, ratio)
    share = 0.5 if mode == "attnlrp" else 1.0
    r_v = share * terms.sum(1).permute(1, 0, 2)  # [j, h, d]
    if mode == "attnlrp":
        r_a = 0.5 * terms.sum(-1)  # [h, i, j]
        r_s = torch.where(allowed, scores * (r_a - probs * r_a.sum(-1, keepdim=True)), 0.0)
        ratio_s = safe_div(r_s, scores)
        prod = torch.einsum("ihd,jhd->hijd", qr, kr) * att.scaling
        r_qr = 0.5 * torch.einsum("hijd,hij->ihd", prod, ratio_s)
        r_kr = 0.5 * torch.einsum("hijd,hij->jhd", prod, ratio_s)
    else:
        r_qr = torch.zeros_like(qr)
        r_kr = torch.zeros_like(kr)
    r_q, rc_q, rs_q = _lrp_rotation(q, c.to(F64), s.to(F64), qr, r_qr)
    r_k, rc_k, rs_k = _lrp_rotation(k, c.to(F64), s.to(F64), kr, r_kr)
    r_qkv = torch.stack([r_q, r_k, r_v], dim=1).reshape(n, -1)
    r_x = _lrp_apply(att.qkv, x, r_qkv)
    return out, r_x, rc_q + rc_k + rs_q + rs_k


def _lrp_rotation(q, cos, sin, q_rot, r_rot):
    """Epsilon rule over ``q cos`` and ``rotate_half(q) sin``, uniform 1/2 inside each product. Returns R_q
    [n, H, d] and the relevance of cos and of sin, each summed over the heads and channels: [n]."""
    t_cos = q * cos
    t_sin = rotate_half(q) * sin
    r_cos = t_cos * safe_div(r_rot, q_rot)
    r_sin = t_sin * safe_div(r_rot, q_rot)
    r_q = 0.5 * r_cos + unrotate_relevance(0.5 * r_sin)
    return r_q, 0.5 * r_cos.sum((1, 2)), 0.5 * r_sin.sum((1, 2))


def _mlp(mlp, x, mode):
    """Forward and a relevance function of the vision MLP (fc1-act-fc2, or Qwen2.5-VL's gated one)."""
    if hasattr(mlp, "fc1"):
        h = _apply(mlp.fc1, x)
        a = mlp.act(h)
        y = _apply(mlp.fc2, a)

        def back(r_y):
            return _lrp_apply(mlp.fc1, x, _lrp_apply(mlp.fc2, a, r_y))  # identity rule at the activation

        return y, back
    g = _apply(mlp.gate_proj, x)
    a = mlp.act_fn(g)
    u = _apply(mlp.up_proj, x)
    p = a * u
    y = _apply(mlp.down_proj, p)

    def back(r_y):
        r_p = _lrp_apply(mlp.down_proj, p, r_y)
        r_a, r_u = (0.5 * r_p, 0.5 * r_p) if mode == "attnlrp" else (torch.zeros_like(r_p), r_p)
        return _lrp_apply(mlp.gate_proj, x, r_a) + _lrp_apply(mlp.up_proj, x, r_u)

    return y, back


@torch.no_grad()
def qwen_vision_reference(
    model, pixels: torch.Tensor, grid: tuple[int, int], images: int, r_merged: torch.Tensor, mode: str
) -> VisionReference:
    """Relevance of each patch's embedding and of each block's rotary leaves, from the relevance ``r_merged``
    [images * merge units, out hidden] reaching the merger's output (raster order of merge units)."""
    vis = model.model.visual
    cfg = vis.config
    merge = cfg.spatial_merge_size
    h, w = grid
    coords = processor_coordinates(h, w, merge)
    patches = pixels.reshape(images * h * w, -1).to(F64)
    weight = vis.patch_embed.proj.weight.detach().to(F64)
    x = patches @ weight.reshape(weight.shape[0], -1).T  # [n, E]: the Conv3d over one whole patch
    cos, sin = _rotary(coords, images, vis.rotary_pos_emb.inv_freq)
    full = _allowed(images, coords, None)
    windowed = None
    if hasattr(cfg, "window_size"):
        windowed = _allowed(images, coords, cfg.window_size // cfg.patch_size)
    saved = []
    for index, block in enumerate(vis.blocks):
        full_block = windowed is None or index in cfg.fullatt_block_indexes
        allowed = full if full_block else windowed
        n1, s1 = _norm(x, block.norm1)
        # the attention output only: its relevance is computed below from the output's relevance
        att_out, _, _ = _attention_block(block.attn, n1, cos, sin, allowed, torch.zeros_like(n1), mode)
        x1 = x + att_out
        n2, s2 = _norm(x1, block.norm2)
        m, back = _mlp(block.mlp, n2, mode)
        x2 = x1 + m
        saved.append((x, n1, s1, allowed, att_out, x1, n2, s2, m, back, x2))
        x = x2
    ln = vis.merger.ln_q
    nq, sq = _norm(x, ln)
    rows = nq.reshape(-1, vis.merger.hidden_size)
    fc1, act, fc2 = vis.merger.mlp
    hid = _apply(fc1, rows)
    a = act(hid)
    # backward
    r_rows = _lrp_apply(fc1, rows, _lrp_apply(fc2, a, r_merged.to(F64)))
    r_x = _lrp_norm(x, nq, sq, r_rows.reshape(nq.shape), ln)
    position = torch.zeros(len(vis.blocks), x.shape[0], dtype=F64)
    for index in reversed(range(len(vis.blocks))):
        block = vis.blocks[index]
        xb, n1, s1, allowed, att_out, x1, n2, s2, m, back, x2 = saved[index]
        r_x1 = x1 * safe_div(r_x, x2)
        r_x1 = r_x1 + _lrp_norm(x1, n2, s2, back(m * safe_div(r_x, x2)), block.norm2)
        r_att = att_out * safe_div(r_x1, x1)
        _, r_n1, r_pos = _attention_block(block.attn, n1, cos, sin, allowed, r_att, mode)
        position[index] = r_pos
        r_x = xb * safe_div(r_x1, x1) + _lrp_norm(xb, n1, s1, r_n1, block.norm1)
    return VisionReference(r_x.sum(-1), position)
