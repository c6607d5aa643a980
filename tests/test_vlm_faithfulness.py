"""The VLM faithfulness check of issue 19 section 4: the quadrant task, the tiny LLaVA's training step, the patch
metrics against hand-computed values, and scripts/eval_vlm_faithfulness.py end to end on an untrained model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hf_pelrp.evaluation.metrics import bootstrap_mean, patch_coverage, patch_mass_inside, pointing_game
from hf_pelrp.evaluation.vlm_canvas import (
    CLASS_TOKENS,
    IMAGE,
    QuadrantTask,
    answer_logits,
    prompt_ids,
    quadrant_batch,
    tiny_llava,
    train_step,
)

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "eval_vlm_faithfulness", ROOT / "scripts" / "eval_vlm_faithfulness.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _garments(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic 28x28 'garments' (a filled block of a class-dependent size) and their labels: no data files."""
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    for i in range(n):
        side = 8 + 2 * int(labels[i])
        images[i, 2 : 2 + side, 3 : 3 + side] = 50 + 20 * int(labels[i])
    return images, labels


# ------------------------------------------------------------------------------------------------------- metrics
def test_patch_coverage_and_mass_inside_by_hand():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = mask[0, 1] = mask[1, 0] = True  # 3 of the 4 pixels of patch 0
    mask[3, 3] = True  # 1 of the 4 pixels of patch 3
    assert patch_coverage(mask, 2).tolist() == [0.75, 0.0, 0.0, 0.25]
    relevance = torch.tensor([2.0, 1.0, -5.0, 1.0])
    # positive mass 4: inside 2 * 0.75 + 1 * 0.25 = 1.75
    assert patch_mass_inside(relevance, mask, 2) == pytest.approx(1.75 / 4)
    assert patch_mass_inside(-relevance.abs(), mask, 2) == 0.0
    with pytest.raises(ValueError, match="patch relevances"):
        patch_mass_inside(torch.ones(9), mask, 2)
    with pytest.raises(ValueError, match="divisible"):
        patch_coverage(torch.ones(5, 4, dtype=torch.bool), 2)


def test_pointing_game_by_hand():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[3, 3] = True  # only patch 3 shows the object
    assert pointing_game(torch.tensor([0.0, 0.0, 0.0, 1.0]), mask, 2) == 1.0
    assert pointing_game(torch.tensor([1.0, 0.0, 0.0, 0.5]), mask, 2) == 0.0
    # equal maxima: the first in raster order decides
    assert pointing_game(torch.tensor([1.0, 0.0, 0.0, 1.0]), mask, 2) == 0.0


def test_bootstrap_mean_by_hand():
    mean, low, high = bootstrap_mean([1.0, 1.0, 1.0])
    assert (mean, low, high) == (1.0, 1.0, 1.0)
    mean, low, high = bootstrap_mean([0.0, 1.0], reps=4000)
    # resampled means of two values are 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4
    assert mean == 0.5 and low == 0.0 and high == 1.0
    with pytest.raises(ValueError, match="no values"):
        bootstrap_mean([])


# ---------------------------------------------------------------------------------------------------------- task
def test_quadrant_batch_is_consistent_and_reproducible():
    images, labels = _garments()
    task = QuadrantTask(seed=3)
    batch = quadrant_batch(images, labels, range(6), task)
    assert batch.pixel_values.shape == (6, 1, 64, 64) and batch.input_ids.shape == (6, 1 + 64 + 7)
    for row in range(6):
        q = int(batch.asked[row])
        assert int(batch.quadrant_labels[row, q]) == int(batch.label[row])
        assert 2 <= int((batch.quadrant_labels[row] >= 0).sum()) <= 4
        assert int(batch.answer[row]) == int(CLASS_TOKENS[batch.label[row]])
        # the asked garment's mask lies in the asked quadrant, and is exactly its non-black pixels there
        top, left = (q // 2) * 32, (q % 2) * 32
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[top : top + 32, left : left + 32] = True
        assert batch.mask[row].any() and not (batch.mask[row] & ~inside).any()
        assert torch.equal(batch.mask[row], (batch.pixel_values[row, 0] > 0) & inside)
        assert not (batch.mask[row] & batch.others[row]).any()
        assert int((batch.input_ids[row] == IMAGE).sum()) == 64
    again = quadrant_batch(images, labels, [4, 5], task)
    assert torch.equal(again.pixel_values, batch.pixel_values[4:]) and torch.equal(
        again.asked, batch.asked[4:]
    )
    with pytest.raises(ValueError, match="quadrant must be"):
        prompt_ids(4, task)
    with pytest.raises(ValueError, match="28x28"):
        QuadrantTask(quadrant=20)


def test_training_step_reduces_the_loss():
    torch.manual_seed(0)
    images, labels = _garments()
    task = QuadrantTask()
    model = tiny_llava(task, hidden=32, vision_layers=1, text_layers=1)
    batch = quadrant_batch(images, labels, range(8), task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = [train_step(model, batch, opt) for _ in range(12)]
    assert losses[-1] < 0.7 * losses[0]
    # seeded: the same initialisation and the same steps again give the same losses
    again = tiny_llava(task, hidden=32, vision_layers=1, text_layers=1)
    opt = torch.optim.AdamW(again.parameters(), lr=3e-3)
    assert [train_step(again, batch, opt) for _ in range(3)] == losses[:3]


# ----------------------------------------------------------------------------------------------- the evaluation
@pytest.fixture(scope="module")
def untrained():
    images, labels = _garments()
    task = QuadrantTask()
    return (
        tiny_llava(task, hidden=32, vision_layers=2, text_layers=2, seed=1),
        quadrant_batch(images, labels, range(2), task),
        task,
    )


def test_integrated_gradients_is_complete(untrained):
    model, batch, task = untrained
    script = _script()
    inputs = {k: v[:1] for k, v in batch.model_inputs().items()}
    target = int(batch.answer[0])
    ig = script.EXPLAIN["ig"](model, inputs, target, task, 0, 64)
    with torch.no_grad():
        full = answer_logits(model, inputs)[0, target]
        empty = answer_logits(model, {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])})[
            0, target
        ]
    assert float(ig.sum()) == pytest.approx(float(full - empty), rel=0.05, abs=1e-3)


def test_rollout_is_a_flow_share(untrained):
    model, batch, task = untrained
    inputs = {k: v[:1] for k, v in batch.model_inputs().items()}
    before = model.config._attn_implementation
    flow = _script().EXPLAIN["rollout"](model, inputs, 0, task, 0, 0)
    # row-stochastic products: the share of the answer's flow that reaches patch inputs, in [0, 1]
    assert flow.shape == (64,) and (flow >= 0).all() and 0 < float(flow.sum()) <= 1
    assert model.config._attn_implementation == before  # the model comes out as it went in


def test_lrp_methods_read_the_image_maps(untrained):
    """``attnlrp`` is ``Attribution.image``, ``attnlrp_pos`` adds ``image_position``, ``cp`` is CP's image map."""
    import hf_pelrp

    model, batch, task = untrained
    script = _script()
    inputs = {k: v[1:] for k, v in batch.model_inputs().items()}
    target = int(batch.answer[1])
    attr = hf_pelrp.attribute(model, target=torch.tensor([target]), config="attnlrp", **inputs)
    content = script.EXPLAIN["attnlrp"](model, inputs, target, task, 1, 0)
    both = script.EXPLAIN["attnlrp_pos"](model, inputs, target, task, 1, 0)
    torch.testing.assert_close(content, attr.image[0].double())
    torch.testing.assert_close(both - content, attr.image_position[0].double())
    positive = script.EXPLAIN["attnlrp_positive"](model, inputs, target, task, 1, 0)
    torch.testing.assert_close(positive, content.clamp(min=0))
    assert (content < 0).any()  # so the clamp is exercised
    assert attr.image_position[0].abs().sum() > 0  # the tower's learned positions get relevance
    cp = hf_pelrp.attribute(model, target=torch.tensor([target]), config="cp", **inputs)
    torch.testing.assert_close(script.EXPLAIN["cp"](model, inputs, target, task, 1, 0), cp.image[0].double())


def test_evaluation_runs_end_to_end(untrained):
    model, batch, task = untrained
    script = _script()
    methods = list(script.METHODS)
    records = script.evaluate(model, batch, task, methods, ig_steps=4, ids=[0, 1])
    assert len(records) == 2 * len(methods)
    for rec in records:
        s = rec["scores"]
        assert 0.0 <= s["mass_inside"] <= 1.0 and s["pointing"] in (0.0, 1.0)
        assert s["lerf_minus_morf_logit"] == pytest.approx(s["lerf_logit_auc"] - s["morf_logit_auc"])
    summary = script.summarise(records, methods, reps=50)
    assert summary["methods"]["ig"]["n"] == 2
    assert "random - ig: mass_inside" in summary["paired"]
    text = script.markdown(summary, {"model": "untrained", "test_accuracy": 0.1, "test_size": 2})
    assert "| `rollout` |" in text
