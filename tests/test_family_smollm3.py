"""SmolLM3's NoPE layers (method.md 2, "Rotary variants"): no positional leaf, exactly 0 per-layer position
relevance, and q, k keep the full AttnLRP factor there; the rotary layers get their own leaves and the 1/2."""

from __future__ import annotations

import pytest
import torch
from transformers import SmolLM3Config, SmolLM3ForCausalLM

import hf_pelrp

pytestmark = pytest.mark.usefixtures("single_thread")


def smollm3(no_rope_layers: list[int]) -> SmolLM3ForCausalLM:
    config = SmolLM3Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=len(no_rope_layers),
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=64,
        pad_token_id=0,
        no_rope_layers=no_rope_layers,  # 1: the layer uses rotary, 0: NoPE
        initializer_range=0.15,
    )
    torch.manual_seed(0)
    return SmolLM3ForCausalLM(config).to(torch.float64).eval()


def inputs():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids * mask, mask


def test_nope_layers_get_exactly_zero_position_relevance():
    model = smollm3([1, 0, 1])
    assert [layer.self_attn.use_rope for layer in model.model.layers] == [1, 0, 1]
    ids, mask = inputs()
    attr = hf_pelrp.attribute(model, ids, mask, mode="attnlrp")
    by_layer = attr.position_by_layer
    assert by_layer.shape == (2, 3, 7)
    assert torch.equal(by_layer[:, 1], torch.zeros_like(by_layer[:, 1]))  # the NoPE layer: exactly 0
    for layer in (0, 2):  # the rotary layers: their own, non-zero maps on the real tokens
        assert (by_layer[:, layer][mask.bool()].abs() > 0).float().mean() > 0.5
    torch.testing.assert_close(attr.position, by_layer.sum(1), rtol=0, atol=0)
    cp = hf_pelrp.attribute(model, ids, mask, mode="cp")
    assert torch.equal(cp.position_by_layer, torch.zeros_like(cp.position_by_layer))


def _q_gradients(model, ids, mask, positional):
    """The gradient reaching each layer's q_proj output, with the lrp rules attached."""
    grads, handles = {}, []

    def keep(layer):
        def hook(_module, _args, output):
            output.register_hook(lambda g: grads.__setitem__(layer, g.detach().clone()))

        return hook

    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.q_proj.register_forward_hook(keep(i)))
    try:
        with hf_pelrp.lrp(model, mode="attnlrp", positional=positional):
            logits = model(input_ids=ids, attention_mask=mask).logits
            logits[:, -1, 5].sum().backward()
    finally:
        for h in handles:
            h.remove()
    return grads


def test_q_keeps_the_full_factor_in_nope_layers_and_gets_half_in_rotary_layers():
    """Rotary layer 0 under a NoPE layer 1: everything above layer 0's attention is the same with and without
    positions, so the gradient at q_proj is exactly 1/2 of the baseline's in the rotary layer (the uniform
    rule at the rotation) and exactly equal in the NoPE layer (no rotation, no split)."""
    model = smollm3([1, 0])
    ids, mask = inputs()
    with_pe = _q_gradients(model, ids, mask, positional=True)
    without = _q_gradients(model, ids, mask, positional=False)
    assert torch.equal(with_pe[1], without[1])  # NoPE: full AttnLRP factor (1/4) either way
    assert without[0].abs().max() > 0
    torch.testing.assert_close(with_pe[0], 0.5 * without[0], rtol=1e-12, atol=0)


def test_an_all_nope_model_is_its_own_baseline():
    """Without any rotary layer, positional=True changes nothing: no leaf, no factor, position exactly 0."""
    model = smollm3([0, 0])
    ids, mask = inputs()
    on = hf_pelrp.attribute(model, ids, mask, mode="attnlrp", positional=True)
    off = hf_pelrp.attribute(model, ids, mask, mode="attnlrp", positional=False)
    assert torch.equal(on.token, off.token)
    assert torch.equal(on.position, torch.zeros_like(on.position))


def test_check_adapter_proves_the_rotary_split_in_a_layer_of_each_kind():
    """The rotary split runs on one layer of each kind (here the rotating layer 0 and the NoPE layer 1): a
    declaration that has the NoPE layer rotate too is refused there, which layer 0 alone cannot see."""
    import dataclasses

    from hf_pelrp.adapters import adapter_for_type
    from hf_pelrp.adapters.base import _REGISTRY
    from hf_pelrp.positions import Rotary

    right = hf_pelrp.check_adapter("smollm3")
    assert "a layer like layer 1" in str(right) and right.passed
    saved = _REGISTRY["smollm3"]
    _REGISTRY["smollm3"] = dataclasses.replace(adapter_for_type("smollm3"), positions=Rotary())
    try:
        wrong = hf_pelrp.check_adapter("smollm3", raise_on_failure=False)
    finally:
        _REGISTRY["smollm3"] = saved
    failed = [line for line in str(wrong).splitlines() if line.startswith("  [FAIL]") or "[FAIL]" in line]
    assert failed and all("layer like layer 1" in line for line in failed if "rotary split" in line)
    assert any("rotary split" in line and "layer like layer 1" in line for line in failed)
