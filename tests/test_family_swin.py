"""Swin: the window bias leaves (relative-bias-table kind, whose rule reference_bias.py checks for BEiT and T5) and
their map back onto the patches: undoing the window partition, the cyclic shift and the patch merging, checked
against a loop written from the definitions."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, SwinForImageClassification

import hf_pelrp
from hf_pelrp import UnsupportedModelError
from hf_pelrp.adapters import adapter_for_type

pytestmark = pytest.mark.usefixtures("single_thread")


def _model(**overrides):
    config = AutoConfig.for_model("swin", **{**adapter_for_type("swin").tiny, **overrides})
    torch.manual_seed(0)
    model = SwinForImageClassification(config).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("norm" in name) and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5 + base)
    return model


def _by_loops(pairs: torch.Tensor, batch: int, side: int, window: int, shift: int, grid: int) -> torch.Tensor:
    """Per-patch relevance of one layer from its per-window, per-key relevance [B * windows, W^2], by definition:
    window ``w`` (row-major over the shifted grid) key ``p`` is the shifted-grid cell ``(wr W + p // W, wc W + p % W)``,
    i.e. the cell shifted back by ``+shift``; a cell of a stage of side ``side`` stands for ``(grid / side)^2``
    first-stage patches, which share its relevance evenly."""
    out = torch.zeros(batch, grid, grid, dtype=pairs.dtype)
    per_row = (side // window) ** 2
    factor = grid // side
    for b in range(batch):
        for w in range(per_row):
            wr, wc = divmod(w, side // window)
            for p in range(window * window):
                r = (wr * window + p // window + shift) % side
                c = (wc * window + p % window + shift) % side
                value = pairs[b * per_row + w, p] / factor**2
                out[b, r * factor : (r + 1) * factor, c * factor : (c + 1) * factor] += value
    return out.reshape(batch, -1)


def test_window_leaves_are_mapped_back_onto_the_patches():
    model = _model()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    attr = hf_pelrp.attribute(model, pixel_values=pixels)
    with hf_pelrp.lrp(model) as ctx:
        logits = model(pixel_values=pixels).logits
        logits[torch.arange(2), attr.target].sum().backward()
        leaves = {layer: named["bias"] for layer, named in ctx.store.layers.items()}
    assert sorted(leaves) == [0, 1, 2, 3]
    # layers 0, 1: stage 0 (8 x 8 patches, windows of 4, layer 1 shifted by 2); layers 2, 3: stage 1 (4 x 4)
    geometry = {0: (8, 0), 1: (8, 2), 2: (4, 0), 3: (4, 0)}
    for layer, (side, shift) in geometry.items():
        leaf = leaves[layer]
        pairs = (leaf.detach() * leaf.grad).sum(1).sum(1)  # heads and queries: [B * windows, W^2]
        expected = _by_loops(pairs, 2, side, 4, shift, 8)
        torch.testing.assert_close(attr.position_by_layer[:, layer], expected, rtol=1e-10, atol=1e-14)
    total = sum(float((leaf.detach() * leaf.grad).sum()) for leaf in leaves.values())
    assert abs(float(attr.position.sum()) - total) < 1e-10 * max(1.0, abs(total))
    assert float(attr.position.abs().max()) > 0
    assert attr.patch_map.shape == (2, 8, 8) and attr.pixel_map.shape == (2, 16, 16)
    offsets = attr.position_offsets[0]
    assert offsets.shape == (49, 2) and offsets[24].tolist() == [0, 0]
    cp = hf_pelrp.attribute(model, pixel_values=pixels, mode="cp")
    assert float(cp.position.abs().max()) == 0.0


def test_absolute_embeddings_and_padded_stages_are_refused():
    with pytest.raises(UnsupportedModelError, match="absolute position embeddings"):
        hf_pelrp.attribute(
            _model(use_absolute_embeddings=True), pixel_values=torch.randn(1, 3, 16, 16).double()
        )
    with pytest.raises(UnsupportedModelError, match="whole windows"):
        hf_pelrp.attribute(_model(window_size=3), pixel_values=torch.randn(1, 3, 16, 16).double())


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_swinv2_cosine_attention_matches_the_explicit_rules(mode):
    """One ``Swinv2SelfAttention`` re-computed by the adapter, against reference_bias.py's biased attention: the
    cosine scores ``s q^ k^T`` with the norms constant (identity rule), the bias ``16 sigmoid(MLP)`` a leaf."""
    from transformers.models.swinv2.modeling_swinv2 import Swinv2SelfAttention

    from helpers.reference_absolute import lrp_linear
    from helpers.reference_bias import biased_attention, lrp_biased_attention
    from hf_pelrp.adapters.swin import swinv2_attention
    from hf_pelrp.config import LRPConfig
    from hf_pelrp.hooks import LeafStore

    config = AutoConfig.for_model("swinv2", **adapter_for_type("swinv2").tiny)
    torch.manual_seed(0)
    att = Swinv2SelfAttention(config, dim=16, num_heads=2, window_size=4).double().eval()
    with torch.no_grad():
        att.logit_scale.fill_(1.3)
    hidden = torch.randn(3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    weight = torch.randn(3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    leaf = hidden.clone().requires_grad_(True)
    store = LeafStore()
    out = swinv2_attention(att, (leaf,), {}, config=LRPConfig(mode=mode), store=store, layer=0)
    assert torch.allclose(out, att(hidden)[0], atol=1e-12)
    (out * weight).sum().backward()
    r_hidden = (hidden * leaf.grad).sum(-1)
    bias_leaf = store.layers[0]["bias"]
    r_bias = (
        torch.zeros(3, dtype=torch.float64)
        if bias_leaf.grad is None
        else (bias_leaf.detach() * bias_leaf.grad).sum((1, 2, 3))
    )
    with torch.no_grad():
        heads, dim = 2, 8
        lin = {n: (getattr(att, n).weight, getattr(att, n).bias) for n in ("query", "key", "value")}
        scale = float(torch.clamp(att.logit_scale, max=4.6052).exp()[0])
        table = att.continuous_position_bias_mlp(att.relative_coords_table).view(-1, heads)
        bias = 16 * torch.sigmoid(
            table[att.relative_position_index.view(-1)].view(16, 16, -1).permute(2, 0, 1)
        )
        for row in range(3):
            h = hidden[row]
            q, k, v = (
                (h @ lin[n][0].T + (0 if lin[n][1] is None else lin[n][1]))
                .view(16, heads, dim)
                .transpose(0, 1)
                for n in ("query", "key", "value")
            )
            qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
            allowed = torch.ones(16, 16, dtype=torch.bool)
            scores, probs, o = biased_attention(scale * qn, kn, v, 1.0, bias, allowed)
            r_o = (o.transpose(0, 1).reshape(16, 16) * weight[row]).view(16, heads, dim).transpose(0, 1)
            r_q, r_k, r_v, r_b = lrp_biased_attention(
                scale * qn, kn, v, 1.0, bias, allowed, scores, probs, o, r_o, mode
            )
            # identity rule of the normalisation: R_q = R_q^ (a diagonal map with a constant scale)
            flat = [t.transpose(0, 1).reshape(16, 16) for t in (r_q, r_k, r_v)]
            r_h = sum(lrp_linear(h, *lin[n], f) for n, f in zip(("query", "key", "value"), flat, strict=True))
            torch.testing.assert_close(r_hidden[row], r_h.sum(-1), rtol=1e-8, atol=1e-12)
            torch.testing.assert_close(r_bias[row], r_b.sum(), rtol=1e-8, atol=1e-12)
