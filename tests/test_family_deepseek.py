"""DeepSeek-V3: multi-head latent attention whose decoupled rotary part is the *last* channels of each head.

The rotary rule's local conservation (method.md 3.2) pins which channels rotate: in a one-layer model the
relevance a rotated query / key channel receives is the same with and without positional leaves, and the rule
only splits it between q (k) and cos / sin, so per position ``token_on + position_on == token_off``. A rule
that halves the content channels instead (the rotary part declared first) breaks the equality.
(The mixture of experts is checked against the written-out rules in test_family_moe.py.)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

import hf_pelrp
from hf_pelrp.adapters.base import _REGISTRY
from hf_pelrp.check import tiny_config
from hf_pelrp.positions import Rotary, rotary_leaves_in_graph

pytestmark = pytest.mark.usefixtures("single_thread")


def _one_layer(**overrides):
    config = tiny_config("deepseek_v3")
    for key, value in {
        "num_hidden_layers": 1,
        "first_k_dense_replace": 0,
        "initializer_range": 0.3,
        **overrides,
    }.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(config).double().eval()


def _local_gap(model) -> tuple[float, float]:
    ids = torch.tensor([[5, 17, 33, 2, 61, 8, 90], [3, 4, 5, 6, 7, 8, 9]])
    on = hf_pelrp.attribute(model, ids, mode="attnlrp", positional=True)
    off = hf_pelrp.attribute(model, ids, mode="attnlrp", positional=False)
    gap = float((on.token + on.position - off.token).abs().max())
    return gap / float(off.token.abs().max()), float(on.position.abs().max() / off.token.abs().max())


@pytest.mark.parametrize("interleave", [True, False])
def test_the_rotary_split_is_local_on_the_last_channels(interleave):
    gap, share = _local_gap(_one_layer(rope_interleave=interleave))
    assert share > 1e-3  # positions receive relevance
    # not 1e-12: the model's RMSNorms compute in float32, so they conserve relevance to float32 rounding
    assert gap < 1e-6


def test_declaring_the_rotary_part_first_breaks_the_local_split():
    saved = _REGISTRY["deepseek_v3"]
    _REGISTRY["deepseek_v3"] = dataclasses.replace(saved, positions=Rotary(rotated="first"))
    try:
        # in the graph, as check_adapter runs it: the attention-side leaf gradient follows the declaration, so
        # it is conservative even when the declaration is wrong (the graph follows the model's own rotation)
        with rotary_leaves_in_graph():
            gap, _ = _local_gap(_one_layer())
    finally:
        _REGISTRY["deepseek_v3"] = saved
    assert gap > 1e-3


def test_check_adapter_with_a_full_rank_query_plain_rotary_and_biases():
    config = tiny_config("deepseek_v3")
    config.q_lora_rank = None  # q_proj instead of q_a_proj / q_a_layernorm / q_b_proj
    config.rope_interleave = False
    config.attention_bias = True
    assert hf_pelrp.check_adapter(config).passed
