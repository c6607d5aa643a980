"""The inputs users have: chat messages, sentence pairs and lists of either, through the lrp-attribution pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import pipeline

import hf_pelrp
from helpers.builders import tiny_bert_family, tiny_llama_family, tiny_word_tokenizer
from hf_pelrp import AttributionInputError

pytestmark = pytest.mark.usefixtures("single_thread")

CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def chat_tokenizer():
    tok = tiny_word_tokenizer(
        specials=("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[user]", "[assistant]")
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def pair_tokenizer():
    from tokenizers.processors import TemplateProcessing

    tok = tiny_word_tokenizer(vocab_size=60)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.cls_token_id), ("[SEP]", tok.sep_token_id)],
    )
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    return tok


def test_chat_messages_explain_the_next_token_after_the_generation_prompt():
    model, tok = tiny_llama_family("llama", num_layers=1), chat_tokenizer()
    pipe = pipeline("lrp-attribution", model=model, tokenizer=tok, device="cpu")
    messages = [{"role": "user", "content": "w1 w2 w3"}]
    out = pipe(messages)
    assert out["tokens"] == ["[user]", "w1", "w2", "w3", "[assistant]"]
    # the same as explaining the templated prompt by hand
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref = hf_pelrp.attribute(model, ids["input_ids"])
    np.testing.assert_allclose(out["relevance"], ref.relevance[0].numpy(), atol=1e-6)
    assert out["target"]["id"] == int(ref.target[0])
    # a list of conversations is a batch (padded, equal to one at a time)
    second = [{"role": "user", "content": "w4"}, {"role": "assistant", "content": "w5 w6"}, messages[0]]
    both = pipe([messages, second])
    assert len(both) == 2 and both[0]["tokens"] == out["tokens"]
    np.testing.assert_allclose(both[0]["relevance"], out["relevance"], atol=1e-6)
    np.testing.assert_allclose(both[1]["relevance"], pipe(second)["relevance"], atol=1e-6)


def test_chat_needs_a_template_and_a_causal_lm():
    model, tok = tiny_llama_family("llama", num_layers=1), tiny_word_tokenizer()
    pipe = pipeline("lrp-attribution", model=model, tokenizer=tok, device="cpu")
    with pytest.raises(AttributionInputError, match="no chat template"):
        pipe([{"role": "user", "content": "w1"}])
    classifier = tiny_bert_family("bert", num_layers=1)
    pipe = pipeline("lrp-attribution", model=classifier, tokenizer=chat_tokenizer(), device="cpu")
    with pytest.raises(AttributionInputError, match="causal language models"):
        pipe([{"role": "user", "content": "w1"}])


def test_sentence_pairs_give_segment_relevance():
    model, tok = tiny_bert_family("bert", num_layers=1), pair_tokenizer()
    pipe = pipeline("lrp-attribution", model=model, tokenizer=tok, device="cpu")
    pair = {"text": "w1 w2", "text_pair": "w3 w4 w5"}
    out = pipe(pair)
    assert out["tokens"] == ["[CLS]", "w1", "w2", "[SEP]", "w3", "w4", "w5", "[SEP]"]
    enc = tok("w1 w2", "w3 w4 w5", return_tensors="pt")
    assert enc["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    ref = hf_pelrp.attribute(model, **enc)
    np.testing.assert_allclose(out["segment_relevance"], ref.segment[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(out["relevance"], ref.relevance[0].numpy(), atol=1e-6)
    # a list of pairs, and a list mixing pairs and plain sentences, are batches
    many = pipe([pair, {"text": "w6", "text_pair": "w7"}, "w8 w9"])
    assert len(many) == 3
    np.testing.assert_allclose(many[0]["relevance"], out["relevance"], atol=1e-6)
    for bad, message in (
        ({"text": "w1"}, "sentence pair is a dict"),
        ({"text": "w1", "text_pair": "w2", "label": 1}, "unknown keys"),
        ({"text": "", "text_pair": "w2"}, "is empty"),
    ):
        with pytest.raises(AttributionInputError, match=message):
            pipe(bad)


def test_pairs_need_a_classifier_and_text_is_not_empty():
    lm = tiny_llama_family("llama", num_layers=1)
    pipe = pipeline("lrp-attribution", model=lm, tokenizer=pair_tokenizer(), device="cpu")
    with pytest.raises(AttributionInputError, match="sequence classifiers"):
        pipe({"text": "w1", "text_pair": "w2"})
    with pytest.raises(AttributionInputError, match="empty text"):
        pipe("")
    with pytest.raises(AttributionInputError, match="takes a string, a sentence pair"):
        pipe(42)


def test_string_targets_in_the_python_api_match_the_pipeline():
    model, tok = tiny_llama_family("llama", num_layers=1), tiny_word_tokenizer()
    pipe = pipeline("lrp-attribution", model=model, tokenizer=tok, device="cpu")
    out = pipe("w1 w2 w3", target="w9", foil="w8")
    attr = hf_pelrp.attribute(
        model, **tok("w1 w2 w3", return_tensors="pt"), target="w9", foil="w8", tokenizer=tok
    )
    np.testing.assert_allclose(out["relevance"], attr.relevance[0].numpy(), atol=1e-6)
    assert out["target"]["label"] == attr.labels[int(attr.target[0])] == "w9"
    assert torch.equal(attr.special_tokens_mask, torch.zeros(1, 3, dtype=torch.bool))
