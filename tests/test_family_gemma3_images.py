"""Gemma 3 explained with its image (issue 19): the image side (SigLIP tower, average pooling, RMSNorm, matrix
product) against an explicit float64 reference seeded with the relevance the language model hands to the image
features, conservation over text + image, and Gemma 3's token_type_ids checks."""

from __future__ import annotations

import pytest
import torch
import transformers

import hf_pelrp
from helpers.reference_vlm import gemma3_image_reference
from hf_pelrp.adapters.base import adapter_for_type
from hf_pelrp.check import _randomise, _zero_biases, tiny_config
from hf_pelrp.errors import AttributionInputError


def _gemma3(seed: int = 0) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    adapter = adapter_for_type("gemma3")
    model = transformers.Gemma3ForConditionalGeneration(tiny_config("gemma3", adapter)).double().eval()
    _randomise(model, seed)  # the projector's weight and norm start at 0
    inputs = adapter.inputs.example(model, 2, 5, torch.Generator().manual_seed(seed + 1))
    return model, inputs


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_gemma3_image_side_matches_explicit_rules(mode):
    model, inputs = _gemma3()
    kept = {}

    def keep(_module, _args, output):
        output.retain_grad()
        kept["features"] = output

    with hf_pelrp.lrp(model, config=mode) as ctx, torch.enable_grad():
        handle = model.model.multi_modal_projector.register_forward_hook(keep)
        logits = model(**inputs).logits[:, -1]
        handle.remove()
        logits.gather(-1, logits.argmax(-1, keepdim=True)).sum().backward()
        maps = ctx.maps()
    r_features = (kept["features"] * kept["features"].grad).detach()
    for row in range(2):
        image, position = gemma3_image_reference(
            model, inputs["pixel_values"][row], r_features[row], mode=mode
        )
        for fast, ref, name in (
            (maps["image"][row], image, "image"),
            (maps["image_position"][row], position, "image_position"),
        ):
            err = (fast.double() - ref).abs().max() / ref.abs().max()
            assert err < 1e-6, f"{name} row {row}: relative error {err:.2e}"
    assert maps["image_grid"].tolist() == [[4, 4], [4, 4]] and bool((maps["image_special"] == 0).all())


def test_bias_free_cp_conserves_over_text_and_image():
    model, inputs = _gemma3(2)
    _zero_biases(model)
    attr = hf_pelrp.attribute(model, **inputs, config="cp")
    torch.testing.assert_close(
        attr.conservation_gap, torch.zeros_like(attr.conservation_gap), rtol=0, atol=1e-6
    )
    assert float(attr.image.abs().sum()) > 0
    attn = hf_pelrp.attribute(model, **inputs, config="attnlrp")
    assert float(attn.image_position.abs().sum()) > 1e-3 * float(attn.image.abs().sum())


def test_token_type_ids_must_mark_the_image_tokens():
    model, inputs = _gemma3()
    with pytest.raises(AttributionInputError, match="needs token_type_ids"):
        hf_pelrp.attribute(model, **{k: v for k, v in inputs.items() if k != "token_type_ids"})
    shifted = inputs["token_type_ids"].roll(1, -1)
    with pytest.raises(AttributionInputError, match="exactly at the image placeholder"):
        hf_pelrp.attribute(model, **{**inputs, "token_type_ids": shifted})
    text = {"input_ids": inputs["input_ids"][:, :2], "attention_mask": inputs["attention_mask"][:, :2]}
    with pytest.raises(AttributionInputError, match="no pixel_values"):
        hf_pelrp.attribute(model, **text, token_type_ids=torch.ones_like(text["input_ids"]))
    plain = hf_pelrp.attribute(model, **text)
    zeros = hf_pelrp.attribute(model, **text, token_type_ids=torch.zeros_like(text["input_ids"]))
    assert plain.image is None and torch.equal(plain.token, zeros.token)
