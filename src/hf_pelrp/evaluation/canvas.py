"""Localisation tasks for vision explanations: Fashion-MNIST garments placed at random positions of a larger
canvas, with the exact mask of where the garment lies (issue 20).

Two layouts, so that a rule is not tuned to one model and one image statistics:

- ``"black"``: a 28x28 garment on a black ``canvas x canvas`` image (the canvas of issue 20, 56x56). The
  background is exactly 0, so ``x * gradient`` maps are 0 there by construction.
- ``"noise"``: the same on a background of uniform noise in ``[0, noise]`` (seeded per image). The background
  is no longer 0, so a map must *find* the garment rather than inherit the zeros of the input.

Only the garment's pixels ``> 0`` are pasted (a cut-out: its own black pixels show the canvas's background), and
the mask is exactly those pixels, as in the original Fashion-MNIST ``pixel > 0`` mask. Placements and noise are drawn from a generator seeded with ``seed`` and the
image index, so any subset of a split is reproducible on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("black", "noise")


@dataclass(frozen=True)
class CanvasLayout:
    """How garments are placed: canvas side, background kind and noise amplitude, and the seed."""

    canvas: int = 56
    background: str = "black"
    noise: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.background not in LAYOUTS:
            raise ValueError(f"background must be one of {LAYOUTS}, got {self.background!r}")
        if self.canvas < 28:
            raise ValueError(f"the canvas ({self.canvas}) must be at least 28 pixels, the garment's size")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")


def place_on_canvas(
    images: torch.Tensor, indices: torch.Tensor | list[int], layout: CanvasLayout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place ``images[indices]`` (uint8 [N, 28, 28]) on canvases.

    Returns
    -------
    pixels : FloatTensor [n, 1, C, C]
        The canvases in [0, 1] (garment pixels as they are, background 0 or noise).
    masks : BoolTensor [n, C, C]
        Where the placed garment's pixels ``> 0`` are.
    offsets : LongTensor [n, 2]
        The (row, column) of each garment's top-left corner.
    """
    indices = torch.as_tensor(indices, dtype=torch.long)
    size = layout.canvas
    n = len(indices)
    pixels = torch.zeros(n, 1, size, size)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    offsets = torch.zeros(n, 2, dtype=torch.long)
    for row, index in enumerate(indices.tolist()):
        # one generator per image: the canvas of image i does not depend on which other images are drawn
        gen = torch.Generator().manual_seed(layout.seed * 1_000_003 + index)
        top, left = torch.randint(0, size - 28 + 1, (2,), generator=gen).tolist()
        if layout.background == "noise":
            pixels[row, 0] = layout.noise * torch.rand(size, size, generator=gen)
        garment = images[index].float() / 255.0
        inside = images[index] > 0
        region = pixels[row, 0, top : top + 28, left : left + 28]
        region[inside] = garment[inside]
        masks[row, top : top + 28, left : left + 28] = inside
        offsets[row] = torch.tensor([top, left])
    return pixels, masks, offsets
