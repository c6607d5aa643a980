"""More ViT-style classifiers (adapters/more_vision.py): I-JEPA without special tokens, DINOv2's register tokens
(special tokens with no position, split against an explicit float64 reference), MetaCLIP 2 and ViT-MSN maps;
the vision types refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Dinov2WithRegistersForImageClassification,
    IJepaForImageClassification,
    MetaClip2ForImageClassification,
    ViTMSNForImageClassification,
)

import hf_pelrp
from hf_pelrp import AttributionStateError, UnsupportedModelError
from hf_pelrp.check import _randomise, _zero_biases, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64
CLASSES = {
    "ijepa": IJepaForImageClassification,
    "vit_msn": ViTMSNForImageClassification,
    "dinov2_with_registers": Dinov2WithRegistersForImageClassification,
    "metaclip_2": MetaClip2ForImageClassification,
}
#: special tokens in front of the patches of the tiny instances (dinov2_with_registers: CLS + 2 registers)
SPECIALS = {"ijepa": 0, "vit_msn": 1, "dinov2_with_registers": 3, "metaclip_2": 1}


def _model(model_type: str, seed: int = 0, **overrides):
    config = tiny_config(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = CLASSES[model_type](config).to(F64).eval()
    _randomise(model, seed)
    return model


def _pixels(batch: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", sorted(CLASSES))
@pytest.mark.parametrize("size", [16, 24])
def test_maps_conservation_and_interpolation(model_type, size):
    """Bias-free CP is conservative at the training size and with interpolated positions; the special tokens
    (none for I-JEPA, CLS and the registers for DINOv2 with registers) stay out of patch_map / pixel_map."""
    model = _model(model_type)
    _zero_biases(model)
    pixels = _pixels(size=size)
    always = model_type == "dinov2_with_registers"
    extra = {"interpolate_pos_encoding": True} if size != 16 and not always else {}
    attr = hf_pelrp.attribute(model, pixel_values=pixels, mode="cp", **extra)
    with torch.no_grad():
        logits = model(pixels, **extra).logits
    torch.testing.assert_close(attr.target_value, logits.gather(1, attr.target[:, None]).squeeze(1))
    torch.testing.assert_close(attr.conservation_gap, torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)
    grid = size // 4
    assert attr.token.shape == (2, SPECIALS[model_type] + grid * grid)
    assert attr.patch_map.shape == (2, grid, grid) and attr.pixel_map.shape == (2, size, size)
    special = SPECIALS[model_type]
    patches = attr.token[:, special:] + attr.position[:, special:]
    torch.testing.assert_close(attr.patch_map.flatten(1), patches, rtol=0, atol=0)
    assert hf_pelrp.attribute(model, pixel_values=pixels, **extra).position.abs().sum() > 0


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_register_tokens_split_matches_the_explicit_reference(mode):
    """At ``e = [CLS + p_0, reg_1 .. reg_R, patch_i + p_i]`` the epsilon rule gives ``R_t = t * g``, ``R_p = p * g``
    with ``g`` the gradient reaching ``e``: ``t`` and ``p`` are rebuilt here from the parameters (plain tensor
    math), the registers get no position row, so their position relevance is exactly 0 and their token relevance
    is ``reg * g``; the patch map holds the patches only."""
    model = _model("dinov2_with_registers")
    registers = model.config.num_register_tokens
    pixels = _pixels()
    grads = []

    def keep(_module, args):
        args[0].register_hook(grads.append)

    handle = model.dinov2_with_registers.encoder.register_forward_pre_hook(keep)
    try:
        attr = hf_pelrp.attribute(model, pixel_values=pixels, mode=mode)
    finally:
        handle.remove()
    (g,) = grads
    emb = model.dinov2_with_registers.embeddings
    conv = emb.patch_embeddings.projection
    patches = F.conv2d(pixels, conv.weight, conv.bias, stride=4).flatten(2).transpose(1, 2)
    batch = pixels.shape[0]
    t = torch.cat(
        [
            emb.cls_token.expand(batch, -1, -1),
            emb.register_tokens.expand(batch, -1, -1),
            patches,
        ],
        dim=1,
    ).detach()
    table = emb.position_embeddings.detach()  # 16x16 images: the table itself, no resampling
    p = torch.cat([table[:, :1], torch.zeros(1, registers, table.shape[-1], dtype=F64), table[:, 1:]], dim=1)
    torch.testing.assert_close(attr.token, (t * g).sum(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attr.position, (p * g).sum(-1), rtol=1e-10, atol=1e-12)
    assert (attr.position[:, 1 : 1 + registers] == 0).all()
    # the registers carry relevance (through attention)
    assert attr.token[:, 1 : 1 + registers].abs().min() > 0
    torch.testing.assert_close(
        attr.patch_map.flatten(1),
        attr.token[:, 1 + registers :] + attr.position[:, 1 + registers :],
        rtol=0,
        atol=0,
    )


def test_register_model_under_the_plain_dinov2_layout_fails_loudly():
    """The register layout is needed: DINOv2's layout (no registers) cannot rebuild the embeddings of a register
    model and refuses instead of explaining it wrongly."""
    from hf_pelrp.adapters.dinov2 import DINOV2_LAYOUT
    from hf_pelrp.adapters.vit import VisionEmbeddingLeaves
    from hf_pelrp.hooks import Handles, LeafStore

    model = _model("dinov2_with_registers")
    handles = Handles()
    VisionEmbeddingLeaves(LeafStore(), True, DINOV2_LAYOUT).attach(
        model.dinov2_with_registers.embeddings, handles
    )
    try:
        with pytest.raises(
            AttributionStateError, match=r"other than \[special tokens, patches\] \+ positions"
        ):
            model(_pixels())
    finally:
        handles.remove()


def test_registers_swiglu_variant_passes_check_adapter():
    config = tiny_config("dinov2_with_registers")
    config.use_swiglu_ffn = True
    assert hf_pelrp.check_adapter(config).passed


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [
        ("resnet", "convolutional"),
        ("poolformer", "pooling"),
        ("timm_wrapper", "timm"),
        ("siglip2", "spatial_shapes"),
        ("levit", "attention bias per patch offset"),
        ("perceiver", "latent"),
    ],
)
def test_vision_types_outside_the_method_are_refused_by_name(model_type, reason):
    with pytest.raises(
        UnsupportedModelError, match=rf"{model_type!r} is not supported by hf_pelrp: .*{reason}"
    ):
        hf_pelrp.adapters.adapter_for_type(model_type)


def test_every_image_classifier_of_the_auto_map_is_explained_or_refused_by_name():
    """Each image-classification type transformers maps is registered or refused with a reason, except the two
    left to other work (``donut-swin``: Swin's layout; ``shieldgemma2``: a Gemma 3 multimodal classifier)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    known = set(hf_pelrp.supported_model_types()) | set(hf_pelrp.adapters.refused_model_types())
    missing = set(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES) - known - {"donut-swin", "shieldgemma2"}
    assert not missing, sorted(missing)


# ---- data2vec-vision: BEiT's layout with attention written inline -------------------------------------------


def _data2vec(attn_implementation: str = "sdpa", **overrides):
    from transformers import Data2VecVisionForImageClassification

    config = tiny_config("data2vec-vision")
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = Data2VecVisionForImageClassification(config).to(F64).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("layernorm" in name and name.endswith("weight")) or "lambda" in name else 0.0
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.5 + base)
    return model


def _as_beit(model):
    """The data2vec-vision model's parameters under the BEiT names the explicit reference reads (the two models
    compute the same function; only the module names differ)."""
    from types import SimpleNamespace as NS

    base = model.data2vec_vision
    layers = []
    for layer in base.encoder.layer:
        att = layer.attention.attention
        layers.append(
            NS(
                relative_position_bias=att.relative_position_bias,
                layernorm_before=layer.layernorm_before,
                layernorm_after=layer.layernorm_after,
                attention=NS(
                    q_proj=att.query, k_proj=att.key, v_proj=att.value, o_proj=layer.attention.output.dense
                ),
                lambda_1=layer.lambda_1,
                lambda_2=layer.lambda_2,
                mlp=NS(
                    fc1=layer.intermediate.dense,
                    fc2=layer.output.dense,
                    activation_fn=layer.intermediate.intermediate_act_fn,
                ),
            )
        )
    beit = NS(embeddings=base.embeddings, layers=layers, pooler=base.pooler)
    return NS(beit=beit, config=model.config, classifier=model.classifier)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_data2vec_vision_matches_the_explicit_beit_reference(mode, attn_implementation):
    """The inline attention re-computed with the LRP factors and the per-layer bias leaf gives BEiT's explicit
    float64 reference (reference_bias.py) on data2vec-vision weights, for both attention classes."""
    from helpers.reference_bias import beit_reference

    model = _data2vec(attn_implementation)
    pixels = _pixels(seed=2)
    attr = hf_pelrp.attribute(model, pixel_values=pixels, mode=mode)
    ref = beit_reference(_as_beit(model), pixels, mode=mode, target=attr.target)
    for name in ("token", "position_by_layer", "position_by_distance"):
        fast, want = getattr(attr, name), getattr(ref, name)
        err = float((fast - want).abs().max() / want.abs().max().clamp(min=1e-12))
        assert err < 1e-6, f"{name}: relative error {err:.2e}"
    torch.testing.assert_close(attr.target_value, ref.logit)
    if mode == "cp":
        assert float(attr.position.abs().max()) == 0.0
    else:
        assert float(attr.position.abs().max()) > 1e-3 * float(attr.token.abs().max())
        torch.testing.assert_close(attr.patch_map.flatten(1), (attr.token + attr.position)[:, 1:])


def test_data2vec_vision_shared_bias_passes_check_adapter():
    config = tiny_config("data2vec-vision")
    config.use_relative_position_bias = False
    config.use_shared_relative_position_bias = True
    assert hf_pelrp.check_adapter(config).passed


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"use_absolute_position_embeddings": True}, "absolute position embeddings"),
        ({"use_relative_position_bias": False}, "no positional encoding"),
    ],
)
def test_data2vec_vision_without_a_relative_bias_is_refused(overrides, match):
    model = _data2vec(**overrides)
    with pytest.raises(UnsupportedModelError, match=match):
        hf_pelrp.attribute(model, pixel_values=_pixels())
