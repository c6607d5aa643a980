"""What the image views show of one row of a vision attribution (ViT / DeiT): the input image and the maps on
it, as numpy arrays; and a small PNG encoder for embedding them in HTML (no imaging library needed).

Maps: ``pixel`` (``pixel_map``, the input resolution), ``patch`` (``patch_map``: token + position relevance of
each patch), ``token`` and ``position`` (the two parts on the patch grid). Prefix tokens (``[CLS]``, DeiT's
``[DIST]``) have no place on the grid; their relevance is listed.
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import AttributionInputError

#: map key -> the name shown to the user, in display order
IMAGE_MAPS = {
    "pixel": "pixel",
    "patch": "patch (token + position)",
    "token": "token (patch content)",
    "position": "position",
}

#: prefix token names by count: ViT has [CLS], DeiT [CLS] and [DIST]
_PREFIX_NAMES = ("[CLS]", "[DIST]")


def is_vision(attr: Any) -> bool:
    """Whether ``attr`` is an attribution of an image model (it carries a ``patch_map`` or ``pixel_map``)."""
    extras = getattr(attr, "extras", None) or {}
    return "patch_map" in extras or "pixel_map" in extras


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def image_array(image: Any) -> np.ndarray:
    """An image as a float array in [0, 1], ``[H, W, 3]`` or ``[H, W]``.

    Accepts a PIL image, a numpy array or a tensor in ``HWC``, ``CHW`` or ``HW`` layout (``uint8`` or float;
    float images outside [0, 1], such as normalised ``pixel_values``, are min-max scaled per channel).
    """
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL without importing it
        image = np.asarray(image.convert("RGB"))
    arr = _as_numpy(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise AttributionInputError(
            f"image must be [H, W], [H, W, 3] or [3, H, W] (a PIL image, array or tensor), got shape {arr.shape}"
        )
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if arr.min() < 0 or arr.max() > 1:
        axes = (0, 1)
        lo, hi = arr.min(axis=axes, keepdims=True), arr.max(axis=axes, keepdims=True)
        arr = (arr - lo) / np.where(hi > lo, hi - lo, 1.0)
    return arr


def grey(image: np.ndarray) -> np.ndarray:
    """The luminance of an ``[H, W, 3]`` image (an ``[H, W]`` image is returned as it is)."""
    return image if image.ndim == 2 else image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _row_map(value: Any, row: int, name: str, batch: int) -> np.ndarray:
    arr = _as_numpy(value)
    if arr.ndim >= 2 and arr.shape[0] == batch:
        arr = arr[row]
    if name == "pixel_map" and arr.ndim == 3:  # [C, H, W]: relevance of a pixel is the sum over its channels
        arr = arr.sum(0)
    if name == "patch_map" and arr.ndim == 1:
        side = math.isqrt(arr.shape[0])
        if side * side != arr.shape[0]:
            raise AttributionInputError(f"patch_map of {arr.shape[0]} patches is not a square grid")
        arr = arr.reshape(side, side)
    if arr.ndim != 2:
        raise AttributionInputError(
            f"{name} must be [B, H, W] (or [B, N] patches), got shape {_as_numpy(value).shape}"
        )
    return arr


def _grid_shape(attr: Any, patch: np.ndarray | None) -> tuple[int, int] | None:
    if patch is not None:
        return int(patch.shape[0]), int(patch.shape[1])
    seq = attr.token.shape[-1]
    for prefix in (1, 2, 0):  # CLS; CLS + distillation (DeiT); no prefix
        side = math.isqrt(max(seq - prefix, 0))
        if side > 0 and side * side == seq - prefix:
            return side, side
    return None


def _stored_image(attr: Any, row: int) -> Any:
    pixels = attr.extras.get("pixel_values")
    if isinstance(pixels, torch.Tensor) and pixels.dim() == 4:
        return pixels[row]
    return pixels


@dataclass
class ImageView:
    """One row of a vision attribution, ready to draw.

    Attributes
    ----------
    row : int
        Index of the row in the batch.
    picture : ndarray or None
        The input image in [0, 1], ``[H, W, 3]`` or ``[H, W]``, if one was given or kept.
    maps : dict[str, ndarray]
        ``pixel`` ``[H, W]`` (when the attribution has a ``pixel_map``), ``patch``, ``token``, ``position``
        ``[h, w]`` on the patch grid; keys in :data:`IMAGE_MAPS` order.
    grid : tuple[int, int]
        The patch grid ``(h, w)``.
    prefix : list[tuple[str, float, float]]
        Name, token relevance and position relevance of each prefix token (``[CLS]``, ``[DIST]``).
    height, width : int
        The frame every map is drawn in: the image's size, else the pixel map's, else the grid's.
    """

    row: int
    picture: np.ndarray | None
    maps: dict[str, np.ndarray]
    grid: tuple[int, int]
    prefix: list[tuple[str, float, float]]
    height: int
    width: int


def _images_per_row(image: Any, batch: int) -> list[Any]:
    if image is None:
        return [None] * batch
    if isinstance(image, Sequence) and not isinstance(image, str | bytes):
        images = list(image)
        if len(images) != batch:
            raise AttributionInputError(
                f"image= is a list of {len(images)} images, but the attribution has {batch} rows; give one "
                "image per row"
            )
        return images
    if isinstance(image, torch.Tensor | np.ndarray) and image.ndim == 4:
        if image.shape[0] != batch:
            raise AttributionInputError(
                f"image= holds {image.shape[0]} images, but the attribution has {batch} rows"
            )
        return list(image)
    if batch != 1:
        raise AttributionInputError(
            f"the attribution has {batch} rows: give image= as a list of {batch} images (one per row)"
        )
    return [image]


def image_view(attr: Any, row: int, image: Any = None) -> ImageView:
    """The :class:`ImageView` of row ``row`` of a vision attribution; ``image`` is that row's input image
    (PIL, array or tensor), else ``attr.extras["pixel_values"]`` if kept, else none (the maps alone).

    Raises
    ------
    AttributionInputError
        The positions cannot be laid on a patch grid, or a map or the image has an unusable shape.
    """
    batch = attr.batch_size
    pixel = (
        _row_map(attr.extras["pixel_map"], row, "pixel_map", batch) if "pixel_map" in attr.extras else None
    )
    patch = (
        _row_map(attr.extras["patch_map"], row, "patch_map", batch) if "patch_map" in attr.extras else None
    )
    grid = _grid_shape(attr, patch)
    if grid is None:
        raise AttributionInputError(
            f"cannot lay {attr.token.shape[-1]} positions on a square patch grid; the attribution needs a patch_map"
        )
    n_patches = grid[0] * grid[1]
    token = _as_numpy(attr.token[row])
    position = _as_numpy(attr.position[row])
    prefix = position.shape[0] - n_patches
    if prefix < 0:
        raise AttributionInputError(
            f"{position.shape[0]} positions cannot hold a {grid[0]}x{grid[1]} patch grid"
        )
    names = list(_PREFIX_NAMES[:prefix]) + [f"[SPECIAL{i}]" for i in range(len(_PREFIX_NAMES), prefix)]
    token_grid = token[prefix:].reshape(grid)
    position_grid = position[prefix:].reshape(grid)
    maps: dict[str, np.ndarray] = {}
    if pixel is not None:
        maps["pixel"] = pixel
    maps["patch"] = patch if patch is not None else token_grid + position_grid
    maps["token"] = token_grid
    maps["position"] = position_grid

    source = image if image is not None else _stored_image(attr, row)
    picture = image_array(source) if source is not None else None
    if picture is not None:
        height, width = picture.shape[:2]
    elif pixel is not None:
        height, width = pixel.shape
    else:
        height, width = grid
    return ImageView(
        row=row,
        picture=picture,
        maps=maps,
        grid=grid,
        prefix=[(names[i], float(token[i]), float(position[i])) for i in range(prefix)],
        height=int(height),
        width=int(width),
    )


def image_views(attr: Any, image: Any = None) -> list[ImageView]:
    """One :class:`ImageView` per row; ``image`` is one image (a batch of 1) or one per row (a list, or a
    ``[B, C, H, W]`` tensor / array)."""
    return [image_view(attr, r, im) for r, im in enumerate(_images_per_row(image, attr.batch_size))]


# ---- PNG, for embedding in HTML ----------------------------------------------------------------------------


def png_bytes(pixels: np.ndarray) -> bytes:
    """A PNG file of a ``uint8`` image: ``[H, W]`` (grey), ``[H, W, 3]`` (RGB) or ``[H, W, 4]`` (RGBA)."""
    arr = np.ascontiguousarray(pixels)
    if arr.dtype != np.uint8:
        raise ValueError(f"png_bytes takes uint8 pixels, got {arr.dtype}")
    channels = 1 if arr.ndim == 2 else arr.shape[-1] if arr.ndim == 3 else 0
    colour_type = {1: 0, 3: 2, 4: 6}.get(channels)  # PNG colour types: grey, RGB, RGBA
    if colour_type is None:
        raise ValueError(f"png_bytes takes [H, W], [H, W, 3] or [H, W, 4] pixels, got shape {arr.shape}")
    height, width = arr.shape[:2]
    rows = arr.reshape(height, -1)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))  # filter type 0 on every scanline

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def png_data_url(pixels: np.ndarray) -> str:
    """``data:image/png;base64,...`` of :func:`png_bytes` (the only kind of image the report's
    Content-Security-Policy allows)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode("ascii")


def picture_pixels(picture: np.ndarray) -> np.ndarray:
    """An image in [0, 1] as ``uint8`` pixels for :func:`png_bytes`."""
    return np.rint(np.clip(picture, 0.0, 1.0) * 255.0).astype(np.uint8)
