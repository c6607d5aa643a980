"""The VLM front ends (issue 19, section 3) on Gemma 3 and Qwen2-VL: the ``lrp-attribution`` pipeline with an
image and text or chat messages, continuations and generation, the HTML / PNG reports with the patch maps, and
``hf-pelrp explain --image --text``.

Each model is a tiny random float32 checkpoint saved with its real processor (tests/helpers/tiny_vlm.py):
Gemma 3 with a ``Gemma3Processor`` (SigLIP image processor, 56 x 56 px, 4 x 4 patches pooled to 4 image tokens;
``token_type_ids`` mark the image tokens), Qwen2-VL with a ``Qwen2VLProcessor`` (aspect kept, 2 px patches merged
2 x 2: a 24 x 30 picture becomes 12 x 16 px, a 6 x 8 patch grid, 12 placeholders; ``image_grid_thw`` and
``mm_token_type_ids``). Where torchvision is missing the Qwen2-VL processor is built and loaded without its
video processor (``qwen2_vl_processor_without_videos``): images and text go through its own code.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import pipeline

import hf_pelrp
from helpers.tiny_vlm import picture, qwen2_vl_processor_without_videos, save_tiny_gemma3, save_tiny_qwen2_vl
from hf_pelrp.cli import main
from hf_pelrp.errors import AttributionInputError
from hf_pelrp.pipeline import _unpatchify

pytestmark = pytest.mark.usefixtures("single_thread")

#: per model: how it is saved, a prompt holding its image marker, the patch grid of ``picture()`` (24 x 30 px)
#: and the size (width, height) of the image as its processor gives it to the model
MODELS = {
    "gemma3": (save_tiny_gemma3, "<start_of_image>What is this?", (4, 4), (56, 56)),
    "qwen2_vl": (
        save_tiny_qwen2_vl,
        "<|vision_start|><|image_pad|><|vision_end|>What is this?",
        (6, 8),
        (16, 12),
    ),
}

#: the chat templates' generation prompt, closing each chat prompt
GENERATION_PROMPT = {"gemma3": "<start_of_turn>model\n", "qwen2_vl": "<|im_start|>assistant\n"}


@pytest.fixture(scope="module", autouse=True)
def _qwen_processor():
    with qwen2_vl_processor_without_videos():
        yield


@pytest.fixture(scope="module", params=sorted(MODELS))
def vlm(request, tmp_path_factory):
    """(name, folder, pipeline, prompt, grid, view size) of one tiny VLM saved with its processor."""
    save, text, grid, size = MODELS[request.param]
    folder = save(tmp_path_factory.mktemp(request.param))
    return request.param, folder, pipeline("lrp-attribution", model=str(folder)), text, grid, size


def _close(a, b, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), atol=atol, rtol=1e-5)


def _same_as_attribute(out, attr):
    _close(out["relevance"], attr.relevance[0].float())
    _close(out["image_relevance"], attr.image[0].float())
    _close(out["image_position_relevance"], attr.image_position[0].float())
    _close(out["image_special"], float(attr.image_special[0]))
    _close(out["conservation_gap"], float(attr.conservation_gap[0]))
    assert out["target"]["id"] == int(attr.target[0])


# ---- the pipeline -------------------------------------------------------------------------------------------


def test_image_with_text_equals_attribute_on_the_processor_output(vlm):
    name, _, pipe, text, grid, size = vlm
    image = picture()
    out = pipe(images=image, text=text)
    encoded = pipe.processor(images=image, text=text, return_tensors="pt")
    # the keywords that come with the image reach the attribution: the result equals attribute() on them all
    keys = {"gemma3": {"token_type_ids"}, "qwen2_vl": {"image_grid_thw", "mm_token_type_ids"}}[name]
    assert keys <= set(encoded)
    _same_as_attribute(out, hf_pelrp.attribute(pipe.model, **encoded))
    placeholders = int((encoded["input_ids"] == pipe.model.config.image_token_id).sum())
    assert placeholders == {"gemma3": 4, "qwen2_vl": 12}[name]
    assert out["image_grid"] == grid and out["image_relevance"].shape == (grid[0] * grid[1],)
    assert float(abs(out["image_relevance"]).sum()) > 0
    # the image as the model saw it: processed again, it gives the same pixels (Qwen2-VL: its patches put back)
    assert out["image"].size == size
    back = pipe.processor.image_processor(out["image"], return_tensors="pt")["pixel_values"]
    _close(back, encoded["pixel_values"], atol=0.02)


def test_the_model_view_of_flattened_patches_is_the_resized_image():
    # Qwen2-VL's layout, by hand: a 2 x 4 grid of 2 px patches in 2 x 2 blocks, 3 channels, 2 temporal copies
    class Processor:
        patch_size, merge_size, temporal_patch_size = 2, 2, 2

    image = torch.arange(3 * 4 * 8, dtype=torch.float32).reshape(3, 4, 8)
    blocks = image.reshape(3, 1, 2, 2, 2, 2, 2).permute(1, 4, 2, 5, 0, 3, 6)  # the processor's patchify
    patches = blocks[:, :, :, :, :, None].expand(1, 2, 2, 2, 3, 2, 2, 2).reshape(8, 3 * 2 * 2 * 2)
    _close(_unpatchify(patches, torch.tensor([[1, 2, 4]]), Processor()), image[None], atol=0)
    assert _unpatchify(patches, torch.tensor([[1, 2, 2]]), Processor()) is None  # 4 patches, not 8
    assert _unpatchify(patches, torch.tensor([[2, 2, 2]]), Processor()) is None  # a video: not an image


def test_chat_messages_with_an_image_equal_attribute(vlm):
    name, _, pipe, _, _, _ = vlm
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": picture(seed=2)}, {"type": "text", "text": "What?"}],
        }
    ]
    out = pipe(text=messages)
    encoded = pipe.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    _same_as_attribute(out, hf_pelrp.attribute(pipe.model, **encoded))
    _close(pipe(messages)["relevance"], out["relevance"], atol=0)
    prompt = "".join(out["tokens"])
    assert "What?" in prompt and prompt.endswith(GENERATION_PROMPT[name])


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_batch_equals_one_prompt_at_a_time(vlm, side, monkeypatch):
    name, _, pipe, text, _, _ = vlm
    monkeypatch.setattr(pipe.tokenizer, "padding_side", side)
    marker = pipe.processor.image_token
    # two pictures of one size (one grid), then of two sizes: Qwen2-VL sizes them differently (one pass each)
    for images in ([picture(seed=3), picture(seed=4)], [picture(seed=3), picture(20, 20, seed=4)]):
        texts = [text, f"Look here: {marker} and say it"]
        batch = pipe(images=images, text=texts, batch_size=2)
        for out, image, prompt in zip(batch, images, texts, strict=True):
            alone = pipe(images=image, text=prompt)
            _close(out["relevance"], alone["relevance"], atol=1e-5)
            _close(out["image_relevance"], alone["image_relevance"], atol=1e-5)
            assert out["image_grid"] == alone["image_grid"]
    if name == "qwen2_vl":
        assert [o["image_grid"] for o in batch] == [(6, 8), (8, 8)]


def test_generation_and_a_continuation_with_an_image(vlm):
    _, _, pipe, text, grid, _ = vlm
    image, patches = picture(seed=5), grid[0] * grid[1]
    out = pipe(images=image, text=text, max_new_tokens=3, return_attribution=True)
    encoded = pipe.processor(images=image, text=text, return_tensors="pt")
    direct = hf_pelrp.explain_continuation(pipe.model, generate=True, max_new_tokens=3, **encoded)
    length = encoded["input_ids"].shape[1]
    assert out["relevance"].shape == (3, length + 3) and out["image_relevance"].shape == (3, patches)
    assert out["image_position_relevance"].shape == (3, patches) and out["image_special"].shape == (3,)
    _close(out["relevance"], direct.relevance)
    _close(out["image_relevance"], direct.image)
    assert out["attribution"].generated_ids.tolist() == direct.generated_ids.tolist()
    # a continuation string: teacher forcing over the same prompt and image
    given = pipe(images=image, text=text, continuation=" a small cat")
    ids = pipe.tokenizer(" a small cat", add_special_tokens=False, return_tensors="pt")["input_ids"]
    forced = hf_pelrp.explain_continuation(pipe.model, continuation_ids=ids, **encoded)
    assert given["image_relevance"].shape == (ids.shape[1], patches)
    _close(given["relevance"], forced.relevance)
    _close(given["image_relevance"], forced.image)


def test_a_processor_that_cannot_load_is_named_when_an_image_comes(vlm, monkeypatch):
    import transformers

    _, folder, pipe, text, _, _ = vlm

    def missing(*args, **kwargs):
        raise ImportError(
            "\nSomeVideoProcessor requires the Torchvision library but it was not found. Install it."
        )

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", missing)
    text_only = pipeline("lrp-attribution", model=str(folder), tokenizer=pipe.tokenizer)
    assert text_only.processor is None
    _close(text_only("What is this?")["relevance"], pipe("What is this?")["relevance"], atol=0)
    with pytest.raises(AttributionInputError, match="SomeVideoProcessor requires the Torchvision library"):
        text_only(images=picture(), text=text)


# ---- reports ------------------------------------------------------------------------------------------------


def test_report_draws_both_patch_maps_on_the_model_view(vlm, tmp_path):
    _, _, pipe, text, grid, _ = vlm
    out = pipe(images=picture(), text=text, return_attribution=True)
    html = out["attribution"].to_html(image=out["image"])
    assert html.count('class="hfp-vlm-overlay') == 2 and html.count('class="hfp-base') == 2
    assert "image patches (content)" in html and "image positions" in html
    assert html.count('<span title="patch ') == 2 * grid[0] * grid[1]
    last = grid[0] * grid[1] - 1
    assert f"patch {last} (row {grid[0] - 1}, column {grid[1] - 1})" in html
    path = out["attribution"].save_png(tmp_path / "vlm.png", image=out["image"])
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_generation_report_has_one_image_panel_per_generated_token(vlm):
    _, _, pipe, text, _, _ = vlm
    out = pipe(images=picture(), text=text, max_new_tokens=3, return_attribution=True)
    html = out["attribution"].to_html(image=out["image"])
    panels = re.findall(r'<details class="hfp-vlm-row" data-row="(\d+)"', html)
    assert panels == ["0", "1", "2"] and html.count('class="hfp-vlm-overlay') == 2 * 3


# ---- the command line ---------------------------------------------------------------------------------------


def test_cli_explains_an_image_with_text_and_writes_the_report(vlm, tmp_path, capsys):
    _, folder, _, text, grid, _ = vlm
    image = tmp_path / "picture.png"
    picture().save(image)
    report, data = tmp_path / "report.html", tmp_path / "out.json"
    argv = ["explain", "--model", str(folder), "--image", str(image), "--text", text]
    assert main([*argv, "--generate", "2", "--out", str(report), "--json", str(data), "--quiet"]) == 0
    html = report.read_text(encoding="utf-8")
    assert html.count('<details class="hfp-vlm-row"') == 2 and 'class="hfp-base' in html
    result = json.loads(data.read_text(encoding="utf-8"))[0]
    assert len(result["image_relevance"]) == 2 and len(result["image_relevance"][0]) == grid[0] * grid[1]
    single = tmp_path / "single.html"
    assert main([*argv, "--out", str(single)]) == 0
    assert single.read_text(encoding="utf-8").count('class="hfp-vlm-overlay') == 2
    summary = capsys.readouterr().out
    assert re.search(r"image -?\d", summary) and "conservation gap" in summary
    assert main([*argv, "--text", text, "--quiet"]) == 2  # two texts for one image
    assert "one --text per --image" in capsys.readouterr().err
