"""The config-aware registry (register_variants): adapter_for picks a variant by the model's config,
adapter_variants lists them for check_adapter, a new register_adapter replaces them, bad registrations fail."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoConfig, FalconForCausalLM

from hf_pelrp.adapters import base
from hf_pelrp.adapters.alibi import FALCON_ALIBI, FALCON_ROTARY


@pytest.fixture
def scratch_type():
    """A model type name registered only for the test (removed afterwards)."""
    name = "variants_test_type"
    yield name
    base._REGISTRY.pop(name, None)
    base._VARIANTS.pop(name, None)


def test_registration_is_validated_and_replaced_by_a_new_declaration(scratch_type):
    one = dataclasses.replace(FALCON_ROTARY, model_types=(scratch_type,), name="one")
    two = dataclasses.replace(FALCON_ROTARY, model_types=(scratch_type,), name="two")
    with pytest.raises(ValueError, match="default adapter"):
        base.register_variants(scratch_type, lambda c: one, (one, two))
    base.register_adapter(one)
    with pytest.raises(ValueError, match="Adapter declarations of that model type"):
        base.register_variants(scratch_type, lambda c: one, (one, FALCON_ALIBI))
    base.register_variants(scratch_type, lambda c: two if getattr(c, "pick_two", False) else one, (one, two))
    assert base.adapter_variants(scratch_type) == (one, two)
    assert base.adapter_for_config(scratch_type, type("C", (), {"pick_two": True})()) is two
    assert base.adapter_for_config(scratch_type, None) is one  # no config: the default
    base.register_adapter(one)  # a new declaration replaces the variants
    assert base.adapter_variants(scratch_type) == (one,)
    assert base.adapter_for_config(scratch_type, type("C", (), {"pick_two": True})()) is one


def test_a_chooser_returning_a_foreign_declaration_is_refused(scratch_type):
    one = dataclasses.replace(FALCON_ROTARY, model_types=(scratch_type,), name="one")
    base.register_adapter(one)
    base.register_variants(scratch_type, lambda c: FALCON_ALIBI, (one,))
    with pytest.raises(base.UnsupportedModelError, match="not one of its declarations"):
        base.adapter_for_config(scratch_type, object())


def test_adapter_for_type_keeps_the_default_and_adapter_for_reads_the_config():
    assert base.adapter_for_type("falcon") is FALCON_ALIBI
    torch.manual_seed(0)
    rotary = FalconForCausalLM(AutoConfig.for_model("falcon", **FALCON_ROTARY.tiny))
    assert base.adapter_for(rotary) is FALCON_ROTARY
