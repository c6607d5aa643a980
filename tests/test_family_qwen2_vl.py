"""Qwen2-VL / Qwen2.5-VL on text-only inputs: M-RoPE leaves, the per-axis position map, refusals of images.

On text the three M-RoPE axes carry the same position ids, so the language model computes exactly what a Qwen2
decoder with the same weights computes. The reference is therefore the explicit rules of reference_lrp.py on
that Qwen2 model (token and position maps), and the per-axis split is the Qwen2 model's per-channel cos / sin
relevance summed by hand over the channels of each ``mrope_section``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2VLForConditionalGeneration

import hf_pelrp
from helpers.reference_lrp import reference_lrp
from hf_pelrp import AttributionInputError
from hf_pelrp.check import tiny_config
from hf_pelrp.heads import head_kind
from hf_pelrp.inputs import causal_position_ids

pytestmark = pytest.mark.usefixtures("single_thread")

SECTIONS = (2, 1, 1)  # of the 4 frequencies of a head of 8 channels: temporal, height, width


def _pair():
    """A tiny Qwen2-VL and a Qwen2 with the same language-model weights (float64)."""
    config = tiny_config("qwen2_vl")
    config.text_config.initializer_range = 0.15
    torch.manual_seed(0)
    vl = Qwen2VLForConditionalGeneration(config).double().eval()
    with torch.no_grad():  # random-init norms are all ones: perturb them so the norm rules are exercised
        for name, p in vl.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    text = config.text_config
    plain = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=text.num_key_value_heads,
            vocab_size=text.vocab_size,
            max_position_embeddings=text.max_position_embeddings,
            rms_norm_eps=text.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": text.rope_parameters["rope_theta"]},
            pad_token_id=0,
        )
    ).double()
    state = {
        (
            "model." + k.removeprefix("model.language_model.") if k.startswith("model.language_model.") else k
        ): v
        for k, v in vl.state_dict().items()
        if k.startswith("model.language_model.") or k == "lm_head.weight"
    }
    loaded = plain.load_state_dict(state, strict=False)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    return vl, plain.eval()


def _batch():
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 97, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, 5:] = 0
    return ids * mask, mask


def _axes_by_hand(model, ids, mask, mode):
    """Per-axis position relevance of the plain Qwen2 model: its cos / sin leaves' relevance per channel, summed
    over the channels of each section (the first 2 frequencies temporal, then 1 height, 1 width; both halves)."""
    axis_of = torch.tensor([0, 0, 1, 2, 0, 0, 1, 2])
    rows = torch.arange(ids.shape[0])
    last = (torch.arange(ids.shape[1]) * mask).argmax(-1)
    with hf_pelrp.lrp(model, mode=mode) as ctx:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=causal_position_ids(mask)).logits
        seed = logits[rows, last].max(-1).values
        torch.autograd.backward(seed.sum(), inputs=ctx.leaves())
        out = torch.zeros(ids.shape[0], 3, ids.shape[1], dtype=torch.float64)
        for leaves in ctx.store.layers.values():
            for leaf in leaves.values():
                if leaf.grad is None:  # CP-LRP: q and k, hence cos and sin, receive nothing
                    continue
                per_channel = leaf.detach() * leaf.grad
                for a in range(3):
                    out[:, a] += per_channel[..., axis_of == a].sum(-1)
    return out


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_text_only_qwen2_vl_matches_the_explicit_rules_and_splits_positions_by_axis(mode):
    vl, plain = _pair()
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.allclose(
            vl(input_ids=ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits
        )
    attr = hf_pelrp.attribute(vl, ids, attention_mask=mask, mode=mode)
    ref = reference_lrp(plain, ids, mask, target=attr.target, mode=mode)
    scale = float(ref.token.abs().max())
    torch.testing.assert_close(attr.token, ref.token, rtol=0, atol=1e-8 * scale)
    torch.testing.assert_close(attr.position, ref.position, rtol=0, atol=1e-8 * scale)
    torch.testing.assert_close(attr.position_by_layer, ref.position_by_layer, rtol=0, atol=1e-8 * scale)
    by_axis = attr.position_by_axis
    assert by_axis.shape == (3, 3, 7)
    torch.testing.assert_close(by_axis.sum(1), attr.position, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(by_axis, _axes_by_hand(plain, ids, mask, mode), rtol=0, atol=1e-10 * scale)
    if mode == "attnlrp":
        assert all(float(by_axis[:, a].abs().max()) > 1e-4 * scale for a in range(3))
    else:
        assert float(by_axis.abs().max()) == 0.0
    assert float(by_axis[1, :, :2].abs().max()) == 0.0 and float(by_axis[2, :, 5:].abs().max()) == 0.0


def test_the_sections_come_from_the_model_instance():
    config = tiny_config("qwen2_vl")
    config.text_config.rope_parameters = {**config.text_config.rope_parameters, "mrope_section": [1, 2, 1]}
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).double().eval()
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with hf_pelrp.lrp(model) as ctx:
        model(input_ids=ids).logits[0, -1].max().backward()
        maps = ctx.maps()
        axis_of = torch.tensor([0, 1, 1, 2, 0, 1, 1, 2])
        height = sum(
            (leaf.detach() * leaf.grad)[..., axis_of == 1].sum(-1)
            for leaves in ctx.store.layers.values()
            for leaf in leaves.values()
        )
    torch.testing.assert_close(maps["position_by_axis"][:, 1], height)


def test_the_head_is_a_causal_lm_and_images_are_refused():
    config = tiny_config("qwen2_vl")
    config.image_token_id = 5
    model = Qwen2VLForConditionalGeneration(config).double().eval()
    assert head_kind(model) == "causal_lm"
    ids = torch.tensor([[4, 8, 15, 16]])
    # images are explained with their grid (tests/test_family_qwen2_vl_vision.py)
    with pytest.raises(AttributionInputError, match="needs image_grid_thw with pixel_values"):
        hf_pelrp.attribute(model, ids, pixel_values=torch.zeros(4, 12))
    with pytest.raises(AttributionInputError, match="image placeholder"):
        hf_pelrp.attribute(model, torch.tensor([[4, 5, 15, 16]]))
    # a causal-LM entry point works on text: explaining a continuation
    attr = hf_pelrp.attribute(model, ids, continuation_ids=torch.tensor([[23, 42]]))
    assert attr.token.shape[-1] == 6
