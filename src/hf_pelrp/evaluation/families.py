"""Metric families: each turns one explanation of one sample into scores (and curves), and says how its table
reads. A task's configuration lists the families it runs (``metrics:``); a method that lacks the map a family
needs (a position map, a token ranking) is simply absent from that family's table.

| Family | Needs | What it measures |
|---|---|---|
| ``token_flip`` | units | replace tokens by a replacement token, MoRF / LeRF / insertion (CP-LRP protocol) |
| ``perturbation`` | units, pixels | vision: patch perturbation and the segmentation-style test |
| ``position_flip`` | position | remove the positional information of slots, MoRF / LeRF (:mod:`.positions`) |
| ``position_flip_layer`` | position_by_layer | the same per (layer, slot) cell (rotary) |
| ``token_position_flip`` | units | delete tokens and renumber the rest: content and position go together |
| ``paper_flip`` | units | the PE-LRP paper's generate / pruning protocol (:mod:`.paper_protocol`) |
| ``ground_truth`` | units and / or position | hit rate, rank and mass on known positions (:mod:`.ground_truth`) |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._engine_gaps import positional_site
from .ground_truth import ground_truth_scores
from .metrics import fractions
from .paper_protocol import PAPER_FRACTIONS, paper_flip
from .perturbation import patch_perturbation, token_flip
from .positions import check_removal, default_removal, position_flip, token_position_flip
from .segmentation import segmentation_scores

UP, DOWN = "↑", "↓"


@dataclass(frozen=True)
class Family:
    """A metric family: ``run(task, sample, target, explanation, config) -> scores and curves, or None``,
    its table columns ``(key, title, direction)`` and its plot panels (curve keys, one row per list)."""

    name: str
    title: str
    run: Callable[..., dict[str, Any] | None]
    columns: list[tuple[str, str, str]]
    panels: list[list[str]]


def _flip_columns(prefix: str, label: str) -> list[tuple[str, str, str]]:
    cols = []
    for unit in ("prob", "logit"):
        cols += [
            (f"{prefix}morf_{unit}_auc", f"{label}MoRF {unit}", DOWN),
            (f"{prefix}lerf_{unit}_auc", f"{label}LeRF {unit}", UP),
            (f"{prefix}lerf_minus_morf_{unit}_auc", f"{label}LeRF−MoRF {unit}", UP),
        ]
    return cols


def _flip_panels(prefix: str) -> list[list[str]]:
    return [[f"{prefix}{c}_{u}_curve" for c in ("morf", "lerf")] for u in ("prob", "logit")]


def removal_of(task, config: dict) -> str:
    """The position removal of a task: ``position_removal`` in its configuration, else the kind's default."""
    site = positional_site(task.model)
    how = config.get("position_removal") or default_removal(site)
    check_removal(site, how)
    return how


def _steps(config: dict) -> list[float]:
    return fractions(int(config.get("steps", 11)))


def curve_fractions(kind: str, config: dict) -> list[float]:
    """The x values of a task's curves (the paper protocol's are always :data:`PAPER_FRACTIONS`)."""
    if kind == "vision":
        return fractions(int(config.get("vision_steps", 9)), 0.1, 0.9)
    return _steps(config)


def _token_flip(task, sample, target, exp, config):
    if exp.units is None:
        return None
    return token_flip(task.model, sample, target, exp.units, task.replacement_id, _steps(config))


def _perturbation(task, sample, target, exp, config):
    if exp.units is None:
        return None
    from .methods import _spread

    fr = curve_fractions("vision", config)
    model = task.model
    patch = int(model.config.patch_size)
    result = patch_perturbation(model, sample, target, exp.units, patch, task.image_replacement, fr)
    pixels = exp.pixels
    if pixels is None:
        h, w = sample.mask.shape
        pixels = _spread(exp.units, patch, (h // patch, w // patch))
    result.update(segmentation_scores(pixels, sample.mask))
    return result


def _position_flip(task, sample, target, exp, config):
    if exp.position is None:
        return None
    return position_flip(task.model, sample, target, exp.position, removal_of(task, config), _steps(config))


def _position_flip_layer(task, sample, target, exp, config):
    if exp.position_by_layer is None:
        return None
    how = removal_of(task, config)
    return position_flip(
        task.model, sample, target, exp.position_by_layer, how, _steps(config), prefix="poslayer"
    )


def _token_position_flip(task, sample, target, exp, config):
    if exp.units is None:
        return None
    return token_position_flip(task.model, sample, target, exp.units, _steps(config))


def _paper_flip(task, sample, target, exp, config):
    if exp.units is None:
        return None
    replacement = task.paper_replacement_id
    if replacement is None:
        raise ValueError(
            f"task {task.name}: the paper protocol needs a tokenizer (or `paper_replacement: ID`)"
        )
    return paper_flip(task.model, sample, target, exp.units, replacement, PAPER_FRACTIONS)


def _ground_truth(task, sample, target, exp, config):
    truth = sample.ground_truth
    if truth is None:
        raise ValueError(f"task {task.name}: samples have no ground-truth positions")
    out = {}
    for name, relevance in (("units", exp.units), ("pos", exp.position)):
        if relevance is not None:
            for key, value in ground_truth_scores(relevance, truth, sample.allowed).items():
                out[f"gt_{name}_{key}"] = value
    return out


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "token_flip",
            "Token flipping (content replaced, position kept)",
            _token_flip,
            [
                ("morf_prob_auc", "MoRF AUC prob", DOWN),
                ("lerf_prob_auc", "LeRF AUC prob", UP),
                ("lerf_minus_morf_prob_auc", "LeRF−MoRF prob", UP),
                ("morf_logit_auc", "MoRF AUC logit", DOWN),
                ("lerf_logit_auc", "LeRF AUC logit", UP),
                ("lerf_minus_morf_logit_auc", "LeRF−MoRF logit", UP),
                ("insertion_prob_auc", "Insertion AUC prob", UP),
                ("insertion_logit_auc", "Insertion AUC logit", UP),
            ],
            [
                ["morf_prob_curve", "lerf_prob_curve", "insertion_prob_curve"],
                ["morf_logit_curve", "lerf_logit_curve", "insertion_logit_curve"],
            ],
        ),
        Family(
            "perturbation",
            "Patch perturbation and segmentation",
            _perturbation,
            [
                ("positive_prob_auc", "Pos. AUC prob", DOWN),
                ("negative_prob_auc", "Neg. AUC prob", UP),
                ("positive_acc_auc", "Pos. AUC acc", DOWN),
                ("negative_acc_auc", "Neg. AUC acc", UP),
                ("pixel_accuracy", "Pixel acc.", UP),
                ("miou", "mIoU", UP),
                ("average_precision", "mAP", UP),
                ("mass_inside", "Mass in mask", UP),
            ],
            [["positive_prob_curve", "negative_prob_curve", "positive_acc_curve", "negative_acc_curve"]],
        ),
        Family(
            "position_flip",
            "Position flipping (positional information of slots removed, content kept)",
            _position_flip,
            _flip_columns("pos_", ""),
            _flip_panels("pos_"),
        ),
        Family(
            "position_flip_layer",
            "Per-layer position flipping ((layer, slot) rotary cells removed)",
            _position_flip_layer,
            _flip_columns("poslayer_", ""),
            _flip_panels("poslayer_"),
        ),
        Family(
            "token_position_flip",
            "Token and position deleted together (the rest renumbered)",
            _token_position_flip,
            _flip_columns("tokpos_", ""),
            _flip_panels("tokpos_"),
        ),
        Family(
            "paper_flip",
            "The PE-LRP paper's protocol (generate / pruning)",
            _paper_flip,
            [
                ("paper_generate_au_ac", "Generate AU-AC", UP),
                ("paper_generate_au_mse", "Generate AU-MSE", DOWN),
                ("paper_pruning_au_ac", "Pruning AU-AC", UP),
                ("paper_pruning_au_mse", "Pruning AU-MSE", DOWN),
                ("paper_lerf", "LERF", DOWN),
                ("paper_merf", "MERF", UP),
            ],
            [
                ["paper_generate_prob_curve", "paper_generate_mse_curve", "paper_generate_logit_curve"],
                ["paper_pruning_prob_curve", "paper_pruning_mse_curve", "paper_generate_least_logit_curve"],
            ],
        ),
        Family(
            "ground_truth",
            "Positional ground truth (hit@|GT|, mean rank 0 = first, positive mass on GT)",
            _ground_truth,
            [
                ("gt_pos_hit", "Position hit", UP),
                ("gt_pos_rank", "Position rank", DOWN),
                ("gt_pos_mass", "Position mass", UP),
                ("gt_units_hit", "Token+pos. hit", UP),
                ("gt_units_rank", "Token+pos. rank", DOWN),
                ("gt_units_mass", "Token+pos. mass", UP),
            ],
            [],
        ),
    )
}

DEFAULT_FAMILIES = {"text": ["token_flip"], "vision": ["perturbation"]}


def task_families(kind: str, config: dict) -> list[str]:
    """The metric families of a task (its configuration's ``metrics``, else the default for its kind)."""
    names = list(config.get("metrics") or DEFAULT_FAMILIES[kind])
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown metric families {unknown}; known: {list(FAMILIES)}")
    return names
