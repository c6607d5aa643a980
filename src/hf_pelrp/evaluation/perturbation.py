"""Perturbation tests: token flipping for text (MoRF / LeRF / insertion) and patch perturbation for images.

Both run every perturbed copy of one sample through the model in a few batched forward passes and return the
curves (probability and logit of the explained class, and accuracy for images) plus their areas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .metrics import area_under_curve, perturbation_order, removal_masks
from .samples import Sample, explained_logits

TEXT_REPLACEMENTS = ("unk", "pad", "mask", "neutral")
IMAGE_REPLACEMENTS = ("zero", "mean", "blur")


def _unique_rows(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows of a boolean [R, N] matrix and, per row, the index of its distinct row.

    The curves share inputs (fraction 0 of MoRF and LeRF, the fully replaced input, ...): each distinct
    perturbed input runs through the model once.
    """
    unique, inverse = torch.unique(masks, dim=0, return_inverse=True)
    return unique, inverse


@torch.no_grad()
def _scores(model, sample: Sample, target: int, batch_inputs: dict, chunk: int) -> tuple[torch.Tensor, ...]:
    """Probability and logit of ``target`` and the argmax class for each row of ``batch_inputs``."""
    n = next(iter(batch_inputs.values())).shape[0]
    probs, logits, preds = [], [], []
    for start in range(0, n, chunk):
        part = {k: v[start : start + chunk] for k, v in batch_inputs.items()}
        out = explained_logits(model, sample, part).float()
        # scores are collected on the CPU, where the curves are indexed and the masks live
        probs.append(out.softmax(-1)[:, target].cpu())
        logits.append(out[:, target].cpu())
        preds.append(out.argmax(-1).cpu())
    return torch.cat(probs), torch.cat(logits), torch.cat(preds)


def token_flip(
    model: torch.nn.Module,
    sample: Sample,
    target: int,
    relevance: torch.Tensor,
    replacement_id: int,
    fracs: Sequence[float],
    chunk: int = 64,
) -> dict[str, object]:
    """The token-flip test of one sample (CP-LRP, Ali et al. 2022).

    For each fraction f, ``round(f * n)`` of the ``n`` perturbable tokens are replaced by ``replacement_id``:
    most relevant first (``morf``, lower area is better), least relevant first (``lerf``, higher is better);
    the ``insertion`` curve starts from all tokens replaced and restores the most relevant first (higher is
    better). Returns the curves (probability and logit of ``target``) and their areas.

    With one replacement token for both, the insertion curve at fraction f is the LeRF curve at 1 - f (the
    same tokens are kept), so the two areas coincide up to the rounding of ``f * n``; the insertion variant is
    reported because the protocol names it, not as independent evidence.
    """
    ids = sample.inputs["input_ids"]
    length = ids.shape[-1]
    if relevance.shape != (length,):
        raise ValueError(f"relevance has shape {tuple(relevance.shape)}, expected ({length},)")
    morf = perturbation_order(relevance, sample.allowed, most_relevant_first=True)
    lerf = perturbation_order(relevance, sample.allowed, most_relevant_first=False)
    removed = {
        "morf": removal_masks(morf, length, fracs),
        "lerf": removal_masks(lerf, length, fracs),
        # insertion: everything perturbable replaced, then the most relevant restored first
        "insertion": sample.allowed.bool()[None] & ~removal_masks(morf, length, fracs),
    }
    unique, inverse = _unique_rows(torch.cat(list(removed.values())))
    replace = torch.as_tensor(replacement_id, device=ids.device)
    batch_ids = torch.where(unique.to(ids.device), replace, ids.expand(unique.shape[0], -1))
    batch = {k: v.expand(unique.shape[0], *v.shape[1:]) for k, v in sample.inputs.items() if k != "input_ids"}
    batch["input_ids"] = batch_ids
    probs, logits, _ = _scores(model, sample, target, batch, chunk)
    probs, logits = probs[inverse], logits[inverse]
    result: dict[str, object] = {}
    xs = list(fracs)
    for i, name in enumerate(removed):
        rows = slice(i * len(xs), (i + 1) * len(xs))
        p, lg = probs[rows].tolist(), logits[rows].tolist()
        result[f"{name}_prob_curve"] = p
        result[f"{name}_logit_curve"] = lg
        result[f"{name}_prob_auc"] = area_under_curve(xs, p)
        result[f"{name}_logit_auc"] = area_under_curve(xs, lg)
    for unit in ("prob", "logit"):
        result[f"lerf_minus_morf_{unit}_auc"] = result[f"lerf_{unit}_auc"] - result[f"morf_{unit}_auc"]
    return result


def gaussian_blur(images: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] images (reflect padding, kernel radius 3 sigma)."""
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    pad = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(pad, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def replacement_image(pixels: torch.Tensor, kind: str) -> torch.Tensor:
    """What removed patches are replaced with: zeros, the image's per-channel mean, or a blurred copy."""
    if kind == "zero":
        return torch.zeros_like(pixels)
    if kind == "mean":
        return pixels.mean(dim=(-2, -1), keepdim=True).expand_as(pixels)
    if kind == "blur":
        return gaussian_blur(pixels)
    raise ValueError(f"unknown image replacement {kind!r}; choose one of {IMAGE_REPLACEMENTS}")


def patch_perturbation(
    model: torch.nn.Module,
    sample: Sample,
    target: int,
    relevance: torch.Tensor,
    patch: int,
    replacement: str,
    fracs: Sequence[float],
    chunk: int = 64,
) -> dict[str, object]:
    """Positive (most relevant first, lower area better) and negative (least relevant first, higher area
    better) perturbation of image patches; curves of the explained class's probability, its logit and of
    accuracy against ``sample.label``."""
    pixels = sample.inputs["pixel_values"]
    h, w = pixels.shape[-2:]
    grid = (h // patch, w // patch)
    n = grid[0] * grid[1]
    if relevance.shape != (n,):
        raise ValueError(f"relevance has shape {tuple(relevance.shape)}, expected ({n},) patches")
    fill = replacement_image(pixels, replacement)
    result: dict[str, object] = {}
    masks = []
    for first in (True, False):
        order = perturbation_order(relevance, sample.allowed, most_relevant_first=first)
        masks.append(removal_masks(order, n, fracs))
    unique, inverse = _unique_rows(torch.cat(masks))
    pixel_mask = F.interpolate(unique.float().view(-1, 1, *grid), scale_factor=patch, mode="nearest").bool()
    pixel_mask = pixel_mask.to(pixels.device)
    batch = torch.where(pixel_mask, fill, pixels)
    probs, logits, preds = _scores(model, sample, target, {"pixel_values": batch}, chunk)
    probs, logits, preds = probs[inverse], logits[inverse], preds[inverse]
    label = target if sample.label is None else sample.label
    correct = (preds == label).float()
    xs = list(fracs)
    for i, name in enumerate(("positive", "negative")):
        rows = slice(i * len(xs), (i + 1) * len(xs))
        p, lg, acc = probs[rows].tolist(), logits[rows].tolist(), correct[rows].tolist()
        result[f"{name}_prob_curve"] = p
        result[f"{name}_logit_curve"] = lg
        result[f"{name}_acc_curve"] = acc
        result[f"{name}_prob_auc"] = area_under_curve(xs, p)
        result[f"{name}_logit_auc"] = area_under_curve(xs, lg)
        result[f"{name}_acc_auc"] = area_under_curve(xs, acc)
    return result
