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
            pytest.fail(
                "CI=true but Chromium is missing: scripts/setup.sh must install the Debian package `chromium`"
            )
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
    styles = re.findall(
        r'class="hfp-tok[^"]*" data-i="(\d+)" style="background-color: rgb\((\d+), (\d+), (\d+)\)', dom
    )
    assert len(styles) == attr.token.shape[-1]
    scale = color_scale([float(v) for m in (attr.relevance, attr.token, attr.position) for v in m[0]])
    for i, r, g, b in styles:
        assert (int(r), int(g), int(b)) == diverging_rgb(float(attr.position[0, int(i)]), scale)


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
