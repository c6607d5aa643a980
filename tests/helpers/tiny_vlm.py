"""A tiny LLaVA saved like a hub checkpoint, with a real ``LlavaProcessor`` (offline).

The processor is built here from a ``CLIPImageProcessor`` matching the tiny CLIP tower (16 x 16 pixels, 4 x 4
patches: 16 image features) and the SmolLM2 tokenizer from the converted asset cache (``<image>`` added as a
special token), with a chat template that puts ``<image>`` where a message holds an image entry. The model is
random (fixed seed): reports and pipelines are tested on it, not what it answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

#: a chat template for image-text content lists (SmolLM2's own takes string contents only)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer() -> Any:
    """The SmolLM2 tokenizer (converted asset cache) with ``<image>`` as a special token; skips without it."""
    from transformers import AutoTokenizer

    from hf_pelrp.assets import smollm2_checkpoint

    try:
        folder = smollm2_checkpoint(convert=False)
    except Exception as exc:  # the asset is not installed / converted on this machine
        pytest.skip(f"the SmolLM2 tokenizer is not available offline here: {exc}")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def save_tiny_llava(folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A tiny random LLaVA (CLIP tower 16 x 16 px, 4 x 4 patches; LLaMA text model over SmolLM2's vocabulary)
    and its ``LlavaProcessor`` saved in ``folder``."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    from hf_pelrp.check import tiny_config

    tok = tokenizer()
    config = tiny_config("llava")
    config.text_config.vocab_size = len(tok)
    config.image_token_index = tok.convert_tokens_to_ids("<image>")
    config.image_seq_length = 16
    config.text_config.pad_token_id = tok.pad_token_id
    config.text_config.bos_token_id = tok.bos_token_id
    config.text_config.eos_token_id = tok.eos_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        image_token="<image>",
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def picture(height: int = 24, width: int = 30, seed: int = 0) -> Any:
    """A random RGB PIL image (not square: the processor resizes and crops it)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
