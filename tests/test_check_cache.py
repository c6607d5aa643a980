"""The structural checks of ``Adapter.check_model`` are remembered per model instance and module tree (issue 22
§6: per-call fixed work done once per model). What these tests pin: a change of the tree after a passing
attribution is checked again and refused, a forward replaced on an instance after a passing attribution is
refused, and a declaration's own checks (which read the config) run at every call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_pelrp
from helpers.builders import tiny_bert_family, tiny_llama_family
from hf_pelrp.adapters import base as adapter_base
from hf_pelrp.errors import UnsupportedModelError


class _Unknown(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def _ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(1, 101, (1, 6))


def test_a_second_attribution_skips_the_structural_walk_and_gives_the_same_map(monkeypatch):
    model = tiny_llama_family("llama")
    first = hf_pelrp.attribute(model, _ids())
    walks = []
    original = adapter_base.Adapter._check_structure
    monkeypatch.setattr(
        adapter_base.Adapter, "_check_structure", lambda self, m: walks.append(m) or original(self, m)
    )
    second = hf_pelrp.attribute(model, _ids())
    assert walks == []
    torch.testing.assert_close(second.token, first.token, rtol=0, atol=0)
    # another instance of the same class is checked on its own
    hf_pelrp.attribute(tiny_llama_family("llama"), _ids())
    assert len(walks) == 1


def test_a_module_added_after_a_passing_attribution_is_refused():
    model = tiny_llama_family("llama")
    hf_pelrp.attribute(model, _ids())
    model.model.layers[0].mlp.extra = _Unknown()
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.mlp\.extra.*_Unknown.*not covered"):
        hf_pelrp.attribute(model, _ids())


def test_a_module_swapped_for_another_class_after_a_passing_attribution_is_refused():
    model = tiny_llama_family("llama")
    hf_pelrp.attribute(model, _ids())
    model.model.layers[1].mlp.act_fn = _Unknown()
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.1\.mlp\.act_fn"):
        hf_pelrp.attribute(model, _ids())


def test_a_forward_replaced_on_the_instance_after_a_passing_attribution_is_refused():
    model = tiny_llama_family("llama")
    hf_pelrp.attribute(model, _ids())
    mlp = model.model.layers[0].mlp
    mlp.forward = lambda x: type(mlp).forward(mlp, x)
    with pytest.raises(UnsupportedModelError, match="forward replaced on the instance"):
        hf_pelrp.attribute(model, _ids())


def test_the_declarations_own_checks_run_at_every_call():
    """BERT's declaration refuses a decoder configuration (a check that reads the config, not the tree)."""
    model = tiny_bert_family("bert")
    ids = torch.tensor([[2, 5, 7, 9, 3]])
    hf_pelrp.attribute(model, ids)
    model.config.is_decoder = True
    with pytest.raises(UnsupportedModelError, match="decoder"):
        hf_pelrp.attribute(model, ids)


def test_weights_moved_to_meta_after_a_passing_attribution_are_refused():
    model = tiny_llama_family("llama")
    hf_pelrp.attribute(model, _ids())
    model.to("meta")
    with pytest.raises(UnsupportedModelError, match="meta device"):
        hf_pelrp.attribute(model, _ids())
