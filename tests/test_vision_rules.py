"""Issue 20's vision rule options: each input-layer rule, the logit contrast and the reference split against a
slow float64 reference; their wiring into the ViT / DeiT adapters (conservation per patch, unchanged maps where
they must be, linearity of the contrast); refusals; the canvas task builder."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from hf_pelrp import LRPConfig, attribute
from hf_pelrp.config import PRESETS, preset, resolve_config
from hf_pelrp.errors import UnsupportedModelError
from hf_pelrp.evaluation.canvas import CanvasLayout, place_on_canvas
from hf_pelrp.evaluation.tasks import tiny_model
from hf_pelrp.rules import (
    contrast_logits,
    flat_relevance,
    reference_split,
    wsquare_relevance,
    zbox_relevance,
    zplus_relevance,
)

# ------------------------------------------------------------------------------------- float64 references


def _conv_terms(x: torch.Tensor, weight: torch.Tensor, stride: int):
    """Every (input index, output index, weight) of a 2-D convolution without padding, by explicit loops."""
    _, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    for o, r, c in itertools.product(range(c_out), range(oh), range(ow)):
        for i, dr, dc in itertools.product(range(c_in), range(kh), range(kw)):
            yield (i, r * stride + dr, c * stride + dc), (o, r, c), weight[o, i, dr, dc]


def _reference(x, relevance, weight, stride, numerator):
    """``R_i = sum_j n_ij / sum_k n_kj R_j`` for one image, with ``numerator(x_i, w_ij)`` -> n_ij."""
    x, relevance = x[0], relevance[0]
    den: dict = {}
    terms = list(_conv_terms(x[None], weight, stride))
    for i, j, w in terms:
        den[j] = den.get(j, 0.0) + numerator(x[i], w)
    out = torch.zeros_like(x)
    for i, j, w in terms:
        if den[j] != 0:
            out[i] += numerator(x[i], w) / den[j] * relevance[j]
    return out[None]


@pytest.fixture
def conv_case():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64)
    x = torch.randn(1, 2, 4, 4, generator=gen, dtype=torch.float64)
    relevance = torch.randn(1, 3, 2, 2, generator=gen, dtype=torch.float64)

    def layer_map(v, w, b):
        return F.conv2d(v, w, b, stride=2)

    return x, relevance, weight, layer_map


def test_zplus_matches_reference(conv_case):
    x, relevance, weight, layer_map = conv_case
    expected = _reference(x, relevance, weight, 2, lambda xi, w: (xi * w).clamp(min=0))
    got = zplus_relevance(x, relevance, weight, layer_map)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_wsquare_and_flat_match_reference(conv_case):
    x, relevance, weight, layer_map = conv_case
    expected = _reference(x, relevance, weight, 2, lambda xi, w: w**2)
    torch.testing.assert_close(wsquare_relevance(x, relevance, weight, layer_map), expected)
    flat = _reference(x, relevance, weight, 2, lambda xi, w: torch.ones((), dtype=torch.float64))
    torch.testing.assert_close(flat_relevance(x, relevance, weight, layer_map), flat)
    # both are conservative: every output's relevance reaches its receptive field
    torch.testing.assert_close(flat.sum(), relevance.sum())
    torch.testing.assert_close(expected.sum(), relevance.sum())


def test_zbox_matches_reference(conv_case):
    x, relevance, weight, layer_map = conv_case
    x = x.sigmoid()  # the box rule's domain: [0, 1]
    expected = _reference(
        x, relevance, weight, 2, lambda xi, w: xi * w - 0.0 * w.clamp(min=0) - 1.0 * w.clamp(max=0)
    )
    got = zbox_relevance(x, relevance, weight, layer_map, low=0.0, high=1.0)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.sum(), relevance.sum())


def test_input_rules_on_a_linear_layer():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    r = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    z = (x[:, None, :] * w[None]).clamp(min=0)  # [B, out, in]
    expected = (z / z.sum(-1, keepdim=True) * r[..., None]).sum(1)
    torch.testing.assert_close(zplus_relevance(x, r, w, F.linear), expected)


def test_zplus_drops_an_output_without_positive_contribution():
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    weight = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    out = zplus_relevance(
        x, torch.ones(1, 1, 1, 1, dtype=torch.float64), weight, lambda v, w, b: F.conv2d(v, w, b)
    )
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("kind", ["softmax", "mean"])
def test_contrast_logits_backward_is_the_contrast(kind):
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    out = contrast_logits(y, kind)
    assert torch.equal(out, y)
    w = y.detach().softmax(-1) if kind == "softmax" else torch.full((2, 4), 0.25, dtype=torch.float64)
    for t in range(4):
        (grad,) = torch.autograd.grad(out[:, t].sum(), y, retain_graph=True)
        expected = torch.nn.functional.one_hot(torch.tensor([t, t]), 4).double() - w
        torch.testing.assert_close(grad, expected)
    with pytest.raises(ValueError, match="softmax"):
        contrast_logits(y, "max")


def test_reference_split_is_conservative():
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(1, 5, 4, generator=gen, dtype=torch.float64)
    g = torch.randn(1, 5, 4, generator=gen, dtype=torch.float64)
    shared, deviation = reference_split(p, p.mean(1, keepdim=True))
    torch.testing.assert_close(shared + deviation, p)
    torch.testing.assert_close(((shared + deviation) * g).sum(-1), (p * g).sum(-1))
    torch.testing.assert_close(deviation.mean(1), torch.zeros(1, 4, dtype=torch.float64))


# -------------------------------------------------------------------------------------------- in the adapter


@pytest.fixture(scope="module")
def vit():
    return tiny_model("vit", "image_classification", num_labels=3, seed=0).double()


@pytest.fixture(scope="module")
def deit():
    import transformers as tf

    config = tf.DeiTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=3,
    )
    torch.manual_seed(0)
    return tf.DeiTForImageClassificationWithTeacher(config).double().eval()


def _pixels(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 1, 16, 16, generator=gen, dtype=torch.float64)
    x[:, :, ::2] = 0.0  # black rows inside every patch: the rules differ on black pixels
    return x


@pytest.mark.parametrize("rule", ["wsquare", "flat", "zbox", "zplus"])
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_patch_rule_keeps_each_patch_relevance(vit, rule, mode):
    x = _pixels()
    base = attribute(vit, pixel_values=x, target=1, config=LRPConfig(mode=mode, positional=False))
    attr = attribute(
        vit, pixel_values=x, target=1, config=LRPConfig(mode=mode, positional=False, patch_rule=rule)
    )
    torch.testing.assert_close(attr.patch_map, base.patch_map)  # patch_map never changes
    per_patch = F.avg_pool2d(attr.pixel_map[:, None], 4)[:, 0] * 16
    if rule == "zplus":
        # an output without a positive contribution drops its relevance: compare where nothing was dropped
        assert not torch.allclose(attr.pixel_map, base.pixel_map)
        return
    torch.testing.assert_close(per_patch, attr.patch_map)
    if rule in ("wsquare", "flat"):
        assert (attr.pixel_map[:, ::2] != 0).any()  # black pixels get relevance under these rules


def test_zplus_pixel_map_matches_the_explicit_rule(vit):
    x = _pixels(1)
    attr = attribute(
        vit, pixel_values=x, target=0, config=LRPConfig(mode="cp", positional=False, patch_rule="zplus")
    )
    base = attribute(vit, pixel_values=x, target=0, config=LRPConfig(mode="cp", positional=False))
    # each patch-channel's relevance z_j g_j, from the epsilon pixel map's per-patch sums is not enough: rebuild
    # it from the model's own patch convolution and the token relevance per channel
    conv = vit.vit.embeddings.patch_embeddings.projection
    with torch.no_grad():
        z = conv(x)  # [B, D, 4, 4]
    from hf_pelrp import lrp

    with lrp(vit, config=LRPConfig(mode="cp", positional=False)) as ctx:
        logits = vit(pixel_values=x).logits
        logits[:, 0].sum().backward()
        g = ctx.store.additive["token"].grad[:, 1:]
    relevance = (z.flatten(2).transpose(1, 2) * g).transpose(1, 2).reshape(z.shape)
    positive = (x[:, :, None, None] * 0).sum()  # noqa: F841  (shape documentation only)
    expected = torch.zeros_like(x[:, 0])
    w = conv.weight.detach()
    for b, o, r, c in itertools.product(range(2), range(w.shape[0]), range(4), range(4)):
        patch = x[b, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4]
        contrib = (patch * w[o, 0]).clamp(min=0)
        if contrib.sum() > 0:
            expected[b, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += (
                contrib / contrib.sum() * relevance[b, o, r, c]
            )
    torch.testing.assert_close(attr.pixel_map, expected)
    torch.testing.assert_close(attr.patch_map, base.patch_map)


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_position_reference_moves_only_the_shared_row(vit, mode):
    x = _pixels()
    plain = attribute(vit, pixel_values=x, target=2, config=LRPConfig(mode=mode))
    ref = attribute(vit, pixel_values=x, target=2, config=LRPConfig(mode=mode, position_reference="mean"))
    torch.testing.assert_close(ref.patch_map, plain.patch_map)
    torch.testing.assert_close(ref.pixel_map, plain.pixel_map)
    torch.testing.assert_close(ref.token + ref.position, plain.token + plain.position)
    # the position map is (p - mean p) . g, with g the gradient at the embedding sum
    from hf_pelrp import lrp

    with lrp(vit, config=LRPConfig(mode=mode)) as ctx:
        vit(pixel_values=x).logits[:, 2].sum().backward()
        leaf = ctx.store.additive["position"]
        p, g = leaf.detach(), leaf.grad
    expected = ((p - p.mean(1, keepdim=True)) * g).sum(-1)
    torch.testing.assert_close(ref.position, expected)


@pytest.mark.parametrize("kind", ["softmax", "mean"])
@pytest.mark.parametrize("model_name", ["vit", "deit"])
def test_logit_contrast_is_the_contrast_of_the_maps(request, model_name, kind):
    """The backward is linear in its seed: the contrast's maps are R(t) - sum_c w_c R(c)."""
    model = request.getfixturevalue(model_name)
    x = _pixels(2)[:1]
    with torch.no_grad():
        logits = model(pixel_values=x).logits[0]
    w = logits.softmax(-1) if kind == "softmax" else torch.full_like(logits, 1 / 3)
    cfg = LRPConfig(mode="cp")
    per_class = [attribute(model, pixel_values=x, target=c, config=cfg) for c in range(3)]
    got = attribute(model, pixel_values=x, target=1, config=cfg.with_(logit_contrast=kind))
    for name in ("token", "position", "patch_map", "pixel_map"):
        expected = getattr(per_class[1], name) - sum(w[c] * getattr(per_class[c], name) for c in range(3))
        torch.testing.assert_close(getattr(got, name), expected)
    with torch.no_grad():
        after = model(pixel_values=x).logits[0]
    assert torch.equal(after, logits)  # the model comes out as it went in


def test_deit_patch_rule_and_reference(deit):
    x = _pixels(3)
    base = attribute(deit, pixel_values=x, target=0, config=LRPConfig(mode="cp"))
    attr = attribute(
        deit,
        pixel_values=x,
        target=0,
        config=LRPConfig(mode="cp", patch_rule="flat", position_reference="mean"),
    )
    torch.testing.assert_close(attr.patch_map, base.patch_map)
    per_patch = F.avg_pool2d(attr.pixel_map[:, None], 4)[:, 0] * 16
    torch.testing.assert_close(per_patch, attr.patch_map)


def test_vision_options_are_checked():
    with pytest.raises(ValueError, match="patch_rule"):
        LRPConfig(patch_rule="alpha2beta1")
    with pytest.raises(ValueError, match="logit_contrast"):
        LRPConfig(logit_contrast="max")
    with pytest.raises(ValueError, match="positional=True"):
        LRPConfig(positional=False, position_reference="mean")
    bert = tiny_model("bert", "sequence_classification")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(UnsupportedModelError, match="patch_rule"):
        attribute(bert, input_ids=ids, target=0, config=LRPConfig(patch_rule="zplus"))


def test_vision_presets_resolve():
    for name, config in PRESETS.items():
        assert resolve_config(name, None, None) == config


# ------------------------------------------------------------------------------------------------ the tasks


@pytest.mark.parametrize("background", ["black", "noise"])
def test_canvas_mask_matches_the_placed_garment(background):
    gen = torch.Generator().manual_seed(4)
    images = (torch.rand(6, 28, 28, generator=gen) * 255).to(torch.uint8)
    images[:, :5] = 0  # garments have black pixels of their own: they are not in the mask
    layout = CanvasLayout(canvas=40, background=background, noise=0.3, seed=7)
    pixels, masks, offsets = place_on_canvas(images, [0, 3, 5], layout)
    assert pixels.shape == (3, 1, 40, 40) and masks.shape == (3, 40, 40)
    for row, index in enumerate([0, 3, 5]):
        top, left = offsets[row].tolist()
        garment = images[index].float() / 255
        expected = torch.zeros(40, 40, dtype=torch.bool)
        expected[top : top + 28, left : left + 28] = images[index] > 0
        assert torch.equal(masks[row], expected)
        torch.testing.assert_close(pixels[row, 0][masks[row]], garment[images[index] > 0])
        outside = pixels[row, 0][~masks[row]]
        if background == "black":
            assert torch.equal(outside, torch.zeros_like(outside))
        else:
            assert outside.max() <= 0.3 and outside.min() >= 0 and outside.std() > 0.05
    # one generator per image: the canvas of an image does not depend on the others drawn with it
    again, _, again_offsets = place_on_canvas(images, [5], layout)
    assert torch.equal(again[0], pixels[2]) and torch.equal(again_offsets[0], offsets[2])
    with pytest.raises(ValueError, match="background"):
        CanvasLayout(background="grey")


def test_paired_bootstrap_known_answers():
    from hf_pelrp.evaluation.metrics import paired_bootstrap

    mean, low, high = paired_bootstrap([1.0, 2.0, 3.0], [0.5, 1.5, 2.5], reps=200)
    assert (mean, low, high) == pytest.approx((0.5, 0.5, 0.5))
    mean, low, high = paired_bootstrap([0.0, 1.0] * 50, [0.0] * 100, reps=2000, seed=1)
    assert mean == pytest.approx(0.5) and 0.38 < low < 0.5 < high < 0.62
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_lrp_config_method_on_a_canvas_sample(vit):
    from hf_pelrp.evaluation.methods import MethodSettings, lrp_config_method
    from hf_pelrp.evaluation.samples import Sample

    x = _pixels()[:1]
    sample = Sample(0, {"pixel_values": x}, torch.ones(16, dtype=torch.bool), mask=x[0, 0] > 0)
    config = LRPConfig(mode="cp", patch_rule="zplus")
    exp = lrp_config_method(config)(vit, sample, 1, MethodSettings())
    attr = attribute(vit, pixel_values=x, target=1, config=config)
    torch.testing.assert_close(exp.units, attr.patch_map[0].reshape(-1))
    torch.testing.assert_close(exp.pixels, attr.pixel_map[0])
    torch.testing.assert_close(exp.position, attr.position[0, 1:])
    off = lrp_config_method(config.with_(positional=False))(vit, sample, 1, MethodSettings())
    assert off.position is None


@pytest.mark.parametrize("model_name", ["vit", "deit"])
def test_positive_readout_clamps_only_the_image_maps(request, model_name):
    model = request.getfixturevalue(model_name)
    x = _pixels(5)
    config = LRPConfig(mode="attnlrp", gamma_linear=0.25, patch_rule="zplus")
    signed = attribute(model, pixel_values=x, target=1, config=config)
    positive = attribute(model, pixel_values=x, target=1, config=config.with_(image_readout="positive"))
    assert (signed.pixel_map < 0).any()  # the test needs negative evidence to drop
    torch.testing.assert_close(positive.pixel_map, signed.pixel_map.clamp(min=0))
    torch.testing.assert_close(positive.patch_map, F.avg_pool2d(positive.pixel_map[:, None], 4)[:, 0] * 16)
    for name in ("token", "position", "conservation_gap"):
        torch.testing.assert_close(getattr(positive, name), getattr(signed, name))


@pytest.mark.parametrize("kind", ["vit", "deit", "deit-teacher"])
def test_vit_positive_preset_resolves_and_conserves_where_it_should(kind):
    from helpers.builders import PATCH, images, tiny_vision

    assert resolve_config("vit-positive", None, None) == LRPConfig(
        mode="attnlrp", positional=False, gamma_linear=0.05, gamma_conv=100.0, image_readout="positive"
    )
    model = tiny_vision(kind, bias_free=True)
    x = images()
    attr = attribute(model, pixel_values=x, config="vit-positive")
    assert attr.mode == "attnlrp" and not attr.positional
    assert (attr.pixel_map >= 0).all() and attr.pixel_map.sum() > 0
    torch.testing.assert_close(
        attr.patch_map,
        F.avg_pool2d(attr.pixel_map[:, None], PATCH)[:, 0] * PATCH * PATCH,
        rtol=1e-5,
        atol=1e-6,
    )
    # the rules under it conserve exactly where they can: CP attention, positions as leaves, no biases
    conservative = attribute(
        model, pixel_values=x, config=preset("vit-positive").with_(mode="cp", positional=True)
    )
    total = conservative.token.sum(-1) + conservative.position.sum(-1)
    torch.testing.assert_close(total, conservative.target_value, rtol=1e-5, atol=1e-6)
    # the positive read-out changes only the image maps: token, position and gap as without it
    signed = attribute(
        model,
        pixel_values=x,
        config=preset("vit-positive").with_(mode="cp", positional=True, image_readout=None),
    )
    for name in ("token", "position", "conservation_gap"):
        torch.testing.assert_close(getattr(conservative, name), getattr(signed, name))


def test_dinov2_takes_the_vision_options():
    import transformers as tf

    config = tf.Dinov2Config(
        hidden_size=32,
        mlp_ratio=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
        num_channels=1,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = tf.Dinov2ForImageClassification(config).double().eval()
    x = _pixels(6)
    base = attribute(model, pixel_values=x, target=2, config=LRPConfig(mode="cp"))
    flat = attribute(
        model,
        pixel_values=x,
        target=2,
        config=LRPConfig(mode="cp", patch_rule="flat", position_reference="mean"),
    )
    torch.testing.assert_close(flat.patch_map, base.patch_map)
    torch.testing.assert_close(F.avg_pool2d(flat.pixel_map[:, None], 4)[:, 0] * 16, flat.patch_map)
    positive = attribute(model, pixel_values=x, target=2, config="vit-positive")
    assert (positive.pixel_map >= 0).all()
    torch.testing.assert_close(positive.patch_map, F.avg_pool2d(positive.pixel_map[:, None], 4)[:, 0] * 16)
