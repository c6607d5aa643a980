"""What the reports show of a vision-language model's image (issue 19): per explained row, the patch maps of
the image (``image``: each patch's content, ``image_position``: the tower's positions) on the patch grid
(``image_grid``), the tower's special tokens, and the image's share next to the text's.

The result holds no pixels (it would double its size and tie it to one processor's layout): the reports take
the image to draw the maps on as ``image=`` (the pipeline returns the image as the model saw it, resized and
cropped, as ``out["image"]``). Without one, the maps are drawn alone. Shapes only; the HTML and the figures
are made in :mod:`hf_pelrp.viz.html` and :mod:`hf_pelrp.viz.image`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import AttributionInputError
from .vision import _as_numpy, _images_per_row, image_array

#: map key -> the name shown to the user, in display order
VLM_MAPS = {
    "image": "image patches (content)",
    "image_position": "image positions",
}


def is_vlm(attr: Any) -> bool:
    """Whether ``attr`` explains a vision-language model's answer over an image (it carries ``image``)."""
    return getattr(attr, "image", None) is not None


@dataclass
class ImagePanel:
    """The image part of one explained row, ready to draw.

    Attributes
    ----------
    row : int
        The row of the attribution (a batch row, or a continuation token).
    maps : dict[str, ndarray]
        ``image`` and, where the tower has position leaves, ``image_position``, each ``[rows, columns]`` of the
        patch grid; keys in :data:`VLM_MAPS` order.
    grid : tuple[int, int]
        The patch grid (rows, columns).
    picture : ndarray or None
        The image in [0, 1] (``[H, W, 3]`` or ``[H, W]``), if one was given.
    special : float
        The relevance of the tower's special tokens (CLIP's class token), 0 where it has none.
    text_total, image_total : float
        The relevance of the text (tokens and positions) and of the image (patches, positions, special tokens).
    height, width : int
        The frame the maps are drawn in: the image's size, else the grid's.
    """

    row: int
    maps: dict[str, np.ndarray]
    grid: tuple[int, int]
    picture: np.ndarray | None
    special: float
    text_total: float
    image_total: float
    height: int
    width: int


def _grid(attr: Any, row: int) -> tuple[int, int]:
    grid = _as_numpy(attr.image_grid)
    grid = grid[row] if grid.ndim == 2 and grid.shape[0] > row else grid.reshape(-1)[:2]
    rows, cols = int(grid[0]), int(grid[1])
    patches = attr.image.shape[-1]
    if rows * cols != patches:
        raise AttributionInputError(
            f"image_grid {rows} x {cols} does not hold the {patches} patches of the image map"
        )
    return rows, cols


def image_panel(attr: Any, row: int, image: Any = None) -> ImagePanel:
    """The :class:`ImagePanel` of row ``row`` of a vision-language attribution (an
    :class:`~hf_pelrp.Attribution` row or a :class:`~hf_pelrp.GenerationAttribution` continuation token);
    ``image`` is the picture to draw the maps on (PIL, array or tensor), or None.

    Raises
    ------
    AttributionInputError
        ``attr`` has no image maps, or its grid does not fit them.
    """
    if not is_vlm(attr):
        raise AttributionInputError(
            "this attribution has no image maps (it is not from a vision-language model)"
        )
    grid = _grid(attr, row)
    maps = {"image": _as_numpy(attr.image[row]).reshape(grid)}
    if attr.image_position is not None:
        maps["image_position"] = _as_numpy(attr.image_position[row]).reshape(grid)
    special = 0.0 if attr.image_special is None else float(_as_numpy(attr.image_special[row]))
    picture = image_array(image) if image is not None else None
    height, width = picture.shape[:2] if picture is not None else grid
    return ImagePanel(
        row=row,
        maps=maps,
        grid=grid,
        picture=picture,
        special=special,
        text_total=float(_as_numpy(attr.relevance[row]).sum()),
        image_total=float(_as_numpy(attr.image_total[row])),
        height=int(height),
        width=int(width),
    )


def image_panels(attr: Any, image: Any = None) -> list[ImagePanel]:
    """One :class:`ImagePanel` per row. A batch takes one image per row (a list, or a ``[B, C, H, W]`` tensor /
    array; one image for a batch of 1); a continuation (:class:`~hf_pelrp.GenerationAttribution`) has one
    image, shared by all its rows."""
    rows = attr.token.shape[0]
    if getattr(attr, "prompt_length", None) is not None:  # a continuation: one prompt, one image
        if isinstance(image, list | tuple):
            raise AttributionInputError(
                f"a continuation explains one prompt: give image= as one image, not a list of {len(image)}"
            )
        return [image_panel(attr, r, image) for r in range(rows)]
    return [image_panel(attr, r, im) for r, im in enumerate(_images_per_row(image, rows))]
