"""Scaled rotary embeddings (``linear``, ``dynamic``, ``yarn``, ``llama3``, ``longrope``; transformers 5
``config.rope_parameters``): the input-length check uses the scaled limit, so a model is explainable past
``max_position_embeddings`` where it is meant to run, and refused beyond that with a clear message."""

from __future__ import annotations

import pytest
import torch

import hf_pelrp
from hf_pelrp import AttributionInputError
from hf_pelrp.inputs import scaled_rotary_limit

pytestmark = pytest.mark.usefixtures("single_thread")

MAX = 16
_LONGROPE = {"short_factor": [1.0] * 4, "long_factor": [2.0, 3.0, 4.0, 5.0]}

#: rope_parameters -> the limit the model is meant to run to (max_position_embeddings = 16)
CASES = {
    "default": ({"rope_type": "default"}, MAX),
    "linear": ({"rope_type": "linear", "factor": 2.0}, 2 * MAX),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, 2 * MAX),
    # scaling added to a config whose max_position_embeddings is the pretraining context (Qwen 2.5 recipe)
    "yarn": ({"rope_type": "yarn", "factor": 4.0}, 4 * MAX),
    # max_position_embeddings already the scaled context (DeepSeek-V3 layout): nothing beyond it
    "yarn-prescaled": ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8}, MAX),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 4.0,
            "original_max_position_embeddings": 8,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
        4 * 8,
    ),
    # Phi-3 layout: no factor, max_position_embeddings is the long context; the long factors apply past 8
    "longrope": ({"rope_type": "longrope", "original_max_position_embeddings": 8, **_LONGROPE}, MAX),
    "longrope-factor": (
        {"rope_type": "longrope", "original_max_position_embeddings": 8, "factor": 4.0, **_LONGROPE},
        4 * 8,
    ),
}


def _llama(rope: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=MAX,
        pad_token_id=0,
        rope_parameters={"rope_theta": 10000.0, **rope},
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double().eval()


@pytest.mark.parametrize("case", list(CASES))
def test_scaled_rotary_limit_per_rope_type(case):
    rope, limit = CASES[case]
    model = _llama(rope)
    assert model.config.rope_parameters["rope_type"] == rope["rope_type"]  # transformers 5 layout
    assert scaled_rotary_limit(model.config) == limit


@pytest.mark.parametrize("case", list(CASES))
def test_explainable_up_to_the_scaled_limit_and_refused_beyond(case):
    rope, limit = CASES[case]
    model = _llama(rope)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (1, limit), generator=gen)
    attr = hf_pelrp.attribute(model, ids, mode="cp")  # bias-free: exact conservation
    assert float(attr.conservation_gap.abs().max()) <= 1e-6 * max(1.0, float(attr.target_value.abs().max()))
    attr = hf_pelrp.attribute(model, ids)
    assert bool(torch.isfinite(attr.relevance).all()) and float(attr.position.abs().sum()) > 0
    if rope["rope_type"] == "dynamic":  # past max_position_embeddings the model really rescaled
        rotary = model.model.rotary_emb
        assert not torch.equal(rotary.inv_freq, rotary.original_inv_freq)
    longer = torch.randint(1, 97, (1, limit + 1), generator=gen)
    with pytest.raises(AttributionInputError, match=f"supports at most {limit} positions"):
        hf_pelrp.attribute(model, longer)
    with pytest.raises(AttributionInputError, match="position_ids holds"):
        hf_pelrp.attribute(model, ids, position_ids=torch.arange(1, limit + 1)[None])


def test_nested_rope_parameters_take_the_shortest_layer_limit():
    """Gemma 3 keeps one rope_parameters dict per layer type: the model runs where every layer type does."""
    from transformers import Gemma3TextConfig

    def config(full, sliding):
        return Gemma3TextConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=MAX,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"full_attention": full, "sliding_attention": sliding},
        )

    default = {"rope_type": "default", "rope_theta": 10000.0}
    linear = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert scaled_rotary_limit(config(linear, default)) == MAX  # Gemma 3 itself: global layers linear x 8
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    assert scaled_rotary_limit(config(linear, dynamic)) == 2 * MAX


def test_dynamic_scaling_grows_from_max_position_embeddings():
    """transformers' dynamic NTK rescales from max_position_embeddings, whatever original context is set."""

    class Config:
        max_position_embeddings = MAX
        original_max_position_embeddings = 4
        rope_parameters = {"rope_type": "dynamic", "factor": 2.0}

    assert scaled_rotary_limit(Config()) == 2 * MAX


def test_rope_types_that_do_not_lengthen_the_context_keep_max_position_embeddings():
    class Config:
        max_position_embeddings = MAX
        rope_parameters = {"rope_type": "proportional", "factor": 4.0}

    assert scaled_rotary_limit(Config()) == MAX


@pytest.mark.parametrize("case", ["dynamic", "longrope"])
def test_length_dependent_scaling_is_not_batch_invariant_past_the_original_context(case):
    """Known non-invariance (method.md "Scaled rotary embeddings"): dynamic NTK and LongRoPE choose their
    frequencies from the longest position of the batch, as the model itself does. A short row explained next
    to a row past the original context is not the row explained alone; inside the original context it is."""
    rope, limit = CASES[case]
    model = _llama(rope)
    gen = torch.Generator().manual_seed(2)
    short = torch.randint(1, 97, (1, 6), generator=gen)
    alone = hf_pelrp.attribute(model, short)
    for length, invariant in ((8, True), (limit, False)):
        ids = torch.randint(1, 97, (2, length), generator=gen)
        mask = torch.ones_like(ids)
        ids[1, :6], ids[1, 6:], mask[1, 6:] = short[0], 0, 0
        row = hf_pelrp.attribute(model, ids, attention_mask=mask)[1].unpad()
        same = torch.allclose(row.relevance, alone.relevance, rtol=1e-9, atol=1e-12)
        assert same == invariant
