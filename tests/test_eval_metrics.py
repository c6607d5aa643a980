"""Metric functions of the evaluation suite on hand-made curves, maps and toy models with known answers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from hf_pelrp.evaluation.methods import captum_integrated_gradients, integrated_gradients
from hf_pelrp.evaluation.metrics import (
    area_under_curve,
    average_precision,
    fractions,
    mean_confidence_interval,
    mean_iou,
    perturbation_order,
    pixel_accuracy,
    relevance_mass_inside,
    removal_masks,
    threshold_at_mean,
)
from hf_pelrp.evaluation.perturbation import gaussian_blur, patch_perturbation, replacement_image, token_flip
from hf_pelrp.evaluation.report import summarise
from hf_pelrp.evaluation.samples import Sample
from hf_pelrp.evaluation.segmentation import segmentation_scores


def test_fractions():
    assert fractions() == [i / 10 for i in range(11)]
    assert fractions(9, 0.1, 0.9) == pytest.approx([0.1 * i for i in range(1, 10)])
    with pytest.raises(ValueError):
        fractions(1)


def test_area_under_curve_known_values():
    xs = fractions()
    assert area_under_curve(xs, [0.7] * 11) == pytest.approx(0.7)
    assert area_under_curve(xs, xs) == pytest.approx(0.5)
    assert area_under_curve([0, 0.5, 1], [1, 0, 1]) == pytest.approx(0.5)
    # normalised by the x-range: a line on [0.1, 0.9] has the mean of its end points
    assert area_under_curve([0.1, 0.5, 0.9], [1.0, 0.6, 0.2]) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="increasing"):
        area_under_curve([0, 0.5, 0.5], [1, 1, 1])
    with pytest.raises(ValueError, match="same length"):
        area_under_curve([0, 1], [1])


def test_perturbation_order_respects_allowed_and_ties():
    rel = torch.tensor([0.5, 2.0, -1.0, 2.0, 9.0])
    allowed = torch.tensor([True, True, True, True, False])
    assert perturbation_order(rel, allowed, True).tolist() == [1, 3, 0, 2]
    assert perturbation_order(rel, allowed, False).tolist() == [2, 0, 1, 3]


def test_removal_masks_counts():
    order = torch.tensor([3, 1, 0, 2, 4])
    masks = removal_masks(order, 6, [0.0, 0.2, 0.5, 1.0])
    assert masks.sum(1).tolist() == [0, 1, 3, 5]  # 2.5 rounds half up
    assert masks[1].nonzero().flatten().tolist() == [3]
    assert not masks[:, 5].any()


def test_threshold_accuracy_iou():
    rel = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [False, False]])
    pred = threshold_at_mean(rel)
    assert pred.tolist() == [[True, False], [False, False]]
    assert pixel_accuracy(pred, mask) == pytest.approx(0.75)
    # object IoU 1/2, background IoU 2/3
    assert mean_iou(pred, mask) == pytest.approx((0.5 + 2 / 3) / 2)
    assert mean_iou(mask, mask) == 1.0


def test_average_precision_known_values():
    labels = torch.tensor([True, False, True, False])
    assert average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), labels) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision(torch.tensor([0.9, 0.1, 0.7, 0.2]), labels) == pytest.approx(1.0)
    # tied scores enter together: precision 1/2 at recall 1/2, then 2/3 at recall 1
    tied = average_precision(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([True, False, True]))
    assert tied == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    with pytest.raises(ValueError, match="without object"):
        average_precision(torch.ones(3), torch.zeros(3, dtype=torch.bool))


def test_relevance_mass_inside():
    rel = torch.tensor([[2.0, -1.0], [1.0, 1.0]])
    mask = torch.tensor([[True, False], [False, True]])
    assert relevance_mass_inside(rel, mask) == pytest.approx(0.75)
    assert relevance_mass_inside(-rel.abs(), mask) == 0.0


def test_segmentation_scores_of_perfect_map():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1:3, 1:3] = True
    scores = segmentation_scores(mask.float() * 3.0, mask)
    assert scores == {"pixel_accuracy": 1.0, "miou": 1.0, "average_precision": 1.0, "mass_inside": 1.0}


def test_mean_confidence_interval():
    mean, ci = mean_confidence_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    # Student's t with 2 degrees of freedom (4.3027), not the normal 1.96: three values say little
    assert ci == pytest.approx(4.302652730 / math.sqrt(3), rel=1e-6)
    assert math.isnan(mean_confidence_interval([4.0])[1])


class _SumModel(torch.nn.Module):
    """Class-0 logit = sum of per-id weights of the tokens present; class-1 logit = 0."""

    def __init__(self, weights):
        super().__init__()
        self.weights = torch.as_tensor(weights, dtype=torch.float32)

    def forward(self, input_ids, attention_mask=None):
        s = self.weights[input_ids].sum(-1)
        return SimpleNamespace(logits=torch.stack([s, torch.zeros_like(s)], -1))


def test_token_flip_on_additive_model():
    weights = [0.0, 3.0, 2.0, 1.0, -1.0]  # id 0 is the replacement token (weight 0)
    model = _SumModel(weights)
    ids = torch.tensor([[1, 2, 3, 4]])
    sample = Sample(
        0, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.ones(4, dtype=torch.bool)
    )
    exact = torch.tensor([3.0, 2.0, 1.0, -1.0])
    out = token_flip(model, sample, 0, exact, 0, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert out["morf_logit_curve"] == pytest.approx([5, 2, 0, -1, 0])
    assert out["lerf_logit_curve"] == pytest.approx([5, 6, 5, 3, 0])
    assert out["insertion_logit_curve"] == pytest.approx([0, 3, 5, 6, 5])
    assert out["morf_prob_curve"][0] == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item())
    assert out["lerf_minus_morf_logit_auc"] == pytest.approx(out["lerf_logit_auc"] - out["morf_logit_auc"])
    assert out["morf_logit_auc"] == pytest.approx((3.5 + 1 - 0.5 - 0.5) / 4)
    # the exact relevance beats its reverse
    worse = token_flip(model, sample, 0, -exact, 0, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert worse["morf_logit_auc"] > out["morf_logit_auc"]


class _PatchModel(torch.nn.Module):
    """Logit of class 0 = sum of the pixels of the top-left 2x2 patch; class 1 = 0.5."""

    config = SimpleNamespace(patch_size=2)

    def forward(self, pixel_values):
        s = pixel_values[:, 0, :2, :2].sum((-2, -1))
        return SimpleNamespace(logits=torch.stack([s, torch.full_like(s, 0.5)], -1))


def test_patch_perturbation_on_known_model():
    img = torch.ones(1, 1, 4, 4)
    sample = Sample(
        0,
        {"pixel_values": img},
        torch.ones(4, dtype=torch.bool),
        label=0,
        mask=torch.ones(4, 4, dtype=torch.bool),
    )
    relevance = torch.tensor([4.0, 0.0, 0.0, 0.0])
    out = patch_perturbation(_PatchModel(), sample, 0, relevance, 2, "zero", [0.25, 0.5, 0.75])
    assert out["positive_acc_curve"] == [0.0, 0.0, 0.0]
    assert out["negative_acc_curve"] == [1.0, 1.0, 1.0]
    assert out["negative_prob_auc"] > out["positive_prob_auc"]
    # the logit of class 0 is the top-left patch's pixel sum: 0 once it is removed, 4 while it stays
    assert out["positive_logit_curve"] == [0.0, 0.0, 0.0]
    assert out["negative_logit_curve"] == [4.0, 4.0, 4.0]
    assert out["positive_logit_auc"] == 0.0 and out["negative_logit_auc"] == pytest.approx(4.0)


def test_replacement_images():
    img = torch.rand(1, 1, 8, 8)
    assert torch.equal(replacement_image(img, "zero"), torch.zeros_like(img))
    assert torch.allclose(replacement_image(img, "mean"), img.mean().expand_as(img))
    const = torch.full((1, 2, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(const), const)
    with pytest.raises(ValueError, match="unknown image replacement"):
        replacement_image(img, "noise")


def test_integrated_gradients_quadratic_is_exact_and_complete():
    x = torch.tensor([[1.0, -2.0, 0.5]])
    ig = integrated_gradients(lambda p: (p**2).sum(-1), x, torch.zeros_like(x), steps=4)
    assert torch.allclose(ig, x[0] ** 2)  # midpoint rule is exact for the linear integrand 2 a x^2


def test_integrated_gradients_completeness_nonlinear():
    torch.manual_seed(0)
    w = torch.randn(6)
    f = lambda p: torch.tanh(p @ w) * 3.0  # noqa: E731
    x, base = torch.randn(1, 6), torch.randn(1, 6)
    ig = integrated_gradients(f, x, base, steps=64)
    assert ig.sum().item() == pytest.approx((f(x) - f(base)).item(), abs=1e-3)


def test_captum_integrated_gradients_equals_the_explicit_midpoint_rule():
    torch.manual_seed(0)
    w = torch.randn(6, 3)
    f = lambda p: torch.tanh(p @ w).pow(2).sum(-1)  # noqa: E731
    x, base = torch.randn(1, 6), torch.randn(1, 6)
    for steps in (2, 7, 16):
        ours = integrated_gradients(f, x, base, steps)
        torch.testing.assert_close(captum_integrated_gradients(f, x, base, steps), ours, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="steps >= 2"):
        captum_integrated_gradients(f, x, base, 1)


def test_paired_summary_directions():
    records = [
        {"sample": s, "method": m, "scores": {"morf_prob_auc": v, **{k: 0.0 for k in keys}}}
        for s, (a, b) in enumerate([(0.1, 0.3), (0.2, 0.5), (0.15, 0.35)])
        for m, v in (("attnlrp_pe", a), ("attnlrp", b))
        for keys in [
            [
                "lerf_prob_auc",
                "lerf_minus_morf_prob_auc",
                "morf_logit_auc",
                "lerf_logit_auc",
                "lerf_minus_morf_logit_auc",
                "insertion_prob_auc",
                "insertion_logit_auc",
            ]
        ]
    ]
    summary = summarise(records, ["attnlrp_pe", "attnlrp"], "text")
    diff = summary["paired"]["attnlrp_pe - attnlrp"]["morf_prob_auc"]
    assert diff["mean"] == pytest.approx(-0.2333333)
    assert diff["better"] and diff["significant"]
    assert summary["methods"]["attnlrp"]["morf_prob_auc"]["mean"] == pytest.approx(0.38333333)


def test_insertion_curve_mirrors_lerf_with_the_same_replacement():
    # restoring the top-k equals removing the bottom n-k: the insertion curve is the LeRF curve read backwards,
    # so its area is the same (a property of the protocol, pinned here so nobody reads it as two results)
    model = _SumModel([0.0, 3.0, 2.0, 1.0, -1.0])
    ids = torch.tensor([[1, 2, 3, 4]])
    sample = Sample(
        0, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.ones(4, dtype=torch.bool)
    )
    out = token_flip(model, sample, 0, torch.tensor([0.3, -2.0, 1.0, 0.5]), 0, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert out["insertion_logit_curve"] == pytest.approx(out["lerf_logit_curve"][::-1])
    assert out["insertion_logit_auc"] == pytest.approx(out["lerf_logit_auc"])
