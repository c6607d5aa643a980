"""Bad input and unsupported models get a clear exception that names the problem, never a wrong answer."""

from __future__ import annotations

import copy
import types
from functools import cache

import pytest
import torch

import hf_pelrp
from conftest import tiny_llama_family
from hf_pelrp import AttributionInputError, AttributionStateError, UnsupportedModelError

pytestmark = pytest.mark.usefixtures("single_thread")


@cache
def _lm():
    return tiny_llama_family("llama", "causal_lm", num_layers=1)


@cache
def _classifier():
    return tiny_llama_family("llama", "sequence_classification", num_layers=1)


def _ids(batch: int = 2, seq: int = 6) -> torch.Tensor:
    return torch.randint(1, 101, (batch, seq), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- unsupported models


def _tiny_mamba():
    from transformers import MambaConfig, MambaForCausalLM

    # a state-space model: no attention, so no adapter will ever cover it
    return MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=101)).eval()


@pytest.mark.parametrize("build, model_type", [(_tiny_mamba, "mamba")])
def test_unsupported_model_type_names_itself_and_the_supported_ones(build, model_type):
    model = build()
    assert model_type not in hf_pelrp.supported_model_types()
    with pytest.raises(
        UnsupportedModelError, match=rf"'{model_type}'.*Supported model types: .*llama"
    ) as err:
        hf_pelrp.attribute(model, _ids())
    for supported in ("llama", "mistral", "qwen2"):
        assert supported in str(err.value)
    with pytest.raises(UnsupportedModelError, match=model_type), hf_pelrp.lrp(model):
        pass


def test_relative_position_model_is_refused():
    """A bias that is none of the supported kinds (LongT5's local / transient-global attention) is refused."""
    from transformers import LongT5Config, LongT5ForConditionalGeneration

    longt5 = LongT5ForConditionalGeneration(
        LongT5Config(d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8, vocab_size=101)
    )
    with pytest.raises(UnsupportedModelError, match=r"'longt5'.*relative"):
        hf_pelrp.attribute(longt5, _ids())


def test_bare_model_without_head_gets_a_clear_error():
    from transformers import LlamaModel

    bare = LlamaModel(_lm().config).eval()
    with pytest.raises(AttributionInputError, match=r"LlamaModel has no supported output head.*hf_pelrp.lrp"):
        hf_pelrp.attribute(bare, _ids())
    # the advice in the message works: the context accepts the bare model, the user seeds the backward pass
    with hf_pelrp.lrp(bare) as ctx:
        bare(input_ids=_ids()).last_hidden_state[:, -1, 0].sum().backward()
        assert ctx.maps()["token"].abs().sum() > 0


def test_forward_replaced_on_an_instance_is_refused():
    model = copy.deepcopy(_lm())
    norm = model.model.layers[0].input_layernorm

    def patched(self, hidden_states):  # bound by hand, not by the kernels library (no _kernel_repo)
        return type(self).forward(self, hidden_states)

    norm.forward = types.MethodType(patched, norm)
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.input_layernorm.*not a hub kernel"):
        hf_pelrp.attribute(model, _ids())


def test_nested_attribution_on_one_model_is_refused():
    model = _lm()
    with hf_pelrp.lrp(model):
        with pytest.raises(AttributionStateError, match="already inside an hf_pelrp.lrp"):
            hf_pelrp.attribute(model, _ids())
        with (
            pytest.raises(AttributionStateError, match="already inside an hf_pelrp.lrp"),
            hf_pelrp.lrp(model),
        ):
            pass
    hf_pelrp.attribute(model, _ids())  # fine again once the context is left


# ---------------------------------------------------------------- targets


def test_target_out_of_range():
    with pytest.raises(AttributionInputError, match=r"target id 101 is out of range.*101 outputs"):
        hf_pelrp.attribute(_lm(), _ids(), target=101)
    with pytest.raises(AttributionInputError, match=r"target id -1 is out of range.*3 outputs"):
        hf_pelrp.attribute(_classifier(), _ids(), target=-1)
    with pytest.raises(AttributionInputError, match=r"target id 3 is out of range"):
        hf_pelrp.attribute(_classifier(), _ids(), target=torch.tensor([0, 3]))


def test_target_batch_size_mismatch():
    with pytest.raises(AttributionInputError, match=r"target has shape \(3,\) but 2 row\(s\) are explained"):
        hf_pelrp.attribute(_lm(), _ids(), target=torch.tensor([1, 2, 3]))


def test_float_target():
    with pytest.raises(AttributionInputError, match="integer class / token ids"):
        hf_pelrp.attribute(_lm(), _ids(), target=torch.tensor([1.0, 2.0]))
    with pytest.raises(AttributionInputError, match="target must be None, an int or a LongTensor"):
        hf_pelrp.attribute(_lm(), _ids(), target=1.5)


# ---------------------------------------------------------------- inputs


def test_empty_input():
    with pytest.raises(AttributionInputError, match=r"empty input \(batch 2, sequence length 0\)"):
        hf_pelrp.attribute(_lm(), torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(AttributionInputError, match=r"empty input \(batch 0"):
        hf_pelrp.attribute(_lm(), torch.zeros(0, 4, dtype=torch.long))


def test_input_ids_and_inputs_embeds_both_given():
    embeds = torch.randn(2, 6, 64)
    with pytest.raises(AttributionInputError, match="either input_ids or inputs_embeds, not both"):
        hf_pelrp.attribute(_lm(), _ids(), inputs_embeds=embeds)


def test_no_input():
    with pytest.raises(AttributionInputError, match=r"no input: pass input_ids \(or inputs_embeds\)"):
        hf_pelrp.attribute(_lm())


def test_attention_mask_shape_mismatch():
    with pytest.raises(
        AttributionInputError, match=r"attention_mask has shape \(2, 5\) but the input has shape \(2, 6\)"
    ):
        hf_pelrp.attribute(_lm(), _ids(), torch.ones(2, 5, dtype=torch.long))


def test_all_padding_row():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    with pytest.raises(AttributionInputError, match=r"row\(s\) \[1\] of attention_mask are all padding"):
        hf_pelrp.attribute(_lm(), _ids(), mask)


def test_float_input_ids():
    with pytest.raises(AttributionInputError, match="input_ids must be integer token ids"):
        hf_pelrp.attribute(_lm(), _ids().float())


def test_position_pointing_at_padding_or_outside():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(AttributionInputError, match="position 1 points at a padding token"):
        hf_pelrp.attribute(_lm(), _ids(), mask, position=1)
    with pytest.raises(AttributionInputError, match="position 6 is outside the sequence of length 6"):
        hf_pelrp.attribute(_lm(), _ids(), position=6)
    with pytest.raises(AttributionInputError, match="position= is only meaningful for causal"):
        hf_pelrp.attribute(_classifier(), _ids(), position=2)


def test_unknown_mode():
    with pytest.raises(ValueError, match=r"mode.*'foo'"):
        hf_pelrp.attribute(_lm(), _ids(), mode="foo")


# ---------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_in_train_mode_gives_the_same_maps():
    model = tiny_llama_family("llama", "causal_lm", num_layers=2)
    ids = _ids()
    expected = hf_pelrp.attribute(model, ids)
    model.gradient_checkpointing_enable()
    model.train()
    assert model.model.layers[0].gradient_checkpointing
    attr = hf_pelrp.attribute(model, ids)
    torch.testing.assert_close(attr.token, expected.token, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(attr.position_by_layer, expected.position_by_layer, rtol=1e-6, atol=1e-8)
    assert model.training and all(m.training for m in model.modules())
    assert model.model.layers[0].gradient_checkpointing


def test_a_model_class_without_source_is_judged_by_its_attention_layers():
    """A head class typed into a notebook has no source for transformers' heuristic to read (its own
    _can_set_attn_implementation says False); its attention layers are transformers' own and dispatch through
    the interface, so it is explained, exactly as the class it wraps."""
    from transformers import LlamaForCausalLM

    from hf_pelrp.adapters import register_adapter
    from hf_pelrp.adapters.base import _REGISTRY
    from hf_pelrp.adapters.llama import llama_like
    from hf_pelrp.adapters.norms import rms_norm

    cell: dict = {"__name__": "notebook_cell", "LlamaForCausalLM": LlamaForCausalLM}
    exec("class NotebookLlamaForCausalLM(LlamaForCausalLM):\n    pass\n", cell)
    notebook = cell["NotebookLlamaForCausalLM"]
    notebook._can_set_attn_implementation_cached_value = None  # not inherited from LlamaForCausalLM's cache
    assert not notebook._can_set_attn_implementation()
    plain = _lm()
    model = notebook(copy.deepcopy(plain.config)).eval()
    model.load_state_dict(plain.state_dict())
    saved = dict(_REGISTRY)
    try:
        register_adapter(
            llama_like(
                ("llama",), "Llama", modules=("NotebookLlamaForCausalLM",), norms={"LlamaRMSNorm": rms_norm}
            )
        )
        torch.testing.assert_close(
            hf_pelrp.attribute(model, _ids()).relevance, hf_pelrp.attribute(plain, _ids()).relevance
        )
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)
