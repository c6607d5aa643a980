"""Render the README's screenshot of the HTML view: a real SmolLM2 explanation, drawn by headless Chromium.

    python scripts/render_screenshot.py                      # -> docs/html_view.png
    python scripts/render_screenshot.py --html report.html   # keep the HTML page too

Uses the offline SmolLM2-135M-Instruct checkpoint (scripts/setup.sh converts it) and the Debian ``chromium``
package. The PNG is stored with an adaptive 256-colour palette to keep it small in git.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import hf_pelrp
from hf_pelrp.assets import load_smollm2
from hf_pelrp.viz.browser import screenshot

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "html_view.png", help="the PNG to write")
    parser.add_argument("--html", type=Path, default=None, help="also keep the HTML page here")
    parser.add_argument("--prompt", default="The capital of France is", help="the text to explain")
    parser.add_argument("--width", type=int, default=980)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    inputs = tokenizer(args.prompt, return_tensors="pt")
    attr = hf_pelrp.attribute(model, **inputs)
    title = f"hf_pelrp · SmolLM2-135M-Instruct · {args.prompt!r} → next token"
    with tempfile.TemporaryDirectory() as tmp:
        page = args.html or Path(tmp) / "view.html"
        attr.to_html(path=page, tokenizer=tokenizer, title=title)
        raw = screenshot(page, Path(tmp) / "raw.png", width=args.width, height=args.height)
        from PIL import Image

        image = Image.open(raw).convert("RGB")
        # crop the empty page below and right of the content, keeping a margin
        ink = Image.eval(image.convert("L"), lambda v: 255 if v < 250 else 0).getbbox()
        if ink is not None:
            image = image.crop((0, 0, min(image.width, ink[2] + 16), min(image.height, ink[3] + 16)))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    label = tokenizer.decode([int(attr.target[0])])
    print(
        f"{args.out}: target {label!r}, logit {float(attr.target_value[0]):.3f}, "
        f"conservation gap {float(attr.conservation_gap[0]):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
