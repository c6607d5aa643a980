"""Every report shows decoded tokens and the target as text from the attribution's own fields (``tokens``,
``labels``, ``special_tokens_mask``, as the pipeline and the CLI fill them), with no tokenizer argument; special
tokens can be hidden everywhere; without the fields, ids are shown."""

from __future__ import annotations

import io
import re

import pytest
import torch

import hf_pelrp
from conftest import tiny_llama_family
from test_viz import bpe_tokenizer, with_display_fields

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def bare(tok):
    """An attribution of a byte-level BPE model as the engine returns it: ids only, no display fields."""
    model = tiny_llama_family("llama", vocab_size=len(tok))
    ids = torch.tensor([[tok.bos_token_id, *tok("The capital of France is")["input_ids"]]])
    return hf_pelrp.attribute(model, input_ids=ids)


@pytest.fixture(scope="module")
def attr(bare, tok):
    return with_display_fields(bare, tok)


def _terminal(renderable) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=160, force_terminal=True, color_system="truecolor")
    console.print(renderable)
    return console.file.getvalue()


def test_the_fixture_is_a_byte_level_bpe(bare, tok):
    pieces = tok.convert_ids_to_tokens(bare.input_ids[0].tolist())
    assert "Ġcapital" in pieces and bare.tokens is None and bare.labels == {}


def test_html_uses_the_fields(attr):
    page = attr.to_html()
    assert "Ġ" not in page
    assert "<bdi> capital</bdi>" in page and "<bdi> France</bdi>" in page
    target = attr.labels[int(attr.target[0])]
    assert not target.startswith("Ġ")
    # the target as text: in the summary and after the explained position
    assert page.count(f"<bdi>{target}</bdi>") == 2
    assert f"(id {int(attr.target[0])})" in page
    # special tokens come from special_tokens_mask: the BOS is hideable and hidden at first
    assert 'class="hfp-root hfp-hide-special"' in page and 'class="hfp-hide" checked' in page
    assert page.count("hfp-tok hfp-c hfp-special") == 1


def test_png_uses_the_fields(attr):
    fig = attr.plot()
    names = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert "<|endoftext|>" not in names  # hidden: special
    assert "' capital'" in names and not any("Ġ" in n for n in names)  # spaces visible (quoted), no markers
    target = attr.labels[int(attr.target[0])]
    assert repr(target)[1:-1] in fig.axes[0].get_title(loc="left")
    shown = [t.get_text() for t in attr.plot(hide_special=False).axes[0].get_xticklabels()]
    assert shown[0] == "<|endoftext|>"


def test_terminal_uses_the_fields(attr, capsys):
    from hf_pelrp.viz import render_tables

    text = _terminal(render_tables(attr))
    target = attr.labels[int(attr.target[0])]
    assert "Ġ" not in text and " capital" in text and f"'{target}' (id {int(attr.target[0])})" in text
    hidden = _terminal(render_tables(attr, hide_special=True))
    assert "<|endoftext|>" in text and "<|endoftext|>" not in hidden
    attr.show()
    assert " capital" in capsys.readouterr().out


def test_a_tokenizer_argument_decodes_too(bare, tok):
    page = bare.to_html(tokenizer=tok)
    assert "Ġ" not in page and "<bdi> capital</bdi>" in page
    assert f"<bdi>{hf_pelrp.tokens.display_token(tok, int(bare.target[0]))}</bdi>" in page


def test_without_fields_ids_are_shown(bare):
    page = bare.to_html()
    first = int(bare.input_ids[0, 1])
    assert f"<bdi>[{first}]</bdi>" in page
    assert f"<b>id {int(bare.target[0])}</b>" in page  # no label known: the id, said once


def test_class_names_and_masked_lm_labels_from_the_fields():
    attr = hf_pelrp.Attribution(
        token=torch.tensor([[0.1, 0.5, -0.2, 0.0]]),
        position=torch.tensor([[0.0, 0.1, 0.1, 0.0]]),
        target=torch.tensor([1]),
        target_value=torch.tensor([0.7]),
        input_ids=torch.tensor([[2, 10, 11, 3]]),
        tokens=[["[CLS]", "great", "movie", "[SEP]"]],
        special_tokens_mask=torch.tensor([[True, False, False, True]]),
        labels={0: "NEGATIVE", 1: "POSITIVE"},
        model_type="bert",
    )
    page = attr.to_html()
    assert "<bdi>POSITIVE</bdi>" in page and page.count("hfp-tok hfp-c hfp-special") == 2
    text = _terminal(hf_pelrp.viz.render_tables(attr, hide_special=True))
    assert "'POSITIVE' (id 1)" in text and "[CLS]" not in text and "sum (all positions)" in text
    # labels= still wins over the stored names
    assert "<bdi>good</bdi>" in attr.to_html(labels={1: "good"})


def test_foil_is_named(tok):
    model = tiny_llama_family("llama", vocab_size=len(tok))
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    paris, city = tok(" Paris")["input_ids"][0], tok(" city")["input_ids"][0]
    attr = with_display_fields(hf_pelrp.attribute(model, input_ids=ids, target=paris, foil=city), tok)
    page = attr.to_html()
    assert re.search(r"target <span class=\"hfp-label\"><bdi> Paris</bdi></span>.*versus foil", page)
    assert "<bdi> city</bdi>" in page
