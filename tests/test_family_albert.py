"""ALBERT: a layer shared across applications gets its rules on every application (the same maps as the
unrolled model with one copy of the layer per application), grouped layouts, checkpointing."""

from __future__ import annotations

import pytest
import torch
from transformers import AlbertForMaskedLM, AlbertForSequenceClassification

import hf_pelrp
from hf_pelrp.check import _randomise, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64
GROUP = "albert.encoder.albert_layer_groups"


def _model(cls, groups: int = 1, inner: int = 1, layers: int = 3, seed: int = 0):
    config = tiny_config("albert")
    config.num_hidden_groups, config.inner_group_num, config.num_hidden_layers = groups, inner, layers
    torch.manual_seed(seed)
    model = cls(config).to(F64).eval()
    _randomise(model, seed)
    return model


def _unrolled(shared):
    """The same function with one copy of the shared layer per application (3 groups of 1 layer)."""
    unrolled = _model(type(shared), groups=3)
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith(GROUP)}
    for key, value in shared.state_dict().items():
        if key.startswith(f"{GROUP}.0."):
            for g in range(3):
                state[key.replace(f"{GROUP}.0.", f"{GROUP}.{g}.")] = value
    unrolled.load_state_dict(state)
    return unrolled


def _inputs(cls):
    ids = torch.randint(4, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if cls is AlbertForMaskedLM:
        ids[:, 2] = 3
        out.update(position=2, mask_token_id=3)
    return out


@pytest.mark.parametrize("cls", [AlbertForSequenceClassification, AlbertForMaskedLM])
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_a_shared_layer_gets_its_rules_on_every_application(cls, mode):
    shared = _model(cls)
    unrolled = _unrolled(shared)
    inputs = _inputs(cls)
    model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(shared(**model_inputs).logits, unrolled(**model_inputs).logits)
    a = hf_pelrp.attribute(shared, **inputs, mode=mode)
    b = hf_pelrp.attribute(unrolled, **inputs, mode=mode, target=a.target)
    for name in ("token", "position", "segment"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-12)
    assert a.position.abs().sum() > 0


def test_the_shared_attention_runs_once_per_application():
    model = _model(AlbertForSequenceClassification, layers=5)
    with hf_pelrp.lrp(model) as ctx, torch.enable_grad():
        model(torch.tensor([[5, 6, 7, 8]]))
        assert [rule.calls for rule in ctx._attention] == [5]


def test_grouped_layers_pass_check_adapter():
    """2 groups of 2 layers applied over 4 layers: 4 distinct blocks, each attention module called twice."""
    config = tiny_config("albert")
    config.num_hidden_groups, config.inner_group_num, config.num_hidden_layers = 2, 2, 4
    assert hf_pelrp.check_adapter(config).passed
    model = _model(AlbertForSequenceClassification, groups=2, inner=2, layers=4)
    adapter = hf_pelrp.adapters.adapter_for(model)
    assert len(adapter.blocks(model)) == 4
    with hf_pelrp.lrp(model) as ctx, torch.enable_grad():
        model(torch.tensor([[5, 6, 7, 8]]))
        assert [rule.calls for rule in ctx._attention] == [2, 2, 2, 2]


def test_gradient_checkpointing_of_a_shared_layer_gives_the_same_maps():
    model = _model(AlbertForSequenceClassification)
    inputs = _inputs(AlbertForSequenceClassification)
    plain = hf_pelrp.attribute(model, **inputs, mode="attnlrp")
    checkpointed = hf_pelrp.attribute(model, **inputs, mode="attnlrp", gradient_checkpointing=True)
    torch.testing.assert_close(plain.relevance, checkpointed.relevance, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(plain.segment, checkpointed.segment, rtol=1e-12, atol=1e-14)
