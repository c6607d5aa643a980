"""The segmentation-style test: how well a pixel relevance map matches a ground-truth object mask."""

from __future__ import annotations

import torch

from .metrics import average_precision, mean_iou, pixel_accuracy, relevance_mass_inside, threshold_at_mean


def segmentation_scores(pixel_map: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Pixel accuracy and mIoU of the map thresholded at its mean, average precision of the soft map, and the
    share of positive relevance inside the mask, for one [H, W] map and its [H, W] boolean mask."""
    binary = threshold_at_mean(pixel_map)
    return {
        "pixel_accuracy": pixel_accuracy(binary, mask),
        "miou": mean_iou(binary, mask),
        "average_precision": average_precision(pixel_map, mask),
        "mass_inside": relevance_mass_inside(pixel_map, mask),
    }
