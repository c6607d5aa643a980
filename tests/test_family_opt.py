"""OPT and GPT-BigCode: layout variants, positions counted from the mask, token types, multi-query attention."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTBigCodeForCausalLM, OPTForCausalLM, OPTForSequenceClassification

import hf_pelrp
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
    "overrides",
    [
        # OPT-350m: post-LN blocks, no final LayerNorm, project_in / project_out
        {"do_layer_norm_before": False},
        # LayerNorms without weight and bias, no projections, bias-free linears
        {"layer_norm_elementwise_affine": False, "word_embed_proj_dim": 32, "enable_bias": False},
    ],
)
def test_opt_variants_pass_check_adapter(overrides):
    config = tiny_config("opt")
    for key, value in overrides.items():
        setattr(config, key, value)
    assert hf_pelrp.check_adapter(config).passed


@pytest.mark.parametrize("cls", [OPTForCausalLM, OPTForSequenceClassification])
def test_opt_left_padding_sees_the_models_own_positions(cls):
    """OPT numbers positions from the attention mask itself (cumsum, + 2): the explained logit of a left-padded
    row is the model's own logit on that padded batch, and the maps equal those of the row alone."""
    model = _model("opt", cls)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = model.config.pad_token_id
    attr = hf_pelrp.attribute(model, ids, attention_mask=mask, mode="attnlrp")
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    own = logits[:, -1] if cls is OPTForCausalLM else logits
    torch.testing.assert_close(attr.target_value, own.gather(1, attr.target[:, None]).squeeze(1))
    alone = hf_pelrp.attribute(model, ids[1:, 3:], mode="attnlrp", target=attr.target[1:])
    torch.testing.assert_close(attr.position[1, 3:], alone.position[0], rtol=0, atol=1e-12)
    assert torch.equal(attr.position[1, :3], torch.zeros(3, dtype=F64))


def test_gpt_bigcode_multi_head_variant_passes_check_adapter():
    config = tiny_config("gpt_bigcode")
    config.multi_query = False
    assert hf_pelrp.check_adapter(config).passed


def test_gpt_bigcode_token_types_are_the_segment_leaf():
    model = _model("gpt_bigcode", GPTBigCodeForCausalLM)
    assert model.transformer.h[0].attn.kv_heads == 1  # multi-query: one key / value head
    _zero_biases(model)
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(2))
    types = torch.tensor([[0, 0, 0, 5, 5, 5], [0, 0, 5, 5, 5, 5]])
    attr = hf_pelrp.attribute(model, ids, token_type_ids=types, mode="cp")
    total = attr.token.sum(-1) + attr.position.sum(-1) + attr.segment.sum(-1)
    torch.testing.assert_close(total, attr.target_value, rtol=1e-12, atol=1e-14)
    assert attr.segment.abs().sum() > 0
