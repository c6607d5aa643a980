"""A result says which rules made it: settings beyond mode / positional / Gamma (a preset such as
``attnlrp-conservative``, relevance per offset) are recorded in ``Attribution.rules`` and survive save / load."""

from __future__ import annotations

import pytest
import torch

import hf_pelrp
from helpers.builders import tiny_llama_family
from hf_pelrp.config import LRPConfig


def _ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(1, 101, (1, 7))


def test_plain_rules_record_nothing_beyond_the_mode():
    attr = hf_pelrp.attribute(tiny_llama_family("llama"), _ids())
    assert attr.rules == {} and attr.mode == "attnlrp"


def test_a_preset_beyond_the_mode_is_recorded_and_saved(tmp_path):
    model = tiny_llama_family("llama")
    attr = hf_pelrp.attribute(model, _ids(), config="attnlrp-conservative")
    assert attr.rules == {"softmax": "identity", "softmax_eps": 0.1}
    assert "rules={'softmax': 'identity'" in repr(attr)
    back = hf_pelrp.load_attribution(attr.save(tmp_path / "a.safetensors"))
    assert back.rules == attr.rules
    plain = hf_pelrp.attribute(model, _ids())
    with pytest.raises(hf_pelrp.errors.AttributionInputError, match="same rules"):
        type(attr).stack([attr, plain])


def test_offsets_are_recorded():
    attr = hf_pelrp.attribute(tiny_llama_family("llama"), _ids(), config=LRPConfig(offsets=True))
    assert attr.rules == {"offsets": True}
