"""The HTML report of an image attribution: the image with switchable relevance overlays (embedded PNGs), the
target's label, the maps alone when no image is given."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch

from hf_pelrp import Attribution, AttributionInputError
from hf_pelrp.viz.colors import color_scale, diverging_rgb_array
from hf_pelrp.viz.vision import png_bytes
from test_viz import _json_block, _vision_attr


def _decode_png(url: str) -> np.ndarray:
    import matplotlib.image as mpimg

    assert url.startswith("data:image/png;base64,")
    pixels = mpimg.imread(io.BytesIO(base64.b64decode(url.split(",", 1)[1])), format="png")
    return np.rint(pixels * 255).astype(np.uint8)


def _overlays(page: str) -> dict[str, tuple[str, str]]:
    return {
        key: (src, style)
        for key, src, style in re.findall(
            r'<img class="hfp-overlay[^"]*" data-r="0" data-map="([a-z]+)" src="([^"]+)"[^>]*style="([^"]*)"',
            page,
        )
    }


def test_png_encoder_round_trips():
    rng = np.random.default_rng(0)
    for shape in ((5, 7), (5, 7, 3), (5, 7, 4)):
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        decoded = _decode_png("data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode())
        np.testing.assert_array_equal(decoded, pixels)
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(np.zeros((2, 2)))


def test_image_report_embeds_the_image_and_switchable_overlays():
    attr = _vision_attr(grid=(2, 3), prefix=2).replace(labels={2: "Sneaker"})
    image = (np.arange(8 * 12 * 3).reshape(8, 12, 3) % 255).astype(np.uint8)
    page = attr.to_html(image=image)
    assert 'data-kind="image"' in page and page.count("<img") == 5  # the image and four overlays
    # the image, exactly
    base = re.search(r'<img class="hfp-base[^"]*" src="([^"]+)"', page).group(1)
    np.testing.assert_array_equal(_decode_png(base), image)
    # one overlay per map, each coloured by the shared colour function on its own scale; the first is shown
    overlays = _overlays(page)
    assert list(overlays) == ["pixel", "patch", "token", "position"]
    maps = {
        "pixel": attr.pixel_map[0],
        "patch": attr.patch_map[0],
        "token": attr.token[0, 2:].reshape(2, 3),
        "position": attr.position[0, 2:].reshape(2, 3),
    }
    for key, values in maps.items():
        expected = diverging_rgb_array(values.numpy(), color_scale(values.reshape(-1).tolist()))
        np.testing.assert_array_equal(_decode_png(overlays[key][0]), expected)
    assert "display:none" not in overlays["pixel"][1]
    assert all("display:none" in overlays[k][1] for k in ("patch", "token", "position"))
    # switched like the text maps: radio buttons (and "image only"), an opacity slider, scales per map
    radios = re.findall(r'<input type="radio" class="hfp-map" name="[^"]+" value="([a-z]+)"', page)
    assert radios == ["pixel", "patch", "token", "position", "image"]
    assert 'class="hfp-opacity"' in page
    data = _json_block(page)
    assert data["maps"] == radios
    assert data["rows"][0]["scale"]["all"]["position"] == f"{float(maps['position'].abs().max()):.3g}"
    # the target's label (from the attribution's labels) and the prefix tokens
    assert '<span class="hfp-label"><bdi>Sneaker</bdi></span> <span class="hfp-id">(id 2)</span>' in page
    assert "<bdi>[CLS]</bdi>" in page and "<bdi>[DIST]</bdi>" in page
    assert "hfp-tok" not in page.split("</style>")[1]  # no more "patch 0 patch 1 ..." token strip
    # instead, hovering a patch tells its name and values
    tips = re.findall(r'<span title="(patch \d+ \(row \d, column \d\)\n[^"]*)"></span>', page)
    assert len(tips) == 6 and tips[4].startswith("patch 4 (row 1, column 1)\npatch ")
    # the image decides the frame, and small inputs are drawn with sharp pixels
    assert 'style="width:320px;height:213px"' in page and "hfp-pixelated" in page


def test_image_report_without_an_image_shows_the_maps_alone():
    attr = _vision_attr(grid=(3, 3), prefix=1)
    page = attr.to_html(labels=["a", "b", "cat"])
    assert 'class="hfp-base' not in page and 'class="hfp-opacity"' not in page
    assert "the maps alone" in page and "<bdi>cat</bdi>" in page
    assert 'value="image"' not in page
    overlays = _overlays(page)
    assert set(overlays) == {"pixel", "patch", "token", "position"}
    assert all(style.startswith("opacity:1;") for _, style in overlays.values())
    # without a pixel map the patch map leads
    patch_only = attr.replace(extras={"patch_map": attr.patch_map})
    assert list(_overlays(patch_only.to_html())) == ["patch", "token", "position"]


def test_image_report_batches_take_one_image_per_row():
    rows = Attribution.stack([_vision_attr(seed=0), _vision_attr(seed=1)])
    images = [np.zeros((8, 12), dtype=np.uint8), np.full((8, 12), 255, dtype=np.uint8)]
    page = rows.to_html(image=images)
    assert page.count('class="hfp-base') == 2 and page.count('data-row="1"') == 1
    assert "<b>row 1</b>" in page
    with pytest.raises(AttributionInputError, match="one image per row"):
        rows.to_html(image=images[:1])
    with pytest.raises(AttributionInputError, match="list of 2 images"):
        rows.to_html(image=images[0])


def test_image_report_of_a_real_vit_with_a_pil_image():
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    import hf_pelrp

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=28,
        patch_size=7,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        id2label={0: "Trouser", 1: "Bag"},
        label2id={"Trouser": 0, "Bag": 1},
    )
    model = ViTForImageClassification(config).eval()
    picture = np.zeros((28, 28), dtype=np.uint8)
    picture[6:22, 8:20] = 220
    attr = hf_pelrp.attribute(model, pixel_values=torch.tensor(picture)[None, None].float() / 255)
    page = attr.to_html(image=Image.fromarray(picture), labels=model.config.id2label)
    label = model.config.id2label[int(attr.target[0])]
    assert f"<bdi>{label}</bdi>" in page and "patch grid 4 × 4" in page
    assert list(_overlays(page)) == ["pixel", "patch", "token", "position"]
    np.testing.assert_array_equal(
        _decode_png(re.search(r'class="hfp-base[^"]*" src="([^"]+)"', page).group(1)),
        np.repeat(picture[..., None], 3, axis=-1),
    )
