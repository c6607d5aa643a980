"""A tiny LLaVA saved like a hub checkpoint, with a real ``LlavaProcessor`` (offline).

The processor is built here from a ``CLIPImageProcessor`` matching the tiny CLIP tower (16 x 16 pixels, 4 x 4
patches: 16 image features) and the SmolLM2 tokenizer from the converted asset cache (``<image>`` added as a
special token), with a chat template that puts ``<image>`` where a message holds an image entry. The model is
random (fixed seed): reports and pipelines are tested on it, not what it answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

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


# ---- Gemma 3 ------------------------------------------------------------------------------------------------

#: Gemma 3's image tokens: the prompt's image marker (``boi``), the placeholder that the processor repeats
#: ``image_seq_length`` times after it, and the end marker
GEMMA3_IMAGE_TOKENS = {
    "boi_token": "<start_of_image>",
    "image_token": "<image_soft_token>",
    "eoi_token": "<end_of_image>",
}

#: Gemma 3's turn markup, with ``<start_of_image>`` where a message holds an image entry (as its own template)
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _smollm2_tokenizer(**named: str) -> Any:
    """The SmolLM2 tokenizer with ``named`` model-specific special tokens added (``tok.image_token``,
    ``tok.image_token_id``, ...); skips without the asset."""
    from transformers import AutoTokenizer

    from hf_pelrp.assets import smollm2_checkpoint

    try:
        folder = smollm2_checkpoint(convert=False)
    except Exception as exc:  # the asset is not installed / converted on this machine
        pytest.skip(f"the SmolLM2 tokenizer is not available offline here: {exc}")
    return AutoTokenizer.from_pretrained(folder, extra_special_tokens=dict(named))


def save_tiny_gemma3(folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A tiny random Gemma 3 (SigLIP tower 56 x 56 px, 4 x 4 patches of 14 px pooled to 2 x 2 = 4 image tokens;
    Gemma 3 text model over SmolLM2's vocabulary) and its ``Gemma3Processor`` saved in ``folder``.

    The processor's image processor resizes to 56 x 56 (no crop) and normalises with SigLIP's mean and std
    (0.5); ``image_seq_length`` is the config's ``mm_tokens_per_image`` (4). A text marks the image with
    ``<start_of_image>``, which the processor expands to ``\\n\\n<start_of_image>`` + 4 x ``<image_soft_token>`` +
    ``<end_of_image>\\n\\n`` and marks with ``token_type_ids``."""
    from transformers import Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    from hf_pelrp.check import _randomise, tiny_config

    tok = _smollm2_tokenizer(**GEMMA3_IMAGE_TOKENS)
    # Gemma's turn markers are single tokens, as in its own vocabulary
    tok.add_special_tokens(
        {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
        replace_extra_special_tokens=False,
    )
    config = tiny_config("gemma3")
    config.text_config.vocab_size = len(tok)
    config.text_config.max_position_embeddings = 128  # the chat template's markup with the image
    config.image_token_index = tok.image_token_id
    config.boi_token_index = tok.boi_token_id
    config.eoi_token_index = tok.eoi_token_id
    config.text_config.pad_token_id = tok.pad_token_id
    config.text_config.bos_token_id = tok.bos_token_id
    config.text_config.eos_token_id = tok.eos_token_id
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    _randomise(model, seed)  # the projector's weight and norm start at 0: the image would explain nothing
    model = model.to(dtype)
    size = config.vision_config.image_size
    images = Gemma3ImageProcessor(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = Gemma3Processor(
        image_processor=images,
        tokenizer=tok,
        image_seq_length=config.mm_tokens_per_image,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ---- Qwen2-VL -----------------------------------------------------------------------------------------------

QWEN2_VL_IMAGE_TOKENS = {
    "vision_start_token": "<|vision_start|>",
    "image_token": "<|image_pad|>",
    "vision_end_token": "<|vision_end|>",
    "video_token": "<|video_pad|>",
}

#: Qwen2-VL's chat markup: an image entry is ``<|vision_start|><|image_pad|><|vision_end|>``
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: the tiny Qwen2-VL image processor's pixel budget: images are resized (aspect kept) to multiples of 4 px
#: (patch 2 x merge 2) holding 64 to 256 pixels, so a 24 x 30 picture becomes 12 x 16 px = 6 x 8 patches
QWEN2_VL_PIXELS = (64, 256)


@contextmanager
def qwen2_vl_processor_without_videos() -> Iterator[None]:
    """Where torchvision is missing, let ``Qwen2VLProcessor`` be built, saved and loaded without its video
    processor (transformers 5 loads a torchvision-only ``Qwen2VLVideoProcessor`` with every Qwen2-VL processor,
    and refuses to build one without it). Only the list of sub-processors changes: the image processor, the
    tokenizer, the placeholder expansion and the chat template are the processor's own code. hf_pelrp explains
    images, never videos. With torchvision installed this does nothing: the processor is the full one."""
    from transformers import Qwen2VLProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        yield
        return
    images_only = classmethod(lambda cls: ["image_processor", "tokenizer"])
    with mock.patch.object(Qwen2VLProcessor, "get_attributes", images_only):
        yield


def save_tiny_qwen2_vl(folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A tiny random Qwen2-VL (vision transformer over 2 x 2 px patches merged 2 x 2; M-RoPE text model over
    SmolLM2's vocabulary) and its ``Qwen2VLProcessor`` saved in ``folder``.

    The image processor keeps the aspect ratio within :data:`QWEN2_VL_PIXELS` (patch size, temporal patch size
    and merge size are the vision config's); ``<|image_pad|>`` in a text becomes ``h * w / 4`` placeholders."""
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor

    from hf_pelrp.check import _randomise, tiny_config

    tok = _smollm2_tokenizer(**QWEN2_VL_IMAGE_TOKENS)
    config = tiny_config("qwen2_vl")
    config.text_config.vocab_size = len(tok)
    config.text_config.max_position_embeddings = 128
    config.image_token_id = tok.image_token_id
    config.video_token_id = tok.video_token_id
    config.vision_start_token_id = tok.vision_start_token_id
    config.vision_end_token_id = tok.vision_end_token_id
    config.text_config.pad_token_id = tok.pad_token_id
    config.text_config.bos_token_id = tok.bos_token_id
    config.text_config.eos_token_id = tok.eos_token_id
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    _randomise(model, seed)
    model = model.to(dtype)
    vision = config.vision_config
    images = Qwen2VLImageProcessor(
        min_pixels=QWEN2_VL_PIXELS[0],
        max_pixels=QWEN2_VL_PIXELS[1],
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
    )
    with qwen2_vl_processor_without_videos():
        processor = Qwen2VLProcessor(
            image_processor=images, tokenizer=tok, chat_template=QWEN2_VL_CHAT_TEMPLATE
        )
        processor.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
