"""The HTML view rendered by a real browser (headless Chromium): it draws, its script runs, injected text
stays text.

Skipped (with the reason) when Chromium is absent outside CI; in CI (``CI=true``) a missing Chromium fails,
since scripts/setup.sh installs it there.
"""

from __future__ import annotations

import html
import os
import re

import numpy as np
import pytest
import torch

import hf_pelrp
from conftest import tiny_llama_family
from hf_pelrp.viz.browser import dump_dom, find_chromium, screenshot
from hf_pelrp.viz.colors import color_scale, diverging_rgb
from test_viz import BREAKOUT, EVIL, ONERROR, word_tokenizer


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def chromium():
    exe = find_chromium()
    if exe is None:
        if _in_ci():
            pytest.fail("CI=true but Chromium is missing: .ci/run must install the Debian package `chromium`")
        pytest.skip(
            "Chromium is not installed (Debian: apt-get install chromium, or run scripts/setup.sh as root)"
        )
    return exe


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A page from a real tiny-LLaMA attribution whose token strings try three ways of running code."""
    model = tiny_llama_family("llama")
    tok = word_tokenizer()
    words = tok("the capital of france is paris a city", return_tensors="pt")["input_ids"]
    ids = torch.cat([torch.tensor([[tok.bos_token_id]]), words], dim=1)
    attr = hf_pelrp.attribute(model, input_ids=ids)
    tokens = tok.convert_ids_to_tokens(ids[0].tolist())
    tokens[2], tokens[3], tokens[4] = EVIL, BREAKOUT, ONERROR
    folder = tmp_path_factory.mktemp("browser")
    full = folder / "view.html"
    attr.to_html([tokens], path=full, tokenizer=tok)
    # the notebook fragment carries no Content-Security-Policy: escaping alone must keep it safe
    bare = folder / "fragment.html"
    bare.write_text(f"<!DOCTYPE html><html><body>{attr.to_html([tokens], full_page=False)}</body></html>")
    return {"attr": attr, "tokens": tokens, "full": full, "bare": bare, "folder": folder}


def _assert_inert(dom: str) -> None:
    assert 'data-ready="1"' in dom, "the page's own script did not run"
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert "data-pwned" not in body, "injected code ran"
    assert html.escape(EVIL, quote=False) in dom  # the text is there, as text
    assert len(re.findall(r"<script\b", dom)) == 2  # the data block and the viewer script, nothing injected
    assert "<img" not in dom


def test_injected_text_stays_text(chromium, page):
    for name in ("full", "bare"):
        _assert_inert(dump_dom(page[name]))


def test_map_switch_recolours_tokens(chromium, page):
    attr = page["attr"]
    dom = dump_dom(page["full"], fragment="#map=position&special=show")
    assert 'data-map="position"' in dom and 'data-special="show"' in dom
    styles = re.findall(r'class="hfp-tok[^"]*" data-r="0" data-i="(\d+)" style="([^"]*)"', dom)
    assert len(styles) == attr.token.shape[-1]
    scale = color_scale([float(v) for m in (attr.relevance, attr.token, attr.position) for v in m[0]])
    for i, style in styles:
        assert _background(style) == diverging_rgb(float(attr.position[0, int(i)]), scale)
    assert sum("rgb(" in style for _, style in styles) >= len(styles) - 1  # the script did recolour


def test_screenshot_is_drawn(chromium, page):
    import matplotlib.image as mpimg

    png = screenshot(page["full"], page["folder"] / "view.png", width=1000, height=600)
    pixels = mpimg.imread(png)[..., :3]
    assert pixels.shape[:2] == (600, 1000)
    assert pixels.std() > 0.05, "blank screenshot"
    saturation = pixels.max(-1) - pixels.min(-1)
    coloured = saturation > 0.25
    assert coloured.sum() > 300, "no coloured token pixels"
    # both the red and the blue side of the scale appear (the tokens and the per-layer chart are signed)
    red = (pixels[..., 0] > pixels[..., 2] + 0.2) & coloured
    blue = (pixels[..., 2] > pixels[..., 0] + 0.2) & coloured
    assert red.sum() > 20 and blue.sum() > 20
    assert np.isfinite(pixels).all()


# ---- the image report, the generation matrix, decoded tokens ---------------------------------------------------


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Pages made from the fields alone (decoded tokens, labels, special mask; no tokenizer= argument): a text
    report and a continuation matrix of a byte-level BPE model, and an image report of a tiny ViT."""
    from transformers import ViTConfig, ViTForImageClassification

    from test_viz import bpe_tokenizer, with_display_fields

    folder = tmp_path_factory.mktemp("reports")
    tok = bpe_tokenizer()
    model = tiny_llama_family("llama", vocab_size=len(tok))
    ids = torch.tensor([[tok.bos_token_id, *tok("The capital of France is")["input_ids"]]])
    attr = with_display_fields(hf_pelrp.attribute(model, input_ids=ids), tok)
    cont = torch.tensor(tok(" Paris, of course")["input_ids"])
    gen = with_display_fields(hf_pelrp.attribute(model, ids, continuation_ids=cont), tok)
    hf_pelrp.viz.to_html(attr, path=folder / "text.html")
    hf_pelrp.viz.to_html(gen, path=folder / "matrix.html")

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    vit = ViTForImageClassification(config).eval()
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[4:12, 3:13] = (200, 180, 40)
    pixels = torch.tensor(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    vision = hf_pelrp.attribute(vit, pixel_values=pixels).replace(
        labels={0: "T-shirt", 1: "Trouser", 2: "Bag"}
    )
    hf_pelrp.viz.to_html(vision, path=folder / "image.html", image=image)
    return {"attr": attr, "gen": gen, "vision": vision, "tok": tok, "folder": folder}


def _background(style: str) -> tuple[int, int, int]:
    """The background colour of an inline style, as the page wrote it (``#rrggbb``) or the browser
    re-serialised it after the script set it (``rgb(r, g, b)``; a property set to its own value stays as is)."""
    found = re.search(r"background-color:\s*(?:#([0-9a-f]{6})|rgb\((\d+), (\d+), (\d+)\))", style)
    assert found is not None, style
    if found.group(1):
        return tuple(int(found.group(1)[k : k + 2], 16) for k in (0, 2, 4))
    return tuple(int(found.group(k)) for k in (2, 3, 4))


def _coloured(png) -> tuple[int, int]:
    import matplotlib.image as mpimg

    pixels = mpimg.imread(png)[..., :3]
    coloured = (pixels.max(-1) - pixels.min(-1)) > 0.25
    red = (pixels[..., 0] > pixels[..., 2] + 0.2) & coloured
    blue = (pixels[..., 2] > pixels[..., 0] + 0.2) & coloured
    return int(red.sum()), int(blue.sum())


def test_tokens_are_decoded_in_the_dom(chromium, reports):
    assert "Ġ" in "".join(reports["tok"].convert_ids_to_tokens(reports["attr"].input_ids[0].tolist()))
    for name in ("text.html", "matrix.html"):
        dom = dump_dom(reports["folder"] / name)
        assert 'data-ready="1"' in dom
        assert "Ġ" not in dom and "\\u0120" not in dom, f"{name}: a byte-level marker reached the page"
        assert "<bdi> capital</bdi>" in dom  # the leading space is a space
    text = dump_dom(reports["folder"] / "text.html")
    target = reports["attr"].labels[int(reports["attr"].target[0])]
    assert f'<span class="hfp-label hfp-target"><bdi>{html.escape(target)}</bdi></span>' in text
    # the BOS token is special (from special_tokens_mask): hidden at first
    assert 'data-special="hide"' in text and "hfp-tok hfp-c hfp-special" in text


def test_matrix_renders_and_switches_maps(chromium, reports):
    from hf_pelrp.viz.view import generation_view

    gen = reports["gen"]
    view = generation_view(gen)
    dom = dump_dom(reports["folder"] / "matrix.html", fragment="#map=position&special=show")
    assert 'data-ready="1"' in dom and 'data-map="position"' in dom and 'data-kind="generation"' in dom
    cells = re.findall(
        r'<td class="hfp-c[^"]*" data-r="(\d+)" data-i="(\d+)" data-v="" style="([^"]*)"[^>]*>([^<]*)</td>',
        dom,
    )
    prompt, rows = gen.prompt_length, gen.token.shape[0]
    assert len(cells) == sum(prompt + s for s in range(rows))  # the causal triangle, nothing from the future
    assert dom.count('<td class="hfp-future') == rows * gen.input_ids.shape[0] - len(cells)
    for r, i, style, text in cells:
        row = view.rows[int(r)]
        visible = range(row.visible)
        scale = color_scale([row.maps[k][c] for k in row.maps for c in visible])  # shared over the maps
        value = row.maps["position"][int(i)]
        assert _background(style) == diverging_rgb(value, scale)
        assert text == (
            f"{value:.2f}" if abs(value) < 0.995 else f"{value:.1f}" if abs(value) < 9.95 else f"{value:.0f}"
        )
    png = screenshot(
        reports["folder"] / "matrix.html", reports["folder"] / "matrix.png", width=1000, height=500
    )
    red, blue = _coloured(png)
    assert red > 50 and blue > 50


def test_image_report_renders_overlays(chromium, reports):
    dom = dump_dom(reports["folder"] / "image.html", fragment="#map=position")
    assert 'data-ready="1"' in dom and 'data-kind="image"' in dom and 'data-map="position"' in dom
    overlays = dict(
        re.findall(r'<img class="hfp-overlay[^"]*" data-r="0" data-map="([a-z]+)"[^>]*style="([^"]*)"', dom)
    )
    assert set(overlays) == {"pixel", "patch", "token", "position"}
    shown = {k: "display:none" not in style.replace(" ", "") for k, style in overlays.items()}
    assert shown == {"pixel": False, "patch": False, "token": False, "position": True}
    assert re.search(r'<img class="hfp-base[^"]*" src="data:image/png;base64,', dom)
    target = reports["vision"].labels[int(reports["vision"].target[0])]
    assert f"<bdi>{target}</bdi>" in dom
    png = screenshot(reports["folder"] / "image.html", reports["folder"] / "image.png", width=900, height=600)
    red, blue = _coloured(png)
    assert red > 200 and blue > 200  # the overlay is drawn, in both signs
