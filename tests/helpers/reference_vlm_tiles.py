"""Slow, explicit PE-LRP of the tiled vision-language models in float64: Idefics3 / SmolVLM and LLaVA-NeXT.

Plain tensor math on the weights, no autograd and no hf_pelrp code, with the rule formulas of
:mod:`reference_absolute` and the decoder sweep of :mod:`reference_lrp` (as :mod:`reference_vlm` for LLaVA):

- **Idefics3 / SmolVLM**, per real tile: ``e = conv(patches) + table[ids]`` with the position ids bucketed from
  the tile's real patch rows and columns (``floor(i * side / n)``; padded patches read row 0), encoder blocks
  without a pre-LayerNorm (LayerNorm by the identity rule, attention by :func:`lrp_attention` with the padded
  patches masked as keys, the MLP activation by the identity rule, residual sums and the embedding sum by the
  epsilon rule), the post-LayerNorm, the pixel shuffle (a permutation: relevance moves back with the values) and
  ``SimpleMLP`` (epsilon rule, no bias); the tiles' features fill the row's placeholders in order.
- **LLaVA-NeXT**, per tile: the CLIP tower and LLaVA's projector of :mod:`reference_vlm`; the packing written
  out: the base tile's patches, then the grid tiles as one ``(rows * h) x (cols * w)`` patch grid, cropped to
  the image's aspect ratio, each kept grid row followed by the ``image_newline`` vector. Relevance reaching a
  placeholder goes back to its patch of its tile, or (a newline) to ``image_special``.

Maps per row: ``image`` / ``image_position`` [n_tiles * P] (tile slots of ``pixel_values``, padding slots 0),
``image_special`` (LLaVA-NeXT: the class tokens of the tiles and the newlines; 0 for Idefics3).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from helpers.reference_absolute import (
    _apply,
    _lin,
    layer_norm,
    lrp_layer_norm,
    lrp_linear,
    split_sum,
)
from helpers.reference_lrp import F64, _explain_row, _weights
from helpers.reference_vlm import (
    ReferenceRows,
    _tower_backward,
    _tower_forward,
    blocks_backward,
    blocks_forward,
)

# ---- Idefics3 / SmolVLM -------------------------------------------------------------------------------------


def _bucketed_ids(real: torch.Tensor, side: int) -> torch.Tensor:
    """Position ids [h * w] of a tile whose real patches are ``real`` [h, w] (a top-left block)."""
    n_h, n_w = int(real[:, 0].sum()), int(real[0, :].sum())
    h, w = real.shape
    rows = torch.tensor([math.floor(i * side / n_h) for i in range(h)])
    cols = torch.tensor([math.floor(j * side / n_w) for j in range(w)])
    ids = (rows[:, None] * side + cols[None, :]).clamp(max=side * side - 1)
    return torch.where(real, ids, torch.zeros_like(ids)).reshape(-1)


def _siglip_blocks_forward(tower, x, allowed):
    return blocks_forward(tower.encoder.layers, x, allowed)


def _siglip_blocks_backward(tower, acts, allowed, r_x, mode):
    return blocks_backward(tower.encoder.layers, acts, allowed, r_x, mode)


def _shuffle_order(connector, seq: int) -> torch.Tensor:
    """The pixel shuffle as a permutation: entry k of the shuffled [seq / s^2, D s^2] (flattened, with D = 1)
    is entry ``order[k]`` of the input [seq]."""
    index = torch.arange(seq, dtype=F64).reshape(1, seq, 1)
    return connector.pixel_shuffle(index, connector.scale_factor).reshape(-1).long()


@torch.no_grad()
def idefics3_reference(model, input_ids, attention_mask, pixel_values, pixel_attention_mask, *, mode):
    """Explicit PE-LRP of an ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration`` (the
    last position's arg-max explained), with positions made leaves."""
    cfg = model.config
    base = model.model
    tower, connector = base.vision_model, base.connector
    emb = tower.embeddings
    patch = cfg.vision_config.patch_size
    side = cfg.vision_config.image_size // patch
    text = _weights(SimpleNamespace(model=base.text_model, config=cfg.text_config, lm_head=model.lm_head))
    table = emb.position_embedding.weight.detach().to(F64)
    conv = emb.patch_embedding
    w_proj = connector.modality_projection.proj.weight.detach().to(F64)
    rows = ReferenceRows()
    for b in range(input_ids.shape[0]):
        ids, mask = input_ids[b], attention_mask[b]
        slots = pixel_values.shape[1]
        tiles = []
        for s in range(slots):
            pixels = pixel_values[b, s].to(F64)
            if bool((pixels == 0).all()):
                continue  # a padding tile: the model drops it
            real = pixel_attention_mask[b, s].reshape(side, patch, side, patch).sum((1, 3)) > 0
            t = torch.nn.functional.conv2d(
                pixels[None], conv.weight.detach().to(F64), conv.bias.detach().to(F64), stride=patch
            )[0]
            t = t.flatten(1).T  # [P, D], raster order
            p = table[_bucketed_ids(real, side)]
            e = t + p
            allowed = real.reshape(1, 1, -1).expand(1, side * side, side * side)
            y, acts = _siglip_blocks_forward(tower, e, allowed)
            out, w_post, s_post = layer_norm(y, tower.post_layernorm)
            order = _shuffle_order(connector, side * side)
            shuffled = out[order.reshape(-1, connector.scale_factor**2)].flatten(1)
            feats = shuffled @ w_proj.T
            tiles.append(
                {
                    "slot": s,
                    "t": t,
                    "p": p,
                    "e": e,
                    "allowed": allowed,
                    "acts": acts,
                    "y": y,
                    "out": out,
                    "w_post": w_post,
                    "s_post": s_post,
                    "order": order,
                    "shuffled": shuffled,
                    "feats": feats,
                }
            )
        holders = ids == cfg.image_token_id
        embeds = text["embed"][ids].clone()
        embeds[holders] = torch.cat([tile["feats"] for tile in tiles])
        keep: dict = {}
        position = int(mask.nonzero().max())
        token, by_layer, logit, target, _, _ = _explain_row(
            text, ids, mask, position, None, mode, True, embeds=embeds, keep=keep
        )
        r_holders = keep["r_x"][holders].split([len(tile["feats"]) for tile in tiles])
        image = torch.zeros(slots, side * side, dtype=F64)
        image_position = torch.zeros(slots, side * side, dtype=F64)
        for tile, r_feats in zip(tiles, r_holders, strict=True):
            r_shuffled = lrp_linear(tile["shuffled"], w_proj, None, r_feats)
            r_out = torch.zeros_like(tile["out"])
            r_out[tile["order"].reshape(r_shuffled.shape[0], -1)] = r_shuffled.reshape(
                r_shuffled.shape[0], connector.scale_factor**2, -1
            )
            r_y = lrp_layer_norm(tile["y"], tile["out"], tile["w_post"], tile["s_post"], r_out)
            r_e = _siglip_blocks_backward(tower, tile["acts"], tile["allowed"], r_y, mode)
            r_t, r_p = split_sum([tile["t"], tile["p"]], r_e)
            image[tile["slot"]] = r_t.sum(-1)
            image_position[tile["slot"]] = r_p.sum(-1)
        rows.add(token, holders, by_layer, image, image_position, torch.zeros((), dtype=F64), logit, target)
    return rows.result()


# ---- LLaVA-NeXT -----------------------------------------------------------------------------------------------


def _best_grid(size, pinpoints, tile: int) -> tuple[int, int]:
    """LLaVA-NeXT's choice of resolution (the most effective pixels, then the least waste): (rows, cols)."""
    height, width = (int(v) for v in size)
    best, best_key = None, None
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(w * h - effective))
        if best_key is None or key > best_key:
            best, best_key = (h, w), key
    return best[0] // tile, best[1] // tile


def _kept(size, grid_h: int, grid_w: int) -> tuple[range, range]:
    """The rows and columns of the (grid_h x grid_w) patch grid kept by the crop to the image's aspect ratio."""
    height, width = (int(v) for v in size)
    if width / height > grid_w / grid_h:
        new = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new) // 2
        return range(pad, grid_h - pad), range(grid_w)
    new = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new) // 2
    return range(grid_h), range(pad, grid_w - pad)


@torch.no_grad()
def llava_next_reference(model, input_ids, attention_mask, pixel_values, image_sizes, *, mode):
    """Explicit PE-LRP of a ``LlavaNextForConditionalGeneration`` (one image per row, the last position's
    arg-max explained, ``vision_feature_select_strategy="default"``), with positions made leaves."""
    cfg = model.config
    base = model.model
    tower, proj = base.vision_tower, base.multi_modal_projector
    text = _weights(SimpleNamespace(model=base.language_model, config=cfg.text_config, lm_head=model.lm_head))
    layers = len(tower.encoder.layers)
    upto = cfg.vision_feature_layer % (layers + 1)
    size = cfg.vision_config.image_size
    side = size // cfg.vision_config.patch_size
    newline = base.image_newline.detach().to(F64)
    rows = ReferenceRows()
    for b in range(input_ids.shape[0]):
        ids, mask = input_ids[b], attention_mask[b]
        tiles_h, tiles_w = _best_grid(image_sizes[b], cfg.image_grid_pinpoints, size)
        tiles = []
        for s in range(1 + tiles_h * tiles_w):
            stem, acts, allowed = _tower_forward(tower, pixel_values[b, s], upto)
            feats = (acts[-1]["y"] if acts else stem["x"])[1:]
            z1 = _apply(_lin(proj.linear_1), feats)
            a1 = proj.act(z1)
            z2 = _apply(_lin(proj.linear_2), a1)
            tiles.append({"stem": stem, "acts": acts, "allowed": allowed, "feats": feats, "a1": a1, "z2": z2})
        # the packed sequence: (tile, patch) per placeholder, or None for a newline
        sequence = [(0, k) for k in range(side * side)]
        keep_rows, keep_cols = _kept(image_sizes[b], tiles_h * side, tiles_w * side)
        for r in keep_rows:
            for c in keep_cols:
                tile = 1 + (r // side) * tiles_w + c // side
                sequence.append((tile, (r % side) * side + c % side))
            sequence.append(None)
        holders = ids == cfg.image_token_id
        embeds = text["embed"][ids].clone()
        embeds[holders] = torch.stack([newline if s is None else tiles[s[0]]["z2"][s[1]] for s in sequence])
        keep: dict = {}
        position = int(mask.nonzero().max())
        token, by_layer, logit, target, _, _ = _explain_row(
            text, ids, mask, position, None, mode, True, embeds=embeds, keep=keep
        )
        r_z2 = [torch.zeros_like(tile["z2"]) for tile in tiles]
        special = torch.zeros((), dtype=F64)
        for where, r in zip(sequence, keep["r_x"][holders], strict=True):
            if where is None:
                special = special + r.sum()
            else:
                r_z2[where[0]][where[1]] += r
        slots = pixel_values.shape[1]
        image = torch.zeros(slots, side * side, dtype=F64)
        image_position = torch.zeros(slots, side * side, dtype=F64)
        for s, tile in enumerate(tiles):
            r_a1 = lrp_linear(tile["a1"], *_lin(proj.linear_2), r_z2[s])
            r_feats = lrp_linear(tile["feats"], *_lin(proj.linear_1), r_a1)
            r_hidden = torch.zeros_like(tile["stem"]["x"])
            r_hidden[1:] = r_feats
            r_t, r_p = _tower_backward(tower, tile["stem"], tile["acts"], tile["allowed"], r_hidden, mode)
            image[s] = r_t[1:].sum(-1)
            image_position[s] = r_p[1:].sum(-1)
            special = special + r_t[0].sum() + r_p[0].sum()
        rows.add(token, holders, by_layer, image, image_position, special, logit, target)
    return rows.result()


# ---- VipLLaVA ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def vipllava_reference(model, input_ids, attention_mask, pixel_values, *, mode):
    """Explicit PE-LRP of a ``VipLlavaForConditionalGeneration`` (one image per row, the last position's arg-max
    explained): the CLIP tower's hidden states of ``vision_feature_layer`` (class token dropped) concatenated,
    the projector's LayerNorm (identity rule) and MLP. The tower's rules are linear in the relevance they pass
    on, so the relevance reaching each feature layer is carried down by :func:`reference_vlm._tower_backward`
    from that layer, and the parts are summed."""
    cfg = model.config
    base = model.model
    tower, proj = base.vision_tower, base.multi_modal_projector
    text = _weights(SimpleNamespace(model=base.language_model, config=cfg.text_config, lm_head=model.lm_head))
    layers = len(tower.encoder.layers)
    wanted = (
        cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, list) else [cfg.vision_feature_layer]
    )
    depths = [k % (layers + 1) for k in wanted]  # hidden_states[k] is the output of layer k - 1
    rows = ReferenceRows()
    for b in range(input_ids.shape[0]):
        ids, mask = input_ids[b], attention_mask[b]
        stem, acts, allowed = _tower_forward(tower, pixel_values[b], max(depths))
        hidden = [stem["x"]] + [a["y"] for a in acts]
        feats = torch.cat([hidden[k][1:] for k in depths], -1)
        normed, w_ln, s_ln = layer_norm(feats, proj.projector_layernorm)
        z1 = _apply(_lin(proj.linear_1), normed)
        a1 = proj.act(z1)
        z2 = _apply(_lin(proj.linear_2), a1)
        holders = ids == cfg.image_token_id
        embeds = text["embed"][ids].clone()
        embeds[holders] = z2
        keep: dict = {}
        position = int(mask.nonzero().max())
        token, by_layer, logit, target, _, _ = _explain_row(
            text, ids, mask, position, None, mode, True, embeds=embeds, keep=keep
        )
        r_a1 = lrp_linear(a1, *_lin(proj.linear_2), keep["r_x"][holders])
        r_normed = lrp_linear(normed, *_lin(proj.linear_1), r_a1)
        r_feats = lrp_layer_norm(feats, normed, w_ln, s_ln, r_normed)
        r_t = torch.zeros_like(stem["t"])
        r_p = torch.zeros_like(stem["p"])
        for k, r in zip(depths, r_feats.split(hidden[0].shape[-1], -1), strict=True):
            r_hidden = torch.zeros_like(stem["x"])
            r_hidden[1:] = r
            part_t, part_p = _tower_backward(tower, stem, acts[:k], allowed, r_hidden, mode)
            r_t, r_p = r_t + part_t, r_p + part_p
        rows.add_tower(token, holders, by_layer, r_t, r_p, logit, target)
    return rows.result()


# ---- Aya Vision / Cohere 2 Vision (from the relevance reaching the image features) --------------------------------


@torch.no_grad()
def aya_vision_image_reference(model, pixel_values, r_features, *, mode):
    """Explicit PE-LRP of Aya Vision's (or Cohere 2 Vision's) image path, from the relevance ``r_features``
    [n_tiles, P', D] reaching the projector's output down to the SigLIP tower's embedding sum: the projector
    (pixel shuffle as a permutation, Aya's LayerNorm by the identity rule, ``linear_1``, the SwiGLU
    ``silu(gate) * x`` by the uniform rule (AttnLRP) or with the activated gate constant (CP), ``linear_2``), then
    the tower's blocks (Aya: ``vision_feature_layer`` -1, before the post-LayerNorm; Cohere 2 Vision: its
    ``last_hidden_state``, after it). The decoder part is Cohere 2's, proven by check_adapter on text; this
    reference checks what the images add. Returns ``(image, image_position)`` [n_tiles, P]."""
    cfg = model.config
    base = model.model
    tower, proj = base.vision_tower, base.multi_modal_projector
    emb = tower.embeddings
    conv = emb.patch_embedding
    patch = cfg.vision_config.patch_size
    side = cfg.vision_config.image_size // patch
    post_norm = cfg.model_type == "cohere2_vision"  # reads last_hidden_state
    if not post_norm and cfg.vision_feature_layer not in (-1, len(tower.encoder.layers)):
        raise ValueError("the reference reads the last block's output")
    table = emb.position_embedding.weight.detach().to(F64)
    order = _shuffle_order(
        SimpleNamespace(pixel_shuffle=lambda x, _s: proj.pixel_shuffle(x), scale_factor=1), side * side
    )
    group = cfg.downsample_factor**2
    images, positions = [], []
    for pixels, r_z in zip(pixel_values.to(F64), r_features.to(F64), strict=True):
        t = (
            torch.nn.functional.conv2d(
                pixels[None], conv.weight.detach().to(F64), conv.bias.detach().to(F64), stride=patch
            )[0]
            .flatten(1)
            .T
        )
        p = table[: side * side]
        e = t + p
        allowed = torch.ones(1, side * side, side * side, dtype=torch.bool)
        y, acts = _siglip_blocks_forward(tower, e, allowed)
        out, w_post, s_post = layer_norm(y, tower.post_layernorm) if post_norm else (y, None, None)
        shuffled = out[order.reshape(-1, group)].flatten(1)
        if hasattr(proj, "layernorm"):
            normed, w_ln, s_ln = layer_norm(shuffled, proj.layernorm)
        else:
            normed = shuffled
        z1 = _apply(_lin(proj.linear_1), normed)
        x, gate = z1.chunk(2, dim=-1)
        h = proj.act(gate) * x
        r_h = lrp_linear(h, *_lin(proj.linear_2), r_z)
        r_x, r_gate = (0.5 * r_h, 0.5 * r_h) if mode == "attnlrp" else (r_h, torch.zeros_like(r_h))
        r_normed = lrp_linear(normed, *_lin(proj.linear_1), torch.cat([r_x, r_gate], -1))
        if hasattr(proj, "layernorm"):
            r_shuffled = lrp_layer_norm(shuffled, normed, w_ln, s_ln, r_normed)
        else:
            r_shuffled = r_normed
        r_out = torch.zeros_like(out)
        r_out[order.reshape(-1, group)] = r_shuffled.reshape(r_shuffled.shape[0], group, -1)
        r_y = lrp_layer_norm(y, out, w_post, s_post, r_out) if post_norm else r_out
        r_e = _siglip_blocks_backward(tower, acts, allowed, r_y, mode)
        r_t, r_p = split_sum([t, p], r_e)
        images.append(r_t.sum(-1))
        positions.append(r_p.sum(-1))
    return torch.stack(images), torch.stack(positions)


# ---- LLaVA-OneVision ------------------------------------------------------------------------------------------


def _interpolation_matrix(height: int, width: int, size: tuple[int, int]) -> torch.Tensor:
    """The bilinear resize of a ``height x width`` grid to ``size`` as a [size[0] * size[1], height * width]
    matrix (the map is linear in the grid's values: each column is the resize of one unit grid)."""
    basis = torch.eye(height * width, dtype=F64).reshape(height * width, 1, height, width)
    resized = torch.nn.functional.interpolate(basis, list(size), mode="bilinear")
    return resized.reshape(height * width, -1).T


@torch.no_grad()
def llava_onevision_reference(model, input_ids, attention_mask, pixel_values, image_sizes, *, mode):
    """Explicit PE-LRP of a ``LlavaOnevisionForConditionalGeneration`` (one image per row, the last position's
    arg-max explained, ``"full"`` features of a SigLIP tower): per tile the tower's blocks up to
    ``vision_feature_layer`` (no class token, no pre-LayerNorm) and LLaVA's MLP projector; the packing written
    out as for LLaVA-NeXT, with the cropped grid resized (bilinear, a linear map: epsilon rule without bias) when
    it holds more than ``anyres_max_N`` tiles' worth of patches, a newline after each of its rows."""
    cfg = model.config
    base = model.model
    tower, proj = base.vision_tower, base.multi_modal_projector
    text = _weights(SimpleNamespace(model=base.language_model, config=cfg.text_config, lm_head=model.lm_head))
    layers = len(tower.encoder.layers)
    if cfg.vision_feature_select_strategy != "full" or cfg.vision_feature_layer % (layers + 1) != layers:
        raise ValueError("the reference reads every token of the last block's output")
    emb = tower.embeddings
    conv = emb.patch_embedding
    size = cfg.vision_config.image_size
    patch = cfg.vision_config.patch_size
    side = size // patch
    table = emb.position_embedding.weight.detach().to(F64)
    newline = base.image_newline.detach().to(F64)
    max_tiles = int(cfg.vision_aspect_ratio.removeprefix("anyres_max_"))
    allowed = torch.ones(1, side * side, side * side, dtype=torch.bool)
    rows = ReferenceRows()
    for b in range(input_ids.shape[0]):
        ids, mask = input_ids[b], attention_mask[b]
        tiles_h, tiles_w = _best_grid(image_sizes[b], cfg.image_grid_pinpoints, size)
        tiles = []
        for s in range(1 + tiles_h * tiles_w):
            t = (
                torch.nn.functional.conv2d(
                    pixel_values[b, s][None].to(F64),
                    conv.weight.detach().to(F64),
                    conv.bias.detach().to(F64),
                    stride=patch,
                )[0]
                .flatten(1)
                .T
            )
            p = table[: side * side]
            y, acts = _siglip_blocks_forward(tower, t + p, allowed)
            z1 = _apply(_lin(proj.linear_1), y)
            a1 = proj.act(z1)
            z2 = _apply(_lin(proj.linear_2), a1)
            tiles.append({"t": t, "p": p, "y": y, "acts": acts, "a1": a1, "z2": z2})
        keep_rows, keep_cols = _kept(image_sizes[b], tiles_h * side, tiles_w * side)
        where = [
            (1 + (r // side) * tiles_w + c // side, (r % side) * side + c % side)
            for r in keep_rows
            for c in keep_cols
        ]
        grid = torch.stack([tiles[t]["z2"][k] for t, k in where])  # [Hk * Wk, D], raster order
        height, width = len(keep_rows), len(keep_cols)
        ratio = math.sqrt(height * width / (max_tiles * side**2))
        resize = None
        if ratio > 1.1:
            out_h, out_w = int(height // ratio), int(width // ratio)
            resize = _interpolation_matrix(height, width, (out_h, out_w))
            packed_grid = resize @ grid
            height, width = out_h, out_w
        else:
            packed_grid = grid
        sequence = [tiles[0]["z2"]]
        for r in range(height):
            sequence += [packed_grid[r * width : (r + 1) * width], newline[None]]
        holders = ids == cfg.image_token_id
        embeds = text["embed"][ids].clone()
        embeds[holders] = torch.cat(sequence)
        keep: dict = {}
        position = int(mask.nonzero().max())
        token, by_layer, logit, target, _, _ = _explain_row(
            text, ids, mask, position, None, mode, True, embeds=embeds, keep=keep
        )
        r_holders = keep["r_x"][holders]
        r_z2 = [torch.zeros_like(tile["z2"]) for tile in tiles]
        r_z2[0] += r_holders[: side * side]
        rest = r_holders[side * side :].reshape(height, width + 1, -1)
        special = rest[:, -1].sum()
        r_packed = rest[:, :-1].reshape(height * width, -1)
        r_grid = r_packed if resize is None else lrp_linear(grid.T, resize, None, r_packed.T).T
        for (t, k), r in zip(where, r_grid, strict=True):
            r_z2[t][k] += r
        slots = pixel_values.shape[1]
        image = torch.zeros(slots, side * side, dtype=F64)
        image_position = torch.zeros(slots, side * side, dtype=F64)
        for s, tile in enumerate(tiles):
            r_a1 = lrp_linear(tile["a1"], *_lin(proj.linear_2), r_z2[s])
            r_y = lrp_linear(tile["y"], *_lin(proj.linear_1), r_a1)  # identity rule on the activation
            r_e = _siglip_blocks_backward(tower, tile["acts"], allowed, r_y, mode)
            r_t, r_p = split_sum([tile["t"], tile["p"]], r_e)
            image[s] = r_t.sum(-1)
            image_position[s] = r_p.sum(-1)
        rows.add(token, holders, by_layer, image, image_position, special, logit, target)
    return rows.result()
