"""Offset flipping (hf_pelrp.evaluation.offsets): the gate frame reproduces the model at alpha = 1, removes exactly
the positional part at alpha = 0, IG over the gates is complete, and the model comes back unchanged."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama_family
from hf_pelrp.evaluation import offsets as ev
from test_family_alibi import _model as alibi_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _models():
    llama = tiny_llama_family("llama", "causal_lm", num_layers=2, seed=0, initializer_range=0.15).double()
    return {"llama": llama, "bloom": alibi_model("bloom")}


@pytest.mark.parametrize("name", ["llama", "bloom"])
def test_gates_reproduce_the_model_and_remove_positions(name):
    model = _models()[name]
    ids = torch.randint(1, 90, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits[0, -1]
    target = int(plain.argmax())
    sample = ev.OffsetSample(ids, position=5, target=target)
    ones = torch.ones(1, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(ev.gated_logits(model, sample, ones), plain[target].float(), atol=1e-5)
        # alpha = 0 at offset 0 changes nothing (no positional part there); everywhere: a different model
        zero0 = ones.clone()
        zero0[0, 0] = 0
        assert torch.allclose(ev.gated_logits(model, sample, zero0), plain[target].float(), atol=1e-5)
        none = ev.gated_logits(model, sample, torch.zeros(1, 6, dtype=torch.float64))
    assert abs(float(none[0]) - float(plain[target])) > 1e-4
    ig, error = ev.offset_ig(model, sample, steps=32)
    assert error < 1e-2 * max(float(ig.abs().sum()), 1e-6)
    assert abs(float(ig[0])) < 1e-9  # offset 0 has no position part
    occlusion = ev.offset_occlusion(model, sample)
    assert float(occlusion[0].abs()) < 1e-5
    assert model.config._attn_implementation in ("sdpa", "eager")
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_flip_curves_start_at_the_model_and_end_without_positions():
    model = _models()["llama"]
    ids = torch.randint(1, 90, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(input_ids=ids).logits[0, -1]
    sample = ev.OffsetSample(ids, position=5, target=int(plain.argmax()))
    curves = ev.offset_flip(model, sample, torch.arange(6, dtype=torch.float32))
    assert len(curves["morf_curve"]) == 6
    assert abs(curves["morf_curve"][0] - curves["lerf_curve"][0]) < 1e-6
    assert abs(curves["morf_curve"][-1] - curves["lerf_curve"][-1]) < 1e-6
    result = ev.evaluate_sample(model, sample, ig_steps=8, random_orders=2)
    assert set(ev.METHODS) <= set(result)
    summary = ev.summarise([result, ev.evaluate_sample(model, sample, ig_steps=8, seed=1, random_orders=2)])
    assert "minus_offset_ig" in summary["offset_map"]
