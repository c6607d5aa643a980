"""The README says what the code does: the architecture table lists exactly the registered model types, the
refusal list names the refused ones, and the "add an architecture" recipe works as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import hf_pelrp
from hf_pelrp.adapters import refused_model_types
from hf_pelrp.adapters.base import _REGISTRY

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _section(name: str) -> str:
    return README[README.index(f"<!-- section:{name} -->") : README.index(f"<!-- /section:{name} -->")]


def test_architecture_table_lists_exactly_the_supported_model_types():
    section = _section("architectures")
    table = section[
        section.index("| `model_type` |") : section.index("\n\n", section.index("| `model_type` |"))
    ]
    listed = set()
    for row in table.splitlines()[2:]:
        listed |= set(re.findall(r"`([a-z0-9_\-]+)`", row.split("|")[1]))
    assert listed == set(hf_pelrp.supported_model_types())
    assert f"{len(listed)} model types" in section


def test_refused_model_types_are_named_in_the_readme():
    section = _section("architectures")
    for model_type in refused_model_types():
        assert f"`{model_type}`" in section, model_type


@pytest.fixture
def scratch_registry():
    saved = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def test_the_add_an_architecture_recipe(scratch_registry):
    """A model with its own classes and model type, declared in a few lines and proven by check_adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_pelrp.adapters import register_adapter
    from hf_pelrp.adapters.llama import llama_like
    from hf_pelrp.adapters.norms import rms_norm

    class MyLlamaConfig(LlamaConfig):
        model_type = "my_llama"

    class MyLlamaForCausalLM(LlamaForCausalLM):
        config_class = MyLlamaConfig

    # the built-in Llama* module classes inside, the model's own head class on top
    register_adapter(
        llama_like(("my_llama",), "Llama", modules=("MyLlamaForCausalLM",), norms={"LlamaRMSNorm": rms_norm})
    )
    config = MyLlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        pad_token_id=0,
    )
    report = hf_pelrp.check_adapter(config, classes=[MyLlamaForCausalLM])
    assert report.passed and "[ok] MyLlamaForCausalLM: bias-free CP conservation" in str(report)
