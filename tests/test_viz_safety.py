"""Odd token strings cannot break or hijack a report (bidirectional overrides, lone surrogates, control
characters), the colours mean the same in HTML and matplotlib, and the optional libraries load lazily."""

from __future__ import annotations

import html
import io
import re
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import hf_pelrp
from hf_pelrp import Attribution
from hf_pelrp.viz.colors import (
    NEGATIVE_RGB,
    POSITIVE_RGB,
    css_hex,
    diverging_rgb,
    diverging_rgb_array,
    matplotlib_cmap,
)
from hf_pelrp.viz.strings import clean, terminal_text, visible_text

RLO = "\u202eevil\u202c"  # right-to-left override: would reverse the text after it without isolation
ANSI = "\x1b[31mred\x1b[0m"
OSC = "x\x1b]0;pwned title\x07y"
CARRIAGE = "over\rwrite"
BELL = "ding\x07"
LONE = "\ud800"
PAIR = "\ud83d\ude00"  # a surrogate pair written as two code points: the emoji
MARKUP = "[bold red]x[/]"


def _attr(tokens: list[str]) -> Attribution:
    n = len(tokens)
    g = torch.Generator().manual_seed(0)
    return Attribution(
        token=torch.randn(1, n, generator=g),
        position=torch.randn(1, n, generator=g),
        target=torch.tensor([3]),
        target_value=torch.tensor([1.0]),
        position_by_layer=torch.randn(1, 2, n, generator=g),
        position_index=torch.tensor([n - 1]),
        input_ids=torch.arange(n)[None],
        tokens=[tokens],
        labels={3: RLO},
        model_type="llama",
    )


ODD = ["<s>", RLO, ANSI, OSC, CARRIAGE, BELL, LONE, PAIR, MARKUP, " after"]


class _TextNodes(HTMLParser):
    """Every text node of the body with the stack of elements it sits in (scripts and styles skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.nodes: list[tuple[str, tuple[str, ...]]] = []

    def handle_starttag(self, tag, attrs):
        if tag not in ("meta", "input", "img", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.stack:
            while self.stack.pop() != tag:
                pass

    def handle_data(self, data):
        if "script" not in self.stack and "style" not in self.stack:
            self.nodes.append((data, tuple(self.stack)))


def test_every_token_string_is_bidi_isolated():
    attr = _attr(ODD)
    for page in (attr.to_html(), hf_pelrp.viz.to_html(_generation(ODD))):
        parser = _TextNodes()
        parser.feed(page)
        with_override = [stack for text, stack in parser.nodes if "\u202e" in text]
        assert with_override, "the token is shown"
        assert all("bdi" in stack for stack in with_override)


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")  # DejaVu has no control pictures / emoji
def test_lone_surrogates_are_replaced_and_pairs_joined(tmp_path):
    assert clean(LONE) == "\ufffd" and clean(PAIR) == "😀" and clean("a" + LONE + "b") == "a\ufffdb"
    attr = _attr(ODD)
    page = attr.to_html(path=tmp_path / "odd.html")  # writing UTF-8 would fail on a lone surrogate
    assert page.encode("utf-8") == (tmp_path / "odd.html").read_bytes()
    assert "<bdi>\ufffd</bdi>" in page and "<bdi>😀</bdi>" in page
    assert not re.search("[\ud800-\udfff]", page)
    hf_pelrp.viz.generation_html(_generation(ODD), path=tmp_path / "odd-gen.html")
    attr.save_png(tmp_path / "odd.png")
    hf_pelrp.viz.generation_png(_generation(ODD), tmp_path / "odd-gen.png")
    _terminal(hf_pelrp.viz.render_tables(attr)).encode("utf-8")


def test_control_characters_shown_in_html_not_executed():
    page = _attr(ODD).to_html()
    assert "\x1b" not in page and "\x07" not in page and "\r" not in page.replace("\r\n", "\n")
    assert "<bdi>␛[31mred␛[0m</bdi>" in page and "<bdi>over␍write</bdi>" in page
    assert visible_text("a\nb\tc\x00") == "a↵b⇥c␀" and visible_text("") == "∅"


def _terminal(renderable) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system="truecolor")
    console.print(renderable)
    return console.file.getvalue()


def test_terminal_output_strips_control_characters():
    assert (
        terminal_text(ANSI) == "red" and terminal_text(OSC) == "xy" and terminal_text(CARRIAGE) == "overwrite"
    )
    assert terminal_text(BELL) == "ding" and terminal_text(RLO) == "evil" and terminal_text("a\nb") == "a↵b"
    for renderable in (
        hf_pelrp.viz.render_tables(_attr(ODD)),
        hf_pelrp.viz.render_generation_table(_generation(ODD)),
    ):
        raw = _terminal(renderable)
        # rich's own colours are SGR sequences; nothing else may reach the terminal
        rest = re.sub(r"\x1b\[[0-9;]*m", "", raw)
        assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", rest), repr(rest[:200])
        assert "\u202e" not in rest and "pwned" not in rest
        assert MARKUP in rest  # markup in a token is text, not a style


def _generation(tokens: list[str]):
    from hf_pelrp.result import GenerationAttribution

    n, prompt = len(tokens), len(tokens) - 3
    g = torch.Generator().manual_seed(1)
    rows = n - prompt
    token = torch.randn(rows, n, generator=g)
    for s in range(rows):
        token[s, prompt + s :] = 0
    return GenerationAttribution(
        token=token,
        position=torch.zeros(rows, n),
        target=torch.arange(prompt, n),
        target_value=torch.ones(rows),
        input_ids=torch.arange(n),
        prompt_length=prompt,
        tokens=list(tokens),
        model_type="llama",
    )


def test_html_and_matplotlib_share_one_colour_function():
    values = np.linspace(-2.0, 2.0, 401)
    scale = 1.5
    exact = np.array([diverging_rgb(float(v), scale) for v in values])
    np.testing.assert_array_equal(diverging_rgb_array(values, scale), exact)  # vectorised = scalar
    cmap = matplotlib_cmap()
    sampled = np.rint(cmap(np.clip((values / scale + 1) / 2, 0, 1))[:, :3] * 255)
    assert np.abs(sampled - exact).max() <= 1  # within one level of 511
    assert tuple(np.rint(np.array(cmap(1.0)[:3]) * 255).astype(int)) == POSITIVE_RGB
    assert tuple(np.rint(np.array(cmap(0.0)[:3]) * 255).astype(int)) == NEGATIVE_RGB
    assert cmap(0.5)[:3] == (1.0, 1.0, 1.0)


def test_the_text_png_colours_like_the_html():
    """The figure's cells are the HTML's colours: red where a map is positive, blue where negative (the old
    bars were red for 'token' and blue for 'position' whatever the sign)."""
    attr = _attr([f"t{i}" for i in range(6)])
    fig = attr.plot()
    fig.canvas.draw()
    strip = fig.axes[0].images[0]
    data = np.asarray(strip.get_array())
    norm = strip.norm
    page = attr.to_html(hide_special=False)
    colours = re.findall(r'data-r="0" data-i="(\d+)" style="background-color:(#[0-9a-f]{6})', page)
    for i, colour in colours:
        rgb = np.rint(np.array(strip.get_cmap()(norm(data[0, int(i)]))[:3]) * 255).astype(int)
        expected = np.array([int(colour[k : k + 2], 16) for k in (1, 3, 5)])
        assert np.abs(rgb - expected).max() <= 1
    # and the per-layer totals: bar colours from the same function
    bar_ax = [ax for ax in fig.axes if ax.get_xlabel() == "layer total"][0]
    totals = attr.position_by_layer[0].sum(-1)
    peak = float(totals.abs().max())
    for patch, total in zip(bar_ax.patches, totals, strict=True):
        face = tuple(np.rint(np.array(patch.get_facecolor()[:3]) * 255).astype(int))
        assert css_hex(face) == css_hex(diverging_rgb(float(total), peak))


def test_optional_libraries_load_lazily():
    code = (
        "import sys, hf_pelrp, hf_pelrp.viz; "
        "loaded = [m for m in ('matplotlib', 'rich') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("blocked", "call"),
    [
        ("matplotlib.figure", lambda a: a.plot()),
        ("rich.console", lambda a: hf_pelrp.viz.render_tables(a)),
    ],
)
def test_a_missing_library_names_the_extra(monkeypatch, blocked, call):
    monkeypatch.setitem(sys.modules, blocked, None)  # as if it were not installed
    with pytest.raises(ImportError, match=re.escape("pip install 'hf_pelrp[viz]'")):
        call(_attr(["a", "b", "c"]))


def test_injected_label_and_title_stay_text():
    attr = _attr(["a", "b"]).replace(labels={3: "<script>alert(1)</script>"}, model_type='"><b>x')
    page = attr.to_html(title="</title><script>alert(2)</script>")
    assert page.count("<script") == 2 and "<b>x" not in page
    assert html.escape("<script>alert(1)</script>", quote=False) in page


def test_long_inputs_keep_readable_axes():
    attr = _attr([f"w{i}" for i in range(300)])
    fig = attr.plot()
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert 30 <= len(labels) <= 64 and labels[0] == "w0"
    assert fig.get_size_inches()[0] <= 26
