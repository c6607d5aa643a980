"""A slow, explicit PE-LRP of a LLaVA (CLIP vision tower, LLaVA's MLP projector, LLaMA decoder) in float64.

Plain tensor math on the weights, no autograd and no hf_pelrp code (as :mod:`reference_lrp` and
:mod:`reference_absolute`, whose rule formulas it reuses):

- the decoder is :func:`reference_lrp._explain_row` with the image features written into the placeholder
  rows of the input embeddings, returning the relevance of every input embedding channel;
- the projector ``z2 = gelu(x W1^T + b1) W2^T + b2``: epsilon rule on both linear maps, identity rule on GELU;
- the CLIP tower, from the hidden state LLaVA reads (``vision_feature_layer``, class token dropped by the
  ``"default"`` strategy) down to its embedding sum ``e = [CLS, conv(patches)] + positions``: LayerNorms by the
  identity rule, attention by :func:`reference_absolute.lrp_attention` (AttnLRP or CP), QuickGELU by the
  identity rule, residual sums and the embedding sum by the epsilon rule. The layers after the one LLaVA reads
  get no relevance.

``image`` [P] is the patch content relevance, ``image_position`` [P] the relevance of the patches' rows of the
position table, ``image_special`` the class token's content and position.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from helpers.reference_absolute import (
    _apply,
    _flat,
    _heads,
    _lin,
    attention_forward,
    layer_norm,
    lrp_attention,
    lrp_layer_norm,
    lrp_linear,
    split_sum,
)
from helpers.reference_lrp import F64, _explain_row, _weights, safe_div


@dataclass
class VlmReference:
    token: torch.Tensor
    position: torch.Tensor
    image: torch.Tensor
    image_position: torch.Tensor
    image_special: torch.Tensor
    logit: torch.Tensor
    target: torch.Tensor


class ReferenceRows:
    """The maps of a VLM reference, one row at a time, stacked into a :class:`VlmReference` at the end."""

    def __init__(self) -> None:
        self.rows: dict[str, list[torch.Tensor]] = {name: [] for name in VlmReference.__dataclass_fields__}

    def add(self, token, holders, by_layer, image, image_position, special, logit, target) -> None:
        """One prompt row; the placeholders' own embeddings were overwritten: their token relevance is 0."""
        token = token.clone()
        token[holders] = 0.0
        values = (token, by_layer.sum(0), image.reshape(-1), image_position.reshape(-1), special, logit)
        for name, value in zip(
            VlmReference.__dataclass_fields__, (*values, torch.tensor(target)), strict=True
        ):
            self.rows[name].append(value)

    def add_tower(self, token, holders, by_layer, r_t, r_p, logit, target) -> None:
        """One prompt row from a tower with a class token at slot 0: the patches' token and position relevance
        (``r_t``, ``r_p`` [1 + patches, d]) become the image maps, the class token's both its special share."""
        self.add(
            token,
            holders,
            by_layer,
            r_t[1:].sum(-1),
            r_p[1:].sum(-1),
            r_t[0].sum() + r_p[0].sum(),
            logit,
            target,
        )

    def result(self) -> VlmReference:
        return VlmReference(**{k: torch.stack(v) for k, v in self.rows.items()})


def blocks_forward(layers, x: torch.Tensor, allowed: torch.Tensor):
    """CLIP / SigLIP encoder blocks (pre-LayerNorm attention and MLP with residuals), keeping every activation;
    returns the output and the activations of each block."""
    acts = []
    for layer in layers:
        att, mlp = layer.self_attn, layer.mlp
        a = {"x": x}
        a["h1"], a["wa"], a["sa"] = layer_norm(x, layer.layer_norm1)
        a["q"], a["k"], a["v"] = (
            _heads(_apply(_lin(m), a["h1"]), att.num_heads) for m in (att.q_proj, att.k_proj, att.v_proj)
        )
        a["S"], a["A"], a["o"] = attention_forward(a["q"], a["k"], a["v"], att.scale, allowed)
        a["o_flat"] = _flat(a["o"])
        a["d"] = _apply(_lin(att.out_proj), a["o_flat"])
        a["x1"] = x + a["d"]
        a["h2"], a["wb"], a["sb"] = layer_norm(a["x1"], layer.layer_norm2)
        a["f"] = _apply(_lin(mlp.fc1), a["h2"])
        a["g"] = mlp.activation_fn(a["f"])
        a["m"] = _apply(_lin(mlp.fc2), a["g"])
        x = a["x1"] + a["m"]
        a["y"] = x
        acts.append(a)
    return x, acts


def blocks_backward(layers, acts, allowed: torch.Tensor, r_x: torch.Tensor, mode: str) -> torch.Tensor:
    """The relevance at the blocks' input from ``r_x`` at their output: residual sums by the epsilon rule,
    LayerNorms and the MLP activation by the identity rule, attention by :func:`lrp_attention`."""
    for layer, a in zip(reversed(list(layers)), reversed(acts), strict=True):
        att, mlp = layer.self_attn, layer.mlp
        r_m, r_x1 = split_sum([a["m"], a["x1"]], r_x)
        r_g = lrp_linear(a["g"], *_lin(mlp.fc2), r_m)
        r_h2 = lrp_linear(a["h2"], *_lin(mlp.fc1), r_g)  # identity rule: R_f = R_g
        r_x1 = r_x1 + lrp_layer_norm(a["x1"], a["h2"], a["wb"], a["sb"], r_h2)
        r_d, r_xin = split_sum([a["d"], a["x"]], r_x1)
        r_o = _heads(lrp_linear(a["o_flat"], *_lin(att.out_proj), r_d), att.num_heads)
        r_q, r_k, r_v = lrp_attention(
            a["q"], a["k"], a["v"], att.scale, allowed, a["S"], a["A"], a["o"], r_o, mode
        )
        r_h1 = sum(
            lrp_linear(a["h1"], *_lin(m), _flat(r))
            for m, r in ((att.q_proj, r_q), (att.k_proj, r_k), (att.v_proj, r_v))
        )
        r_x = r_xin + lrp_layer_norm(a["x"], a["h1"], a["wa"], a["sa"], r_h1)
    return r_x


def _tower_forward(tower, pixels: torch.Tensor, upto: int):
    """CLIP (class token, ``pre_layrnorm``) or SigLIP (neither) up to the output of block ``upto - 1``."""
    emb = tower.embeddings
    conv = emb.patch_embedding
    bias = None if conv.bias is None else conv.bias.detach().to(F64)
    patches = torch.nn.functional.conv2d(
        pixels[None].to(F64), conv.weight.detach().to(F64), bias, stride=conv.stride
    )[0]
    patches = patches.flatten(1).T  # [P, D], raster order
    cls = getattr(emb, "class_embedding", None)
    t = patches if cls is None else torch.cat([cls.detach().to(F64)[None], patches])
    p = emb.position_embedding.weight.detach().to(F64)[: t.shape[0]]
    e = t + p
    pre = getattr(tower, "pre_layrnorm", None)
    if pre is None:
        x, w0, s0 = e, None, None
    else:
        x, w0, s0 = layer_norm(e, pre)
    stem = {"t": t, "p": p, "e": e, "x": x, "w": w0, "s": s0}
    seq = t.shape[0]
    allowed = torch.ones(1, seq, seq, dtype=torch.bool)
    _, acts = blocks_forward(list(tower.encoder.layers)[:upto], x, allowed)
    return stem, acts, allowed


def _tower_backward(tower, stem, acts, allowed, r_x, mode):
    r_x = blocks_backward(list(tower.encoder.layers)[: len(acts)], acts, allowed, r_x, mode)
    r_e = r_x if stem["w"] is None else lrp_layer_norm(stem["e"], stem["x"], stem["w"], stem["s"], r_x)
    return split_sum([stem["t"], stem["p"]], r_e)


@torch.no_grad()
def gemma3_image_reference(model, pixels: torch.Tensor, r_features: torch.Tensor, *, mode: str):
    """The image side of Gemma 3, explicitly: from the relevance ``r_features`` [M, D_text] of the projector's
    output (the image features written into the placeholders) down to the SigLIP tower's leaves.

    Projector: ``out = n W`` (epsilon rule), ``n = (1 + w) * s * pooled`` (RMSNorm, identity rule: ``s``
    constant; ``n`` as the model computes it, statistics in float32), ``pooled`` = the average of each ``k x k`` window of the patch grid (epsilon rule: each patch
    gets ``h / k^2 * R_pooled / pooled``); the tower's ``post_layernorm`` (identity rule), its blocks, the
    embedding sum ``e = patches + positions``. Returns (image [P], image_position [P]).
    """
    base = model.model
    tower, proj = base.vision_tower, base.multi_modal_projector
    stem, acts, allowed = _tower_forward(tower, pixels, len(tower.encoder.layers))
    y = acts[-1]["y"] if acts else stem["x"]
    h, wl, sl = layer_norm(y, tower.post_layernorm)
    side, k = proj.patches_per_image, proj.kernel_size
    grid = h.T.reshape(-1, side, side)  # [D, side, side]
    pooled = grid.unflatten(1, (side // k, k)).unflatten(3, (side // k, k)).mean((2, 4))  # [D, m, m]
    pooled = pooled.flatten(1).T  # [M, D]
    norm = proj.mm_soft_emb_norm
    # the norm as the model computes it (its statistics in float32), so that its rounding is not counted as a
    # disagreement; the identity rule is the epsilon rule of the element-wise map pooled -> n
    p32 = pooled.float()
    n = (p32 * torch.rsqrt(p32.pow(2).mean(-1, keepdim=True) + norm.eps) * (1.0 + norm.weight.float())).to(
        F64
    )
    weight = proj.mm_input_projection_weight.detach().to(F64)  # [D_v, D_t]
    r_n = lrp_linear(n, weight.T, None, r_features)
    r_pooled = pooled * safe_div(n, pooled) * safe_div(r_n, n)
    ratio = safe_div(r_pooled, pooled).T.reshape(-1, side // k, side // k)  # [D, m, m]
    ratio = ratio.repeat_interleave(k, 1).repeat_interleave(k, 2).flatten(1).T  # [P, D]: each patch's window
    r_h = h / (k * k) * ratio
    r_y = lrp_layer_norm(y, h, wl, sl, r_h)
    r_t, r_p = _tower_backward(tower, stem, acts, allowed, r_y, mode)
    return r_t.sum(-1), r_p.sum(-1)


@torch.no_grad()
def llava_reference(model, input_ids, attention_mask, pixel_values, *, mode: str) -> VlmReference:
    """Explicit PE-LRP of a ``LlavaForConditionalGeneration`` (one image per row, the last position's arg-max
    explained), with positions made leaves."""
    cfg = model.config
    if cfg.vision_feature_select_strategy != "default" or not isinstance(cfg.vision_feature_layer, int):
        raise ValueError("the reference implements the 'default' strategy with one feature layer")
    base = model.model
    tower, proj = base.vision_tower, base.multi_modal_projector
    text = _weights(SimpleNamespace(model=base.language_model, config=cfg.text_config, lm_head=model.lm_head))
    layers = len(tower.encoder.layers)
    upto = cfg.vision_feature_layer % (layers + 1)  # hidden_states[k] is the output of layer k - 1
    rows = ReferenceRows()
    for b in range(input_ids.shape[0]):
        ids, mask = input_ids[b], attention_mask[b]
        stem, acts, allowed = _tower_forward(tower, pixel_values[b], upto)
        feats = (acts[-1]["y"] if acts else stem["x"])[1:]
        z1 = _apply(_lin(proj.linear_1), feats)
        a1 = proj.act(z1)
        z2 = _apply(_lin(proj.linear_2), a1)
        slots = ids == cfg.image_token_id
        embeds = text["embed"][ids].clone()
        embeds[slots] = z2
        keep: dict = {}
        position = int(mask.nonzero().max())
        token, by_layer, logit, target, _, _ = _explain_row(
            text, ids, mask, position, None, mode, True, embeds=embeds, keep=keep
        )
        r_z2 = keep["r_x"][slots]
        r_a1 = lrp_linear(a1, *_lin(proj.linear_2), r_z2)
        r_feats = lrp_linear(feats, *_lin(proj.linear_1), r_a1)  # identity rule: R_z1 = R_a1
        r_hidden = torch.zeros_like(stem["x"])
        r_hidden[1:] = r_feats
        r_t, r_p = _tower_backward(tower, stem, acts, allowed, r_hidden, mode)
        rows.add_tower(token, slots, by_layer, r_t, r_p, logit, target)
    return rows.result()
