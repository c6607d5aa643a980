"""Encoder-decoder models (T5 family, BART): the T5 bucket bias against the explicit float64 reference, the
seq2seq result (source and target-prefix maps, conservation over both), continuations, the target side's
padding, and refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, BartForConditionalGeneration, T5ForConditionalGeneration

import hf_pelrp
from helpers.reference_bias import t5_reference
from hf_pelrp import AttributionInputError
from hf_pelrp.adapters import adapter_for_type
from hf_pelrp.result import Seq2SeqAttribution

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-6


def _model(model_type="t5", cls=T5ForConditionalGeneration, scale=0.5, **overrides):
    config = AutoConfig.for_model(model_type, **{**adapter_for_type(model_type).tiny, **overrides})
    torch.manual_seed(0)
    model = cls(config).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale + base)
    return model


def _close(fast, ref, what):
    err = float((fast - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
    assert err < TOL, f"{what}: relative error {err:.2e}"


def _inputs():
    gen = torch.Generator().manual_seed(3)
    src = torch.randint(3, 97, (2, 7), generator=gen)
    tgt = torch.randint(3, 97, (2, 4), generator=gen)
    tgt[:, 0] = 0
    return src, tgt


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_t5_matches_the_explicit_reference(mode):
    model = _model()
    src, tgt = _inputs()
    attr = hf_pelrp.attribute(model, src, decoder_input_ids=tgt, mode=mode)
    assert isinstance(attr, Seq2SeqAttribution)
    ref = t5_reference(model, src, tgt, mode=mode, target=attr.target)
    _close(attr.target_value, ref["logit"], "logit")
    _close(attr.token, ref["token"], "token")
    _close(attr.target_token, ref["target_token"], "target_token")
    if mode == "attnlrp":
        _close(attr.position_by_layer, ref["position_by_layer"], "position_by_layer")
        _close(attr.position_by_distance, ref["position_by_distance"], "position_by_distance")
        _close(attr.target_position_by_layer, ref["target_position_by_layer"], "target_position_by_layer")
        _close(attr.target_position_by_distance, ref["target_position_by_distance"], "target buckets")
        edges = attr.position_distance_edges[0]
        assert edges.shape == (8, 2) and edges[0].tolist() == [0, 0]  # bucket 0: distance 0 exactly
    else:
        assert float(attr.position.abs().max()) == 0.0
        assert float(attr.target_position.abs().max()) == 0.0
        # bias-free? T5 has no biases: CP conservation over source and target prefix is exact
        gap = attr.conservation_gap.abs() / attr.target_value.abs()
        assert float(gap.max()) < 1e-6


def test_continuation_rows_equal_single_explanations_and_are_causal():
    model = _model(scale=0.3)
    src, tgt = _inputs()
    cont = tgt[0, 1:]
    rows = hf_pelrp.attribute(model, src[0], continuation_ids=cont)
    assert isinstance(rows, Seq2SeqAttribution) and rows.batch_size == cont.numel()
    for s in range(cont.numel()):
        single = hf_pelrp.attribute(model, src[:1], decoder_input_ids=tgt[:1, : s + 1], target=int(cont[s]))
        torch.testing.assert_close(rows.token[s], single.token[0])
        torch.testing.assert_close(rows.target_token[s, : s + 1], single.target_token[0])
        assert float(rows.target_token[s, s + 1 :].abs().sum()) == 0.0
        torch.testing.assert_close(rows.target_value[s], single.target_value[0])
    generated = hf_pelrp.explain_continuation(model, src[0], generate=True, max_new_tokens=3)
    assert generated.batch_size == 3


def test_target_prefix_padding_and_bart_positions():
    model = _model("bart", BartForConditionalGeneration, scale=0.2)
    src, tgt = _inputs()
    tgt[:, 0] = 2
    attr = hf_pelrp.attribute(model, src, decoder_input_ids=tgt)
    assert float(attr.position.abs().max()) > 0 and float(attr.target_position.abs().max()) > 0
    # right-padded target prefix: padding gets exactly 0, the row equals the row alone
    mask = torch.ones_like(tgt)
    mask[1, 3:] = 0
    padded = hf_pelrp.attribute(
        model, src, decoder_input_ids=tgt * mask + (1 - mask), decoder_attention_mask=mask
    )
    assert float(padded.target_token[1, 3:].abs().max()) == 0.0
    alone = hf_pelrp.attribute(model, src[1:], decoder_input_ids=tgt[1:, :3])
    torch.testing.assert_close(padded.token[1:], alone.token, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(padded.target_token[1:, :3], alone.target_token, rtol=1e-9, atol=1e-12)
    left = mask.flip(-1)
    with pytest.raises(AttributionInputError, match="pad the target prefixes"):
        hf_pelrp.attribute(model, src, decoder_input_ids=tgt, decoder_attention_mask=left)


def test_t5_default_prefix_is_the_decoder_start_token():
    model = _model(scale=0.3)
    src, _ = _inputs()
    attr = hf_pelrp.attribute(model, src)
    assert attr.target_input_ids.tolist() == [[0], [0]]
    assert attr.position_index.tolist() == [0, 0]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from conftest import tiny_word_tokenizer

    path = tmp_path_factory.mktemp("t5")
    model = _model(scale=0.3).float()
    model.config.architectures = ["T5ForConditionalGeneration"]
    model.save_pretrained(path)
    tiny_word_tokenizer(vocab_size=97).save_pretrained(path)
    return path


def test_pipeline_and_cli_take_text_and_continuation(t5_dir, tmp_path, capsys):
    import json

    from transformers import pipeline

    from hf_pelrp import cli

    pipe = pipeline("lrp-attribution", model=str(t5_dir), device="cpu")
    one = pipe("w1 w2 w3")
    assert one["tokens"] == ["w1", "w2", "w3"] and one["target_tokens"] == ["[PAD]"]
    assert one["token_relevance"].shape == (3,) and one["target_token"].shape == (1,)
    rows = pipe("w1 w2 w3", continuation="w4 w5")
    assert rows["token_relevance"].shape == (2, 3) and rows["target_token_relevance"].shape == (2, 2)
    assert [t["label"] for t in rows["target"]] == ["w4", "w5"] and rows["generated_text"] == "w4 w5"
    report = tmp_path / "out.json"
    code = cli.main(
        [
            "explain",
            "--model",
            str(t5_dir),
            "--text",
            "w1 w2 w3",
            "--continuation",
            "w4 w5",
            "--json",
            str(report),
        ]
    )
    assert code == 0 and "2 tokens explained" in capsys.readouterr().out
    saved = json.loads(report.read_text())[0]
    assert len(saved["target_token_relevance"]) == 2


def test_encoder_decoder_classifiers_explain_source_and_shifted_target():
    from transformers import BartForSequenceClassification, T5ForSequenceClassification

    for model_type, cls in (("t5", T5ForSequenceClassification), ("bart", BartForSequenceClassification)):
        model = _model(model_type, cls, scale=0.3, num_labels=3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
        src, _ = _inputs()
        src[src == model.config.eos_token_id] = 5
        src[:, -1] = model.config.eos_token_id  # the classifiers read the last end-of-sequence token
        attr = hf_pelrp.attribute(model, src, mode="cp")
        assert isinstance(attr, Seq2SeqAttribution) and attr.target_token.shape == src.shape
        gap = (attr.conservation_gap.abs() / attr.target_value.abs()).max()
        assert float(gap) < 1e-6, model_type  # exact only with the target prefix's share counted
        assert float(attr.target_token.abs().sum()) > 0
        with pytest.raises(AttributionInputError, match="derives its decoder input"):
            hf_pelrp.attribute(model, src, decoder_input_ids=src)
