"""DeBERTa-v2 with ``position_biased_input=True`` (absolute AND relative positions): the absolute embedding is an
additive ``position`` leaf beside the per-layer c2p / p2c leaves, against a float64 reference.

The reference: a relative-only twin whose word-embedding row of each (distinct) token id is ``t_i + p_i`` (the
word row plus the absolute row of its position) computes exactly what the model computes; its explicit
reference (``deberta_reference``, the c2p / p2c position halves per pair) gives the relative maps, and the
relevance of its embedding sum ``e = t + p`` per channel, which splits as ``R_t = t / e R_e``, ``R_p = p / e R_e``
(the epsilon rule of the sum: the identity rule at the embedding LayerNorm is linear in its input per channel).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, DebertaV2ForSequenceClassification

import helpers.reference_bias as reference_bias
import hf_pelrp
from helpers.reference_absolute import lrp_layer_norm
from hf_pelrp.adapters.base import adapter_for, adapter_variants
from hf_pelrp.adapters.deberta import DEBERTA_V2, DEBERTA_V2_ABSOLUTE

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-6


def _model(**overrides) -> DebertaV2ForSequenceClassification:
    config = AutoConfig.for_model("deberta-v2", **{**DEBERTA_V2_ABSOLUTE.tiny, **overrides})
    torch.manual_seed(0)
    model = DebertaV2ForSequenceClassification(config).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "LayerNorm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.4 + base)
    return model


def _twin(model, ids: torch.Tensor) -> DebertaV2ForSequenceClassification:
    """The relative-only model with ``word[ids[i]] = word[ids[i]] + pos[i]`` (ids distinct): same function on ids."""
    assert len(set(ids.tolist())) == ids.numel()
    config = copy.deepcopy(model.config)
    config.position_biased_input = False
    twin = DebertaV2ForSequenceClassification(config).double().eval()
    state = {k: v for k, v in model.state_dict().items() if "position_embeddings" not in k}
    twin.load_state_dict(state, strict=True)
    with torch.no_grad():
        emb = model.deberta.embeddings
        twin.deberta.embeddings.word_embeddings.weight[ids] += emb.position_embeddings.weight[: ids.numel()]
    return twin


def _reference(model, ids: torch.Tensor, mode: str, target: int, monkeypatch) -> dict[str, torch.Tensor]:
    twin = _twin(model, ids)
    calls = []

    def recording(*args):
        calls.append(args)
        return lrp_layer_norm(*args)

    monkeypatch.setattr(reference_bias, "lrp_layer_norm", recording)
    ref = reference_bias.deberta_reference(twin, ids[None], mode=mode, target=torch.tensor([target]))
    monkeypatch.undo()
    e, *rest = calls[-1]  # the last identity rule of the backward pass: the embedding LayerNorm, at e = t + p
    emb = model.deberta.embeddings
    t = emb.word_embeddings.weight.detach()[ids]
    p = emb.position_embeddings.weight.detach()[: ids.numel()]
    torch.testing.assert_close(e, t + p, rtol=0, atol=1e-12)
    token = lrp_layer_norm(t, *rest).sum(-1)
    absolute = lrp_layer_norm(p, *rest).sum(-1)
    torch.testing.assert_close(token + absolute, ref.token[0], rtol=1e-10, atol=1e-12)  # the split is a split
    return {
        "logit": ref.logit[0],
        "token": token,
        "position_absolute": absolute,
        "position_by_layer": ref.position_by_layer[0],
        "position_by_distance": ref.position_by_distance[0],
    }


def _close(fast, ref, what):
    err = float((fast - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
    assert err < TOL, f"{what}: relative error {err:.2e}"


def test_the_registry_chooses_the_declaration_from_position_biased_input():
    assert adapter_variants("deberta-v2") == (DEBERTA_V2, DEBERTA_V2_ABSOLUTE)
    assert adapter_for(_model()) is DEBERTA_V2_ABSOLUTE
    assert adapter_for(_model(position_biased_input=False)) is DEBERTA_V2
    report = hf_pelrp.check_adapter("deberta-v2")
    assert "DebertaV2ForSequenceClassification [deberta-v2 (absolute + relative)]" in report.heads
    assert "DebertaV2ForSequenceClassification [deberta-v2]" in report.heads


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_absolute_and_relative_positions_match_the_float64_reference(mode, monkeypatch):
    model = _model()
    ids = torch.randperm(90, generator=torch.Generator().manual_seed(2))[:12] + 3
    attr = hf_pelrp.attribute(model, ids[None], mode=mode)
    ref = _reference(model, ids, mode, int(attr.target[0]), monkeypatch)
    _close(attr.target_value[0], ref["logit"], "logit")
    _close(attr.token[0], ref["token"], "token")
    _close(attr.position_absolute[0], ref["position_absolute"], "position_absolute")
    assert float(ref["position_absolute"].abs().max()) > 1e-3 * float(ref["token"].abs().max())
    torch.testing.assert_close(attr.position, attr.position_absolute + attr.position_relative)
    if mode == "attnlrp":
        _close(attr.position_by_layer[0], ref["position_by_layer"], "position_by_layer")
        _close(attr.position_by_distance[0], ref["position_by_distance"], "position_by_distance")
        torch.testing.assert_close(attr.position_relative, attr.position_by_layer.sum(1))
        assert float(attr.position_relative.abs().max()) > 0
    else:  # CP: the relative leaves get exactly 0, the absolute leaf keeps its share
        assert float(attr.position_relative.abs().max()) == 0.0


def test_inputs_longer_than_the_absolute_table_are_refused():
    model = _model(max_position_embeddings=8)
    with pytest.raises(hf_pelrp.HfPelrpError, match="8"):
        hf_pelrp.attribute(model, torch.arange(3, 13)[None])
