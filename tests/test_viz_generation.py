"""A continuation (GenerationAttribution) as a target x source matrix: HTML (maps switchable, per-layer charts
on demand), PNG and terminal, from its own fields."""

from __future__ import annotations

import html
import io
import re

import numpy as np
import pytest
import torch

import hf_pelrp
from conftest import tiny_llama_family
from hf_pelrp import AttributionInputError
from hf_pelrp.viz import generation_html, generation_plot, generation_png, render_generation_table
from hf_pelrp.viz.colors import color_scale, css_hex, diverging_rgb
from test_viz import _json_block, bpe_tokenizer, with_display_fields

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama_family("llama", vocab_size=len(tok))


@pytest.fixture(scope="module")
def prompt(tok):
    return torch.tensor([[tok.bos_token_id, *tok("The capital of France is")["input_ids"]]])


@pytest.fixture(scope="module")
def gen(model, tok, prompt):
    cont = torch.tensor(tok(" Paris, of course")["input_ids"])
    return with_display_fields(hf_pelrp.attribute(model, prompt, continuation_ids=cont), tok)


def _matrix(page: str) -> str:
    """The matrix table alone (the per-layer charts below it have token columns too)."""
    return re.search(r'<table class="hfp-heat hfp-matrix.*?</table>', page, re.S).group(0)


def _cells(page: str) -> list[tuple[int, int, str]]:
    return [
        (int(r), int(i), bg)
        for r, i, bg in re.findall(
            r'<td class="hfp-c[^"]*" data-r="(\d+)" data-i="(\d+)" data-v="" style="background-color:(#[0-9a-f]{6})',
            page,
        )
    ]


def test_matrix_shape_labels_and_causal_triangle(gen, tok):
    page = generation_html(gen)
    rows, length, prompt = gen.token.shape[0], gen.input_ids.shape[0], gen.prompt_length
    cells = _cells(page)
    # row s sees the prompt and the s tokens generated before it; the rest is grey
    assert all(c < prompt + s for s, c, _ in cells) and len(cells) == sum(prompt + s for s in range(rows))
    assert page.count('<td class="hfp-future') == rows * length - len(cells)
    # columns: the decoded tokens of prompt + continuation, the continuation marked
    columns = re.findall(
        r'<th class="hfp-col[^"]*" title="[^"]*"><span class="hfp-chip"><bdi>([^<]*)</bdi>', _matrix(page)
    )
    assert columns == [html.escape(t, quote=False) for t in gen.tokens]
    assert "Ġ" not in page and _matrix(page).count(" hfp-gen") == length - prompt
    # rows: the explained tokens as text (from the labels), with their logit and gap
    labels = re.findall(r'<th class="hfp-rowlab">→ <span class="hfp-label"><bdi>([^<]*)</bdi>', page)
    assert labels == [gen.labels[int(t)] for t in gen.target]
    assert labels[0] == " Paris"
    for s in range(rows):
        assert f'<td class="hfp-num">{float(gen.target_value[s]):.4g}</td>' in page
    # the position each token is read from is outlined: the diagonal below the generated tokens
    explained = re.findall(r'<td class="hfp-c[^"]*hfp-explained[^"]*" data-r="(\d+)" data-i="(\d+)"', page)
    assert [(int(r), int(i)) for r, i in explained] == [(s, prompt + s - 1) for s in range(rows)]


def test_matrix_colours_and_switch(gen):
    page = generation_html(gen, hide_special=False)
    data = _json_block(page)
    assert data["kind"] == "generation" and data["maps"] == ["relevance", "token", "position"]
    radios = re.findall(r'<input type="radio" class="hfp-map" name="[^"]+" value="([a-z]+)"', page)
    assert radios == data["maps"]
    prompt = gen.prompt_length
    for s, row in enumerate(data["rows"]):
        visible = slice(0, prompt + s)
        maps = {"relevance": gen.relevance[s], "token": gen.token[s], "position": gen.position[s]}
        scale = max(float(m[visible].abs().max()) for m in maps.values())  # per row, shared by the maps
        for name, values in maps.items():
            assert row["colors"]["all"][name] == [css_hex(diverging_rgb(float(v), scale)) for v in values]
            assert row["fmt"][name][0] == f"{float(values[0]):.2f}" or abs(float(values[0])) >= 0.995
    # the initial cells show the combined map
    for r, i, bg in _cells(page):
        assert bg == data["rows"][r]["colors"]["all"]["relevance"][i]
    # one scale for the whole matrix
    whole = _json_block(generation_html(gen, scale="matrix", hide_special=False))
    scales = {row["scale"]["all"]["relevance"] for row in whole["rows"]}
    assert len(scales) == 1
    with pytest.raises(AttributionInputError, match="scale must be"):
        generation_html(gen, scale="column")


def test_special_columns_hidden_and_layer_charts_on_demand(gen):
    page = generation_html(gen)
    assert 'class="hfp-root hfp-hide-special"' in page and 'class="hfp-hide" checked' in page
    assert _matrix(page).count('<th class="hfp-col hfp-special"') == 1  # the BOS column
    # per-layer charts folded, one per explained token
    rows = gen.token.shape[0]
    assert (
        page.count('<details class="hfp-layers">') == rows and '<details class="hfp-layers" open' not in page
    )
    layers = gen.position_by_layer.shape[1]
    assert page.count('<td class="hfp-cell') == layers * sum(gen.prompt_length + s for s in range(rows))
    assert '<details class="hfp-layers">' not in generation_html(gen, layer_charts=False)


def test_compact_compared_with_one_text_report_per_token(gen):
    """The matrix replaces a full per-layer chart per token: far fewer elements are laid out."""
    matrix = generation_html(gen)
    rows = hf_pelrp.viz.to_html(gen.to_attribution())
    visible = re.sub(r"<details.*?</details>", "", matrix, flags=re.S)
    assert visible.count("<td") < rows.count("<td") / 2


def test_to_html_show_plot_dispatch(gen, capsys):
    assert 'data-kind="generation"' in hf_pelrp.viz.to_html(gen)
    fig = hf_pelrp.viz.plot(gen)
    assert fig.axes[0].images[0].get_array().shape == (gen.token.shape[0], gen.input_ids.shape[0] - 1)
    hf_pelrp.viz.show(gen)
    out = capsys.readouterr().out
    assert "→ ' Paris'" in out and "Ġ" not in out
    with pytest.raises(AttributionInputError, match="image="):
        hf_pelrp.viz.to_html(gen, image=np.zeros((2, 2)))


def test_matrix_png(gen, tmp_path):
    import matplotlib.image as mpimg

    fig = generation_plot(gen, map="position", hide_special=False)
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    rows, length, prompt = gen.token.shape[0], gen.input_ids.shape[0], gen.prompt_length
    assert shown.shape == (rows, length)
    mask = np.ma.getmaskarray(shown)
    for s in range(rows):
        assert not mask[s, : prompt + s].any() and mask[s, prompt + s :].all()
        scale = color_scale(gen.position[s, : prompt + s].tolist())
        np.testing.assert_allclose(
            shown[s, : prompt + s], gen.position[s, : prompt + s].numpy() / scale, rtol=1e-5
        )
    labels = [gen.labels[int(t)] for t in gen.target]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        f"→ '{x}'" if x != x.strip() else f"→ {x}" for x in labels
    ]
    names = [t.get_text() for t in ax.get_xticklabels()]
    assert names[0] == "<|endoftext|>" and "' capital'" in names and not any("Ġ" in n for n in names)
    assert ax.images[0].get_cmap().name == "hf_pelrp_diverging"
    path = generation_png(gen, tmp_path / "matrix.png")
    assert mpimg.imread(path).shape[0] > 200
    with pytest.raises(AttributionInputError, match="map must be"):
        generation_plot(gen, map="segment")


def test_terminal_matrix(gen):
    from rich.console import Console

    console = Console(file=io.StringIO(), width=160, force_terminal=True, color_system="truecolor")
    console.print(render_generation_table(gen))
    text = console.file.getvalue()
    assert "→ ' Paris'" in text and " capital" in text and "Ġ" not in text
    assert text.count("·") >= sum(range(gen.token.shape[0]))  # the future of each token


def test_span_sum_and_contrast(model, tok, prompt):
    cont = torch.tensor(tok(" Paris, of course")["input_ids"])
    span = with_display_fields(
        hf_pelrp.attribute(model, prompt, continuation_ids=cont, span_reduce="sum"), tok
    )
    page = generation_html(span)
    assert (
        "<bdi> Paris, of course</bdi>" in page and "→ " not in page.split("<tbody>")[1].split("</tbody>")[0]
    )
    assert len(_json_block(page)["rows"]) == 1
    city = tok(" city")["input_ids"][0]
    contrast = with_display_fields(
        hf_pelrp.attribute(model, prompt, continuation_ids=cont[:2], foil=city), tok
    )
    page = generation_html(contrast)
    assert "logit difference" in page and page.count("<bdi> city</bdi>") == 2


def test_ids_when_the_fields_are_missing(model, tok, prompt):
    cont = torch.tensor(tok(" Paris")["input_ids"])
    bare = hf_pelrp.attribute(model, prompt, continuation_ids=cont)
    page = generation_html(bare)
    assert f"<bdi>[{int(cont[0])}]</bdi>" in page
    assert "<bdi> Paris</bdi>" in generation_html(bare, tokenizer=tok)
