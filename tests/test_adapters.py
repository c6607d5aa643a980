"""Every registered model type passes check_adapter; the declarations refuse what they do not cover."""

from __future__ import annotations

import pytest
import torch

import hf_pelrp
from hf_pelrp import AdapterCheckError, UnsupportedModelError
from hf_pelrp.adapters import Adapter, register_adapter
from hf_pelrp.adapters.base import _REGISTRY
from hf_pelrp.adapters.llama import llama_like
from hf_pelrp.adapters.norms import rms_norm

pytestmark = pytest.mark.usefixtures("single_thread")


#: declarations that need a newer transformers than pyproject's lower bound, with the first release they run on
#: (before it they are refused clearly; make test-oldest checks exactly that)
NEWER_TRANSFORMERS = {
    "falcon": ("5.25", "falcon (rotary)", "does not dispatch through transformers' AttentionInterface"),
    "llama4": ("5.25", None, "does not run on text-only inputs in transformers"),
}


@pytest.mark.parametrize("model_type", hf_pelrp.supported_model_types())
def test_every_registered_model_type_passes_check_adapter(model_type):
    import importlib.metadata

    from packaging.version import Version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    installed = Version(importlib.metadata.version("transformers"))
    if (
        model_type not in CONFIG_MAPPING_NAMES
    ):  # declared for a newer release (make test-oldest runs older ones)
        pytest.skip(f"transformers {installed} has no model type {model_type!r}")
    if model_type in NEWER_TRANSFORMERS and installed < Version(NEWER_TRANSFORMERS[model_type][0]):
        _, variant, refusal = NEWER_TRANSFORMERS[model_type]
        report = hf_pelrp.check_adapter(model_type, raise_on_failure=False)
        assert report.failures and all(
            (variant is None or f"[{variant}]" in r.head) and refusal in r.detail for r in report.failures
        )
        return
    report = hf_pelrp.check_adapter(model_type)
    assert report.passed and report.heads
    names = {r.name for r in report.results}
    assert any(n.startswith("bias-free CP conservation") for n in names)
    assert any(n.startswith("model restored exactly") for n in names)


@pytest.fixture
def scratch_registry():
    saved = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def test_a_wrong_norm_surrogate_is_caught(scratch_registry):
    """Qwen3-style q/k norms declared but gemma's (1 + w) RMSNorm declared as w * x / std: refused loudly."""
    from transformers import GemmaConfig

    register_adapter(llama_like(("gemma",), "Gemma", norms={"GemmaRMSNorm": rms_norm}, name="wrong gemma"))
    config = GemmaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=97,
    )
    with pytest.raises(
        AdapterCheckError, match="norm surrogate declared for .*GemmaRMSNorm.* does not reproduce"
    ):
        hf_pelrp.check_adapter(config)


def test_unknown_modules_are_refused(scratch_registry):
    """A family registered on another family's declaration: its own classes are not covered, so refused."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    register_adapter(llama_like(("qwen3",), "Qwen2", name="qwen2 declaration"))
    model = Qwen3ForCausalLM(
        Qwen3Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=97,
        )
    ).eval()
    with pytest.raises(UnsupportedModelError, match=r"Qwen3RMSNorm.*no declared surrogate|not covered"):
        hf_pelrp.attribute(model, torch.tensor([[5, 6, 7]]))


def test_an_activation_without_identity_rule_is_refused():
    from conftest import tiny_llama_family

    model = tiny_llama_family("llama", hidden_act="sigmoid", num_layers=1)
    with pytest.raises(UnsupportedModelError, match="Sigmoid.*identity rule"):
        hf_pelrp.attribute(model, torch.tensor([[5, 6, 7]]))


def test_register_adapter_takes_a_declaration():
    with pytest.raises(TypeError, match="Adapter declaration"):
        register_adapter(object())
    assert isinstance(
        hf_pelrp.adapter_for_type("llama")
        if hasattr(hf_pelrp, "adapter_for_type")
        else hf_pelrp.adapters.adapter_for_type("llama"),
        Adapter,
    )


def test_a_rotated_slice_declared_at_the_wrong_end_is_caught(scratch_registry):
    """DeepSeek-V3 rotates the LAST channels of each head: declared as the first, CP conservation still holds
    (q, k carry nothing there) but the one-layer rotary split does not."""
    import dataclasses

    from hf_pelrp.adapters import adapter_for_type

    right = adapter_for_type("deepseek_v3")
    wrong = dataclasses.replace(right, positions=dataclasses.replace(right.positions, rotated="first"))
    register_adapter(wrong)
    report = hf_pelrp.check_adapter("deepseek_v3", raise_on_failure=False)
    failed = {r.name for r in report.failures}
    assert any(name.startswith("rotary split") for name in failed), str(report)
    assert not any(name.startswith("bias-free CP conservation") for name in failed)
