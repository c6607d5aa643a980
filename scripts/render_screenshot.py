"""Render the screenshots of the reports (headless Chromium) and the matplotlib figures into docs/screenshots/.

    python scripts/render_screenshot.py                       # all of them (about 2 minutes on a CPU)
    python scripts/render_screenshot.py --only text image     # some of them
    python scripts/render_screenshot.py --html-dir /tmp/pages # keep the HTML pages too

- ``text``: SmolLM2-135M-Instruct explaining " Paris" after "The capital of France is": the HTML report
  (``text_report.png``, also ``docs/html_view.png`` for the README) and the figure (``text_plot.png``);
- ``generation``: SmolLM2 generating 6 tokens, as the target x source matrix (``generation_matrix.png``, the
  same page with one per-layer chart opened: ``generation_layers.png``) and its figure (``generation_plot.png``);
- ``image``: a tiny ViT trained here (about 20 s) on synthetic Fashion-MNIST-like 28 x 28 images
  (``image_report.png``, ``image_report_maps.png`` without the image, ``image_plot.png``);
- ``vlm``: a LLaVA whose language model is the real SmolLM2-135M-Instruct and whose CLIP tower (32 x 32 pixels,
  8 x 8 patches) and projector are tiny and random (no VLM weights exist offline), through the pipeline with an
  image and text, generating 4 tokens: the matrix with one image panel per generated token
  (``vlm_generation_report.png``), the single-token report (``vlm_report.png``) and its figure
  (``vlm_plot.png``). The image maps show the layout, not a meaningful reading of the picture: the tower is
  untrained.

The attributions carry their display fields (decoded ``tokens``, ``labels``, ``special_tokens_mask``) as the
pipeline and the CLI fill them, so the reports are rendered with no tokenizer argument. Uses the offline
SmolLM2 checkpoint (scripts/setup.sh converts it) and the Debian ``chromium`` package. PNGs are stored as RGB
(a 256-colour palette would band the colour scales).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hf_pelrp
from hf_pelrp.tokens import display_token, display_tokens, special_ids
from hf_pelrp.viz.browser import screenshot

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("text", "generation", "image", "vlm")
#: Fashion-MNIST's names for the classes drawn by :func:`synthetic_clothes`
CLASSES = {0: "T-shirt/top", 1: "Trouser", 2: "Bag", 3: "Sneaker", 4: "Ankle boot"}


def with_display_fields(attr: Any, tokenizer: Any) -> Any:
    """``attr`` with decoded ``tokens``, the target's (and foil's) ``labels`` and the special-token mask, as the
    pipeline and the CLI fill them."""
    ids = attr.input_ids
    named = attr.target.reshape(-1).tolist() + ([] if attr.foil is None else attr.foil.reshape(-1).tolist())
    labels = {int(i): display_token(tokenizer, int(i)) for i in named}
    specials = special_ids(tokenizer)
    if ids.dim() == 1:  # a continuation: one sequence
        gen = attr.replace(tokens=display_tokens(tokenizer, ids.tolist()), labels=labels)
        gen.special_tokens_mask = torch.tensor([int(i) in specials for i in ids.tolist()])
        return gen
    return attr.replace(
        tokens=[display_tokens(tokenizer, row) for row in ids.tolist()],
        labels=labels,
        special_tokens_mask=torch.tensor([[int(i) in specials for i in row] for row in ids.tolist()]),
    )


def shoot(page: Path, png: Path, *, width: int = 1000, height: int = 1600, fragment: str = "") -> int:
    """Screenshot ``page`` into ``png`` cropped to its content (plus a margin); returns the content height."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        raw = screenshot(page, Path(tmp) / "raw.png", width=width, height=height, fragment=fragment)
        image = Image.open(raw).convert("RGB")
    ink = Image.eval(image.convert("L"), lambda v: 255 if v < 245 else 0).getbbox()
    if ink is not None:
        image = image.crop((0, 0, min(image.width, ink[2] + 16), min(image.height, ink[3] + 16)))
    png.parent.mkdir(parents=True, exist_ok=True)
    image.save(png, optimize=True)
    return ink[3] if ink is not None else 0


def save_figure(draw: Any, png: Path) -> None:
    """Write a matplotlib PNG as RGB (no alpha channel), like the screenshots."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        raw = draw(Path(tmp) / "raw.png")
        Image.open(raw).convert("RGB").save(png, optimize=True)


# ---- the three subjects ------------------------------------------------------------------------------------


def render_text(model: Any, tok: Any, prompt: str, out: Path, pages: Path) -> str:
    attr = with_display_fields(hf_pelrp.attribute(model, **tok(prompt, return_tensors="pt")), tok)
    title = f"hf_pelrp · SmolLM2-135M-Instruct · {prompt!r} → next token"
    page = pages / "text_report.html"
    attr.to_html(path=page, title=title)
    height = shoot(page, out / "text_report.png", width=1000, height=1400)
    shoot(page, ROOT / "docs" / "html_view.png", width=1000, height=1400)
    save_figure(lambda p: attr.save_png(p), out / "text_plot.png")
    target = attr.labels[int(attr.target[0])]
    return (
        f"text: target {target!r}, logit {float(attr.target_value[0]):.3f}, gap {float(attr.conservation_gap[0]):.3f}"
        f", page {height} px"
    )


def render_generation(model: Any, tok: Any, prompt: str, new_tokens: int, out: Path, pages: Path) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    gen = with_display_fields(
        hf_pelrp.explain_continuation(model, ids, generate=True, max_new_tokens=new_tokens), tok
    )
    page = pages / "generation_matrix.html"
    title = f"hf_pelrp · SmolLM2-135M-Instruct · {prompt!r} → {new_tokens} generated tokens"
    hf_pelrp.viz.generation_html(gen, page, title=title)
    height = shoot(page, out / "generation_matrix.png", width=1000, height=1600)
    # the same page with its first per-layer chart opened (as a click on it does)
    opened = pages / "generation_layers.html"
    text = page.read_text(encoding="utf-8").replace(
        '<details class="hfp-layers">', '<details class="hfp-layers" open>', 1
    )
    opened.write_text(text, encoding="utf-8")
    shoot(opened, out / "generation_layers.png", width=1000, height=2000)
    save_figure(lambda p: hf_pelrp.viz.generation_png(gen, p), out / "generation_plot.png")
    return f"generation: {tok.decode(gen.generated_ids)!r}, matrix page {height} px"


def synthetic_clothes(label: int, rng: np.random.Generator) -> np.ndarray:
    """A 28 x 28 grey image in [0, 1] of a crude garment of class ``label`` (see :data:`CLASSES`), shifted,
    scaled in brightness and noisy, in the spirit of Fashion-MNIST."""
    img = np.zeros((28, 28), dtype=np.float32)
    dy, dx = rng.integers(-2, 3, size=2)
    yy, xx = np.mgrid[0:28, 0:28]
    if label == 0:  # T-shirt: torso and sleeves
        img[7:24, 9:19] = 1
        img[7:13, 4:24] = 1
        img[7:9, 12:16] = 0.3  # neckline
    elif label == 1:  # trousers: waist and two legs
        img[4:8, 9:19] = 1
        img[8:25, 9:13] = 1
        img[8:25, 15:19] = 1
    elif label == 2:  # bag: body and handle
        img[12:24, 6:22] = 1
        ring = ((yy - 12) ** 2 + (xx - 14) ** 2 <= 36) & ((yy - 12) ** 2 + (xx - 14) ** 2 >= 16) & (yy < 12)
        img[ring] = 1
    elif label == 3:  # sneaker: low, long, with a sole
        img[16:22, 3:25] = 1
        img[12:16, 10:22] = 1
        img[21:23, 3:25] = 0.6
    else:  # ankle boot: a shaft and a foot
        img[6:22, 12:20] = 1
        img[16:22, 5:20] = 1
        img[21:23, 5:21] = 0.6
    img = np.roll(img, (dy, dx), axis=(0, 1)) * rng.uniform(0.6, 1.0)
    img += rng.normal(0, 0.06, size=img.shape).astype(np.float32) * (img > 0)
    return np.clip(img, 0, 1)


def train_tiny_vit(steps: int = 400, seed: int = 0) -> Any:
    """A ViT (2 layers, width 48, 4 x 4 patches of a 28 x 28 grey image) trained for ``steps`` batches of 64 on
    :func:`synthetic_clothes` (about 20 s on one CPU thread; deterministic given the seed)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = ViTConfig(
        image_size=28,
        patch_size=4,
        num_channels=1,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        num_labels=len(CLASSES),
        id2label=dict(CLASSES),
        label2id={v: k for k, v in CLASSES.items()},
    )
    model = ViTForImageClassification(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    try:
        model.train()
        for _ in range(steps):
            labels = rng.integers(0, len(CLASSES), size=64)
            pixels = torch.tensor(np.stack([synthetic_clothes(int(y), rng) for y in labels]))[:, None]
            loss = model(pixel_values=pixels, labels=torch.tensor(labels)).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    labels = rng.integers(0, len(CLASSES), size=200)
    pixels = torch.tensor(np.stack([synthetic_clothes(int(y), rng) for y in labels]))[:, None]
    with torch.no_grad():
        accuracy = float((model(pixel_values=pixels).logits.argmax(-1).numpy() == labels).mean())
    model.config.hf_pelrp_training = {"steps": steps, "accuracy": accuracy}
    return model


def render_image(out: Path, pages: Path, train_steps: int) -> str:
    model = train_tiny_vit(train_steps)
    image = synthetic_clothes(3, np.random.default_rng(7))  # a sneaker
    attr = hf_pelrp.attribute(model, pixel_values=torch.tensor(image)[None, None])
    attr = attr.replace(labels=dict(model.config.id2label))
    picture = (image * 255).astype(np.uint8)
    title = "hf_pelrp · tiny ViT (synthetic Fashion-MNIST-like clothes) · explaining its prediction"
    page = pages / "image_report.html"
    attr.to_html(path=page, image=picture, title=title)
    shoot(page, out / "image_report.png", width=1000, height=900)
    bare = pages / "image_report_maps.html"
    attr.to_html(path=bare, title=title + " · no image given")
    shoot(bare, out / "image_report_maps.png", width=1000, height=900, fragment="#map=position")
    save_figure(lambda p: attr.save_png(p, image=picture), out / "image_plot.png")
    training = model.config.hf_pelrp_training
    return (
        f"image: predicted {attr.labels[int(attr.target[0])]!r} after {training['steps']} steps "
        f"(accuracy {training['accuracy']:.0%} on fresh synthetic images)"
    )


def smollm2_llava(smol: Any, tok: Any) -> tuple[Any, Any]:
    """A LLaVA around the real SmolLM2 (its weights copied in) with a tiny random CLIP tower, and a real
    ``LlavaProcessor`` (CLIP image processor for 32 x 32 pixels, SmolLM2's tokenizer with ``<image>`` added)."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64}
    vision.update({"num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 4})
    config = LlavaConfig(
        text_config=smol.config.to_dict(),
        vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=64,
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config).eval()
    llava.model.language_model.load_state_dict(smol.model.state_dict())
    llava.lm_head.load_state_dict(smol.lm_head.state_dict())
    llava.resize_token_embeddings(len(tok))  # a row for <image> (replaced by the image features, never read)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    return llava, processor


def render_vlm(smol: Any, tok: Any, out: Path, pages: Path) -> str:
    from PIL import Image
    from transformers import pipeline

    llava, processor = smollm2_llava(smol, tok)
    pipe = pipeline("lrp-attribution", model=llava, processor=processor, tokenizer=processor.tokenizer)
    garment = synthetic_clothes(4, np.random.default_rng(3))  # an ankle boot, 28 x 28 grey
    image = Image.fromarray((garment * 255).astype(np.uint8)).convert("RGB")
    text = "<image>The capital of France is"
    name = "LLaVA = SmolLM2-135M-Instruct + tiny random CLIP tower"
    gen = pipe(images=image, text=text, max_new_tokens=4, return_attribution=True)
    page = pages / "vlm_generation_report.html"
    title = f"hf_pelrp · {name} · image + {text[7:]!r} → 4 generated tokens"
    gen["attribution"].to_html(path=page, image=gen["image"], title=title)
    shoot(page, out / "vlm_generation_report.png", width=1100, height=1600)
    one = pipe(images=image, text=text, return_attribution=True)
    page = pages / "vlm_report.html"
    one["attribution"].to_html(path=page, image=one["image"], title=f"hf_pelrp · {name} · next token")
    shoot(page, out / "vlm_report.png", width=1000, height=1000)
    save_figure(lambda p: one["attribution"].save_png(p, image=one["image"]), out / "vlm_plot.png")
    attr = one["attribution"]
    return (
        f"vlm: generated {gen['generated_text']!r}; next token {one['target']['label']!r}, logit "
        f"{one['score']:.3f}, text {float(attr.relevance.sum()):.3f}, image {float(attr.image_total[0]):.4g}, "
        f"gap {one['conservation_gap']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=KINDS, default=list(KINDS), help="which screenshots")
    parser.add_argument(
        "--out-dir", type=Path, default=ROOT / "docs" / "screenshots", help="where the PNGs go"
    )
    parser.add_argument("--html-dir", type=Path, default=None, help="also keep the HTML pages here")
    parser.add_argument("--prompt", default="The capital of France is", help="the text to explain")
    parser.add_argument("--new-tokens", type=int, default=6, help="tokens to generate for the matrix")
    parser.add_argument("--train-steps", type=int, default=400, help="training batches of the tiny ViT")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pages = args.html_dir or Path(tmp)
        pages.mkdir(parents=True, exist_ok=True)
        if "text" in args.only or "generation" in args.only or "vlm" in args.only:
            from hf_pelrp.assets import load_smollm2

            model, tok = load_smollm2()
            if "text" in args.only:
                print(render_text(model, tok, args.prompt, args.out_dir, pages))
            if "generation" in args.only:
                print(render_generation(model, tok, args.prompt, args.new_tokens, args.out_dir, pages))
            if "vlm" in args.only:
                print(render_vlm(model, tok, args.out_dir, pages))
        if "image" in args.only:
            print(render_image(args.out_dir, pages, args.train_steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
