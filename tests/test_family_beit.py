"""BEiT: the relative position bias per window offset, through the "lrp" attention's float-mask leaf, against
the explicit float64 reference of reference_bias.py."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, BeitForImageClassification

import hf_pelrp
from helpers.reference_bias import beit_reference
from hf_pelrp import UnsupportedModelError
from hf_pelrp.adapters import adapter_for_type

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-6


def _model(**overrides):
    config = AutoConfig.for_model("beit", **{**adapter_for_type("beit").tiny, **overrides})
    torch.manual_seed(0)
    model = BeitForImageClassification(config).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("layernorm" in name and name.endswith("weight")) or "lambda" in name else 0.0
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5 + base)
    return model


def _close(fast, ref, what):
    err = float((fast - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
    assert err < TOL, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_beit_matches_the_explicit_reference(mode):
    model = _model()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    attr = hf_pelrp.attribute(model, pixel_values=pixels, mode=mode)
    ref = beit_reference(model, pixels, mode=mode, target=attr.target)
    _close(attr.target_value, ref.logit, "logit")
    _close(attr.token, ref.token, "token")
    _close(attr.position_by_layer, ref.position_by_layer, "position_by_layer")
    _close(attr.position_by_distance, ref.position_by_distance, "position_by_distance")
    if mode == "cp":
        assert float(attr.position.abs().max()) == 0.0
    else:
        assert float(attr.position.abs().max()) > 1e-3 * float(attr.token.abs().max())
        # patch_map = token + position of the patches; pixel_map spreads them (as for ViT)
        patch = attr.patch_map.flatten(1)
        torch.testing.assert_close(patch, (attr.token + attr.position)[:, 1:])
        offsets, labels = attr.position_offsets[0], attr.position_distances[0]
        assert offsets.shape == (labels.numel(), 2) and labels[-3:].tolist() == [-3, -2, -1]
        assert offsets[labels == 24].tolist() == [[0, 0]]  # the centre of a 4 x 4 window's 7 x 7 table


def test_absolute_and_relative_positions_together_are_refused():
    model = _model(use_absolute_position_embeddings=True)
    with pytest.raises(UnsupportedModelError, match="absolute position embeddings as well"):
        hf_pelrp.attribute(model, pixel_values=torch.randn(1, 3, 16, 16, dtype=torch.float64))
