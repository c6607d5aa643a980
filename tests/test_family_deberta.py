"""DeBERTa-v2: disentangled attention's position factors (c2p, p2c) as per-pair leaves, against the explicit
float64 reference of reference_bias.py; refusals of the variants the adapter does not declare."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, DebertaV2ForSequenceClassification

import hf_pelrp
from helpers.reference_bias import deberta_reference
from hf_pelrp import UnsupportedModelError
from hf_pelrp.adapters import adapter_for_type

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-6


def _model(**overrides):
    config = AutoConfig.for_model("deberta-v2", **{**adapter_for_type("deberta-v2").tiny, **overrides})
    torch.manual_seed(0)
    model = DebertaV2ForSequenceClassification(config).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "LayerNorm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.4 + base)
    return model


def _close(fast, ref, what):
    err = float((fast - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
    assert err < TOL, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_deberta_matches_the_explicit_reference(mode):
    model = _model()
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    attr = hf_pelrp.attribute(model, ids, mode=mode)
    ref = deberta_reference(model, ids, mode=mode, target=attr.target)
    _close(attr.target_value, ref.logit, "logit")
    _close(attr.token, ref.token, "token")
    if mode == "attnlrp":
        _close(attr.position_by_layer, ref.position_by_layer, "position_by_layer")
        _close(attr.position_by_distance, ref.position_by_distance, "position_by_distance")
    else:
        assert float(attr.position.abs().max()) == 0.0


def test_the_conv_layer_is_refused():
    # (position_biased_input=True has its own declaration: tests/test_family_deberta_absolute.py)
    for overrides, match in (
        ({"conv_kernel_size": 3}, "conv_kernel_size"),
        ({"conv_kernel_size": 3, "position_biased_input": True}, "conv_kernel_size"),
    ):
        with pytest.raises(UnsupportedModelError, match=match):
            hf_pelrp.attribute(_model(**overrides), torch.tensor([[3, 4, 5]]))
