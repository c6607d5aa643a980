"""Model-card sections (hf_pelrp.card), tested offline against locally built cards."""

from __future__ import annotations

import pytest
import torch

import hf_pelrp
from conftest import tiny_llama_family
from hf_pelrp import AttributionInputError
from hf_pelrp.card import (
    SECTION_BEGIN,
    SECTION_END,
    add_attribution_section,
    attribution_section,
    replace_section,
)
from test_viz import word_tokenizer


@pytest.fixture(scope="module")
def llama():
    return tiny_llama_family("llama")


def _row(section: str, name: str) -> str:
    line = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
    return line.split("|")[2].strip()


def test_section_reports_the_measured_gap(llama):
    ids = torch.tensor([[5, 17, 42, 8, 99, 23]])
    before = llama(input_ids=ids).logits
    section = attribution_section(llama, mode="cp", example={"input_ids": ids})
    attr = hf_pelrp.attribute(llama, input_ids=ids, mode="cp")
    assert section.startswith(SECTION_BEGIN) and section.endswith(SECTION_END)
    assert _row(section, "Supported by hf_pelrp") == "**yes**"
    assert "rotary" in _row(section, "Positional encoding")
    assert _row(section, "Rule preset").startswith("`cp`: CP-LRP")
    assert _row(section, "Positions as leaves") == "yes (PE-LRP)"
    gap = float(attr.conservation_gap[0])
    assert _row(section, "Conservation gap").startswith(f"{gap:.4g} (")
    assert f"logit {float(attr.target_value[0]):.4g}" in _row(section, "Explained target")
    assert _row(section, "Relevance sums") == (
        f"token {float(attr.token[0].sum()):.4g}, position {float(attr.position[0].sum()):.4g}"
    )
    # measuring leaves the model as it was
    torch.testing.assert_close(llama(input_ids=ids).logits, before, rtol=0, atol=0)


def test_default_example_is_deterministic_and_text_needs_a_tokenizer(llama):
    first = attribution_section(llama, positional=False)
    assert first == attribution_section(llama, positional=False)
    assert "8 random token ids (seed 0)" in _row(first, "Measured on")
    assert _row(first, "Positions as leaves") == "no (classic baseline)"
    tok = word_tokenizer()
    text = attribution_section(llama, example="the capital of france is", tokenizer=tok)
    assert "the text `the capital of france is`" in _row(text, "Measured on")
    target = int(hf_pelrp.attribute(llama, **tok("the capital of france is", return_tensors="pt")).target[0])
    assert f"{target} (`{tok.decode([target])!r}`)" in _row(text, "Explained target")
    with pytest.raises(AttributionInputError, match="needs tokenizer="):
        attribution_section(llama, example="no tokenizer")
    with pytest.raises(AttributionInputError, match="example must be"):
        attribution_section(llama, example=3.5)


def test_classifier_label_and_backticks_in_examples():
    model = tiny_llama_family("qwen2", head="sequence_classification")
    model.config.id2label = {0: "negative", 1: "neutral", 2: "positive"}
    section = attribution_section(model, example=torch.tensor([7, 8, 9, 10]))
    attr = hf_pelrp.attribute(model, input_ids=torch.tensor([[7, 8, 9, 10]]))
    label = model.config.id2label[int(attr.target[0])]
    assert f"(`{label}`)" in _row(section, "Explained target")
    assert "sequence classification" in _row(section, "Model type")
    from hf_pelrp.card import _code_span

    assert _code_span("a `b` c") == "``a `b` c``"
    assert _code_span("`x`") == "`` `x` ``"


def test_unsupported_model_says_no_with_the_reason():
    from transformers import LongT5Config, LongT5ForConditionalGeneration

    config = LongT5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    section = attribution_section(LongT5ForConditionalGeneration(config))
    assert _row(section, "Supported by hf_pelrp") == "**no**"
    assert "relative attention biases" in section and "`longt5`" in section


def test_model_card_gets_the_section_once(llama):
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard.from_template(ModelCardData(license="apache-2.0", language="en"), model_id="tiny-llama")
    original = card.text
    section = attribution_section(llama)
    add_attribution_section(card, section=section)
    once = str(card)
    add_attribution_section(card, llama)  # measured again: the same section replaces the old one
    assert str(card) == once
    assert card.text.count(SECTION_BEGIN) == 1 and card.text.startswith(original.rstrip())
    assert card.data.license == "apache-2.0"
    reloaded = ModelCard(str(card))
    assert section in reloaded.text and reloaded.data.language == "en"


def test_an_old_section_is_replaced_in_place():
    old = f"# Model\n\nIntro.\n\n{SECTION_BEGIN}\n## old stuff\n{SECTION_END}\n\n## Citation\n\nCite us.\n"
    new = f"{SECTION_BEGIN}\n## new stuff\n{SECTION_END}"
    replaced = replace_section(old, new)
    assert replaced == f"# Model\n\nIntro.\n\n{new}\n\n## Citation\n\nCite us.\n"
    assert replace_section(replaced, new) == replaced
    assert add_attribution_section("# Card\n", section=new) == f"# Card\n\n{new}\n"
    with pytest.raises(ValueError, match="no '<!-- hf_pelrp:attribution:end -->'"):
        replace_section(f"# Model\n{SECTION_BEGIN}\nhalf a section\n", new)
    with pytest.raises(ValueError, match="wrapped in the hf_pelrp markers"):
        replace_section("# Model\n", "## no markers")
    with pytest.raises(AttributionInputError, match="needs model="):
        add_attribution_section("# Card\n")
