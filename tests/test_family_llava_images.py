"""LLaVA explained with its image (issue 19): the fast path against the explicit float64 reference of
``helpers/reference_vlm.py`` (CLIP tower, MLP projector, LLaMA decoder), conservation over text + image, and the
refusals of bad image inputs."""

from __future__ import annotations

import pytest
import torch
import transformers

import hf_pelrp
from helpers.reference_vlm import llava_reference
from hf_pelrp.adapters.base import adapter_for_type
from hf_pelrp.check import _zero_biases, tiny_config
from hf_pelrp.errors import AttributionInputError


def _llava(seed: int = 0) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    adapter = adapter_for_type("llava")
    model = transformers.LlavaForConditionalGeneration(tiny_config("llava", adapter)).double().eval()
    inputs = adapter.inputs.example(model, 2, 5, torch.Generator().manual_seed(seed + 1))
    return model, inputs


def _close(fast: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    scale = ref.abs().max().item()
    err = (fast.double() - ref).abs().max().item() / max(scale, 1e-30)
    assert err < tol, f"{what}: max error {err:.3e} of the largest entry (tolerance {tol:.0e})"


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_llava_image_maps_match_explicit_rules(mode):
    model, inputs = _llava()
    ref = llava_reference(
        model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], mode=mode
    )
    attr = hf_pelrp.attribute(model, **inputs, config=mode)
    assert torch.equal(attr.target, ref.target)
    torch.testing.assert_close(attr.target_value.double(), ref.logit, rtol=1e-9, atol=0)
    for name in ("token", "position", "image", "image_position", "image_special"):
        _close(getattr(attr, name), getattr(ref, name), 1e-6, name)
    assert attr.image_grid.tolist() == [[4, 4], [4, 4]]
    if mode == "attnlrp":  # positions of the tower and of the text are both non-trivial
        assert ref.image_position.abs().sum() > 1e-3 * ref.image.abs().sum()
        assert ref.position.abs().sum() > 0


def test_bias_free_cp_conserves_over_text_and_image():
    model, inputs = _llava(3)
    _zero_biases(model)
    attr = hf_pelrp.attribute(model, **inputs, config="cp")
    total = attr.relevance.sum(-1) + attr.image.sum(-1) + attr.image_position.sum(-1) + attr.image_special
    torch.testing.assert_close(total, attr.target_value, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        attr.conservation_gap, torch.zeros_like(attr.conservation_gap), rtol=0, atol=1e-6
    )
    assert attr.image.abs().sum() > 0


def test_text_only_prompt_is_the_text_decoder_and_has_no_image_maps():
    model, inputs = _llava()
    text = {"input_ids": inputs["input_ids"][:, :2], "attention_mask": inputs["attention_mask"][:, :2]}
    attr = hf_pelrp.attribute(model, **text)
    assert attr.image is None and attr.image_total is None


def test_model_comes_out_as_it_went_in():
    model, inputs = _llava()
    with torch.no_grad():
        before = model(**inputs).logits
    hooks = {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}
    hf_pelrp.attribute(model, **inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert hooks == {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}


def test_image_results_save_load_and_slice(tmp_path):
    model, inputs = _llava()
    attr = hf_pelrp.attribute(model, **inputs)
    path = attr.save(tmp_path / "a.safetensors")
    back = hf_pelrp.Attribution.load(path) if hasattr(hf_pelrp.Attribution, "load") else hf_pelrp.load(path)
    for name in ("image", "image_position", "image_special", "image_grid"):
        assert torch.equal(getattr(back, name), getattr(attr, name))
    row = attr[1]
    assert torch.equal(row.image, attr.image[1:]) and torch.equal(row.image_grid, attr.image_grid[1:])
    torch.testing.assert_close(row.conservation_gap, attr.conservation_gap[1:])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda i: {**i, "pixel_values": i["pixel_values"][:1]}, "one image per row"),
        (lambda i: {**i, "pixel_values": i["pixel_values"][:, :, :8]}, "takes 16x16"),
        (lambda i: {**i, "pixel_values": i["pixel_values"].float()}, "dtype"),
        (
            lambda i: {**i, "input_ids": i["input_ids"][:, 3:], "attention_mask": i["attention_mask"][:, 3:]},
            "placeholder",
        ),
        (lambda i: {k: v for k, v in i.items() if k != "pixel_values"}, "placeholder"),
        (lambda i: {**i, "pixel_values": i["pixel_values"][0]}, "shape"),
    ],
)
def test_bad_image_inputs_are_refused(change, message):
    model, inputs = _llava()
    with pytest.raises(AttributionInputError, match=message):
        hf_pelrp.attribute(model, **change(inputs))


def test_rows_stack_back_with_their_image_maps():
    model, inputs = _llava()
    attr = hf_pelrp.attribute(model, **inputs)
    again = hf_pelrp.Attribution.stack(attr.rows())
    for name in ("image", "image_position", "image_special", "image_grid", "token"):
        assert torch.equal(getattr(again, name), getattr(attr, name))
    assert torch.equal(attr[0].unpad().image, attr.image[:1])
