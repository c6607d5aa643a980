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
