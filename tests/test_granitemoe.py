"""GraniteMoE's router (softmax of the selected logits) is explained exactly as Mixtral's (renormalised top-k of
the full softmax), the same function: with Granite's multipliers at their neutral values and the same weights,
a GraniteMoE and a Mixtral give the same maps in both modes (float64 reference for ``adapters/granitemoe.py``;
measured: 1e-9 relative for the token map, 2e-8 for the position map, from the routers' float32 rounding)."""

from __future__ import annotations

import math

import pytest
import torch

import hf_pelrp
from hf_pelrp.check import tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.tensor([[5, 17, 3, 42, 8, 11, 60], [9, 2, 33, 71, 4, 25, 13]])


def test_granitemoe_router_is_explained_as_mixtrals():
    from transformers import GraniteMoeForCausalLM, MixtralForCausalLM

    torch.manual_seed(0)
    mixtral = MixtralForCausalLM(tiny_config("mixtral")).to(torch.float64).eval()
    config = tiny_config("granitemoe")
    head_dim = config.hidden_size // config.num_attention_heads
    config.embedding_multiplier = config.residual_multiplier = config.logits_scaling = 1.0
    config.attention_multiplier = 1.0 / math.sqrt(head_dim)
    config.rms_norm_eps = mixtral.config.rms_norm_eps
    config.rope_parameters = dict(mixtral.config.rope_parameters)
    config.tie_word_embeddings = mixtral.config.tie_word_embeddings
    granite = GraniteMoeForCausalLM(config).to(torch.float64).eval()
    state = {
        k.replace("mlp.gate.", "block_sparse_moe.router.").replace(
            "mlp.experts.", "block_sparse_moe.experts."
        ): v
        for k, v in mixtral.state_dict().items()
    }
    granite.load_state_dict(state)
    with torch.no_grad():
        # the routers round differently in float32: about 3e-8
        assert float((granite(IDS).logits - mixtral(IDS).logits).abs().max()) < 1e-6
    for mode in ("attnlrp", "cp"):
        got = hf_pelrp.attribute(granite, IDS, mode=mode)
        want = hf_pelrp.attribute(mixtral, IDS, mode=mode)
        for name in ("token", "position"):
            a, b = getattr(got, name), getattr(want, name)
            assert float((a - b).abs().max()) <= 1e-6 * max(1e-30, float(b.abs().max())), (mode, name)
