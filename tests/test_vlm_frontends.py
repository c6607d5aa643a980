"""Where users meet a vision-language model's explanation (issue 19, section 3): continuations and generation
with an image, the ``lrp-attribution`` pipeline with an image and text or chat messages with images, the HTML /
PNG reports with the image's patch maps, and ``hf-pelrp explain --image --text``.

Exactness is tested on a tiny float64 LLaVA (``check.tiny_config``) under bias-free CP rules; the front ends on a
tiny float32 LLaVA saved with a real ``LlavaProcessor`` (CLIP image processor + the SmolLM2 tokenizer, offline:
tests/helpers/tiny_vlm.py), loaded by ``pipeline(model=<folder>)`` like a hub checkpoint.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import transformers
from transformers import pipeline

import hf_pelrp
from helpers.tiny_vlm import picture, save_tiny_llava, tokenizer
from hf_pelrp.adapters.base import adapter_for_type
from hf_pelrp.check import _zero_biases, tiny_config
from hf_pelrp.cli import main
from hf_pelrp.errors import AttributionInputError

pytestmark = pytest.mark.usefixtures("single_thread")

TEXT = "<image>What is this?"


# ---- continuations with an image (float64, bias-free CP: exact) ---------------------------------------------


@pytest.fixture(scope="module")
def llava64():
    adapter = adapter_for_type("llava")
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(tiny_config("llava", adapter)).double().eval()
    _zero_biases(model)
    prompt = adapter.inputs.example(model, 1, 6, torch.Generator().manual_seed(1))
    return model, prompt


def _relative_gap(result) -> torch.Tensor:
    return result.conservation_gap.abs() / result.target_value.abs()


def test_generated_rows_conserve_and_equal_a_single_target_of_their_prefix(llava64):
    model, prompt = llava64
    gen = hf_pelrp.explain_continuation(
        model,
        prompt["input_ids"],
        attention_mask=prompt["attention_mask"],
        pixel_values=prompt["pixel_values"],
        generate=True,
        max_new_tokens=4,
        config="cp",
    )
    steps = gen.generated_ids.numel()
    assert steps == 4 and gen.image.shape == (4, 16) and gen.image_position.shape == (4, 16)
    assert gen.image_grid.tolist() == [[4, 4]] * 4 and gen.relevance.shape == (
        4,
        prompt["input_ids"].shape[1] + 4,
    )
    # each row: text + image maps add up to its logit (bias-free CP)
    total = gen.relevance.sum(-1) + gen.image.sum(-1) + gen.image_position.sum(-1) + gen.image_special
    torch.testing.assert_close(total + gen.conservation_gap, gen.target_value, rtol=0, atol=1e-12)
    assert float(_relative_gap(gen).max()) <= 1e-6
    assert bool((gen.image.abs().sum(-1) > 0).all())
    for s in range(steps):
        prefix = gen.input_ids[: gen.prompt_length + s][None]
        single = hf_pelrp.attribute(
            model,
            input_ids=prefix,
            pixel_values=prompt["pixel_values"],
            target=int(gen.target[s]),
            config="cp",
        )
        length = prefix.shape[1]
        for name in ("relevance", "token", "position"):
            torch.testing.assert_close(
                getattr(gen, name)[s, :length], getattr(single, name)[0], atol=1e-12, rtol=0
            )
        for name in ("image", "image_position", "image_special"):
            torch.testing.assert_close(getattr(gen, name)[s], getattr(single, name)[0], atol=1e-12, rtol=0)
        assert bool((gen.relevance[s, length:] == 0).all())  # causality: the row's future is exactly 0


def test_a_given_continuation_equals_the_generated_one(llava64):
    model, prompt = llava64
    common = {
        "attention_mask": prompt["attention_mask"],
        "pixel_values": prompt["pixel_values"],
        "config": "cp",
    }
    gen = hf_pelrp.explain_continuation(model, prompt["input_ids"], generate=True, max_new_tokens=3, **common)
    given = hf_pelrp.explain_continuation(model, prompt["input_ids"], gen.generated_ids, **common)
    torch.testing.assert_close(given.relevance, gen.relevance, atol=0, rtol=0)
    torch.testing.assert_close(given.image, gen.image, atol=0, rtol=0)
    # to_attribution() keeps the image maps of every row
    rows = gen.to_attribution()
    torch.testing.assert_close(rows.image, gen.image) and torch.testing.assert_close(
        rows.conservation_gap, gen.conservation_gap
    )


def test_a_left_padded_prompt_explains_as_the_unpadded_one(llava64):
    model, prompt = llava64
    ids, pixels = prompt["input_ids"], prompt["pixel_values"]
    padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    plain = hf_pelrp.explain_continuation(model, ids, [5, 7], pixel_values=pixels, config="cp")
    left = hf_pelrp.explain_continuation(
        model, padded, [5, 7], attention_mask=mask, pixel_values=pixels, config="cp"
    )
    torch.testing.assert_close(left.relevance, plain.relevance, atol=1e-12, rtol=0)
    torch.testing.assert_close(left.image, plain.image, atol=1e-12, rtol=0)


def test_a_wrong_image_size_is_refused_before_generating(llava64):
    model, prompt = llava64
    with pytest.raises(AttributionInputError, match=r"20x20 but .* takes 16x16"):
        hf_pelrp.explain_continuation(
            model,
            prompt["input_ids"],
            pixel_values=torch.randn(1, 3, 20, 20, dtype=torch.float64),
            generate=True,
            max_new_tokens=2,
        )


def test_a_prompt_without_placeholders_is_refused_with_an_image(llava64):
    model, prompt = llava64
    text_only = prompt["input_ids"][:, prompt["input_ids"][0] != model.config.image_token_id]
    with pytest.raises(AttributionInputError, match="placeholder"):
        hf_pelrp.explain_continuation(model, text_only, [3], pixel_values=prompt["pixel_values"], config="cp")


def test_a_text_only_model_refuses_an_image_in_a_continuation():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(AttributionInputError, match="no vision tower"):
        hf_pelrp.explain_continuation(model, [[1, 2, 3]], [4], pixel_values=torch.randn(1, 3, 16, 16))


# ---- the pipeline (a tiny LLaVA saved with its processor) --------------------------------------------------


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="module")
def pipe(llava_dir):
    return pipeline("lrp-attribution", model=str(llava_dir))


def _close(a, b, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), atol=atol, rtol=1e-5)


def _same_as_attribute(out, attr):
    _close(out["relevance"], attr.relevance[0].float())
    _close(out["image_relevance"], attr.image[0].float())
    _close(out["image_position_relevance"], attr.image_position[0].float())
    _close(out["image_special"], float(attr.image_special[0]))
    _close(out["conservation_gap"], float(attr.conservation_gap[0]))
    assert out["target"]["id"] == int(attr.target[0])


def test_pipeline_image_with_text_equals_attribute_on_the_processor_output(pipe):
    image = picture()
    out = pipe(images=image, text=TEXT)
    encoded = pipe.processor(images=image, text=TEXT, return_tensors="pt")
    assert int((encoded["input_ids"] == pipe.model.config.image_token_index).sum()) == 16
    _same_as_attribute(out, hf_pelrp.attribute(pipe.model, **encoded))
    assert out["image_grid"] == (4, 4) and out["image_relevance"].shape == (16,)
    assert out["tokens"][:16] == ["<image>"] * 16 and out["tokens"][16:] == ["What", " is", " this", "?"]
    # the image as the model saw it: the processor's 16 x 16 crop, un-normalised back to pixels
    assert out["image"].size == (16, 16)
    back = pipe.processor.image_processor(out["image"], return_tensors="pt")["pixel_values"]
    _close(back, encoded["pixel_values"], atol=0.02)


def test_pipeline_chat_messages_with_an_image_equal_attribute(pipe):
    image = picture(seed=2)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}
    ]
    out = pipe(text=messages)
    positional = pipe(messages)
    encoded = pipe.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    _same_as_attribute(out, hf_pelrp.attribute(pipe.model, **encoded))
    _close(positional["relevance"], out["relevance"], atol=0)
    assert "".join(out["tokens"]).endswith(
        "What?<|im_end|>\n<|im_start|>assistant\n"
    )  # the generation prompt


def test_pipeline_batch_of_images_equals_one_at_a_time(pipe):
    images, texts = [picture(seed=3), picture(20, 20, seed=4)], [TEXT, "Look: <image> and say"]
    batch = pipe(images=images, text=texts, batch_size=2)
    for out, image, text in zip(batch, images, texts, strict=True):
        alone = pipe(images=image, text=text)
        _close(out["relevance"], alone["relevance"], atol=1e-5)
        _close(out["image_relevance"], alone["image_relevance"], atol=1e-5)


def test_pipeline_generation_with_an_image_is_a_matrix_over_text_and_patches(pipe):
    image = picture(seed=5)
    out = pipe(images=image, text=TEXT, max_new_tokens=3, return_attribution=True)
    gen = out["attribution"]
    encoded = pipe.processor(images=image, text=TEXT, return_tensors="pt")
    direct = hf_pelrp.explain_continuation(pipe.model, generate=True, max_new_tokens=3, **encoded)
    assert out["relevance"].shape == (3, 23) and out["image_relevance"].shape == (3, 16)
    assert out["image_special"].shape == (3,) and len(out["target"]) == 3
    _close(out["relevance"], direct.relevance)
    _close(out["image_relevance"], direct.image)
    assert gen.generated_ids.tolist() == direct.generated_ids.tolist()
    # a continuation string: teacher forcing over the same prompt and image
    given = pipe(images=image, text=TEXT, continuation=" a small cat")
    ids = pipe.tokenizer(" a small cat", add_special_tokens=False, return_tensors="pt")["input_ids"]
    forced = hf_pelrp.explain_continuation(pipe.model, continuation_ids=ids, **encoded)
    assert given["image_relevance"].shape == (ids.shape[1], 16)
    _close(given["relevance"], forced.relevance)
    _close(given["image_relevance"], forced.image)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p(images=picture(), text="What is this?"), "holds no image token '<image>'"),
        (lambda p: p(images=picture()), "images= needs text="),
        (lambda p: p(picture()), "an image alone cannot be explained"),
        (lambda p: p(images=[picture(), picture()], text=TEXT), "one text per image"),
        (lambda p: p(TEXT, images=picture()), "either positionally or as images="),
        (lambda p: p(images=picture(), text=TEXT + " <image>"), "Found total 2 <image> tokens and 1 images"),
        (lambda p: p(images=torch.rand(16, 16, 3), text=TEXT), "uint8"),
    ],
)
def test_pipeline_bad_image_inputs_are_named(pipe, call, message):
    with pytest.raises(AttributionInputError, match=re.escape(message)):
        call(pipe)


def test_a_text_only_pipeline_refuses_an_image(tmp_path):
    tok = tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    text_pipe = pipeline("lrp-attribution", model=str(tmp_path))
    with pytest.raises(AttributionInputError, match="is a text model here"):
        text_pipe(images=picture(), text=TEXT)
    with pytest.raises(AttributionInputError, match="it is a text model"):
        text_pipe(picture())


# ---- reports ------------------------------------------------------------------------------------------------


def test_report_draws_both_patch_maps_beside_the_text(pipe):
    out = pipe(images=picture(), text=TEXT, return_attribution=True)
    html = out["attribution"].to_html(image=out["image"])
    assert html.count('class="hfp-vlm-overlay') == 2  # content and positions
    assert html.count('class="hfp-base') == 2 and 'class="hfp-vlm-textside"' in html
    assert "image patches (content)" in html and "image positions" in html
    assert html.count('<span title="patch ') == 2 * 16  # a tooltip per patch on each map
    bare = out["attribution"].to_html()
    assert 'class="hfp-base' not in bare and "no image given" in bare


def test_generation_report_has_one_image_panel_per_generated_token(pipe):
    out = pipe(images=picture(), text=TEXT, max_new_tokens=3, return_attribution=True)
    html = out["attribution"].to_html(image=out["image"])
    panels = re.findall(r'<details class="hfp-vlm-row" data-row="(\d+)"( open)?>', html)
    assert [int(r) for r, _ in panels] == [0, 1, 2] and [o for _, o in panels] == [" open", "", ""]
    assert html.count('class="hfp-vlm-overlay') == 2 * 3
    # the image's total is a column of the matrix, next to each row's logit
    for total in out["attribution"].image_total.tolist():
        assert f"{total:.4g}" in html


def test_png_report_of_a_vlm_row(pipe, tmp_path):
    out = pipe(images=picture(), text=TEXT, return_attribution=True)
    path = out["attribution"].save_png(tmp_path / "vlm.png", image=out["image"])
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_image_for_a_text_report_is_refused():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    attr = hf_pelrp.attribute(
        transformers.LlamaForCausalLM(config).eval(), input_ids=torch.tensor([[1, 2, 3]])
    )
    with pytest.raises(AttributionInputError, match="no image maps"):
        attr.to_html(image=picture())


# ---- the command line ---------------------------------------------------------------------------------------


def test_cli_explains_an_image_with_text_and_writes_the_report(llava_dir, tmp_path, capsys):
    image = tmp_path / "picture.png"
    picture(40, 50).save(image)
    report, data = tmp_path / "report.html", tmp_path / "out.json"
    argv = ["explain", "--model", str(llava_dir), "--image", str(image), "--text", TEXT, "--generate", "2"]
    assert main([*argv, "--out", str(report), "--json", str(data), "--quiet"]) == 0
    html = report.read_text(encoding="utf-8")
    assert html.count('<details class="hfp-vlm-row"') == 2 and 'class="hfp-base' in html
    result = json.loads(data.read_text(encoding="utf-8"))[0]
    assert len(result["image_relevance"]) == 2 and len(result["image_relevance"][0]) == 16
    single = tmp_path / "single.html"
    assert (
        main(
            [
                "explain",
                "--model",
                str(llava_dir),
                "--image",
                str(image),
                "--text",
                TEXT,
                "--out",
                str(single),
            ]
        )
        == 0
    )
    assert single.read_text(encoding="utf-8").count('class="hfp-vlm-overlay') == 2
    summary = capsys.readouterr().out
    assert re.search(r"image -?\d", summary) and "conservation gap" in summary


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "is a vision-language model (LlavaForConditionalGeneration): give --text with the --image"),
        (["--text", "What is this?"], "holds no image token '<image>'"),
        (["--text", TEXT, "--text", TEXT], "one --text per --image"),
    ],
)
def test_cli_bad_image_inputs_end_with_one_line(llava_dir, tmp_path, capsys, extra, message):
    image = tmp_path / "picture.png"
    picture().save(image)
    assert main(["explain", "--model", str(llava_dir), "--image", str(image), *extra, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_terminal_tables_name_the_image_share(pipe):
    import io

    from rich.console import Console

    out = pipe(images=picture(), text=TEXT, return_attribution=True)
    console = Console(file=io.StringIO(), width=200)
    hf_pelrp.viz.show_terminal(out["attribution"], console=console)
    assert f"image {float(out['attribution'].image_total[0]):.4g}" in console.file.getvalue()
    gen = pipe(images=picture(), text=TEXT, max_new_tokens=2, return_attribution=True)["attribution"]
    console = Console(file=io.StringIO(), width=200)
    hf_pelrp.viz.show_terminal(gen, console=console)
    line = next(r for r in console.file.getvalue().splitlines() if "│ image" in r)
    assert all(f"{t:+.4g}" in line for t in gen.image_total.tolist())


def test_a_vlm_pipeline_without_processor_explains_text_and_refuses_images(pipe):
    # a model object from nowhere (no folder to find a processor in), with a tokenizer only
    config = copy.deepcopy(pipe.model.config)
    config._name_or_path = ""
    model = transformers.LlavaForConditionalGeneration(config).eval()
    text_only = pipeline("lrp-attribution", model=model, tokenizer=pipe.tokenizer)
    assert text_only.processor is None
    out = text_only("What is this?")
    direct = hf_pelrp.attribute(model, **pipe.tokenizer("What is this?", return_tensors="pt"))
    _close(out["relevance"], direct.relevance[0])
    assert "image_relevance" not in out
    with pytest.raises(AttributionInputError, match="no processor for LlavaForConditionalGeneration"):
        text_only(images=picture(), text=TEXT)


def test_per_token_image_inputs_follow_the_prompt_and_give_the_continuation_zero():
    from hf_pelrp.request import _extend_image_inputs, _prompt_image_inputs

    images = {
        "pixel_values": torch.ones(1, 3, 4, 4),
        "token_type_ids": torch.tensor([[0, 1, 1, 0]]),
        "image_grid_thw": torch.tensor([[1, 2, 2]]),  # [1, 3]: not a per-token map, even for a 3-token prompt
    }
    prompt = _prompt_image_inputs(images, [[5, 6, 6, 7]], [[0, 1, 1, 1]], torch.device("cpu"))
    assert prompt["token_type_ids"].tolist() == [[1, 1, 0]] and prompt["image_grid_thw"].tolist() == [
        [1, 2, 2]
    ]
    full = _extend_image_inputs(prompt, 3, 2)
    assert full["token_type_ids"].tolist() == [[1, 1, 0, 0, 0]] and full["image_grid_thw"].tolist() == [
        [1, 2, 2]
    ]
    assert full["pixel_values"] is prompt["pixel_values"]
