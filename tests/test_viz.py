"""HTML, terminal and matplotlib views of an Attribution (hf_pelrp.viz)."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
import torch

import hf_pelrp
from conftest import tiny_llama_family
from hf_pelrp import Attribution, AttributionInputError
from hf_pelrp.viz.colors import NEGATIVE_RGB, POSITIVE_RGB, color_scale, css_hex, diverging_rgb

WORDS = ["the", "capital", "of", "france", "is", "paris", "a", "city", "river", "seine"]
EVIL = "<script>alert(1)</script>"
BREAKOUT = "</script><script>document.body.setAttribute('data-pwned','1')</script>"
ONERROR = "<img src=x onerror=\"document.body.setAttribute('data-pwned','2')\">"


def bpe_tokenizer():
    """A byte-level BPE tokenizer (the GPT-2 / SmolLM2 kind: a leading space is the marker ``Ġ``) trained in
    memory on a few sentences (no network); ``<|endoftext|>`` (id 0) is its BOS / EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["The capital of France is Paris.", "Paris is a city on the river Seine, of course."] * 4
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def with_display_fields(attr, tokenizer):
    """``attr`` with the fields the pipeline and the CLI fill: decoded ``tokens``, ``labels`` of the target and
    foil, ``special_tokens_mask`` (so that renderers need no tokenizer)."""
    from hf_pelrp.tokens import display_token, display_tokens, special_ids

    specials = special_ids(tokenizer)
    ids = attr.input_ids
    ids_of = [ids.tolist()] if ids.dim() == 1 else ids.tolist()
    named = [int(i) for i in attr.target.reshape(-1).tolist()]
    if attr.foil is not None:
        named += [int(i) for i in attr.foil.reshape(-1).tolist()]
    labels = {i: display_token(tokenizer, i) for i in named}
    mask = torch.tensor([[i in specials for i in row] for row in ids_of])
    if ids.dim() == 1:  # a GenerationAttribution: tokens of its one sequence
        gen = attr.replace(tokens=display_tokens(tokenizer, ids_of[0]), labels=labels)
        # the viewers read a special_tokens_mask [T] where the result has one (proposed to result.py)
        gen.special_tokens_mask = mask[0]
        return gen
    return attr.replace(
        tokens=[display_tokens(tokenizer, r) for r in ids_of], labels=labels, special_tokens_mask=mask
    )


def word_tokenizer():
    """A 101-word tokenizer built in memory (no network): <pad>=0, <s>=1, </s>=2, <unk>=3, then words."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(4, 101):
        vocab[WORDS[i - 4] if i - 4 < len(WORDS) else f"w{i}"] = i
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def llama_attr():
    """A padded batch of 2 from a tiny LLaMA: row 0 starts with <s>, row 1 is left-padded by 3."""
    model = tiny_llama_family("llama")
    torch.manual_seed(3)
    ids = torch.randint(4, 101, (2, 9))
    ids[0, 0] = 1
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return hf_pelrp.attribute(model, input_ids=ids, attention_mask=mask)


def _json_block(page: str) -> dict:
    match = re.search(r'<script type="application/json" class="hfp-data">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))


def _span_backgrounds(page: str) -> dict[int, str]:
    return {
        int(i): bg
        for i, bg in re.findall(
            r'<span class="hfp-tok[^"]*" data-r="\d+" data-i="(\d+)" style="background-color:(#[0-9a-f]{6})',
            page,
        )
    }


def test_colours_are_signed_and_saturate_at_the_scale():
    assert diverging_rgb(0.0, 1.0) == (255, 255, 255)
    assert diverging_rgb(2.0, 2.0) == POSITIVE_RGB
    assert diverging_rgb(-5.0, 2.0) == NEGATIVE_RGB  # clipped beyond the scale
    half = diverging_rgb(0.5, 1.0)
    assert half == tuple(round(255 + 0.5 * (p - 255)) for p in POSITIVE_RGB)
    assert color_scale([0.0, 0.0]) == 1.0 and color_scale([0.5, -3.0]) == 3.0


def test_html_escapes_text_and_embeds_json_safely(llama_attr):
    tokens = [["<s>", EVIL, BREAKOUT, ONERROR, "a&b", "x\ny", "", "q", "z"], [f"t{i}" for i in range(9)]]
    page = llama_attr.to_html(tokens)
    # the only script elements are the page's own two: the data and the constant viewer script
    assert page.count("<script") == 2
    assert EVIL not in page and BREAKOUT not in page and "<img" not in page
    assert html.escape(EVIL) in page
    assert "&lt;img src=x onerror=" in page
    data = _json_block(page)
    assert data["rows"][0]["tokens"][:4] == ["<s>", EVIL, BREAKOUT, ONERROR]  # JSON round-trips the raw text
    assert "↵" in page and "∅" in page  # newline and empty token made visible
    assert f"<bdi>{html.escape(EVIL)}</bdi>" in page  # every token string is bidi-isolated


def test_html_colours_follow_the_maps(llama_attr):
    page = llama_attr.to_html(hide_special=False)
    data = _json_block(page)
    assert data["maps"] == ["relevance", "token", "position"]
    for r, row in enumerate(data["rows"]):
        keep = llama_attr.attention_mask[r].bool()
        maps = {
            "relevance": llama_attr.relevance[r][keep],
            "token": llama_attr.token[r][keep],
            "position": llama_attr.position[r][keep],
        }
        scale = max(float(m.abs().max()) for m in maps.values())  # shared scale over the three maps
        for name, values in maps.items():
            expected = [css_hex(diverging_rgb(float(v), scale)) for v in values]
            assert row["colors"]["all"][name] == expected
            assert row["values"][name] == pytest.approx(values.tolist())
    # padding is not shown: row 1 has 6 tokens
    assert len(data["rows"][1]["tokens"]) == 6 and data["rows"][1]["positions"] == list(range(3, 9))
    # the initial colours of the spans are those of the combined map
    first_row = page.split('data-row="1"')[0]
    assert _span_backgrounds(first_row) == dict(enumerate(data["rows"][0]["colors"]["all"]["relevance"]))


def test_html_special_tokens_hidden_and_excluded_from_the_scale(llama_attr):
    tok = word_tokenizer()
    page = llama_attr.to_html(tokenizer=tok)
    data = _json_block(page)
    row = data["rows"][0]
    assert row["tokens"][0] == "<s>" and all(t in tok.get_vocab() for t in row["tokens"])
    assert 'class="hfp-root hfp-hide-special"' in page
    assert page.count("hfp-tok hfp-c hfp-special") == 1
    rel = llama_attr.relevance[0]
    visible_scale = float(
        rel[1:]
        .abs()
        .max()
        .maximum(llama_attr.token[0, 1:].abs().max())
        .maximum(llama_attr.position[0, 1:].abs().max())
    )
    assert row["colors"]["visible"]["relevance"][1:] == [
        css_hex(diverging_rgb(float(v), visible_scale)) for v in rel[1:]
    ]
    # the target token of a causal LM is decoded and shown after the explained position
    target = tok.decode([int(llama_attr.target[0])])
    assert f'<span class="hfp-label hfp-target"><bdi>{html.escape(target)}</bdi></span>' in page
    assert 'class="hfp-tok hfp-c hfp-explained"' in page


def test_html_layer_chart_for_rotary_models_only(llama_attr):
    page = llama_attr.to_html()
    layers = llama_attr.position_by_layer.shape[1]
    assert page.count('<td class="hfp-cell') == layers * (9 + 6)  # both rows, padding excluded
    assert page.count('class="hfp-total"') == layers * 2
    # a batch folds its charts (one click each); a single row shows its chart open
    assert page.count('<details class="hfp-layers">') == 2
    assert llama_attr[0].to_html().count('<details class="hfp-layers" open>') == 1
    # the chart's columns are the tokens, and the bars have an axis with the scale of the totals
    totals = llama_attr.position_by_layer[0].sum(-1)
    assert f"+{float(totals.abs().max()):.3g}</span>" in page
    assert page.count('<th class="hfp-col') == 9 + 6
    absolute = Attribution(
        token=torch.tensor([[0.5, -0.25]]),
        position=torch.tensor([[0.1, 0.0]]),
        target=torch.tensor([1]),
        target_value=torch.tensor([0.4]),
        model_type="bert",
    )
    assert '<td class="hfp-cell' not in absolute.to_html(["[CLS]", "hi"])


def test_html_page_is_self_contained_and_written(llama_attr, tmp_path):
    path = tmp_path / "view.html"
    page = llama_attr.to_html(path=path, title="My <title>")
    assert path.read_text(encoding="utf-8") == page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert "My &lt;title&gt;" in page
    csp = html.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1))
    assert "default-src 'none'" in csp
    import base64
    import hashlib

    from hf_pelrp.viz.html import content_security_policy, script_hash

    assert csp == content_security_policy()
    # the hash names the script that is in the page, byte for byte
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    assert base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() == script_hash()
    assert f"'sha256-{script_hash()}'" in csp
    fragment = llama_attr._repr_html_()
    assert fragment.startswith('<div class="hfp-root') and "<html" not in fragment


def test_tokens_argument_is_checked(llama_attr):
    with pytest.raises(AttributionInputError, match="one string per position"):
        llama_attr.to_html([["a", "b"], ["c"]])
    with pytest.raises(AttributionInputError, match="list of strings"):
        llama_attr.to_html("the capital")
    no_ids = Attribution(
        token=torch.ones(1, 2),
        position=torch.zeros(1, 2),
        target=torch.tensor([0]),
        target_value=torch.tensor([2.0]),
    )
    with pytest.raises(AttributionInputError, match="kept no input_ids"):
        no_ids.to_html(tokenizer=word_tokenizer())


def test_terminal_table_is_coloured(llama_attr, capsys):
    from rich.console import Console

    from hf_pelrp.viz import render_tables

    console = Console(record=True, width=140, force_terminal=True, color_system="truecolor")
    console.print(render_tables(llama_attr, tokenizer=word_tokenizer(), labels=None))
    text = console.export_text(clear=False)
    assert "explained logit" in text and "conservation gap" in text and "◀ explained" in text
    styled = console.export_text(styles=True)
    # the largest |value| of row 0 is drawn in a saturated colour
    row0 = torch.stack([llama_attr.relevance[0], llama_attr.token[0], llama_attr.position[0]])
    peak = float(row0.flatten()[row0.abs().flatten().argmax()])
    end = POSITIVE_RGB if peak > 0 else NEGATIVE_RGB
    assert f"48;2;{end[0]};{end[1]};{end[2]}" in styled
    llama_attr.show()  # outside a notebook: the rich table on stdout
    out = capsys.readouterr().out
    assert "combined" in out and "position" in out and "sum" in out


def test_text_plot_and_png(llama_attr, tmp_path):
    import matplotlib.image as mpimg

    fig = llama_attr.plot(tokens=[[f"${i}" for i in range(9)], [f"t{i}" for i in range(9)]], row=1)
    strip_ax = fig.axes[0]
    # the heat strip: combined / token / position of the 6 unpadded tokens, on the shared colour map
    strip = np.asarray(strip_ax.images[0].get_array())
    keep = slice(3, 9)
    expected = torch.stack(
        [llama_attr.relevance[1, keep], llama_attr.token[1, keep], llama_attr.position[1, keep]]
    )
    np.testing.assert_allclose(strip, expected.numpy(), rtol=1e-6)
    assert strip_ax.images[0].get_cmap().name == "hf_pelrp_diverging"
    assert [t.get_text() for t in strip_ax.get_yticklabels()] == ["combined", "token", "position"]
    assert [t.get_text() for t in strip_ax.get_xticklabels()] == [f"t{i}" for i in range(3, 9)]
    heat_ax = [ax for ax in fig.axes if "per layer" in ax.get_title(loc="left")][0]
    np.testing.assert_allclose(
        np.asarray(heat_ax.images[0].get_array()), llama_attr.position_by_layer[1][:, 3:].numpy(), rtol=1e-6
    )
    # the per-layer heatmap's x-axis shows the tokens, and its totals are bars on a scale (an x axis)
    assert [t.get_text() for t in heat_ax.get_xticklabels()] == [f"t{i}" for i in range(3, 9)]
    bar_ax = [ax for ax in fig.axes if ax.get_xlabel() == "layer total"][0]
    totals = llama_attr.position_by_layer[1][:, 3:].sum(-1)
    widths = [p.get_width() for p in bar_ax.patches]
    np.testing.assert_allclose(widths, totals.numpy(), rtol=1e-5)
    assert bar_ax.get_xlim()[1] >= float(totals.abs().max())
    fig_dollar = llama_attr.plot(tokens=[[f"${i}" for i in range(9)], [f"t{i}" for i in range(9)]], row=0)
    assert fig_dollar.axes[0].get_xticklabels()[0].get_text() == r"\$0"  # shown literally, not as math
    path = llama_attr.save_png(tmp_path / "text.png")
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels[..., :3].std() > 0.05
    with pytest.raises(AttributionInputError, match="not from a vision model"):
        llama_attr.plot(image=np.zeros((4, 4, 3)))
    with pytest.raises(AttributionInputError, match="outside the batch"):
        llama_attr.plot(row=2)


def _vision_attr(grid=(2, 3), patch=4, prefix=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    seq = prefix + n
    token, position = torch.randn(1, seq, generator=g), torch.randn(1, seq, generator=g)
    patch_map = (token + position)[:, prefix:].reshape(1, *grid)
    pixel_map = torch.randn(1, grid[0] * patch, grid[1] * patch, generator=g)
    return Attribution(
        token=token,
        position=position,
        target=torch.tensor([2]),
        target_value=torch.tensor([1.5]),
        model_type="vit",
        extras={"patch_map": patch_map, "pixel_map": pixel_map},
    )


def test_image_plot_overlays_maps_on_the_image(tmp_path):
    import matplotlib.image as mpimg

    attr = _vision_attr(grid=(2, 3), prefix=2)
    image = (np.arange(8 * 12 * 3).reshape(8, 12, 3) % 255).astype(np.uint8)
    fig = attr.plot(image, labels={2: "cat"})
    axes = {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.get_title()}
    assert set(axes) == {"image", "pixel relevance", "patch relevance", "position relevance"}
    # each overlay panel: the grey image under the map, both spanning the image
    np.testing.assert_allclose(axes["pixel relevance"].images[1].get_array(), attr.pixel_map[0].numpy())
    np.testing.assert_allclose(axes["patch relevance"].images[1].get_array(), attr.patch_map[0].numpy())
    np.testing.assert_allclose(
        axes["position relevance"].images[1].get_array(), attr.position[0, 2:].reshape(2, 3).numpy()
    )
    assert axes["patch relevance"].images[1].get_extent() == [0, 12, 8, 0]
    assert (
        "[CLS]" in axes["position relevance"].get_title()
        and "[DIST]" in axes["position relevance"].get_title()
    )
    assert "'cat' (id 2)" in fig._suptitle.get_text()
    png = attr.save_png(tmp_path / "vision.png", image)
    assert mpimg.imread(png).shape[-1] in (3, 4)


def test_image_inputs_are_converted():
    from hf_pelrp.viz.image import image_array

    chw = torch.rand(3, 5, 7)
    np.testing.assert_allclose(image_array(chw), chw.permute(1, 2, 0).numpy())
    normalised = image_array(torch.randn(1, 3, 5, 7) * 3)
    assert normalised.shape == (5, 7, 3) and normalised.min() >= 0 and normalised.max() <= 1
    assert image_array(np.full((5, 7), 255, dtype=np.uint8)).max() == 1.0
    with pytest.raises(AttributionInputError, match="image must be"):
        image_array(np.zeros((2, 5, 7)))


def test_image_plot_of_a_real_vit():
    from transformers import ViTConfig, ViTForImageClassification

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
    model = ViTForImageClassification(config).eval()
    pixels = torch.randn(1, 3, 16, 16)
    attr = hf_pelrp.attribute(model, pixel_values=pixels)
    fig = attr.plot(pixels[0])
    axes = {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.get_title()}
    assert {"image", "position relevance"} <= set(axes)
    np.testing.assert_allclose(
        axes["position relevance"].images[1].get_array(),
        attr.position[0, 1:].reshape(4, 4).numpy(),
        rtol=1e-6,
    )
    page = attr.to_html(image=pixels[0])
    assert "[CLS]" in page and 'data-map="position"' in page and 'class="hfp-base' in page


def test_show_in_a_notebook_displays_the_html_fragment(llama_attr, monkeypatch):
    import sys
    import types

    shown = []

    class ZMQInteractiveShell:  # the class name is how a Jupyter kernel is recognised
        pass

    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: ZMQInteractiveShell()
    display = types.ModuleType("IPython.display")
    display.HTML = lambda text: ("html", text)
    display.display = shown.append
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    llama_attr.show(tokenizer=word_tokenizer())
    assert len(shown) == 1 and shown[0][0] == "html"
    assert shown[0][1].startswith('<div class="hfp-root') and "hfp-special" in shown[0][1]
