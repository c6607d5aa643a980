"""ALiBi decoders (bloom, falcon with alibi=True, mpt): the fast path against the explicit float64 reference of
reference_bias.py (the bias leaf's relevance from the score decomposition), the maps' structure, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoConfig,
    BloomForCausalLM,
    FalconForCausalLM,
    MptForCausalLM,
    MptForSequenceClassification,
)

import hf_pelrp
from helpers.reference_bias import alibi_reference
from hf_pelrp import UnsupportedModelError
from hf_pelrp.check import tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-6  # relative to the largest entry of the reference map
CLASSES = {"bloom": BloomForCausalLM, "falcon": FalconForCausalLM, "mpt": MptForCausalLM}


def _model(model_type: str, cls=None, **overrides):
    from hf_pelrp.adapters import adapter_for_type

    config = AutoConfig.for_model(model_type, **{**adapter_for_type(model_type).tiny, **overrides})
    torch.manual_seed(0)
    model = (cls or CLASSES[model_type])(config).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger weights: peaked attention, so q, k and the bias carry visible relevance
        for name, p in model.named_parameters():
            scale = 0.5 if p.dim() > 1 else 0.1
            p.copy_(
                torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
                + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
            )
    return model


def _batch():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 97, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    return ids * mask, mask


def _assert_close(fast, ref, what):
    scale = ref.abs().max().clamp(min=1e-12)
    err = float((fast - ref).abs().max() / scale)
    assert err < TOL, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("model_type", ["bloom", "falcon", "mpt"])
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_alibi_matches_the_explicit_reference(model_type, mode):
    model = _model(model_type)
    ids, mask = _batch()
    attr = hf_pelrp.attribute(model, ids, attention_mask=mask, mode=mode)
    ref = alibi_reference(model, ids, mask, mode=mode, target=attr.target)
    _assert_close(attr.target_value, ref.logit, "logit")
    _assert_close(attr.token, ref.token, "token")
    _assert_close(attr.position_by_layer, ref.position_by_layer, "position_by_layer")
    _assert_close(attr.position_by_distance, ref.position_by_distance, "position_by_distance")
    if mode == "cp":
        assert float(attr.position.abs().max()) == 0.0
    else:
        assert float(attr.position.abs().max()) > 1e-3 * float(attr.token.abs().max())


def test_maps_views_agree_and_padding_is_zero():
    model = _model("bloom")
    ids, mask = _batch()
    attr = hf_pelrp.attribute(model, ids, attention_mask=mask)
    # the per-key and per-distance views sum to the same total; causal: no relevance at positive distances
    torch.testing.assert_close(
        attr.position.sum(-1), attr.position_by_distance.sum(-1), rtol=1e-10, atol=1e-14
    )
    distances = attr.position_distances
    assert distances.shape == attr.position_by_distance.shape
    assert float(attr.position_by_distance[distances > 0].abs().max()) == 0.0
    # distance 0 (a key attending to itself) carries no bias: the canonical leaf is 0 there
    assert float(attr.position_by_distance[distances == 0].abs().max()) == 0.0
    for row in (1, 2):
        pad = mask[row] == 0
        assert float(attr.position[row][pad].abs().max()) == 0.0
        assert float(attr.position_by_layer[row][:, pad].abs().max()) == 0.0
        assert float(attr.token[row][pad].abs().max()) == 0.0
    # a left-padded row has the distances of the row alone
    alone = hf_pelrp.attribute(model, ids[1:2, 3:])
    shift = ids.shape[1] - alone.seq_len
    torch.testing.assert_close(attr.position_by_distance[1, shift:-shift], alone.position_by_distance[0])


def test_mpt_sequence_classifier_padded_rows_equal_rows_alone():
    model = _model("mpt", MptForSequenceClassification)
    ids, mask = _batch()
    ids[2, 5:] = model.config.pad_token_id
    attr = hf_pelrp.attribute(model, ids, attention_mask=mask)
    for row in range(3):
        keep = mask[row].bool()
        alone = hf_pelrp.attribute(model, ids[row : row + 1, keep])
        # float64 everywhere except MPT's float32 softmax, which sees the same scores: equal to rounding of the
        # batched matmuls (a shifted bias would differ at float32 rounding, ~1e-8)
        torch.testing.assert_close(attr.target_value[row : row + 1], alone.target_value, rtol=0, atol=1e-13)
        torch.testing.assert_close(attr.position[row, keep], alone.position[0], rtol=0, atol=1e-13)


def test_falcon_layouts_multi_query_and_grouped_give_the_attention_factors():
    """Bias-free CP conservation is exact only if every q / k / v channel gets its factor (0, 0, 1)."""
    for overrides in (
        {"multi_query": True},
        {"new_decoder_architecture": True, "num_kv_heads": 2, "parallel_attn": True},
    ):
        model = _model("falcon", **overrides)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
        ids, mask = _batch()
        attr = hf_pelrp.attribute(model, ids, attention_mask=mask, mode="cp")
        gap = (attr.conservation_gap.abs() / attr.target_value.abs()).max()
        assert float(gap) < 1e-8, overrides
        attr = hf_pelrp.attribute(model, ids, attention_mask=mask)
        assert float(attr.position.abs().max()) > 0


def test_eager_alibi_falcon_is_refused():
    # (rotary Falcon, alibi=False, has its own declaration: tests/test_family_falcon_rotary.py)
    config = tiny_config("falcon")
    config._attn_implementation = "eager"
    model = FalconForCausalLM(config)
    with pytest.raises(UnsupportedModelError, match="adds the bias a second time"):
        hf_pelrp.attribute(model, torch.tensor([[3, 4, 5]]))
