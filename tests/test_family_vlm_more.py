"""Idefics3 / SmolVLM (image tiles, pixel shuffle), LLaVA-NeXT (anyres tiles, ``image_newline``) and VipLLaVA
(several feature layers) explained with their images (issue 19), in float64: conservation over text + image maps under bias-free CP, the per-tile
layout of the maps against the relevance at the tower's embedding output, the newline's relevance against the
gradient of the ``image_newline`` parameter, placeholders at exactly 0, and the refusal of bad image inputs."""

from __future__ import annotations

import pytest
import torch
import transformers

import hf_pelrp
from helpers.reference_vlm_tiles import (
    aya_vision_image_reference,
    idefics3_reference,
    llava_next_reference,
    llava_onevision_reference,
    vipllava_reference,
)
from hf_pelrp import AttributionInputError, UnsupportedModelError
from hf_pelrp.adapters.base import adapter_for_type
from hf_pelrp.adapters.vlm_llava_next import NEWLINE, feature_layout
from hf_pelrp.check import _zero_biases, check_adapter, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = {
    "idefics3": transformers.Idefics3ForConditionalGeneration,
    "smolvlm": transformers.SmolVLMForConditionalGeneration,
    "llava_next": transformers.LlavaNextForConditionalGeneration,
    "llava_next_video": transformers.LlavaNextVideoForConditionalGeneration,  # on images
    "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,  # SigLIP tower, grids resized
    "vipllava": transformers.VipLlavaForConditionalGeneration,
    "aya_vision": transformers.AyaVisionForConditionalGeneration,
    "cohere2_vision": transformers.Cohere2VisionForConditionalGeneration,
}
#: SigLIP tower per tile, SwiGLU projector, tiles of all rows in one [n_tiles, C, H, W] tensor
SWIGLU = ("aya_vision", "cohere2_vision")
#: the types whose images come as tiles ([B, n_tiles, C, H, W])
TILED = ("idefics3", "llava_next", "llava_next_video", "llava_onevision", "smolvlm")


def _model(model_type: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    adapter = adapter_for_type(model_type)
    model = CLASSES[model_type](tiny_config(model_type, adapter)).double().eval()
    inputs = adapter.inputs.example(model, 2, 5, torch.Generator().manual_seed(seed + 1))
    return model, inputs


@pytest.mark.parametrize("model_type", sorted(CLASSES))
def test_check_adapter_passes_with_images(model_type):
    report = check_adapter(model_type, raise_on_failure=False)
    assert report.passed, str(report)
    names = {r.name for r in report.results}
    assert any("conservation with images" in n for n in names)  # the image checks ran


def _close(fast: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    scale = ref.abs().max().item()
    err = (fast.double() - ref).abs().max().item() / max(scale, 1e-30)
    assert err < tol, f"{what}: max error {err:.3e} of the largest entry (tolerance {tol:.0e})"


@pytest.mark.parametrize("model_type", sorted(set(CLASSES) - set(SWIGLU)))
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_image_maps_match_explicit_rules(model_type, mode):
    """The whole path (tower per tile or image, connector / projector, packing, decoder) against the explicit float64
    reference of ``helpers/reference_vlm_tiles.py``: every map, both modes."""
    model, inputs = _model(model_type)
    if model_type == "llava_onevision":
        ref = llava_onevision_reference(
            model,
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["pixel_values"],
            inputs["image_sizes"],
            mode=mode,
        )
    elif model_type.startswith("llava_next"):
        ref = llava_next_reference(
            model,
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["pixel_values"],
            inputs["image_sizes"],
            mode=mode,
        )
    elif model_type == "vipllava":
        ref = vipllava_reference(
            model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], mode=mode
        )
    else:
        ref = idefics3_reference(
            model,
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["pixel_values"],
            inputs["pixel_attention_mask"],
            mode=mode,
        )
    attr = hf_pelrp.attribute(model, **inputs, config=mode)
    assert torch.equal(attr.target, ref.target)
    torch.testing.assert_close(attr.target_value.double(), ref.logit, rtol=1e-9, atol=0)
    for name in ("token", "position", "image", "image_position", "image_special"):
        if name == "image_special" and model_type in ("idefics3", "smolvlm"):
            assert float(attr.image_special.abs().max()) == 0.0
            continue
        _close(getattr(attr, name), getattr(ref, name), 1e-6, name)
    if mode == "attnlrp":
        assert ref.image_position.abs().sum() > 1e-3 * ref.image.abs().sum()


@pytest.mark.parametrize("model_type", sorted(CLASSES))
def test_bias_free_cp_conserves_over_text_and_image(model_type):
    model, inputs = _model(model_type, 3)
    _zero_biases(model)
    attr = hf_pelrp.attribute(model, **inputs, config="cp")
    total = attr.relevance.sum(-1) + attr.image.sum(-1) + attr.image_position.sum(-1) + attr.image_special
    torch.testing.assert_close(total, attr.target_value, rtol=1e-6, atol=0)
    assert float(attr.image.abs().sum()) > 1e-3 * float(attr.target_value.abs().sum())
    placeholders = inputs["input_ids"] == model.config.image_token_id
    assert float(attr.token[placeholders].abs().max()) == 0.0


@pytest.mark.parametrize("model_type", TILED)
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_tile_maps_are_the_relevance_at_the_tower_embedding_output(model_type, mode):
    """Layout: ``image + image_position`` of row b, tile slot s, patch p is the relevance ``e * de`` of the
    embedding output of the tower's run on that tile (tiles in the tower's batch in row order, padding slots
    0); under AttnLRP the positions carry relevance too."""
    model, inputs = _model(model_type)
    attr = hf_pelrp.attribute(model, **inputs, config=mode)
    base = model.model
    tower = base.vision_model if hasattr(base, "vision_model") else base.vision_tower
    seen = []
    with hf_pelrp.lrp(model, config=mode), torch.enable_grad():
        # registered after the rules' hooks: sees the output rebuilt from the leaves
        handle = tower.embeddings.register_forward_hook(lambda _m, _a, out: seen.append(out))
        try:
            logits = model(**inputs).logits
        finally:
            handle.remove()
        (emb,) = seen
        emb.retain_grad()
        logits[torch.arange(2), -1, attr.target].sum().backward(inputs=[emb])
        per_tile = (emb * emb.grad).sum(-1).detach()
    if model_type.startswith("llava_next"):
        per_tile = per_tile[:, 1:]  # the class token: in image_special
    if model_type.startswith("llava"):
        real = torch.zeros(inputs["pixel_values"].shape[:2], dtype=torch.bool)
        for row, n in enumerate([5, 3]):  # example(): (32, 32) and (12, 40) with the tiny pinpoints
            real[row, :n] = True
    else:
        flat = inputs["pixel_values"].flatten(2)
        real = (flat != 0).any(-1)
    slots = inputs["pixel_values"].shape[1]
    want = torch.zeros(2, slots, per_tile.shape[-1], dtype=per_tile.dtype)
    want[real] = per_tile
    got = (attr.image + attr.image_position).reshape(2, slots, -1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert (~real).any() and float(got[~real].abs().max()) == 0.0  # padding slots
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert attr.image_grid.tolist() == [[slots * side, side]] * 2
    if mode == "attnlrp":
        assert float(attr.image_position.abs().sum()) > 1e-6 * float(attr.image.abs().sum())


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_llava_next_newline_relevance_is_the_newline_times_its_gradient(mode):
    """The ``image_newline`` copies' relevance (read at the language model's input) against the gradient of the
    shared parameter, one row at a time: ``sum over copies of n * g_copy = n * dlogit/dn``."""
    model, inputs = _model("llava_next")
    newline = model.model.image_newline
    flag = newline.requires_grad
    for row in range(2):
        one = {k: v[row : row + 1] for k, v in inputs.items()}
        with hf_pelrp.lrp(model, config=mode) as ctx, torch.enable_grad():
            newline.requires_grad_(True)  # restored when the context closes
            logits = model(**one).logits
            target = int(logits[0, -1].argmax())
            (grad,) = torch.autograd.grad(logits[0, -1, target], newline, retain_graph=True)
            logits[0, -1, target].backward(inputs=[ctx.store.additive["image_newline"]])
            probe = ctx.store.additive["image_newline"]
            got = float((probe * probe.grad).sum().detach())
            copies = probe.shape[0]
        want = float((newline.detach() * grad).sum())
        assert abs(got - want) <= 1e-10 * abs(want) and abs(want) > 0
        layout = feature_layout(model, one["image_sizes"])[0]
        assert copies == int((layout == NEWLINE).sum()) == (8 if row == 0 else 2)
    assert newline.requires_grad == flag  # the context restored the test's own change


def test_llava_next_conservation_needs_the_newline():
    """Without the newlines' relevance bias-free CP would not conserve: the probe carries real relevance."""
    model, inputs = _model("llava_next", 3)
    _zero_biases(model)
    with hf_pelrp.lrp(model, config="cp") as ctx, torch.enable_grad():
        logits = model(**inputs).logits
        logits[torch.arange(2), -1, logits[:, -1].argmax(-1)].sum().backward(inputs=ctx.leaves())
        probe = ctx.store.additive["image_newline"]
        newline = float((probe * probe.grad).sum().abs().detach())
    attr = hf_pelrp.attribute(model, **inputs, config="cp")
    assert newline > 1e3 * float(attr.conservation_gap.abs().max())


def test_idefics3_positions_follow_the_patch_attention_mask():
    """A tile whose right-most patch column is padding (``pixel_attention_mask`` 0 there) is given the
    bucketed position rows the model computes for 3 real patch columns: the leaves hold the looked-up rows."""
    model, inputs = _model("idefics3")
    with hf_pelrp.lrp(model, config="attnlrp") as ctx, torch.no_grad():
        model(**inputs)
        rows = ctx.store.additive["image_position"]
    table = model.model.vision_model.embeddings.position_embedding.weight
    # tower batch: row 0's 3 tiles, then row 1's 2 real tiles; row 1's first tile has a padded last column
    padded = rows[3].reshape(4, 4, -1)
    full = rows[0].reshape(4, 4, -1)
    assert torch.equal(full, table.reshape(4, 4, -1))  # ids 0..15
    buckets = [0, 1, 2]  # floor(j / 3 * 4) for j < 3
    for i in range(4):
        for j, b in enumerate(buckets):
            assert torch.equal(padded[i, j], table[i * 4 + b])
        assert torch.equal(padded[i, 3], table[0])  # padding patches read id 0


def _drop(key):
    return lambda i: {k: v for k, v in i.items() if k != key}


@pytest.mark.parametrize("model_type", ["idefics3", "smolvlm"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda i: {**i, "pixel_values": i["pixel_values"][:, :, :, :8, :8]}, "tiles are 8x8"),
        (lambda i: {**i, "pixel_values": i["pixel_values"][:1]}, "row"),
        (lambda i: {**i, "pixel_values": i["pixel_values"][:, 0]}, r"\[batch, tiles"),
        (lambda i: {**i, "pixel_values": i["pixel_values"].float()}, "dtype"),
        (lambda i: {**i, "pixel_attention_mask": i["pixel_attention_mask"][:, :2]}, "pixel_attention_mask"),
        (
            lambda i: {**i, "input_ids": i["input_ids"][:, 3:], "attention_mask": i["attention_mask"][:, 3:]},
            "placeholder",
        ),
        (  # one more real tile in row 1 than its placeholders
            lambda i: {**i, "pixel_values": i["pixel_values"] + 1.0},
            "3 image tile",
        ),
        (
            lambda i: {
                **i,
                "pixel_values": i["pixel_values"] * torch.tensor([1.0, 0.0])[:, None, None, None, None],
            },
            "all-zero",
        ),
        (_drop("pixel_values"), "pixel_attention_mask comes with images"),
        (lambda i: _drop("pixel_attention_mask")(_drop("pixel_values")(i)), "placeholder"),
    ],
)
def test_bad_tiled_image_inputs_are_refused(model_type, change, message):
    model, inputs = _model(model_type)
    with pytest.raises(AttributionInputError, match=message):
        hf_pelrp.attribute(model, **change(inputs))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_drop("image_sizes"), "needs image_sizes"),
        (lambda i: {**i, "image_sizes": i["image_sizes"].double()}, "integer tensor"),
        (lambda i: {**i, "image_sizes": torch.tensor([[32, 32], [32, 32]])}, "fills 88"),
        (lambda i: {**i, "pixel_values": i["pixel_values"][:, :3]}, "makes 5 tiles"),
        (lambda i: {**i, "pixel_values": i["pixel_values"][..., :8, :8]}, "tiles are 8x8"),
        (
            lambda i: {**i, "input_ids": i["input_ids"][:, 3:], "attention_mask": i["attention_mask"][:, 3:]},
            "placeholder",
        ),
        (_drop("pixel_values"), "image_sizes / batch_num_images come with images"),
    ],
)
@pytest.mark.parametrize("model_type", ["llava_next", "llava_next_video"])
def test_bad_llava_next_image_inputs_are_refused(model_type, change, message):
    model, inputs = _model(model_type)
    with pytest.raises(AttributionInputError, match=message):
        hf_pelrp.attribute(model, **change(inputs))


def test_llava_next_video_refuses_videos_and_video_placeholders_with_images():
    model, inputs = _model("llava_next_video")
    with pytest.raises(AttributionInputError, match="videos are not explained"):
        hf_pelrp.attribute(
            model, **inputs, pixel_values_videos=torch.zeros(2, 1, 3, 16, 16, dtype=torch.float64)
        )
    ids = inputs["input_ids"].clone()
    ids[:, 0] = model.config.video_token_id
    with pytest.raises(AttributionInputError, match="config.video_token_id"):
        hf_pelrp.attribute(model, **{**inputs, "input_ids": ids})


def test_llava_next_full_feature_strategy_is_refused():
    model, inputs = _model("llava_next")
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(UnsupportedModelError, match="'default'"):
        hf_pelrp.attribute(model, **inputs)


@pytest.mark.parametrize("model_type", sorted(CLASSES))
def test_text_only_prompts_have_no_image_maps_and_model_comes_out_as_it_went_in(model_type):
    model, inputs = _model(model_type)
    text = {"input_ids": inputs["input_ids"][:, :2], "attention_mask": inputs["attention_mask"][:, :2]}
    assert hf_pelrp.attribute(model, **text).image is None
    with torch.no_grad():
        before = model(**inputs).logits
    hooks = {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}
    flags = [p.requires_grad for p in model.parameters()]
    hf_pelrp.attribute(model, **inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert hooks == {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}
    assert flags == [p.requires_grad for p in model.parameters()]


def test_idefics3_without_pixel_attention_mask_conserves_with_the_models_own_mask():
    """Without ``pixel_attention_mask`` the model treats every pixel of a real tile as real (plain position ids):
    other maps than with the mask, the same conservation."""
    model, inputs = _model("idefics3", 3)
    _zero_biases(model)
    masked = hf_pelrp.attribute(model, **inputs, config="cp")
    plain = hf_pelrp.attribute(
        model, **{k: v for k, v in inputs.items() if k != "pixel_attention_mask"}, config="cp"
    )
    torch.testing.assert_close(plain.conservation_gap, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-6)
    assert not torch.allclose(plain.image_position[1], masked.image_position[1])
    torch.testing.assert_close(plain.image_position[0], masked.image_position[0], rtol=1e-9, atol=1e-15)


# ---- the processors' own outputs (offline: PIL image processors and a word-level tokenizer) ------------------


def _tokenizer():
    import tokenizers
    from tokenizers import models, pre_tokenizers

    words = ["[UNK]", "[PAD]", "a", "b", "c", "what", "is", "this", "?"]
    special = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
    special += [f"<row_{i}_col_{j}>" for i in range(1, 5) for j in range(1, 5)]
    tok = tokenizers.Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(words + special)}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.add_special_tokens({"additional_special_tokens": special})
    return fast


def _images():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)),  # 2 x 2 tiles + the whole image
        Image.fromarray(rng.integers(0, 255, (40, 12, 3), dtype=np.uint8)),  # 2 x 1 tiles + the whole image
    ]


def _conserves(model, inputs, tiles):
    _zero_biases(model)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    attr = hf_pelrp.attribute(model, **inputs, config="cp")
    torch.testing.assert_close(attr.conservation_gap, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-6)
    per_tile = attr.image.reshape(2, inputs["pixel_values"].shape[1], -1)
    for row, n in enumerate(tiles):
        assert float(per_tile[row, :n].abs().min(-1).values.min()) > 0  # every real tile's patches
        if n < per_tile.shape[1]:
            assert float(per_tile[row, n:].abs().max()) == 0.0  # the padding tiles
    placeholders = inputs["input_ids"] == model.config.image_token_id
    assert float(attr.token[placeholders].abs().max()) == 0.0
    return attr


def test_idefics3_processor_output_is_explained():
    """Idefics3's processor (image splitting, row / column tokens, the global image, padding tiles, right
    padding of the text) gives inputs the declaration accepts, and bias-free CP conserves on them."""
    tokenizer = _tokenizer()
    processor = transformers.Idefics3Processor(
        image_processor=transformers.Idefics3ImageProcessorPil(
            size={"longest_edge": 32}, max_image_size={"longest_edge": 16}
        ),
        tokenizer=tokenizer,
        image_seq_len=4,
    )
    inputs = processor(
        text=["a <image> what is this ?", "b <image> c"],
        images=[[im] for im in _images()],
        return_tensors="pt",
        padding=True,
    )
    config = tiny_config("idefics3")
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    model = transformers.Idefics3ForConditionalGeneration(config).double().eval()
    assert inputs["pixel_values"].shape[:2] == (2, 5)
    _conserves(model, dict(inputs), [5, 3])


def test_llava_next_processor_output_is_explained():
    """LLaVA-NeXT's processor (anyres tiles, image_sizes, the expanded image token with the crop and the
    newlines counted its way) gives inputs the declaration accepts, and bias-free CP conserves on them."""
    tokenizer = _tokenizer()
    pinpoints = [[16, 32], [32, 16], [32, 32]]
    processor = transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    inputs = processor(
        text=["a <image> what is this ?", "b <image> c"], images=_images(), return_tensors="pt", padding=True
    )
    config = tiny_config("llava_next")
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    model = transformers.LlavaNextForConditionalGeneration(config).double().eval()
    _conserves(model, dict(inputs), [5, 3])


# ---- Aya Vision / Cohere 2 Vision: tiles of all rows in one [n_tiles, C, H, W] tensor, a SwiGLU projector -------


def _aya_two_rows(model_type: str = "aya_vision", seed: int = 0):
    """Row 0 owns 3 tiles, row 1 one: pixel_values [4, C, H, W], each row's placeholders after two text tokens."""
    model, one_tile = _model(model_type, seed)
    gen = torch.Generator().manual_seed(seed + 5)
    pixels = torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64)
    holder = model.config.image_token_id
    text = one_tile["input_ids"][:, [0, 1, -2, -1]]
    rows = [
        torch.cat([text[0, :2], torch.full((12,), holder), text[0, 2:]]),
        torch.cat([text[1, :2], torch.full((4,), holder), text[1, 2:], text[1], text[1]]),
    ]
    ids = torch.stack(rows)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


@pytest.mark.parametrize("model_type", SWIGLU)
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_swiglu_vlm_image_maps_match_explicit_rules_from_the_image_features(model_type, mode):
    """The SwiGLU projector, the pixel shuffle and the SigLIP tower against the explicit float64 reference, from
    the relevance the fast path gives the projector's output (the Cohere 2 decoder is check_adapter's); the
    maps of the 3 + 1 tiles land in the rows that own them."""
    model, inputs = _aya_two_rows(model_type)
    attr = hf_pelrp.attribute(model, **inputs, config=mode)
    seen = []
    proj = model.model.multi_modal_projector
    with hf_pelrp.lrp(model, config=mode), torch.enable_grad():
        handle = proj.register_forward_hook(lambda _m, _a, out: seen.append(out))
        try:
            logits = model(**inputs).logits
        finally:
            handle.remove()
        (features,) = seen
        features.retain_grad()
        logits[torch.arange(2), -1, attr.target].sum().backward(inputs=[features])
        # [tiles, h', w', D] in the projector: the model reads it as [tiles, h' * w', D]
        r_features = (features * features.grad).detach().flatten(1, -2)
    image, position = aya_vision_image_reference(model, inputs["pixel_values"], r_features, mode=mode)
    want_image = torch.zeros(2, 3, 16, dtype=torch.float64)
    want_position = torch.zeros(2, 3, 16, dtype=torch.float64)
    want_image[0], want_image[1, :1] = image[:3], image[3:]
    want_position[0], want_position[1, :1] = position[:3], position[3:]
    _close(attr.image, want_image.reshape(2, -1), 1e-6, "image")
    _close(attr.image_position, want_position.reshape(2, -1), 1e-6, "image_position")
    assert float(attr.image.reshape(2, 3, 16)[1, 1:].abs().max()) == 0.0
    assert attr.image_grid.tolist() == [[12, 4], [12, 4]]
    if mode == "attnlrp":
        assert float(position.abs().sum()) > 1e-3 * float(image.abs().sum())


@pytest.mark.parametrize("model_type", SWIGLU)
def test_swiglu_vlm_multi_tile_rows_conserve(model_type):
    model, inputs = _aya_two_rows(model_type, 3)
    _zero_biases(model)
    attr = hf_pelrp.attribute(model, **inputs, config="cp")
    torch.testing.assert_close(attr.conservation_gap, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-6)
    assert float(attr.token[inputs["input_ids"] == model.config.image_token_id].abs().max()) == 0.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda i: {**i, "pixel_values": i["pixel_values"][:3]}, "ask for 4 image tile"),
        (
            lambda i: {**i, "input_ids": i["input_ids"][:, 3:], "attention_mask": i["attention_mask"][:, 3:]},
            "fills 4",
        ),
        (lambda i: {**i, "pixel_values": i["pixel_values"][..., :8, :8]}, "takes 16x16"),
        (_drop("pixel_values"), "placeholder"),
    ],
)
@pytest.mark.parametrize("model_type", SWIGLU)
def test_bad_swiglu_vlm_image_inputs_are_refused(model_type, change, message):
    model, inputs = _aya_two_rows(model_type)
    with pytest.raises(AttributionInputError, match=message):
        hf_pelrp.attribute(model, **change(inputs))


def test_aya_vision_default_feature_strategy_is_refused():
    model, inputs = _aya_two_rows()
    model.config.vision_feature_select_strategy = "default"
    with pytest.raises(UnsupportedModelError, match="'full'"):
        hf_pelrp.attribute(model, **inputs)


def test_llava_onevision_refuses_several_images_per_row_and_the_default_strategy():
    model, inputs = _model("llava_onevision")
    with pytest.raises(AttributionInputError, match="one image per prompt row"):
        hf_pelrp.attribute(model, **inputs, batch_num_images=torch.tensor([2, 1]))
    ones = hf_pelrp.attribute(model, **inputs, batch_num_images=torch.tensor([1, 1]), config="cp")
    plain = hf_pelrp.attribute(model, **inputs, config="cp")
    torch.testing.assert_close(ones.image, plain.image, rtol=0, atol=0)
    model.config.vision_feature_select_strategy = "default"
    with pytest.raises(UnsupportedModelError, match="only with 'full'"):
        hf_pelrp.attribute(model, **inputs)
