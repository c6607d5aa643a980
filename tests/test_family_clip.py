"""CLIP and SigLIP vision towers with a classification head: nested vision config, patch / pixel maps,
interpolation, the SigLIP attention-pooling head kept out of the relevance graph, Gamma."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPForImageClassification, SiglipForImageClassification

import hf_pelrp
from hf_pelrp import AttributionInputError, LRPConfig
from hf_pelrp.check import _randomise, _zero_biases, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64
CLASSES = {"clip": CLIPForImageClassification, "siglip": SiglipForImageClassification}


def _model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    model = CLASSES[model_type](tiny_config(model_type)).to(F64).eval()
    _randomise(model, seed)
    return model


def _pixels(batch: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", ["clip", "siglip"])
@pytest.mark.parametrize("size", [16, 24])
def test_maps_conservation_and_interpolation(model_type, size):
    model = _model(model_type)
    assert model.config.model_type == model_type and not hasattr(model.config, "image_size")
    _zero_biases(model)
    pixels = _pixels(size=size)
    extra = {"interpolate_pos_encoding": True} if size != 16 else {}
    attr = hf_pelrp.attribute(model, pixel_values=pixels, mode="cp", **extra)
    with torch.no_grad():
        logits = model(pixels, **extra).logits
    torch.testing.assert_close(attr.target_value, logits.gather(1, attr.target[:, None]).squeeze(1))
    torch.testing.assert_close(attr.conservation_gap, torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)
    grid = size // 4
    specials = 1 if model_type == "clip" else 0  # CLIP's class embedding; SigLIP has no special token
    assert attr.token.shape == (2, specials + grid * grid)
    assert attr.patch_map.shape == (2, grid, grid)
    # the patch convolution is bias-free: the pixels get exactly the patches' relevance
    torch.testing.assert_close(attr.pixel_map.sum((1, 2)), attr.patch_map.sum((1, 2)), rtol=0, atol=1e-12)
    assert hf_pelrp.attribute(model, pixel_values=pixels, **extra).position.abs().sum() > 0


@pytest.mark.parametrize("model_type", ["clip", "siglip"])
def test_image_checks_read_the_vision_config(model_type):
    model = _model(model_type)
    with pytest.raises(AttributionInputError, match="takes 16x16 images.*interpolate_pos_encoding"):
        hf_pelrp.attribute(model, pixel_values=_pixels(size=24))
    with pytest.raises(AttributionInputError, match="expects 3 .*num_channels"):
        hf_pelrp.attribute(model, pixel_values=_pixels()[:, :1])
    with pytest.raises(AttributionInputError, match="dtype"):
        hf_pelrp.attribute(model, pixel_values=_pixels().float())


def test_siglip_pooling_head_gets_no_relevance():
    """The attention-pooling head (torch's MultiheadAttention, outside the attention interface) is computed but
    not used by the classifier: its output is cut from the relevance graph (a constant of the pass)."""
    model = _model("siglip")
    seen = {}

    def record(_module, _args, output):
        seen["pooled"], seen["hidden"] = output.pooler_output, output.last_hidden_state

    handle = model.vision_model.register_forward_hook(record)
    try:
        with hf_pelrp.lrp(model), torch.enable_grad():
            model(_pixels())
    finally:
        handle.remove()
    assert seen["hidden"].requires_grad and not seen["pooled"].requires_grad


def test_a_head_that_used_the_pooling_head_would_fail_loudly():
    """If the logits depended on the pooling head, the relevance through it would be cut: bias-free CP
    conservation breaks visibly (check_adapter's check), it does not flow through unruled attention."""
    model = _model("siglip")
    _zero_biases(model)

    def use_pooler(_module, _args, output):
        output.last_hidden_state = output.last_hidden_state + output.pooler_output[:, None]
        return output

    handle = model.vision_model.register_forward_hook(use_pooler)
    try:
        attr = hf_pelrp.attribute(model, pixel_values=_pixels(), mode="cp")
    finally:
        handle.remove()
    assert (attr.conservation_gap.abs() / attr.target_value.abs()).max() > 1e-3


@pytest.mark.parametrize("model_type", ["clip", "siglip"])
def test_gamma_rules_reach_the_declared_layers(model_type):
    model = _model(model_type)
    pixels = _pixels()
    eps = hf_pelrp.attribute(model, pixel_values=pixels, config=LRPConfig(mode="attnlrp"))
    conv = hf_pelrp.attribute(model, pixel_values=pixels, config=LRPConfig(mode="attnlrp", gamma_conv=1.0))
    linear = hf_pelrp.attribute(
        model, pixel_values=pixels, config=LRPConfig(mode="attnlrp", gamma_linear=0.25)
    )
    torch.testing.assert_close(conv.patch_map, eps.patch_map)
    assert (conv.pixel_map - eps.pixel_map).abs().max() > 1e-6
    assert (linear.patch_map - eps.patch_map).abs().max() > 1e-6


def test_siglip_without_the_pooling_head_passes_check_adapter():
    config = tiny_config("siglip")
    config.vision_config.vision_use_head = False
    assert hf_pelrp.check_adapter(config).passed
