"""ELECTRA and XLM-RoBERTa: causal LM heads as decoders, the embedding projection, the segment leaf,
refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    ElectraForCausalLM,
    ElectraForPreTraining,
    ElectraForSequenceClassification,
    XLMRobertaForCausalLM,
    XLMRobertaForSequenceClassification,
)

import hf_pelrp
from hf_pelrp import AttributionInputError, UnsupportedModelError
from hf_pelrp.check import _randomise, _zero_biases, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64


def _model(model_type, cls, seed: int = 0, **overrides):
    config = tiny_config(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = cls(config).to(F64).eval()
    _randomise(model, seed)
    return model


@pytest.mark.parametrize(
    ("model_type", "cls"), [("electra", ElectraForCausalLM), ("xlm-roberta", XLMRobertaForCausalLM)]
)
def test_causal_lm_heads_as_decoders(model_type, cls):
    config = tiny_config(model_type)
    config.is_decoder = True
    assert hf_pelrp.check_adapter(config, classes=[cls]).passed
    model = _model(model_type, cls, is_decoder=True)
    ids = torch.randint(4, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    for mode in ("attnlrp", "cp"):
        attr = hf_pelrp.attribute(model, ids, position=4, mode=mode)
        # causal attention: what comes after the explained position gets exactly nothing
        for name in ("token", "position", "segment"):
            assert torch.equal(getattr(attr, name)[:, 5:], torch.zeros(2, 3, dtype=F64)), name
        assert (attr.token[:, :5] != 0).all()


def test_electra_without_embedding_projection():
    """embedding_size == hidden_size: no embeddings_project (the tiny config has 16 != 32, with one)."""
    config = tiny_config("electra")
    config.embedding_size = config.hidden_size
    assert hf_pelrp.check_adapter(config, classes=[ElectraForSequenceClassification]).passed
    assert hasattr(_model("electra", ElectraForSequenceClassification).electra, "embeddings_project")


@pytest.mark.parametrize(
    ("model_type", "cls"),
    [("electra", ElectraForSequenceClassification), ("xlm-roberta", XLMRobertaForSequenceClassification)],
)
def test_bias_free_cp_conservation_counts_the_segment_leaf(model_type, cls):
    model = _model(model_type, cls)
    _zero_biases(model)
    ids = torch.randint(4, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    attr = hf_pelrp.attribute(model, ids, mode="cp")
    total = attr.token.sum(-1) + attr.position.sum(-1) + attr.segment.sum(-1)
    torch.testing.assert_close(total, attr.target_value, rtol=1e-12, atol=1e-14)
    assert attr.segment.abs().sum() > 0  # XLM-R's single token-type vector is reported, not lost


@pytest.mark.parametrize(
    ("model_type", "cls"), [("electra", ElectraForCausalLM), ("xlm-roberta", XLMRobertaForCausalLM)]
)
def test_cross_attention_is_refused(model_type, cls):
    model = _model(model_type, cls, is_decoder=True, add_cross_attention=True)
    with pytest.raises(UnsupportedModelError, match="CrossAttention|cross-attention"):
        hf_pelrp.attribute(model, torch.tensor([[5, 6, 7]]))


def test_the_discriminator_head_has_no_supported_head_kind():
    model = _model("electra", ElectraForPreTraining)
    with pytest.raises(AttributionInputError, match="no supported output head"):
        hf_pelrp.attribute(model, torch.tensor([[5, 6, 7]]))
