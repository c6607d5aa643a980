"""Bad input gets a clear error naming the problem and the fix, or the right answer: never a plausible wrong one.

Table-driven over the architectures: every entry of ``BAD`` must raise an ``HfPelrpError`` subclass whose message
names the problem; the correctness cases below check the answers that used to be wrong (left padding of encoders,
a classifier padded with another id, float64 models, inference tensors).
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

import hf_pelrp
from helpers.builders import MASK_ID, images, tiny_bert_family, tiny_gpt2, tiny_llama_family, tiny_vision
from hf_pelrp import AttributionInputError, AttributionStateError, HfPelrpError, UnsupportedModelError

pytestmark = pytest.mark.usefixtures("single_thread")


@cache
def model(name: str) -> torch.nn.Module:
    builders = {
        "llama": lambda: tiny_llama_family("llama", num_layers=1),
        "llama-cls": lambda: tiny_llama_family("llama", "sequence_classification", num_layers=1),
        "gpt2": lambda: tiny_gpt2("lm", num_layers=1),
        "bert": lambda: tiny_bert_family("bert", num_layers=1),
        "bert-mlm": lambda: tiny_bert_family("bert", "mlm", num_layers=1),
        "roberta": lambda: tiny_bert_family("roberta", num_layers=1),
        "distilbert": lambda: tiny_bert_family("distilbert", num_layers=1),
        "vit": lambda: tiny_vision("vit", num_layers=1),
    }
    return builders[name]()


TEXT = ("llama", "llama-cls", "gpt2", "bert", "bert-mlm", "roberta", "distilbert")
LMS = ("llama", "gpt2")


def ids_for(name: str, batch: int = 2, seq: int = 6) -> torch.Tensor:
    m = model(name)
    vocab = m.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab - 2, (batch, seq), generator=torch.Generator().manual_seed(1))
    if name == "bert-mlm":
        ids[:, 2] = MASK_ID
    return ids


def base_kwargs(name: str) -> dict:
    return {"position": 2, "mask_token_id": MASK_ID} if name == "bert-mlm" else {}


def call(name: str, **kwargs):
    args = {"input_ids": ids_for(name), **base_kwargs(name), **kwargs}
    return hf_pelrp.attribute(model(name), **args)


def _meta_model(name: str) -> torch.nn.Module:
    m = model(name)
    with torch.device("meta"):
        return type(m)(m.config)


def _under_inference_mode(name: str):
    with torch.inference_mode():
        return call(name)


BAD = {
    "mask with a 2": (lambda n: call(n, attention_mask=torch.full((2, 6), 2)), "attention_mask must hold 1"),
    "fractional mask": (
        lambda n: call(n, attention_mask=torch.full((2, 6), 0.5)),
        "attention_mask must hold 1",
    ),
    "misspelt keyword": (lambda n: call(n, taget=5), "unknown keyword argument 'taget'"),
    "bool target": (lambda n: call(n, target=True), "target"),
    "fractional target": (lambda n: call(n, target=1.5), "target"),
    "float target tensor": (lambda n: call(n, target=torch.tensor([1.0, 2.0])), "floating-point"),
    "id beyond the vocabulary": (
        lambda n: call(n, input_ids=ids_for(n) + 10_000),
        "out of range: the model's vocabulary",
    ),
    "negative id": (lambda n: call(n, input_ids=ids_for(n) * 0 - 3), "out of range"),
    "inputs_embeds of the wrong size": (
        lambda n: hf_pelrp.attribute(model(n), inputs_embeds=torch.randn(2, 6, 7), **base_kwargs(n)),
        "hidden size 7",
    ),
    "inputs_embeds of the wrong dtype": (
        lambda n: hf_pelrp.attribute(
            model(n),
            inputs_embeds=torch.randn(
                2, 6, model(n).get_input_embeddings().embedding_dim, dtype=torch.float64
            ),
            **base_kwargs(n),
        ),
        "dtype torch.float64 but the model computes in torch.float32",
    ),
    "return_dict=False": (lambda n: call(n, return_dict=False), "return_dict= is not accepted"),
    "labels=": (lambda n: call(n, labels=ids_for(n)), "labels= is not accepted"),
    "logits_to_keep=": (lambda n: call(n, logits_to_keep=1), "logits_to_keep= is not accepted"),
    "inputs on the meta device": (lambda n: call(n, input_ids=ids_for(n).to("meta")), "meta device"),
    "model on the meta device": (
        lambda n: hf_pelrp.attribute(_meta_model(n), ids_for(n), **base_kwargs(n)),
        "meta device",
    ),
    "called under inference_mode": (_under_inference_mode, "inside torch.inference_mode"),
    "empty string target without tokenizer": (lambda n: call(n, target=" Paris"), "tokenizer=|not a label"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("name", TEXT)
def test_bad_text_input_is_refused_with_a_reason(name, case):
    run, message = BAD[case]
    with pytest.raises(HfPelrpError, match=message):
        run(name)
    # the refusal left the model as it was: it explains the next (good) call normally
    assert torch.isfinite(call(name).relevance).all()


@pytest.mark.parametrize("name", LMS)
@pytest.mark.parametrize("position", [True, 1.5, torch.tensor([1.0, 2.0])])
def test_bool_or_fractional_position_is_refused(name, position):
    with pytest.raises(AttributionInputError, match="position"):
        call(name, position=position)


VISION_BAD = {
    "attention_mask": ({"attention_mask": torch.ones(2, 17)}, "attention_mask is not supported"),
    "misspelt keyword": ({"interpolate_pos_encodin": True}, "unknown keyword argument"),
    "integer pixels": ({"pixel_values": torch.ones(2, 3, 32, 32, dtype=torch.long)}, "floating-point"),
    "float64 pixels": ({"pixel_values": images().double()}, "dtype torch.float64"),
    "meta pixels": ({"pixel_values": images().to("meta")}, "meta device"),
    "labels": ({"labels": torch.tensor([0, 1])}, "labels= is not accepted"),
    "bool target": ({"target": True}, "target"),
}


@pytest.mark.parametrize("case", sorted(VISION_BAD))
def test_bad_image_input_is_refused_with_a_reason(case):
    extra, message = VISION_BAD[case]
    inputs = {"pixel_values": images(), **extra}
    with pytest.raises(HfPelrpError, match=message):
        hf_pelrp.attribute(model("vit"), **inputs)


# ---- answers that used to be wrong --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert", "bert-mlm", "roberta", "distilbert"])
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_left_padded_encoder_rows_equal_the_unpadded_row(name, mode):
    """Encoders read their first token and count positions from it: left padding is aligned internally, the
    maps come back where the user's tokens were, and padding gets exactly 0."""
    m = model(name)
    pad = m.config.pad_token_id
    ids = ids_for(name, batch=1, seq=5)
    left = torch.cat([torch.full((1, 3), pad), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], dim=1)
    extra = {"position": 2, "mask_token_id": MASK_ID} if name == "bert-mlm" else {}
    alone = hf_pelrp.attribute(m, ids, mode=mode, **extra)
    if name == "bert-mlm":
        extra["position"] = 5  # the [MASK] in the user's (left-padded) layout
    padded = hf_pelrp.attribute(m, left, mask, mode=mode, **extra)
    for field in ("token", "position", "relevance"):
        got = getattr(padded, field)
        assert torch.equal(got[:, :3], torch.zeros_like(got[:, :3])), field
        torch.testing.assert_close(got[:, 3:], getattr(alone, field), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(padded.target_value, alone.target_value, rtol=1e-6, atol=1e-6)
    if name == "bert-mlm":
        assert int(padded.position_index[0]) == 5


def test_classifier_padded_with_another_id_is_refused():
    m = model("llama-cls")
    ids = ids_for("llama-cls")
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    wrong = ids.clone()
    wrong[1, 4:] = 7  # not config.pad_token_id: the model would read its logits at a padding position
    with pytest.raises(AttributionInputError, match="padding position.*config.pad_token_id"):
        hf_pelrp.attribute(m, wrong, mask)
    right = ids.clone()
    right[1, 4:] = m.config.pad_token_id
    attr = hf_pelrp.attribute(m, right, mask)
    assert float(attr.relevance[1, 4:].abs().max()) == 0.0


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_float64_models_give_float64_relevance(name):
    m = tiny_llama_family("llama", num_layers=1) if name == "llama" else None
    m = m or (tiny_gpt2("lm", num_layers=1) if name == "gpt2" else tiny_bert_family("bert", num_layers=1))
    m = m.double()
    vocab = m.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab - 2, (2, 6), generator=torch.Generator().manual_seed(2))
    attr = hf_pelrp.attribute(m, ids)
    assert attr.token.dtype == attr.position.dtype == attr.target_value.dtype == torch.float64
    total = attr.token + attr.position + (attr.segment if attr.segment is not None else 0)
    assert torch.equal(attr.relevance, total)


def test_tensors_made_under_inference_mode_are_usable():
    with torch.inference_mode():
        ids = ids_for("llama").clone()
    assert ids.is_inference()
    attr = hf_pelrp.attribute(model("llama"), ids)
    torch.testing.assert_close(attr.relevance, call("llama").relevance)


def test_string_targets_and_foils_need_exactly_one_token():
    from helpers.builders import tiny_word_tokenizer

    tok = tiny_word_tokenizer()
    lm = model("llama")
    ids = tok(["w3 w4 w5"], return_tensors="pt").input_ids
    by_string = hf_pelrp.attribute(lm, ids, target="w7", foil="w9", tokenizer=tok)
    by_id = hf_pelrp.attribute(
        lm, ids, target=tok.convert_tokens_to_ids("w7"), foil=tok.convert_tokens_to_ids("w9")
    )
    torch.testing.assert_close(by_string.relevance, by_id.relevance)
    assert by_string.labels[int(by_string.target[0])] == "w7" and by_string.tokens == [["w3", "w4", "w5"]]
    with pytest.raises(AttributionInputError, match="not a single token"):
        hf_pelrp.attribute(lm, ids, target="w7 w8", tokenizer=tok)
    with pytest.raises(AttributionInputError, match="empty string"):
        hf_pelrp.attribute(lm, ids, target="", tokenizer=tok)


def test_config_and_mode_that_disagree_are_an_error():
    lm = model("llama")
    with pytest.raises(AttributionInputError, match="config= says mode 'cp' but mode='attnlrp'"):
        hf_pelrp.attribute(lm, ids_for("llama"), config=hf_pelrp.LRPConfig(mode="cp"), mode="attnlrp")
    with pytest.raises(AttributionInputError, match="positional must be True or False"):
        hf_pelrp.attribute(lm, ids_for("llama"), positional="yes")


def test_unsupported_and_busy_errors_are_hf_pelrp_errors():
    assert issubclass(UnsupportedModelError, HfPelrpError) and issubclass(AttributionStateError, HfPelrpError)
