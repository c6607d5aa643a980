"""The last silent answers and obscure crashes (issue 17, section 5): each case now gives the right answer,
checked against the unpadded row or an equivalent model, or an ``HfPelrpError`` that names the problem.

- ALiBi classifiers (BLOOM, MPT) padded with an id other than ``config.pad_token_id``;
- ``position_ids`` given to families whose forward does not read them;
- a saved ``Seq2SeqAttribution`` / ``GenerationAttribution`` loads as what was saved;
- BART target prefixes longer than its decoder positions, empty batches, BEiT with ``interpolate_pos_encoding``.
"""

from __future__ import annotations

import copy
import json
from functools import cache

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

import hf_pelrp
from helpers.builders import tiny_llama_family
from hf_pelrp import (
    Attribution,
    AttributionFileError,
    AttributionInputError,
    GenerationAttribution,
    Seq2SeqAttribution,
)
from hf_pelrp.adapters import adapter_for_type
from hf_pelrp.io import METADATA_KEY, _digest

pytestmark = pytest.mark.usefixtures("single_thread")

AUTO = {
    "causal_lm": AutoModelForCausalLM,
    "seq2seq": AutoModelForSeq2SeqLM,
    "cls": AutoModelForSequenceClassification,
    "image": AutoModelForImageClassification,
}


@cache
def tiny(model_type: str, head: str, **overrides) -> torch.nn.Module:
    """The adapter's tiny model, weights drawn at a visible scale (constant biases and tables included)."""
    config = AutoConfig.for_model(model_type, **{**adapter_for_type(model_type).tiny, **overrides})
    torch.manual_seed(0)
    model = AUTO[head].from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            unit = ("norm" in name.lower() and name.endswith("weight")) or "lambda" in name
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() > 1 else 0.1) + float(unit))
    return model


def ids(batch: int, length: int, seed: int = 3) -> torch.Tensor:
    """Token ids that avoid the tiny configs' special ids (0, 1, 2) and the foreign pad id used below (7)."""
    out = torch.randint(8, 90, (batch, length), generator=torch.Generator().manual_seed(seed))
    return out


# ---- 1. ALiBi classifiers padded with another id ----------------------------------------------------------------

FOREIGN_PAD = 7  # not config.pad_token_id (0): the model does not recognise it as padding


def _padded(real: torch.Tensor, side: str, pad: int, count: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    fill = torch.full((1, count), pad)
    zeros, ones = torch.zeros(1, count, dtype=torch.long), torch.ones_like(real)
    if side == "right":
        return torch.cat([real, fill], 1), torch.cat([ones, zeros], 1)
    return torch.cat([fill, real], 1), torch.cat([zeros, ones], 1)


def _assert_same_row(padded, alone, real: slice, pad: slice) -> None:
    torch.testing.assert_close(padded.target_value, alone.target_value, rtol=1e-5, atol=1e-6)
    for field in ("token", "position", "relevance"):
        got = getattr(padded, field)
        assert float(got[:, pad].abs().max()) == 0.0, field
        torch.testing.assert_close(got[:, real], getattr(alone, field), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", ["bloom", "mpt"])
def test_alibi_classifier_padding_is_explained_right_or_refused(model_type):
    """Right padding with a foreign id: the model would read its logits at a padding position, refused as for
    LLaMA / Falcon. Left padding with a foreign id (the model reads the last real token) and padding with the
    pad id on either side: the maps of the unpadded row. (Before: the foreign id explained a padding logit.)"""
    model = tiny(model_type, "cls")
    real = ids(1, 5)
    alone = hf_pelrp.attribute(model, real)
    wrong, mask = _padded(real, "right", FOREIGN_PAD)
    with pytest.raises(AttributionInputError, match="padding position.*config.pad_token_id"):
        hf_pelrp.attribute(model, wrong, mask)
    cases = [("left", FOREIGN_PAD), ("left", 0), ("right", 0)]
    for side, pad in cases:
        padded_ids, mask = _padded(real, side, pad)
        padded = hf_pelrp.attribute(model, padded_ids, mask)
        real_cols, pad_cols = (slice(0, 5), slice(5, 8)) if side == "right" else (slice(3, 8), slice(0, 3))
        _assert_same_row(padded, alone, real_cols, pad_cols)


@pytest.mark.parametrize("model_type", ["bloom", "mpt"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_alibi_classifier_with_padded_inputs_embeds_is_refused(model_type, side):
    """Without input_ids the classifier reads the last position. BLOOM / MPT run right-padded inside hf_pelrp,
    where that is padding on either side: refused, naming inputs_embeds. Unpadded embeddings work."""
    model = tiny(model_type, "cls")
    real = ids(1, 5)
    table = model.get_input_embeddings()
    padded_ids, mask = _padded(real, side, 0)
    with torch.no_grad():
        embeds = table(padded_ids)
        alone_embeds = table(real)
    match = "padding position" if side == "right" else "inputs_embeds"
    with pytest.raises(AttributionInputError, match=match):
        hf_pelrp.attribute(model, inputs_embeds=embeds, attention_mask=mask)
    by_embeds = hf_pelrp.attribute(model, inputs_embeds=alone_embeds)
    by_ids = hf_pelrp.attribute(model, real)
    torch.testing.assert_close(by_embeds.relevance, by_ids.relevance)


# ---- 2. position_ids the model does not read -------------------------------------------------------------------

IGNORING = [
    ("bloom", "causal_lm"),
    ("mpt", "causal_lm"),
    ("falcon", "causal_lm"),
    ("t5", "seq2seq"),
    ("bart", "seq2seq"),
    ("deberta-v2", "cls"),
]


@pytest.mark.parametrize(("model_type", "head"), IGNORING)
def test_position_ids_the_model_ignores_are_refused(model_type, head):
    """Reversed position_ids used to give bit-identical maps. The model's own forward does not read them
    (it has no such argument, or its logits do not change), so the attribution refuses them by name."""
    model = tiny(model_type, head)
    source = ids(1, 6)
    reversed_ids = torch.arange(5, -1, -1)[None]
    extra = {"decoder_input_ids": torch.tensor([[2, 9, 10]])} if head == "seq2seq" else {}
    with torch.no_grad():
        plain = model(input_ids=source, **extra).logits
        try:
            moved = model(input_ids=source, position_ids=reversed_ids, **extra).logits
        except TypeError:  # no position_ids argument at all
            moved = plain
    assert torch.equal(moved, plain), "the model reads position_ids: the attribution must honour them"
    with pytest.raises(AttributionInputError, match="position_ids.*computes its positions itself"):
        hf_pelrp.attribute(model, source, position_ids=reversed_ids, **extra)


def test_position_ids_a_model_reads_are_still_honoured():
    """The refusal is declared per family: LLaMA reads position_ids, and reversed ones change its maps."""
    model = tiny_llama_family("llama", num_layers=1)
    source = ids(1, 6)
    plain = hf_pelrp.attribute(model, source)
    moved = hf_pelrp.attribute(model, source, position_ids=torch.arange(5, -1, -1)[None])
    assert not torch.allclose(plain.position, moved.position)


# ---- 3. saved results load as what was saved -------------------------------------------------------------------


def _assert_same_result(a, b) -> None:
    assert type(a) is type(b)
    for name, value in vars(a).items():
        other = getattr(b, name)
        if name == "extras":
            assert value.keys() == other.keys()
            for key, v in value.items():
                w = other[key]
                assert (
                    (torch.equal(v, w) and v.dtype == w.dtype) if isinstance(v, torch.Tensor) else v == w
                ), key
        elif isinstance(value, torch.Tensor):
            assert isinstance(other, torch.Tensor) and other.dtype == value.dtype, name
            assert torch.equal(value, other), name
        else:
            assert value == other, name
    torch.testing.assert_close(a.conservation_gap, b.conservation_gap, rtol=0, atol=0)


def test_seq2seq_attribution_round_trips_with_its_type(tmp_path):
    """hf_pelrp.load_attribution used to return a plain Attribution: the target prefix's relevance dropped out of
    conservation_gap. Now the type and every field come back; an older file (format 2, no class recorded) is
    recognised by its target-prefix maps."""
    model = tiny("t5", "seq2seq")
    attr = hf_pelrp.attribute(model, ids(2, 6), decoder_input_ids=torch.tensor([[0, 9, 10], [0, 11, 12]]))
    assert isinstance(attr, Seq2SeqAttribution) and float(attr.target_relevance.abs().sum()) > 0
    path = attr.save(tmp_path / "s2s.safetensors")
    loaded = hf_pelrp.load_attribution(path)
    _assert_same_result(attr, loaded)
    assert isinstance(Seq2SeqAttribution.load(path), Seq2SeqAttribution)

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    old = {k: v for k, v in meta.items() if k != "class"}
    old["format_version"] = 2
    old["sha256"] = _digest(tensors, old)
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={METADATA_KEY: json.dumps(old)})
    _assert_same_result(attr, hf_pelrp.load_attribution(tmp_path / "old.safetensors"))

    tampered = {**meta, "class": "Attribution"}  # the class is covered by the digest
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={METADATA_KEY: json.dumps(tampered)})
    with pytest.raises(AttributionFileError, match="SHA-256"):
        hf_pelrp.load_attribution(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("span_reduce", [None, "sum"])
def test_generation_attribution_round_trips(tmp_path, span_reduce):
    """A GenerationAttribution (no extras, one input_ids row, rows != targets with span_reduce) saves and loads
    as itself; Attribution.load refuses it by name instead of building a wrong Attribution."""
    model = tiny_llama_family("llama", num_layers=1)
    sequence = ids(1, 7)[0]
    attr = hf_pelrp.explain_continuation(model, sequence[:4], sequence[4:], foil=9, span_reduce=span_reduce)
    path = hf_pelrp.save_attribution(attr, tmp_path / "gen.safetensors")
    loaded = hf_pelrp.load_attribution(path)
    assert isinstance(loaded, GenerationAttribution)
    _assert_same_result(attr, loaded)
    with pytest.raises(AttributionFileError, match="holds a GenerationAttribution.*load_attribution"):
        Attribution.load(path)


# ---- 4. obscure crashes --------------------------------------------------------------------------------------


def test_bart_target_prefix_beyond_its_positions_is_refused():
    """BART's decoder has max_position_embeddings learned positions: a longer target prefix used to end in an
    IndexError inside the embedding; now it is refused naming the limit, and the limit itself works."""
    model = tiny("bart", "seq2seq")
    limit = model.config.max_position_embeddings
    source = ids(1, 6)
    longest = ids(1, limit, seed=4)
    longest[0, 0] = model.config.decoder_start_token_id
    attr = hf_pelrp.attribute(model, source, decoder_input_ids=longest)
    assert attr.extras["target_token"].shape == (1, limit)
    too_long = torch.cat([longest, longest[:, :1]], 1)
    with pytest.raises(AttributionInputError, match=f"decoder_input_ids has {limit + 1} positions.*{limit}"):
        hf_pelrp.attribute(model, source, decoder_input_ids=too_long)


@pytest.mark.parametrize("model_type", ["swin", "beit"])
def test_an_empty_image_batch_is_refused(model_type):
    """Swin used to fail in amax; the engine refuses an empty batch once for every family."""
    model = tiny(model_type, "image")
    size = model.config.image_size
    with pytest.raises(AttributionInputError, match="empty input"):
        hf_pelrp.attribute(model, pixel_values=torch.zeros(0, 3, size, size))


def _beit_resampled_table(table: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """BEiT's bias table for a new ``new x new`` window: the offset entries resampled bilinearly as
    ``BeitRelativePositionBias`` does, the three CLS entries kept."""
    sub = table[:-3].reshape(1, 2 * old - 1, 2 * old - 1, -1).permute(0, 3, 1, 2)
    sub = torch.nn.functional.interpolate(sub, size=(2 * new - 1, 2 * new - 1), mode="bilinear")
    return torch.cat([sub.permute(0, 2, 3, 1).reshape((2 * new - 1) ** 2, -1), table[-3:]])


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_beit_interpolate_pos_encoding_explains_the_resampled_bias(mode):
    """BEiT with interpolate_pos_encoding=True used to fail (AttributeError on a missing position table). It
    resamples its relative bias table to the image's window; the maps must equal those of a BEiT built for the
    larger image whose tables are those resampled ones (checked against the explicit reference elsewhere)."""
    small = tiny("beit", "image")
    size, patch = small.config.image_size, small.config.patch_size
    new_size = size + 2 * patch
    config = copy.deepcopy(small.config)
    config.image_size = new_size
    large = AUTO["image"].from_config(config)
    large.load_state_dict(
        {
            name: (
                _beit_resampled_table(value, size // patch, new_size // patch)
                if name.endswith("relative_position_bias_table")
                else value
            )
            for name, value in small.state_dict().items()
        }
    )
    large.eval()
    pixels = torch.randn(2, 3, new_size, new_size, generator=torch.Generator().manual_seed(2))
    with pytest.raises(AttributionInputError, match="interpolate_pos_encoding=True"):
        hf_pelrp.attribute(small, pixel_values=pixels, mode=mode)  # other size without the flag: refused
    got = hf_pelrp.attribute(small, pixel_values=pixels, interpolate_pos_encoding=True, mode=mode)
    want = hf_pelrp.attribute(large, pixel_values=pixels, mode=mode)
    for field in ("target_value", "token", "position", "position_by_layer", "position_by_distance"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-6)
    windows = new_size // patch
    assert got.position_by_distance.shape == (2, (2 * windows - 1) ** 2 + 3)
    if mode == "attnlrp":
        assert float(got.position.abs().max()) > 0


def test_seq2seq_position_index_is_a_decoder_position_with_a_left_padded_source():
    """The source of an encoder-decoder model is re-padded internally; the explained position is a decoder
    position and must not be mapped back through the source's alignment (it read 3 instead of 1)."""
    model = tiny("t5", "seq2seq")
    src = ids(1, 6)
    source_mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    target = ids(1, 4, seed=5)
    target_mask = torch.tensor([[1, 1, 0, 0]])
    padded = hf_pelrp.attribute(
        model, src, attention_mask=source_mask, decoder_input_ids=target, decoder_attention_mask=target_mask
    )
    plain = hf_pelrp.attribute(
        model, src[:, 2:], decoder_input_ids=target[:, :2], decoder_attention_mask=target_mask[:, :2]
    )
    assert int(padded.position_index[0]) == int(plain.position_index[0]) == 1
    torch.testing.assert_close(padded.target_value, plain.target_value)


def test_a_label_named_by_id2label_is_a_target_when_label2id_is_stale():
    """transformers 5 leaves label2id at LABEL_0 / LABEL_1 (or empty) when only id2label is given: the labels
    the model shows must still be accepted as targets, and mean the class id2label gives them."""
    model = copy.deepcopy(tiny("bert", "cls"))  # tiny() is cached: the labels stay with this copy
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"LABEL_0": 0, "LABEL_1": 1}
    row = ids(1, 5)
    by_name = hf_pelrp.attribute(model, row, target="positive")
    by_id = hf_pelrp.attribute(model, row, target=1)
    assert int(by_name.target[0]) == 1
    torch.testing.assert_close(by_name.relevance, by_id.relevance, rtol=0, atol=0)
    assert int(hf_pelrp.attribute(model, row, target="Negative").target[0]) == 0
    with pytest.raises(AttributionInputError, match="'neutral' is not a label.*negative.*positive"):
        hf_pelrp.attribute(model, row, target="neutral")
