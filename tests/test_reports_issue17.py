"""What users saw in reports (issue 17, section 6 and part of section 5): encoder-decoder views (the explained
position is in the decoder, every row keeps its target, the target prefix is drawn, the chart is named after the
model's positional kind, the gap covers the prefix), per-position extras unpadded with the tokens, the
generation matrix not clipped, ``to_html(path)`` for every result, no layer chart for constant positions, and
terminal text without Unicode line separators."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers import AutoConfig, BartForConditionalGeneration, T5ForConditionalGeneration, pipeline

import hf_pelrp
from conftest import tiny_llama_family, tiny_word_tokenizer
from hf_pelrp import Attribution, AttributionInputError
from hf_pelrp.adapters import adapter_for_type
from hf_pelrp.viz import plot, to_html
from hf_pelrp.viz.strings import terminal_text, visible_text
from hf_pelrp.viz.view import row_views

pytestmark = pytest.mark.usefixtures("single_thread")

SOURCE = "w1 w2 w3 w4"  # 4 source tokens: a continuation of 6 has rows whose decoder position is >= 4
CONTINUATION = [10, 11, 12, 13, 14, 15]
CHART = '<table class="hfp-heat hfp-layer-chart'  # a drawn per-layer chart (the CSS names the class too)


def _seq2seq(model_type: str, cls: type) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **adapter_for_type(model_type).tiny)
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_word_tokenizer()


@pytest.fixture(scope="module", params=["t5", "bart"])
def continuation(request, tok):
    cls = {"t5": T5ForConditionalGeneration, "bart": BartForConditionalGeneration}[request.param]
    model = _seq2seq(request.param, cls)
    src = tok(SOURCE, return_tensors="pt")["input_ids"]
    return hf_pelrp.attribute(model, src, continuation_ids=torch.tensor(CONTINUATION), tokenizer=tok)


def _row_blocks(html: str) -> list[str]:
    return re.split(r'<div class="hfp-row" data-row="\d+">', html)[1:]


# ---- encoder-decoder reports ----------------------------------------------------------------------------------


def test_seq2seq_html_outlines_the_decoder_position_and_keeps_every_target(continuation):
    attr = continuation
    html = to_html(attr)
    blocks = _row_blocks(html)
    assert len(blocks) == attr.batch_size == len(CONTINUATION)
    source_len = attr.seq_len
    for r, block in enumerate(blocks):
        source, _, decoder = block.partition('class="hfp-text hfp-decoder"')
        assert decoder, f"row {r}: no decoder-prefix strip"
        # nothing in the source is outlined (the old view outlined source token r, or nothing from row 4 on)
        assert "hfp-explained" not in source, f"row {r}: a source token is outlined"
        explained = re.findall(r'class="hfp-tok hfp-c[^"]*hfp-explained[^"]*"[^>]*data-i="(\d+)"', decoder)
        # the outlined chip is the decoder position whose logits were explained (after the source's colours)
        assert explained == [str(source_len + int(attr.position_index[r]))], f"row {r}: {explained}"
        # the target chip follows the decoder prefix in every row (rows 4 and 5 lost it before)
        label = attr.labels[int(attr.target[r])]
        assert re.search(r'hfp-label hfp-target"><bdi>' + re.escape(label), decoder), (
            f"row {r}: no target chip"
        )
        # the decoder prefix ends at the explained position: later decoder inputs are not this row's prefix
        assert decoder.count('class="hfp-tok') == int(attr.position_index[r]) + 1


def test_seq2seq_explained_decoder_start_token_is_never_hidden(continuation, tok):
    attr = continuation
    html = to_html(attr, tokenizer=tok)  # the tokenizer marks the decoder start token ([PAD] / [CLS]) special
    assert 'class="hfp-hide"' in html  # special tokens exist (in the decoder prefix): the switch is offered
    first = _row_blocks(html)[0].partition('class="hfp-text hfp-decoder"')[2]
    chip = re.search(r'<span class="(hfp-tok hfp-c[^"]*hfp-explained[^"]*)"', first).group(1)
    assert "hfp-special" not in chip  # hiding special tokens would hide what row 0 explains
    later = _row_blocks(html)[1].partition('class="hfp-text hfp-decoder"')[2]
    assert re.search(r'class="hfp-tok hfp-c hfp-special"', later)  # elsewhere it is hideable


def test_seq2seq_gap_covers_the_target_prefix_even_for_a_plain_attribution(continuation):
    attr = continuation
    gap = attr.conservation_gap
    source_only = attr.target_value - attr.relevance.sum(-1)
    assert float((gap - source_only).abs().max()) > 1e-6  # the prefix holds relevance: the two differ
    views = row_views(attr)
    np.testing.assert_allclose([v.gap for v in views], gap.tolist(), rtol=1e-5, atol=1e-7)
    # a result read back as a plain Attribution (same fields and extras) is shown with the same gap
    plain = Attribution(**{f: getattr(attr, f) for f in attr.__dataclass_fields__})
    np.testing.assert_allclose([v.gap for v in row_views(plain)], gap.tolist(), rtol=1e-5, atol=1e-7)
    html = to_html(attr)
    for r, block in enumerate(_row_blocks(html)):
        share = abs(float(gap[r])) / abs(float(attr.target_value[r]))
        assert f"({share:.1%} of |logit|)" in block, f"row {r}"
        assert "decoder token" in block and "decoder position" in block  # the prefix's sums are listed


def test_seq2seq_png_draws_the_decoder_prefix_with_the_outline(continuation):
    attr = continuation
    fig = plot(attr, row=4)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    decoder_axes = [ax for ax, t in zip(fig.axes, titles, strict=True) if t.startswith("decoder prefix")]
    assert len(decoder_axes) == 1, titles
    dax = decoder_axes[0]
    assert attr.labels[int(attr.target[4])] in dax.get_title(loc="left")
    outlines = [p for p in dax.patches if not p.get_fill()]
    assert len(outlines) == 1 and outlines[0].get_x() == pytest.approx(int(attr.position_index[4]) - 0.5)
    source_ax = fig.axes[titles.index(next(t for t in titles if "source" in t))]
    assert not [p for p in source_ax.patches if not p.get_fill()]  # no outline in the source


def test_layer_chart_is_named_after_the_positional_kind(tok):
    t5 = _seq2seq("t5", T5ForConditionalGeneration)
    src = tok(SOURCE, return_tensors="pt")["input_ids"]
    attr = hf_pelrp.attribute(t5, src, continuation_ids=torch.tensor(CONTINUATION[:2]), tokenizer=tok)
    html = to_html(attr)
    assert "rotary" not in html and "T5 bias table" in html
    titles = [ax.get_title(loc="left") for ax in plot(attr).axes]
    assert any("T5 bias table" in t for t in titles) and not any("rotary" in t for t in titles)
    llama = hf_pelrp.attribute(tiny_llama_family(), src, tokenizer=tok)
    assert "rotary cos + sin" in to_html(llama)


# ---- constant positions, to_html(path), the generation matrix ------------------------------------------------


def test_no_layer_chart_when_positions_were_constants(tok):
    model = tiny_llama_family()
    src = tok(SOURCE, return_tensors="pt")["input_ids"]
    with_positions = hf_pelrp.attribute(model, src, tokenizer=tok)
    constants = hf_pelrp.attribute(model, src, tokenizer=tok, positional=False)
    assert constants.position_by_layer is not None and float(constants.position_by_layer.abs().max()) == 0.0
    assert CHART in to_html(with_positions)
    assert CHART not in to_html(constants)
    assert len(plot(with_positions).axes) > len(plot(constants).axes)
    gen = hf_pelrp.attribute(model, src, continuation_ids=[7, 8], tokenizer=tok, positional=False)
    assert CHART not in to_html(gen)


def test_to_html_writes_the_file_given_first(tmp_path, tok):
    model = tiny_llama_family()
    src = tok(SOURCE, return_tensors="pt")["input_ids"]
    attr = hf_pelrp.attribute(model, src, tokenizer=tok)
    gen = hf_pelrp.attribute(model, src, continuation_ids=[7, 8], tokenizer=tok)
    for result, name in ((attr, "attr.html"), (gen, "gen.html")):
        html = result.to_html(str(tmp_path / name))
        assert (tmp_path / name).read_text(encoding="utf-8") == html
    html = to_html(attr, tmp_path / "path.html")  # a pathlib.Path, through the function
    assert (tmp_path / "path.html").read_text(encoding="utf-8") == html


def test_generation_matrix_is_not_clipped_by_the_page_width(tok):
    model = tiny_llama_family()
    src = tok(SOURCE, return_tensors="pt")["input_ids"]
    gen = hf_pelrp.attribute(model, src, continuation_ids=list(range(10, 30)), tokenizer=tok)
    html = to_html(gen)
    # the root of every report is capped at 1000 px for reading; the matrix page is not, and its table scrolls
    assert re.search(r'\.hfp-root\[data-kind="generation"\]\{max-width:none\}', html)
    assert 'data-kind="generation"' in html
    assert re.search(r'<div class="hfp-scroll"><table class="hfp-heat hfp-matrix', html)
    assert ".hfp-scroll{overflow-x:auto" in html
    # the last columns and the value / gap / scale columns are in the page
    assert html.count('class="hfp-num"') >= 3 * 20


# ---- unpadding every per-position map ---------------------------------------------------------------------------


def test_unpad_drops_padding_from_every_per_position_map():
    model = tiny_llama_family()
    tok = tiny_word_tokenizer()  # its own: the module's tokenizer stays right-padding
    tok.padding_side = "left"
    batch = tok(["w1 w2 w3 w4 w5 w6", "w7"], return_tensors="pt", padding=True)
    attr = hf_pelrp.attribute(model, **batch, tokenizer=tok)
    assert {"position_abs", "position_by_leaf"} <= set(attr.extras)
    short = attr[1].unpad()
    assert short.seq_len == 1 and len(short.tokens[0]) == 1
    assert short.position_abs.shape == (1, 1)
    assert short.position_by_leaf.shape == (1, *attr.position_by_leaf.shape[1:-1], 1)
    torch.testing.assert_close(short.position_abs[0], attr.position_abs[1, -1:])
    torch.testing.assert_close(short.position_by_leaf[0], attr.position_by_leaf[1, ..., -1:])


def test_unpad_keeps_non_positional_extras_of_the_same_length():
    # 4 positions, 1 of them padding; the M-RoPE axes are per position, 4 distance bins are not
    mask = torch.tensor([[0, 1, 1, 1]])
    by_axis = torch.arange(12.0).reshape(1, 3, 4)
    bins = torch.arange(4.0)[None]
    attr = Attribution(
        token=torch.ones(1, 4),
        position=torch.zeros(1, 4),
        target=torch.tensor([0]),
        target_value=torch.tensor([3.0]),
        attention_mask=mask,
        extras={"position_by_axis": by_axis, "position_by_distance": bins, "patch_map": torch.ones(1, 2, 4)},
    )
    row = attr.unpad()
    torch.testing.assert_close(row.position_by_axis, by_axis[..., 1:])
    torch.testing.assert_close(row.position_by_distance, bins)
    assert row.patch_map.shape == (1, 2, 4)


def test_unpad_of_a_seq2seq_row_drops_the_padding_of_both_sides(tok):
    model = _seq2seq("t5", T5ForConditionalGeneration)
    assert tok.padding_side == "right"  # T5's own side (a left-padded source is re-aligned by the engine)
    src = tok(["w1 w2 w3 w4", "w5 w6"], return_tensors="pt", padding=True)
    decoder = torch.tensor([[0, 10, 11, 12], [0, 13, 0, 0]])
    decoder_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    attr = hf_pelrp.attribute(
        model, **src, decoder_input_ids=decoder, decoder_attention_mask=decoder_mask, tokenizer=tok
    )
    assert int(attr.position_index[1]) == 1  # the last real decoder position of row 1
    row = attr[1].unpad()
    assert row.tokens == [["w5", "w6"]] and row.position_abs.shape == (1, 2)  # the source's padding
    for name in ("target_token", "target_position", "target_position_abs", "target_input_ids"):
        assert row.extras[name].shape == (1, 2), name  # the target prefix's own padding
    assert row.target_position_by_layer.shape[-1] == 2 and len(row.target_tokens[0]) == 2
    # distance bins are not positions: they keep their size
    assert row.target_position_by_distance.shape == attr.target_position_by_distance[1:].shape
    # the explained position counts decoder positions (the source's mask said nothing about it)
    assert int(row.position_index[0]) == 1
    torch.testing.assert_close(row.conservation_gap, attr.conservation_gap[1:])
    torch.testing.assert_close(row.target_token[0], attr.target_token[1, :2])


def test_pipeline_rows_are_unpadded_consistently(tok):
    pipe = pipeline("lrp-attribution", model=tiny_llama_family(), tokenizer=tok, device="cpu")
    outs = pipe(["w1 w2 w3 w4 w5 w6 w7 w8", "w9"], batch_size=2)
    for out in outs:
        n = len(out["tokens"])
        for key in ("token_relevance", "position_relevance", "relevance", "position_abs"):
            assert out[key].shape == (n,), key
        assert out["position_by_leaf"].shape[-1] == n
        assert out["position_relevance_by_layer"].shape[-1] == n


def test_pipeline_refuses_no_inputs(tok):
    pipe = pipeline("lrp-attribution", model=tiny_llama_family(), tokenizer=tok, device="cpu")
    with pytest.raises(AttributionInputError, match="no inputs"):
        pipe([])


def test_seq2seq_pipeline_keeps_ids_integer(tok):
    model = _seq2seq("t5", T5ForConditionalGeneration)
    pipe = pipeline("lrp-attribution", model=model, tokenizer=tok, device="cpu")
    out = pipe(SOURCE)
    assert np.issubdtype(out["target_input_ids"].dtype, np.integer), out["target_input_ids"].dtype
    assert np.issubdtype(out["target_attention_mask"].dtype, np.integer)
    assert out["relevance"].dtype == np.float32


# ---- terminal text ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_terminal_text_has_no_line_separators(separator):
    shown = terminal_text(f"a{separator}b")
    assert shown == "a↵b"
    assert len(shown.splitlines()) == 1  # str.splitlines breaks at every Unicode line boundary
    assert visible_text(f"a{separator}b") == "a↵b"


# ---- Captum ----------------------------------------------------------------------------------------------------


def test_captum_records_take_an_int_target(tok):
    pytest.importorskip("captum.attr", reason="the captum extra is not installed")
    from hf_pelrp.captum import PELRP, visualization_records

    ids = tok(["w1 w2 w3 w4", "w5 w6 w7 w8"], return_tensors="pt").input_ids
    attributions, delta = PELRP(tiny_llama_family()).attribute(ids, target=7, return_convergence_delta=True)
    tokens = [tok.convert_ids_to_tokens(row) for row in ids]
    for target in (7, torch.tensor(7), [7, 7], torch.tensor([7, 7])):  # the README passes an int
        records = visualization_records(attributions, tokens, target, delta)
        assert [r.attr_class for r in records] == [7, 7]
    with pytest.raises(AttributionInputError, match="3 entries for 2 rows"):
        visualization_records(attributions, tokens, [7, 7, 7])


def test_captum_visualize_text_names_ipython_when_missing(monkeypatch, tok):
    pytest.importorskip("captum.attr", reason="the captum extra is not installed")
    import importlib.util

    from hf_pelrp import captum as pe_captum

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "IPython" else real(name, *a)
    )
    ids = tok(["w1 w2"], return_tensors="pt").input_ids
    attributions = pe_captum.PELRP(tiny_llama_family()).attribute(ids, target=7)
    records = pe_captum.visualization_records(attributions, [["w1", "w2"]], 7)
    with pytest.raises(ImportError, match="pip install ipython"):
        pe_captum.visualize_text(records)


def test_captum_delta_on_t5_is_the_conservation_gap(tok):
    pytest.importorskip("captum.attr", reason="the captum extra is not installed")
    from hf_pelrp.captum import PELRP

    model = _seq2seq("t5", T5ForConditionalGeneration)
    src = tok(["w1 w2 w3 w4", "w5 w6 w7 w8"], return_tensors="pt")["input_ids"]
    decoder = torch.tensor([[0, 10, 11], [0, 12, 13]])
    _attributions, delta = PELRP(model).attribute(
        src, target=[20, 21], decoder_input_ids=decoder, return_convergence_delta=True
    )
    attr = hf_pelrp.attribute(model, src, target=torch.tensor([20, 21]), decoder_input_ids=decoder)
    assert float(attr.target_relevance.sum(-1).abs().max()) > 1e-4  # the prefix holds relevance
    torch.testing.assert_close(delta, attr.conservation_gap)


# ---- the command line ------------------------------------------------------------------------------------------


@pytest.fixture
def cli_model(tmp_path, monkeypatch, tok):
    """A model folder for the argument checks, and the pipeline built in memory (no from_pretrained)."""
    from hf_pelrp import cli

    model = tiny_llama_family()
    model.config.save_pretrained(tmp_path)
    monkeypatch.setattr(
        cli,
        "_load_pipeline",
        lambda args: pipeline("lrp-attribution", model=model, tokenizer=tok, device="cpu"),
    )
    return tmp_path


def test_cli_progress_counts_one_input_as_one(cli_model, capsys):
    from hf_pelrp import cli

    assert cli.main(["explain", "--model", str(cli_model), "--text", "w1 w2 w3", "--target", "w7"]) == 0
    err = capsys.readouterr().err
    assert "1/1" in err and "2/2" not in err, err[-500:]


def test_cli_summary_names_the_foil(cli_model, capsys):
    from hf_pelrp import cli

    argv = ["explain", "--model", str(cli_model), "--text", "w1 w2 w3", "--target", "w7", "--foil", "w8"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "target 'w7' (id 12) versus foil 'w8' (id 13) score (difference)" in out, out
    argv = [
        "explain",
        "--model",
        str(cli_model),
        "--text",
        "w1 w2",
        "--continuation",
        "w3 w4",
        "--foil",
        "w8",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "versus foil 'w8' (id 13)" in out, out


def test_cli_no_positional_report_has_no_layer_chart(cli_model, tmp_path):
    from hf_pelrp import cli

    base = ["explain", "--model", str(cli_model), "--text", "w1 w2 w3", "--quiet"]
    assert cli.main([*base, "--out", str(tmp_path / "on.html")]) == 0
    assert cli.main([*base, "--no-positional", "--out", str(tmp_path / "off.html")]) == 0
    assert CHART in (tmp_path / "on.html").read_text(encoding="utf-8")
    assert CHART not in (tmp_path / "off.html").read_text(encoding="utf-8")
