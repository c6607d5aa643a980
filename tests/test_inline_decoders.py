"""GPT-Neo's inline attention with the projection-factor rule (``adapters/inline_decoders.py``) against the
reference: the same network as a GPT-2 (unscaled attention weights, global layers) whose attention runs through
the ``"lrp"`` attention implementation. Same weights, same maps, both modes (float64 models; GPT-Neo computes its
scores in float32: the maps agree to about 1e-8 relative, tested at 1e-6)."""

from __future__ import annotations

import pytest
import torch

import hf_pelrp

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.tensor([[5, 17, 3, 42, 8, 11, 60], [9, 2, 33, 71, 4, 25, 13]])


def _pair():
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    neo = GPTNeoForCausalLM(
        GPTNeoConfig(
            hidden_size=32,
            num_layers=2,
            attention_types=[[["global"], 2]],
            num_heads=4,
            intermediate_size=64,
            vocab_size=97,
            max_position_embeddings=64,
            activation_function="gelu_new",
            initializer_range=0.1,
            bos_token_id=1,
            eos_token_id=1,
        )
    ).to(torch.float64)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_inner=64,
            vocab_size=97,
            n_positions=64,
            activation_function="gelu_new",
            scale_attn_weights=False,
            layer_norm_epsilon=neo.config.layer_norm_epsilon,
            bos_token_id=1,
            eos_token_id=1,
        )
    ).to(torch.float64)
    with torch.no_grad():
        gpt2.transformer.wte.weight.copy_(neo.transformer.wte.weight)
        gpt2.transformer.wpe.weight.copy_(neo.transformer.wpe.weight)
        for mine, theirs in zip(gpt2.transformer.h, neo.transformer.h, strict=True):
            att = theirs.attn.attention
            mine.attn.c_attn.weight.copy_(
                torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).T
            )
            mine.attn.c_attn.bias.zero_()
            mine.attn.c_proj.weight.copy_(att.out_proj.weight.T)
            mine.attn.c_proj.bias.copy_(att.out_proj.bias)
            mine.mlp.c_fc.weight.copy_(theirs.mlp.c_fc.weight.T)
            mine.mlp.c_fc.bias.copy_(theirs.mlp.c_fc.bias)
            mine.mlp.c_proj.weight.copy_(theirs.mlp.c_proj.weight.T)
            mine.mlp.c_proj.bias.copy_(theirs.mlp.c_proj.bias)
            for a, b in ((mine.ln_1, theirs.ln_1), (mine.ln_2, theirs.ln_2)):
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
        gpt2.transformer.ln_f.weight.copy_(neo.transformer.ln_f.weight)
        gpt2.transformer.ln_f.bias.copy_(neo.transformer.ln_f.bias)
        gpt2.lm_head.weight.copy_(neo.lm_head.weight)
    return neo.eval(), gpt2.eval()


def test_gpt_neo_inline_attention_matches_the_lrp_attention():
    neo, gpt2 = _pair()
    with torch.no_grad():
        assert torch.allclose(neo(IDS).logits, gpt2(IDS).logits, atol=1e-6)
    for mode in ("attnlrp", "cp"):
        got = hf_pelrp.attribute(neo, IDS, mode=mode)
        want = hf_pelrp.attribute(gpt2, IDS, mode=mode)
        for name in ("token", "position"):
            a, b = getattr(got, name), getattr(want, name)
            assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max()), (mode, name)
        assert torch.allclose(got.conservation_gap, want.conservation_gap, atol=1e-5)


def test_without_the_factors_the_maps_differ():
    """The reference can fail: GPT-Neo with plain gradients through its attention is not the AttnLRP map."""
    import dataclasses

    from hf_pelrp.adapters import adapter_for_type, inline_decoders
    from hf_pelrp.adapters.base import _REGISTRY

    neo, gpt2 = _pair()
    adapter = adapter_for_type("gpt_neo")
    saved = _REGISTRY["gpt_neo"]
    _REGISTRY["gpt_neo"] = dataclasses.replace(adapter, extra_rules=None)
    try:
        got = hf_pelrp.attribute(neo, IDS, mode="attnlrp")
    finally:
        _REGISTRY["gpt_neo"] = saved
    want = hf_pelrp.attribute(gpt2, IDS, mode="attnlrp")
    assert float((got.token - want.token).abs().max()) > 1e-3 * float(want.token.abs().max())
    assert inline_decoders.GPT_NEO is saved
