"""Qwen2-VL and Qwen2.5-VL explained with images (issue 19): the vision tower's per-patch relevance against a
slow explicit float64 LRP of the tower (tests/helpers/reference_qwen_vision.py), the 2-D rotary split per
patch, conservation over text + image maps, the text's M-RoPE positions with images, padding, and refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

import hf_pelrp
from helpers.reference_qwen_vision import processor_coordinates, qwen_vision_reference
from hf_pelrp import AttributionInputError, LRPConfig
from hf_pelrp.adapters.base import adapter_for_type
from hf_pelrp.adapters.qwen2_vl_vision import rotary_leaf_names
from hf_pelrp.check import _randomise, _zero_biases, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64
CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
TYPES = list(CLASSES)
GRID = (4, 8)  # the example grid of QwenImageInputs: 32 patches, 8 merge units per image


def _model(model_type: str, seed: int = 0, sharpen: float = 6.0, **vision):
    """A tiny float64 model; the vision blocks' q and k weights times ``sharpen``, so that the tiny tower's
    attention is far from uniform and its q / k (and rotary) relevance far from 0 (x1: the 2-D rotary gets
    ~7e-5 of the patches' |relevance| under AttnLRP, x6: ~1e-3)."""
    adapter = adapter_for_type(model_type)
    config = tiny_config(model_type, adapter)
    for key, value in vision.items():
        setattr(config.vision_config, key, value)
    torch.manual_seed(seed)
    model = CLASSES[model_type](config).to(F64).eval()
    _randomise(model, seed)
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.qkv.weight[: 2 * block.attn.qkv.in_features] *= sharpen
    return model, adapter


def _example(model, adapter, batch: int = 2, seed: int = 1, grid: tuple[int, int] = GRID) -> dict:
    inputs = dataclasses.replace(adapter.inputs, example_grid=grid)
    return inputs.example(model, batch, 6, torch.Generator().manual_seed(seed))


def _raster(values: torch.Tensor, images: int, grid: tuple[int, int] = GRID, merge: int = 2) -> torch.Tensor:
    """Processor-order values [images * h * w] -> [images, h * w] in raster order, by explicit loops."""
    h, w = grid
    coords = processor_coordinates(h, w, merge)
    out = torch.zeros(images, h * w, dtype=values.dtype)
    for n in range(images):
        for p, (row, col) in enumerate(coords):
            out[n, row * w + col] = values[n * h * w + p]
    return out


def _explain_with_tower_output(model, adapter, inputs, config, seed_grad=None):
    """One forward and backward inside ``hf_pelrp.lrp``; returns (maps, relevance at the tower's output, leaves).

    ``seed_grad``: seed the backward at the tower's output with this gradient (instead of at the logit)."""
    prepared = adapter.inputs.validate(model, inputs).inputs
    seen = {}

    def keep(_module, _args, output):
        output.pooler_output.retain_grad()
        seen["merged"] = output.pooler_output

    handle = model.model.visual.register_forward_hook(keep)
    try:
        with hf_pelrp.lrp(model, config=config) as ctx, torch.enable_grad():
            logits = model(**prepared).logits[:, -1]
            if seed_grad is None:
                logits.gather(-1, logits.argmax(-1, keepdim=True)).sum().backward()
            else:
                seen["merged"].backward(seed_grad)
            maps = ctx.maps()
            merged = seen["merged"]
            relevance = (merged * merged.grad).detach()
            leaves = {k: v.detach() * v.grad for k, v in ctx.store.additive.items() if v.grad is not None}
    finally:
        handle.remove()
    return maps, relevance, leaves


@pytest.mark.parametrize(
    ("model_type", "mode", "grid"),
    [
        *[(t, m, GRID) for t in TYPES for m in ("attnlrp", "cp")],
        # Qwen2.5-VL: a grid of 3 x 5 merge units, cut into windows of 2 x 2 units with partial ones at the edges
        ("qwen2_5_vl", "attnlrp", (6, 10)),
    ],
)
def test_tower_matches_the_explicit_reference(model_type, mode, grid):
    """Per patch (raster order) and per block: the fast path equals the explicit float64 LRP of the tower, fed
    with the relevance that reaches the tower's output in the same pass."""
    model, adapter = _model(model_type)
    inputs = _example(model, adapter, grid=grid)
    maps, merged, leaves = _explain_with_tower_output(model, adapter, inputs, LRPConfig(mode=mode))
    ref = qwen_vision_reference(model, inputs["pixel_values"], grid, 2, merged, mode)
    scale = ref.token.abs().max()
    torch.testing.assert_close(maps["image"], _raster(ref.token, 2, grid), rtol=1e-6, atol=1e-7 * scale)
    torch.testing.assert_close(
        maps["image_position"], _raster(ref.position_by_block.sum(0), 2, grid), rtol=1e-6, atol=1e-7 * scale
    )
    assert maps["image_grid"].tolist() == [list(grid)] * 2
    assert torch.equal(maps["image_special"], torch.zeros(2, dtype=F64))
    if mode == "cp":
        assert float(maps["image_position"].abs().max()) == 0.0
    else:
        assert float(maps["image_position"].abs().sum()) > 1e-6 * float(maps["image"].abs().sum())
    if (
        model_type == "qwen2_vl" and mode == "attnlrp"
    ):  # the blocks see the processor's order: each block's leaves compared alone
        for block in range(2):
            cos, sin = rotary_leaf_names(block)
            got = (leaves[cos].sum(-1) + leaves[sin].sum(-1)).to(F64)
            torch.testing.assert_close(got, ref.position_by_block[block], rtol=1e-6, atol=1e-7 * scale)


@pytest.mark.parametrize("model_type", TYPES)
def test_tower_conserves_under_bias_free_cp(model_type):
    """Bias-free CP: the relevance reaching the tower's output equals the patches' relevance (no positions)."""
    model, adapter = _model(model_type)
    _zero_biases(model)
    maps, merged, _ = _explain_with_tower_output(
        model, adapter, _example(model, adapter), LRPConfig(mode="cp")
    )
    per_image = merged.reshape(2, -1).sum(-1)
    # Qwen2.5-VL's RMSNorm computes in float32 (its identity rule's scale too): conserved to float32 rounding
    # (the gap relative to the patches' |relevance|, sample of 2 images: qwen2_vl ~1e-16, qwen2_5_vl ~1e-8)
    size = maps["image"].abs().sum(-1)
    gap = ((maps["image"].sum(-1) - per_image).abs() / size).max()
    assert float(gap) <= (1e-12 if model_type == "qwen2_vl" else 1e-6)


@pytest.mark.parametrize("model_type", TYPES)
def test_rotary_split_per_patch_in_one_block(model_type):
    """One vision block, bias-free, AttnLRP, the same gradient seeded at the tower's output: per patch
    ``image(positions on) + image_position = image(positions off)`` (the rotary 1/2 sends half of each rotated
    product to cos / sin, the rest to the same patch's q / k). Qwen2.5-VL's one block attends in windows."""
    vision = {"depth": 1, "fullatt_block_indexes": []} if model_type == "qwen2_5_vl" else {"depth": 1}
    model, adapter = _model(model_type, **vision)
    _zero_biases(model)
    inputs = _example(model, adapter)
    with torch.no_grad():
        merged = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]
        ).pooler_output
    seed = torch.randn(torch.cat(merged).shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    on, _, _ = _explain_with_tower_output(model, adapter, inputs, LRPConfig(mode="attnlrp"), seed)
    off, _, _ = _explain_with_tower_output(
        model, adapter, inputs, LRPConfig(mode="attnlrp", positional=False), seed
    )
    assert float(on["image_position"].abs().sum()) > 1e-4 * float(on["image"].abs().sum())
    assert float(off["image_position"].abs().max()) == 0.0
    # measured: |difference| <= 1.1e-11, |image_position| up to 6e-5, |image| up to 0.09
    scale = off["image"].abs().max()
    torch.testing.assert_close(on["image"] + on["image_position"], off["image"], rtol=0, atol=1e-9 * scale)
    assert not torch.allclose(on["image"], off["image"], rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("model_type", TYPES)
def test_conservation_with_flattened_patches_and_text_positions(model_type):
    """The processor's layout ([total patches, features]) gives the maps of the per-image layout; bias-free CP
    conserves over text + image maps; the explained logit is the plain model's, with the M-RoPE positions the
    model computes itself from image_grid_thw."""
    model, adapter = _model(model_type)
    _zero_biases(model)
    inputs = _example(model, adapter)
    flat = {**inputs, "pixel_values": inputs["pixel_values"].reshape(-1, inputs["pixel_values"].shape[-1])}
    with torch.no_grad():
        plain = model(**flat).logits[:, -1]
    attr = hf_pelrp.attribute(model, **flat, config="cp")
    torch.testing.assert_close(attr.target_value, plain.gather(-1, attr.target[:, None]).squeeze(-1))
    total = attr.relevance.sum(-1) + attr.image_total
    torch.testing.assert_close(total, attr.target_value, rtol=1e-7, atol=1e-9)
    assert float(attr.image_total.abs().min()) > 0
    same = hf_pelrp.attribute(model, **inputs, config="cp")
    torch.testing.assert_close(same.image, attr.image, rtol=0, atol=0)
    # the positions hf_pelrp passes are the model's own (get_rope_index over the image grid)
    prepared = adapter.inputs.validate(model, flat).inputs
    own = model.model.compute_3d_position_ids(
        input_ids=flat["input_ids"],
        inputs_embeds=None,
        image_grid_thw=flat["image_grid_thw"],
        attention_mask=flat["attention_mask"],
        mm_token_type_ids=flat["mm_token_type_ids"],
        video_grid_thw=None,
        cache=None,
    )
    assert torch.equal(prepared["position_ids"], own)
    placeholders = flat["input_ids"] == model.config.image_token_id
    # placeholders share the image's 3-D positions: their height / width axes differ from the temporal one
    axes = prepared["position_ids"][:, placeholders]
    assert not torch.equal(axes[1], axes[0]) and not torch.equal(axes[2], axes[0])


@pytest.mark.parametrize("model_type", TYPES)
def test_left_padded_row_equals_the_row_alone(model_type):
    model, adapter = _model(model_type)
    inputs = _example(model, adapter)
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    ids[1] = torch.cat([torch.zeros(2, dtype=ids.dtype), ids[1, :-2]])
    mask[1, :2] = 0
    types = (ids == model.config.image_token_id).to(torch.int32)
    padded = {**inputs, "input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
    both = hf_pelrp.attribute(model, **padded, config="attnlrp")
    alone = hf_pelrp.attribute(
        model,
        input_ids=ids[1:, 2:],
        attention_mask=mask[1:, 2:],
        pixel_values=inputs["pixel_values"][1:],
        image_grid_thw=inputs["image_grid_thw"][1:],
        config="attnlrp",
    )
    for name in ("image", "image_position"):
        torch.testing.assert_close(getattr(both, name)[1], getattr(alone, name)[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(both.relevance[1, 2:], alone.relevance[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(both.position[1, 2:], alone.position[0], rtol=1e-9, atol=1e-12)
    assert float(both.relevance[1, :2].abs().max()) == 0.0


def test_text_only_prompts_still_work_and_placeholders_need_images():
    model, adapter = _model("qwen2_vl")
    ids = torch.randint(3, 90, (1, 7), generator=torch.Generator().manual_seed(0))
    attr = hf_pelrp.attribute(model, input_ids=ids)
    assert attr.image is None and attr.position_by_axis.shape == (1, 3, 7)
    with pytest.raises(AttributionInputError, match="placeholder tokens .* but no pixel_values"):
        hf_pelrp.attribute(
            model, input_ids=torch.cat([ids, torch.tensor([[model.config.image_token_id]])], 1)
        )


@pytest.mark.parametrize("model_type", TYPES)
def test_refusals(model_type):
    model, adapter = _model(model_type)
    inputs = _example(model, adapter)
    features = inputs["pixel_values"].shape[-1]

    def refused(match: str, **changes):
        with pytest.raises(AttributionInputError, match=match):
            hf_pelrp.attribute(model, **{**inputs, **changes})

    refused("videos", pixel_values_videos=torch.zeros(32, features, dtype=F64))
    refused("videos", video_grid_thw=torch.tensor([[2, 4, 8]]))
    refused("t = ", image_grid_thw=torch.tensor([[2, 4, 8], [1, 4, 8]]))
    # two images for one row (one row's prompt would need both images' placeholders)
    refused(
        r"2 image\(s\) for 1 prompt row",
        input_ids=inputs["input_ids"][:1],
        attention_mask=inputs["attention_mask"][:1],
        mm_token_type_ids=inputs["mm_token_type_ids"][:1],
    )
    # a grid that does not match the row's placeholders (and pixels of that grid)
    refused(
        "placeholder token",
        image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]),
        pixel_values=inputs["pixel_values"][:, :16],
    )
    refused("different patch grids", image_grid_thw=torch.tensor([[1, 4, 8], [1, 8, 4]]))
    refused("asks for", pixel_values=inputs["pixel_values"][:, :16])
    refused("multiples of the merge size", image_grid_thw=torch.tensor([[1, 3, 8], [1, 3, 8]]))
    refused("drop position_ids", position_ids=torch.zeros_like(inputs["input_ids"]))
    refused("mm_token_type_ids does not mark", mm_token_type_ids=torch.zeros_like(inputs["input_ids"]))
    refused("needs image_grid_thw", image_grid_thw=None)
    refused("dtype", pixel_values=inputs["pixel_values"].float())
    # the tiny text model has 64 positions: an image of 8 x 8 merge units takes 64 tokens but 8 positions (2 text
    # tokens, the image at 2..9, 4 + 60 text tokens at 10..73)
    big = _example(model, adapter, batch=1, grid=(16, 16))
    assert hf_pelrp.attribute(model, **big).image.shape == (1, 256)
    long = torch.randint(3, 90, (1, 60), generator=torch.Generator().manual_seed(3))
    with pytest.raises(AttributionInputError, match="reaches position 73.*at most 64"):
        hf_pelrp.attribute(
            model,
            **{
                **big,
                "input_ids": torch.cat([big["input_ids"], long], 1),
                "attention_mask": None,
                "mm_token_type_ids": None,
            },
        )
    with pytest.raises(AttributionInputError, match="image_grid_thw comes with images"):
        hf_pelrp.attribute(
            model, input_ids=inputs["input_ids"][:, :2], image_grid_thw=inputs["image_grid_thw"]
        )


def test_maps_refuse_a_direct_pass_on_mixed_grids():
    """Inside ``hf_pelrp.lrp`` the user calls the model directly (no input checks): per-image maps of images of
    two sizes are refused when read, not laid out on a wrong grid."""
    model, adapter = _model("qwen2_vl")
    a, b = _example(model, adapter, batch=1), _example(model, adapter, batch=1, grid=(4, 4))
    ids = torch.cat([a["input_ids"], torch.cat([b["input_ids"], torch.ones(1, 4, dtype=torch.long)], 1)])
    pixels = torch.cat([a["pixel_values"].reshape(-1, 24), b["pixel_values"].reshape(-1, 24)])
    grid = torch.cat([a["image_grid_thw"], b["image_grid_thw"]])
    types = (ids == model.config.image_token_id).to(torch.int32)
    with hf_pelrp.lrp(model) as ctx, torch.enable_grad():
        logits = model(
            input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=types
        ).logits
        logits[:, -1, 3].sum().backward()
        with pytest.raises(hf_pelrp.AttributionStateError, match="one size"):
            ctx.maps()


def test_check_adapter_refuses_a_tower_without_the_gated_rule(monkeypatch):
    """Qwen2.5-VL's gated vision MLP declared without the uniform rule at its product: relevance flows through
    both factors in full, and check_adapter's image conservation fails."""
    from hf_pelrp.adapters import base

    good = base._REGISTRY["qwen2_5_vl"]
    bad = dataclasses.replace(good, vision=dataclasses.replace(good.vision, gated=None))
    monkeypatch.setitem(base._REGISTRY, "qwen2_5_vl", bad)
    report = hf_pelrp.check_adapter("qwen2_5_vl", raise_on_failure=False)
    assert [r.name for r in report.failures] == ["bias-free CP conservation with images (text + image maps)"]


@pytest.mark.parametrize("model_type", TYPES)
def test_the_rotary_split_refuses_a_tower_without_the_half(monkeypatch, model_type):
    """The 2-D rotary declared without its 1/2 on q and k (cos / sin get relevance q and k keep too): CP
    conservation cannot see it (q, k get 0 there), check_adapter's image checks pass, the per-patch split of
    test_rotary_split_per_patch_in_one_block fails."""
    from hf_pelrp.adapters import base

    good = base._REGISTRY[model_type]

    class NoHalf(type(good.vision)):
        def attention_rule(self, rule, config):
            return rule

    tower = NoHalf(**{f.name: getattr(good.vision, f.name) for f in dataclasses.fields(good.vision)})
    monkeypatch.setitem(base._REGISTRY, model_type, dataclasses.replace(good, vision=tower))
    with pytest.raises(AssertionError, match="not close"):
        test_rotary_split_per_patch_in_one_block(model_type)
