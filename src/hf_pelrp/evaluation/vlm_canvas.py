"""A visual question-answering task for the VLM faithfulness check of issue 19: "what is in the top left?"
about Fashion-MNIST garments in the quadrants of a canvas, and the tiny LLaVA that learns it.

The canvas is ``2 * quadrant`` pixels square (64x64 by default). Each canvas holds 2 to 4 garments in distinct
quadrants; each garment is placed at a random offset inside its 32x32 quadrant by
:func:`hf_pelrp.evaluation.canvas.place_on_canvas` (a 28x28 cut-out on black, so the mask ``pixel > 0`` is exact
and the garments do not line up with the 8x8 patch grid). The question names one occupied quadrant; the answer
is one class token. Everything is drawn from a generator seeded with ``seed`` and the canvas index, so any
canvas is reproducible on its own, and the training canvases (training split of Fashion-MNIST) never share a
garment image with the test canvases (test split).

The model is a ``LlavaForConditionalGeneration``: a CLIP vision tower (one channel, 8x8 patches, 64 patches),
LLaVA's MLP projector and a LLaMA text model over a 22-word vocabulary. The prompt is
``<s> <image> x 64 what is in the top left ?`` and the answer is the next-token logit at the last position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from .canvas import CanvasLayout, place_on_canvas

#: Fashion-MNIST's classes, one token each
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
SPECIALS = ("<pad>", "<s>", "<image>")
WORDS = ("what", "is", "in", "the", "top", "bottom", "left", "right", "?")
VOCAB = SPECIALS + WORDS + CLASSES
TOKEN = {word: i for i, word in enumerate(VOCAB)}
PAD, BOS, IMAGE = (TOKEN[s] for s in SPECIALS)
#: vocabulary id of each class's answer token
CLASS_TOKENS = torch.tensor([TOKEN[c] for c in CLASSES])
#: quadrant q lies at row q // 2, column q % 2 of the 2x2 layout
QUADRANT_WORDS = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))


@dataclass(frozen=True)
class QuadrantTask:
    """Canvas geometry: quadrant side (>= 28, a garment's size), patch size and the seed of the draws."""

    quadrant: int = 32
    patch: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.quadrant < 28:
            raise ValueError(f"a quadrant ({self.quadrant}) must hold a 28x28 garment: use quadrant >= 28")
        if (2 * self.quadrant) % self.patch:
            raise ValueError(
                f"the canvas side {2 * self.quadrant} must be a multiple of the patch {self.patch}"
            )

    @property
    def canvas(self) -> int:
        return 2 * self.quadrant

    @property
    def grid(self) -> tuple[int, int]:
        side = self.canvas // self.patch
        return side, side

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class QuadrantBatch:
    """Canvases with their questions, answers and masks.

    ``pixel_values`` [n, 1, C, C] in [0, 1] (black background); ``input_ids`` [n, T]; ``answer`` [n] the answer's
    vocabulary id; ``label`` [n] its class; ``asked`` [n] the asked quadrant; ``mask`` [n, C, C] the asked
    garment's exact pixels; ``others`` [n, C, C] the pixels of the other garments; ``quadrant_labels`` [n, 4]
    the class in each quadrant (-1: empty).
    """

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    answer: torch.Tensor
    label: torch.Tensor
    asked: torch.Tensor
    mask: torch.Tensor
    others: torch.Tensor
    quadrant_labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.answer)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """What the model takes (every row has the same length: no padding, the attention mask is all ones)."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": torch.ones_like(self.input_ids),
            "pixel_values": self.pixel_values,
        }


def prompt_ids(quadrant: int, task: QuadrantTask) -> torch.Tensor:
    """``<s> <image> x n_patches what is in the <row> <column> ?`` for quadrant 0..3."""
    if not 0 <= quadrant < 4:
        raise ValueError(
            f"quadrant must be 0..3 (top left, top right, bottom left, bottom right), got {quadrant}"
        )
    row, column = QUADRANT_WORDS[quadrant]
    words = ("what", "is", "in", "the", row, column, "?")
    return torch.tensor([BOS] + [IMAGE] * task.num_patches + [TOKEN[w] for w in words])


def quadrant_batch(
    images: torch.Tensor, labels: torch.Tensor, canvases: list[int] | range, task: QuadrantTask
) -> QuadrantBatch:
    """The canvases with indices ``canvases``, garments drawn from ``images`` (uint8 [N, 28, 28]) / ``labels``."""
    canvases = list(canvases)
    n, side, q = len(canvases), task.canvas, task.quadrant
    pixels = torch.zeros(n, 1, side, side)
    owner = torch.full((n, side, side), -1, dtype=torch.long)  # which quadrant's garment each pixel shows
    quadrant_labels = torch.full((n, 4), -1, dtype=torch.long)
    asked = torch.zeros(n, dtype=torch.long)
    layout = CanvasLayout(canvas=q, background="black", seed=task.seed)
    for row, c in enumerate(canvases):
        gen = torch.Generator().manual_seed(task.seed * 1_000_003 + c)
        count = int(torch.randint(2, 5, (1,), generator=gen))
        quads = torch.randperm(4, generator=gen)[:count].tolist()
        garments = torch.randint(0, len(images), (count,), generator=gen).tolist()
        asked[row] = quads[int(torch.randint(0, count, (1,), generator=gen))]
        placed, masks, _ = place_on_canvas(images, garments, layout)
        for quad, garment, tile, mask in zip(quads, garments, placed, masks, strict=True):
            top, left = (quad // 2) * q, (quad % 2) * q
            pixels[row, :, top : top + q, left : left + q] = tile
            owner[row, top : top + q, left : left + q][mask] = quad
            quadrant_labels[row, quad] = labels[garment]
    label = quadrant_labels[torch.arange(n), asked]
    mask = owner == asked[:, None, None]
    return QuadrantBatch(
        pixel_values=pixels,
        input_ids=torch.stack([prompt_ids(int(a), task) for a in asked]),
        answer=CLASS_TOKENS[label],
        label=label,
        asked=asked,
        mask=mask,
        others=(owner >= 0) & ~mask,
        quadrant_labels=quadrant_labels,
    )


def tiny_llava(
    task: QuadrantTask, hidden: int = 64, vision_layers: int = 3, text_layers: int = 2, seed: int = 0
) -> LlavaForConditionalGeneration:
    """An untrained LLaVA for the task (seeded): CLIP tower on one channel, every tower layer feeding the
    projector (``vision_feature_layer=-1``; LLaVA's default ``-2`` would leave the last layer unused), the CLS
    token dropped (LLaVA's ``"default"`` strategy: placeholder token i is patch i), LLaMA text model."""
    vision = CLIPVisionConfig(
        image_size=task.canvas,
        patch_size=task.patch,
        num_channels=1,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
    )
    text = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2 * (task.num_patches + 8),
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=PAD,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE,
        image_seq_length=task.num_patches,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def answer_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The next-token logits [B, V] at the last position (the answer)."""
    return model(**inputs, logits_to_keep=1).logits[:, -1]


def train_step(model: torch.nn.Module, batch: QuadrantBatch, optimizer: torch.optim.Optimizer) -> float:
    """One step of cross-entropy on the answer token; returns the loss."""
    model.train()
    loss = torch.nn.functional.cross_entropy(answer_logits(model, batch.model_inputs()), batch.answer)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def answer_accuracy(model: torch.nn.Module, batch: QuadrantBatch, chunk: int = 256) -> float:
    """Share of canvases whose arg-max next token (over the whole vocabulary) is the right class token."""
    model.eval()
    correct = 0
    inputs = batch.model_inputs()
    for start in range(0, len(batch), chunk):
        part = {k: v[start : start + chunk] for k, v in inputs.items()}
        correct += int((answer_logits(model, part).argmax(-1) == batch.answer[start : start + chunk]).sum())
    return correct / len(batch)
