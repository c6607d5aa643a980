"""The ``lrp-attribution`` pipeline: registration, every head kind, batching, targets, state of the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import pipeline
from transformers.pipelines import PIPELINE_REGISTRY

import hf_pelrp
from conftest import tiny_llama_family, tiny_word_tokenizer
from hf_pelrp import AttributionInputError

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ["w1 w2 w3 w4 w5 w6", "w9 w8", "w3 w3 w7 w1"]
MAP_KEYS = ("token_relevance", "position_relevance", "relevance")


def _labelled(model):
    model.config.id2label = {0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    return model


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny LLaMA causal LM and a word-level tokenizer saved in one folder."""
    path = tmp_path_factory.mktemp("tiny_lm")
    tiny_llama_family().save_pretrained(path)
    tiny_word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm_pipe(lm_dir):
    return pipeline("lrp-attribution", model=str(lm_dir), device="cpu")


@pytest.fixture(scope="module")
def cls_pipe():
    model = _labelled(tiny_llama_family(head="sequence_classification", seed=2))
    return pipeline("lrp-attribution", model=model, tokenizer=tiny_word_tokenizer(), device="cpu")


def _ids(tokenizer, text):
    return tokenizer(text, return_tensors="pt")["input_ids"]


def test_registered_on_import():
    assert "lrp-attribution" in PIPELINE_REGISTRY.get_supported_tasks()
    assert PIPELINE_REGISTRY.supported_tasks["lrp-attribution"]["impl"] is hf_pelrp.LRPAttributionPipeline


def test_causal_lm_from_path_matches_attribute(lm_pipe, lm_dir):
    out = lm_pipe(TEXTS[0], target="w7")
    tok = lm_pipe.tokenizer
    ref = hf_pelrp.attribute(lm_pipe.model, _ids(tok, TEXTS[0]), target=tok.convert_tokens_to_ids("w7"))
    assert out["tokens"] == TEXTS[0].split()
    assert out["target"] == {"id": tok.convert_tokens_to_ids("w7"), "label": "w7"}
    for key in MAP_KEYS:
        assert isinstance(out[key], np.ndarray) and out[key].dtype == np.float32
    np.testing.assert_allclose(out["token_relevance"], ref.token[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(out["position_relevance"], ref.position[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(
        out["relevance"], out["token_relevance"] + out["position_relevance"], atol=1e-6
    )
    assert out["position_relevance_by_layer"].shape == (2, 6)
    assert isinstance(out["score"], float) and out["score"] == pytest.approx(
        ref.target_value.item(), abs=1e-6
    )
    assert out["conservation_gap"] == pytest.approx(ref.conservation_gap.item(), abs=1e-5)
    assert out["position"] == 5
    # top_k: the most relevant tokens, in decreasing order
    top = out["top_tokens"]
    assert len(top) == 5
    assert [t["relevance"] for t in top] == sorted((t["relevance"] for t in top), reverse=True)
    assert top[0]["relevance"] == pytest.approx(float(out["relevance"].max()))
    assert len(lm_pipe(TEXTS[0], top_k=2)["top_tokens"]) == 2
    # a model object loaded from a folder: its tokenizer is found in that folder
    from transformers import AutoModelForCausalLM

    from_object = pipeline(
        "lrp-attribution", model=AutoModelForCausalLM.from_pretrained(lm_dir), device="cpu"
    )
    np.testing.assert_allclose(from_object(TEXTS[0], target="w7")["relevance"], out["relevance"], atol=1e-6)
    with pytest.raises(AttributionInputError, match="pass tokenizer="):
        pipeline("lrp-attribution", model=tiny_llama_family(), device="cpu")


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_equals_one_by_one(lm_pipe, cls_pipe, side):
    for pipe in (lm_pipe, cls_pipe):
        pipe.tokenizer.padding_side = side
        batched = pipe(TEXTS, batch_size=3)
        assert len(batched) == len(TEXTS)
        for text, row in zip(TEXTS, batched, strict=True):
            single = pipe(text)
            assert row["tokens"] == single["tokens"] == text.split()
            assert row["target"] == single["target"]
            for key in MAP_KEYS:
                np.testing.assert_allclose(row[key], single[key], atol=1e-5)
            assert row["score"] == pytest.approx(single["score"], abs=1e-5)
    lm_pipe.tokenizer.padding_side = cls_pipe.tokenizer.padding_side = "right"


def test_classifier_label_targets(cls_pipe):
    out = cls_pipe(TEXTS[2], target="POSITIVE")
    assert out["target"] == {"id": 2, "label": "POSITIVE"}
    assert cls_pipe(TEXTS[2], target="positive")["score"] == pytest.approx(out["score"])
    assert cls_pipe(TEXTS[2], target=2)["score"] == pytest.approx(out["score"])
    logits = cls_pipe.model(_ids(cls_pipe.tokenizer, TEXTS[2])).logits[0]
    assert out["score"] == pytest.approx(logits[2].item(), abs=1e-5)
    default = cls_pipe(TEXTS[2])
    assert default["target"]["id"] == int(logits.argmax())
    with pytest.raises(AttributionInputError, match="not a label of this model.*NEGATIVE"):
        cls_pipe(TEXTS[2], target="JOYFUL")


def test_token_string_targets(lm_pipe):
    with pytest.raises(AttributionInputError, match="not a single token.*2 tokens"):
        lm_pipe(TEXTS[0], target="w7 w8")
    with pytest.raises(AttributionInputError, match="unknown parameter"):
        lm_pipe(TEXTS[0], targett="w7")


def test_rules_position_and_foil(lm_pipe):
    tok, model = lm_pipe.tokenizer, lm_pipe.model
    ids = _ids(tok, TEXTS[0])
    base = lm_pipe(TEXTS[0], target="w7", position=2, mode="cp", positional=False)
    ref = hf_pelrp.attribute(model, ids, target=12, position=2, mode="cp", positional=False)
    assert base["mode"] == "cp" and base["positional"] is False and base["position"] == 2
    assert not base["position_relevance"].any()
    np.testing.assert_allclose(base["relevance"], ref.relevance[0].numpy(), atol=1e-6)
    # causal: nothing after the explained position is relevant
    assert not base["relevance"][3:].any()
    contrast = lm_pipe(TEXTS[0], target="w7", foil="w8")
    logits = model(ids).logits[0, -1]
    assert contrast["score"] == pytest.approx((logits[12] - logits[13]).item(), abs=1e-5)
    assert contrast["foil"] == {"id": 13, "label": "w8"}
    # the backward pass is linear in its seed: R(target - foil) = R(target) - R(foil)
    diff = lm_pipe(TEXTS[0], target="w7")["relevance"] - lm_pipe(TEXTS[0], target="w8")["relevance"]
    np.testing.assert_allclose(contrast["relevance"], diff, atol=1e-5)


def test_model_state_restored_and_gradients_enabled(cls_pipe):
    model = cls_pipe.model
    ids = _ids(cls_pipe.tokenizer, TEXTS[0])
    before = model(ids).logits.detach()
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back exactly
    flags = {name: m.training for name, m in model.named_modules()}
    out = cls_pipe(TEXTS[0], return_attribution=True)
    assert {name: m.training for name, m in model.named_modules()} == flags
    model.eval()
    assert torch.equal(model(ids).logits.detach(), before)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()
    attr = out["attribution"]
    assert isinstance(attr, hf_pelrp.Attribution) and not attr.token.requires_grad
    assert attr.token.abs().sum() > 0  # gradients flowed inside the pipeline


def test_continuation_matches_attribute(lm_pipe):
    tok, model = lm_pipe.tokenizer, lm_pipe.model
    out = lm_pipe("w1 w2 w3", continuation="w5 w6 w7")
    ref = hf_pelrp.attribute(model, _ids(tok, "w1 w2 w3"), continuation_ids=_ids(tok, "w5 w6 w7"))
    assert out["tokens"] == ["w1", "w2", "w3", "w5", "w6", "w7"] and out["prompt_length"] == 3
    assert [t["label"] for t in out["target"]] == ["w5", "w6", "w7"]
    assert out["relevance"].shape == (3, 6)
    np.testing.assert_allclose(out["relevance"], ref.relevance.numpy(), atol=1e-6)
    np.testing.assert_allclose(out["score"], ref.target_value.numpy(), atol=1e-6)
    summed = lm_pipe("w1 w2 w3", continuation="w5 w6 w7", span_reduce="sum")
    np.testing.assert_allclose(summed["relevance"][0], out["relevance"].sum(0), atol=1e-5)
    generated = lm_pipe("w1 w2 w3", max_new_tokens=2)
    assert generated["relevance"].shape == (2, 5)
    with pytest.raises(AttributionInputError, match="only meaningful for causal"):
        pipeline("lrp-attribution", model=_labelled(tiny_llama_family(head="cls")), tokenizer=tok)(
            "w1", continuation="w2"
        )


def test_masked_lm(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=101,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    BertForMaskedLM(config).eval().save_pretrained(tmp_path)
    tiny_word_tokenizer().save_pretrained(tmp_path)
    pipe = pipeline("lrp-attribution", model=str(tmp_path), device="cpu")
    out = pipe("w1 [MASK] w3 w4", target="w7")
    ids = _ids(pipe.tokenizer, "w1 [MASK] w3 w4")
    ref = hf_pelrp.attribute(
        pipe.model, ids, target=12, position=1, mask_token_id=pipe.tokenizer.mask_token_id
    )
    assert out["position"] == 1 and out["target"]["label"] == "w7"
    np.testing.assert_allclose(out["relevance"], ref.relevance[0].numpy(), atol=1e-6)
    assert "segment_relevance" in out  # BERT's token-type embedding keeps its own map
    batched = pipe(["w1 [MASK] w3 w4", "[MASK] w2"], target="w7")
    np.testing.assert_allclose(batched[0]["relevance"], out["relevance"], atol=1e-5)
    np.testing.assert_allclose(
        batched[1]["relevance"], pipe("[MASK] w2", target="w7")["relevance"], atol=1e-5
    )
    with pytest.raises(AttributionInputError, match="no mask token"):
        pipe("w1 w2 w3")


def test_image_classifier(tmp_path):
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "car"},
        label2id={"cat": 0, "dog": 1, "car": 2},
    )
    ViTForImageClassification(config).eval().save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    pipe = pipeline("lrp-attribution", model=str(tmp_path), device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(3)]
    out = pipe(images[0], target="dog")
    assert out["target"] == {"id": 1, "label": "dog"}
    assert out["tokens"][0] == "[CLS]" and len(out["tokens"]) == 17
    assert out["patch_map"].shape == (4, 4) and out["pixel_map"].shape == (16, 16)
    assert isinstance(out["pixel_map"], np.ndarray)
    np.testing.assert_allclose(out["patch_map"].ravel(), out["relevance"][1:], atol=1e-6)
    batched = pipe(images, target="dog", batch_size=3)
    for image, row in zip(images, batched, strict=True):
        single = pipe(image, target="dog")
        for key in (*MAP_KEYS, "patch_map", "pixel_map"):
            np.testing.assert_allclose(row[key], single[key], atol=1e-5)
    with pytest.raises(AttributionInputError, match="takes a PIL image"):
        pipe(3.5)


def test_gpt2_byte_level_tokenizer_without_pad_token():
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from hf_pelrp.assets import MissingAssetError, gpt2_tokenizer_files

    try:
        files = gpt2_tokenizer_files()
    except MissingAssetError as exc:
        pytest.skip(str(exc))
    # positional arguments: in transformers 5 the keyword form builds an empty vocabulary
    tokenizer = GPT2TokenizerFast(str(files.vocab), str(files.merges))
    assert tokenizer.pad_token is None
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=32)).eval()
    pipe = pipeline("lrp-attribution", model=model, tokenizer=tokenizer, device="cpu")
    text = "The capital of France is"
    out = pipe(text, target=" Paris")
    assert out["target"] == {"id": 6342, "label": " Paris"}
    # decoded display strings: the leading space is a space, no byte-level "Ġ" marker
    assert out["tokens"] == ["The", " capital", " of", " France", " is"]
    assert pipe(text, target="ĠParis")["score"] == out["score"]  # the raw vocabulary item is accepted too
    ref = hf_pelrp.attribute(model, tokenizer(text, return_tensors="pt")["input_ids"], target=6342)
    np.testing.assert_allclose(out["position_relevance"], ref.position[0].numpy(), atol=1e-6)
    assert np.abs(out["position_relevance"]).sum() > 0  # learned absolute positions receive relevance
    texts = [text, "Hi", "One two three four five six"]
    for row, single in zip(pipe(texts, target=" Paris"), texts, strict=True):
        np.testing.assert_allclose(row["relevance"], pipe(single, target=" Paris")["relevance"], atol=1e-5)
    with pytest.raises(AttributionInputError, match="not a single token"):
        pipe(text, target="Paris is")
