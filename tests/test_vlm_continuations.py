"""Continuations of every VLM declared with images: a matrix of generated tokens over the text and the patches,
exact under bias-free CP, and each row the attribution of its own prefix (LLaVA, Gemma 3, Qwen2-VL, Qwen2.5-VL)."""

from __future__ import annotations

import pytest
import torch
import transformers

import hf_pelrp
from hf_pelrp.adapters.base import adapter_for_type
from hf_pelrp.check import _randomise, _zero_biases, tiny_config

CLASSES = {
    "llava": transformers.LlavaForConditionalGeneration,
    "gemma3": transformers.Gemma3ForConditionalGeneration,
    "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
}


@pytest.mark.parametrize("model_type", sorted(CLASSES))
def test_generated_rows_conserve_over_text_and_image(model_type):
    adapter = adapter_for_type(model_type)
    torch.manual_seed(0)
    model = CLASSES[model_type](tiny_config(model_type, adapter)).double().eval()
    _randomise(model, 0)
    _zero_biases(model)
    inputs = adapter.inputs.example(model, 1, 4, torch.Generator().manual_seed(1))
    inputs.pop("attention_mask")
    # a given continuation (greedy generation of a random tiny model may pick a video placeholder)
    gen = hf_pelrp.explain_continuation(
        model, **inputs, continuation_ids=torch.tensor([[5, 6, 7]]), config="cp"
    )
    assert gen.image.shape[0] == 3 and gen.image_grid.shape == (3, 2)
    scale = gen.target_value.abs().clamp(min=1.0)
    assert float((gen.conservation_gap.abs() / scale).max()) < 1e-6
    assert float(gen.image.abs().sum(-1).min()) > 0  # every generated token reads the image
    # the last row is the attribution of the whole prefix before the last generated token
    prefix = gen.input_ids[:-1][None]
    extra = {k: v for k, v in inputs.items() if k != "input_ids"}
    if "token_type_ids" in extra:  # Gemma 3: the generated tokens are text
        types = extra["token_type_ids"]
        extra["token_type_ids"] = torch.cat([types, types.new_zeros(1, prefix.shape[1] - types.shape[1])], 1)
    if "mm_token_type_ids" in extra:
        types = extra["mm_token_type_ids"]
        extra["mm_token_type_ids"] = torch.cat(
            [types, types.new_zeros(1, prefix.shape[1] - types.shape[1])], 1
        )
    last = hf_pelrp.attribute(model, prefix, target=gen.target[-1:], config="cp", **extra)
    for name in ("image", "image_position", "image_special"):
        torch.testing.assert_close(getattr(gen, name)[-1:], getattr(last, name), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gen.token[-1:, : prefix.shape[1]], last.token, rtol=1e-9, atol=1e-12)


def _vision_types() -> list[str]:
    from hf_pelrp.adapters.base import _REGISTRY

    return sorted(t for t, a in _REGISTRY.items() if getattr(a, "vision", None) is not None)


@pytest.mark.parametrize("model_type", _vision_types())
def test_every_vlm_with_images_explains_a_continuation_exactly(model_type):
    from hf_pelrp.check import head_classes

    adapter = adapter_for_type(model_type)
    cls = next(
        c
        for c in head_classes(model_type, adapter)
        if "Conditional" in c.__name__ or "CausalLM" in c.__name__
    )
    torch.manual_seed(0)
    model = cls(tiny_config(model_type, adapter)).double().eval()
    _randomise(model, 0)
    _zero_biases(model)
    inputs = adapter.inputs.example(model, 1, 4, torch.Generator().manual_seed(1))
    inputs.pop("attention_mask")
    gen = hf_pelrp.explain_continuation(
        model, **inputs, continuation_ids=torch.tensor([[5, 6, 7]]), config="cp"
    )
    assert gen.image.shape[0] == 3
    scale = gen.target_value.abs().clamp(min=1.0)
    assert float((gen.conservation_gap.abs() / scale).max()) < 1e-6
    assert float(gen.image.abs().sum(-1).min()) > 0
