"""Hub kernels: transformers 5.25 loads every model with ``use_kernels=True``; attribution runs the modules' own
torch forwards and puts the kernels back exactly.

On a CPU transformers binds no kernel; :func:`helpers.kernels.kernelize_on_cpu` binds CPU kernels with the
``kernels`` library's own ``kernelize`` (norms, the MLP's activation, the rotary function of every attention),
the way it binds hub kernels on a GPU.
"""

from __future__ import annotations

import importlib.metadata
from types import MethodType

import pytest
import torch
from packaging.version import Version
from transformers import AutoModelForCausalLM, pipeline

import hf_pelrp
from helpers.builders import tiny_llama_family, tiny_word_tokenizer
from helpers.kernels import CALLS, kernelize_on_cpu
from hf_pelrp import UnsupportedModelError
from hf_pelrp.check import _differences, _snapshot
from hf_pelrp.hub_kernels import kernel_forwards

pytestmark = pytest.mark.usefixtures("single_thread")

#: transformers turns hub kernels on in from_pretrained by default from 5.25 on
KERNELS_BY_DEFAULT = Version(importlib.metadata.version("transformers")) >= Version("5.25")
IDS = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_kernels")
    tiny_llama_family().save_pretrained(path)
    tiny_word_tokenizer().save_pretrained(path)
    return path


def _assert_same(a, b):
    for field in ("token", "position", "relevance", "position_by_layer", "target_value"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=0)


def test_from_pretrained_with_transformers_defaults_is_explained(saved, monkeypatch):
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    model = AutoModelForCausalLM.from_pretrained(saved)
    plain = AutoModelForCausalLM.from_pretrained(saved, use_kernels=False)
    if KERNELS_BY_DEFAULT:
        assert model.use_kernels  # the default this test is about
    assert not plain.use_kernels
    flags = (model.use_kernels, getattr(model, "kernels_mode", None))
    before = _snapshot(model)
    for mode in ("attnlrp", "cp"):
        _assert_same(
            hf_pelrp.attribute(model, IDS, attention_mask=MASK, mode=mode),
            hf_pelrp.attribute(plain, IDS, attention_mask=MASK, mode=mode),
        )
    assert _differences(before, _snapshot(model)) == []
    assert (model.use_kernels, getattr(model, "kernels_mode", None)) == flags


def test_enable_attribution_and_pipeline_take_a_default_loaded_model(saved, monkeypatch):
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    model = hf_pelrp.from_pretrained(AutoModelForCausalLM, saved)
    pipe = pipeline("lrp-attribution", model=str(saved), device="cpu")
    if KERNELS_BY_DEFAULT:
        assert model.use_kernels and pipe.model.use_kernels
    tok = tiny_word_tokenizer()
    ids = tok("w1 w2 w3", return_tensors="pt")["input_ids"]
    row = pipe("w1 w2 w3")
    torch.testing.assert_close(
        torch.as_tensor(row["relevance"]), hf_pelrp.attribute(model, ids).relevance[0], rtol=1e-6, atol=1e-7
    )


@pytest.fixture
def kernelized():
    pytest.importorskip("kernels")
    reference = tiny_llama_family()
    model = kernelize_on_cpu(tiny_llama_family())
    CALLS.clear()
    return model, reference


def test_kernelize_binds_kernels_on_norms_activations_and_rotary(kernelized):
    model, _ = kernelized
    bound = {(type(b.kernel.__self__).__name__, b.key) for b in kernel_forwards(model)}
    assert {n for n, _ in bound} >= {"LlamaRMSNorm", "SiLUActivation"}
    assert any("Func" in n for n, _ in bound)  # the private rotary wrappers of the attentions
    model(IDS)
    assert CALLS["RMSNorm"] and CALLS["SiLU"] and CALLS["rotary_pos_emb"]  # the kernels really run outside


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_attribution_runs_the_torch_forwards_and_puts_the_kernels_back(kernelized, mode):
    model, reference = kernelized
    bindings = [(b.own, b.key, b.kernel) for b in kernel_forwards(model)]
    before = _snapshot(model)
    outputs = model(IDS, attention_mask=MASK).logits
    CALLS.clear()
    attr = hf_pelrp.attribute(model, IDS, attention_mask=MASK, mode=mode)
    assert sum(CALLS.values()) == 0, CALLS  # no kernel ran during the attribution
    _assert_same(attr, hf_pelrp.attribute(reference, IDS, attention_mask=MASK, mode=mode))
    assert attr.position_by_layer.abs().sum() > 0 or mode == "cp"
    # the same bound methods, not equal copies
    assert all(own[key] is kernel for own, key, kernel in bindings)
    assert _differences(before, _snapshot(model)) == []
    torch.testing.assert_close(model(IDS, attention_mask=MASK).logits, outputs, rtol=0, atol=0)
    assert CALLS["RMSNorm"]


def test_inside_lrp_no_kernel_is_bound_and_an_exception_puts_them_back(kernelized):
    model, _ = kernelized
    bindings = [(b.own, b.key, b.kernel) for b in kernel_forwards(model)]
    with pytest.raises(RuntimeError, match="inside"), hf_pelrp.lrp(model):
        assert kernel_forwards(model) == []
        assert "forward" not in model.model.norm.__dict__
        raise RuntimeError("inside")
    assert all(own[key] is kernel for own, key, kernel in bindings)


def test_kernel_under_an_accelerate_hook(kernelized):
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    model, reference = kernelized
    norm = model.model.norm
    kernel = norm.forward
    add_hook_to_module(norm, ModelHook())
    assert norm._old_forward is kernel
    CALLS.clear()
    _assert_same(hf_pelrp.attribute(model, IDS), hf_pelrp.attribute(reference, IDS))
    assert CALLS["RMSNorm"] == 0
    assert norm._old_forward is kernel
    remove_hook_from_module(norm)


def test_generation_keeps_the_kernels_mode(kernelized):
    model, _ = kernelized
    model.train()
    flags = [(m, m.training) for m in model.modules()]
    mode = getattr(model, "kernels_mode", None)
    hf_pelrp.explain_continuation(model, IDS[:1], generate=True, max_new_tokens=2)
    assert all(m.training == t for m, t in flags)
    assert kernel_forwards(model) and getattr(model, "kernels_mode", None) == mode


def test_a_forward_replaced_by_something_else_is_refused_naming_the_module():
    model = tiny_llama_family()
    mlp = model.model.layers[0].mlp

    def patched(self, x):
        return type(self).forward(self, x)

    mlp.forward = MethodType(patched, mlp)
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.mlp.*not a hub kernel"):
        hf_pelrp.attribute(model, IDS)
