"""The coverage table tells the truth: its stored probes of the inference are those of the current registry (a
declaration or refusal added since makes this fail until ``python scripts/coverage.py --write`` is run), a sample
of them is re-run here, and every type it counts as declared is one check_adapter proves for that head."""

from __future__ import annotations

import pytest
import transformers

from hf_pelrp.adapters import _coverage_probes as stored
from hf_pelrp.adapters import coverage

pytestmark = pytest.mark.usefixtures("single_thread")

needs_stored = pytest.mark.skipif(
    transformers.__version__ != stored.TRANSFORMERS,
    reason=f"the probes are stored for transformers {stored.TRANSFORMERS}",
)


@needs_stored
def test_the_stored_probes_are_those_of_the_current_registry():
    left = {f"{head}:{t}" for head, t in coverage.left_to_inference()}
    assert set(stored.PROBES) == left, "out of date: run python scripts/coverage.py --write"
    assert {status for status, _ in stored.PROBES.values()} <= {
        coverage.INFERRED,
        coverage.REFUSED,
        coverage.NOT_PROBED,
    }


@needs_stored
@pytest.mark.parametrize(
    "key",
    [
        "causal_lm:bert-generation",  # an encoder: refused by the inference, naming the attention module
        "seq2seq_lm:qwen2_audio",  # a composite model (an audio tower and a language model)
        "causal_lm:dory",  # the probe instance does not run
    ],
)
def test_a_sample_of_the_stored_probes_is_what_the_inference_does_now(key):
    if key not in stored.PROBES:
        pytest.skip(f"{key} is no longer left to the inference")
    head, model_type = key.split(":")
    status, detail = coverage.probe_inference(head, model_type)
    assert (status, detail[:600]) == stored.PROBES[key]


def test_every_declared_type_is_proven_for_that_head_class():
    """Declared means: the class of the head's auto map is among those check_adapter builds for the type."""
    from hf_pelrp.adapters.base import adapter_variants
    from hf_pelrp.check import head_classes

    rows = {row.head: row for row in coverage.coverage({})}
    for head, row in rows.items():
        for t in row.declared:
            proven = {c.__name__ for a in adapter_variants(t) for c in head_classes(t, a)}
            assert coverage.head_class_name(head, t) in proven, (head, t)
    assert {"gemma3", "llava", "mistral3", "qwen2_vl", "smolvlm"} <= set(rows["image_text_to_text"].declared)
    assert "gemma3" in rows["sequence_classification"].declared
    # Llama 4's causal-LM map gives Llama4ForCausalLM, a llama4_text class: not proven for llama4 (nor claimed)
    assert "llama4" in rows["image_text_to_text"].declared and "llama4" in rows["causal_lm"].other_heads


def test_the_table_counts_each_type_once_and_states_the_total():
    rows = coverage.coverage({})  # without probes every type left to the inference counts as not probed
    every = {t for row in rows for t in (*row.declared, *row.refused, *row.other_heads, *row.inference)}
    declared = {t for row in rows for t in row.declared}
    assert len(declared) >= 150
    for row in rows:
        groups = (row.declared, row.refused, row.other_heads, row.inference)
        assert sum(map(len, groups)) == len({t for g in groups for t in g}) == row.total
    assert not declared & {t for row in rows for t in row.refused}
    assert every


def test_a_composite_model_is_refused_by_the_inference_with_that_reason():
    status, detail = coverage.probe_inference("seq2seq_lm", "qwen2_audio")
    assert status == coverage.REFUSED
    assert "composite model" in detail and "Qwen2AudioForConditionalGeneration" in detail
