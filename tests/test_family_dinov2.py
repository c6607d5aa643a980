"""DINOv2: the SwiGLU rule against its explicit formula, always-interpolated positions, input checks, Gamma."""

from __future__ import annotations

import pytest
import torch
from transformers import Dinov2ForImageClassification

import hf_pelrp
from helpers.reference_absolute import lrp_linear
from hf_pelrp import AttributionInputError, LRPConfig
from hf_pelrp.check import _randomise, _zero_biases, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64


def _model(seed: int = 0, **overrides):
    config = tiny_config("dinov2")
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = Dinov2ForImageClassification(config).to(F64).eval()
    _randomise(model, seed)
    return model


def _pixels(batch: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_swiglu_matches_the_explicit_uniform_rule(mode):
    """``down(silu(gate(x)) * up(x))``: epsilon at ``down``; uniform rule at the product (1/2 each under
    AttnLRP; CP: the activated gate is a constant, all to ``up``); identity rule at SiLU; epsilon at ``gate``
    and ``up`` (float64, eps -> 0, biases absorb their share)."""
    model = _model(use_swiglu_ffn=True)
    mlp = model.dinov2.encoder.layer[1].mlp
    x = torch.randn(2, 5, 32, dtype=F64, generator=torch.Generator().manual_seed(3))
    with hf_pelrp.lrp(model, mode=mode), torch.enable_grad():
        leaf = x.clone().requires_grad_(True)
        mlp(leaf).sum().backward()  # gradient 1 at every output: R_out = out
    fast = (leaf * leaf.grad).detach()

    (wg, bg), (wu, bu), (wd, bd) = (
        (m.weight.detach(), m.bias.detach()) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    )
    gate, up = x @ wg.T + bg, x @ wu.T + bu
    h = torch.nn.functional.silu(gate) * up
    r_h = lrp_linear(h, wd, bd, h @ wd.T + bd)
    gate_share, up_share = (0.5, 0.5) if mode == "attnlrp" else (0.0, 1.0)
    ref = lrp_linear(x, wg, bg, gate_share * r_h) + lrp_linear(x, wu, bu, up_share * r_h)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-12)


def test_swiglu_variant_passes_check_adapter():
    config = tiny_config("dinov2")
    config.use_swiglu_ffn = True
    assert hf_pelrp.check_adapter(config).passed


@pytest.mark.parametrize("size", [16, 24])
def test_positions_are_interpolated_to_any_image_size(size):
    """DINOv2 always interpolates: a 24x24 image on a 16x16 model needs no keyword; the interpolated table is
    the position leaf (one copy per image), bias-free CP is conservative, pixel_map sums to patch_map."""
    model = _model()
    _zero_biases(model)
    pixels = _pixels(size=size)
    attr = hf_pelrp.attribute(model, pixel_values=pixels, mode="cp")
    with torch.no_grad():
        logits = model(pixels).logits
    torch.testing.assert_close(attr.target_value, logits.gather(1, attr.target[:, None]).squeeze(1))
    torch.testing.assert_close(attr.conservation_gap, torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)
    grid = size // 4
    assert attr.patch_map.shape == (2, grid, grid) and attr.pixel_map.shape == (2, size, size)
    torch.testing.assert_close(attr.pixel_map.sum((1, 2)), attr.patch_map.sum((1, 2)), rtol=0, atol=1e-12)
    assert attr.token.shape == (2, 1 + grid * grid)
    nonzero = hf_pelrp.attribute(model, pixel_values=pixels, mode="attnlrp")
    assert nonzero.position.abs().sum() > 0


def test_image_checks():
    model = _model()
    with pytest.raises(AttributionInputError, match="always interpolates"):
        hf_pelrp.attribute(model, pixel_values=_pixels(), interpolate_pos_encoding=True)
    with pytest.raises(AttributionInputError, match="smaller than one 4x4 patch"):
        hf_pelrp.attribute(model, pixel_values=_pixels(size=3))
    with pytest.raises(AttributionInputError, match="num_channels"):
        hf_pelrp.attribute(model, pixel_values=_pixels()[:, :1])
    with pytest.raises(AttributionInputError, match="bool_masked_pos|unknown keyword"):
        hf_pelrp.attribute(
            model, pixel_values=_pixels(), bool_masked_pos=torch.zeros(2, 16, dtype=torch.bool)
        )


def test_gamma_rules_reach_the_declared_layers():
    """gamma_conv changes only how patch relevance reaches the pixels; gamma_linear changes the patch map."""
    model = _model()
    pixels = _pixels()
    eps = hf_pelrp.attribute(model, pixel_values=pixels, config=LRPConfig(mode="attnlrp"))
    conv = hf_pelrp.attribute(model, pixel_values=pixels, config=LRPConfig(mode="attnlrp", gamma_conv=1.0))
    linear = hf_pelrp.attribute(
        model, pixel_values=pixels, config=LRPConfig(mode="attnlrp", gamma_linear=0.25)
    )
    torch.testing.assert_close(conv.patch_map, eps.patch_map)
    assert (conv.pixel_map - eps.pixel_map).abs().max() > 1e-6
    assert (linear.patch_map - eps.patch_map).abs().max() > 1e-6
