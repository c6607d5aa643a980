"""What check_adapter does not prove for the declarations of ``adapters/rotary_decoders.py`` and ``olmoe.py``:
NoPE layers get no rotary factor (EXAONE 4, Command R7B), Nemotron's ``(1 + w)`` LayerNorm surrogate is the
identity rule (float64 reference), OLMoE's ``clip_qkv`` is refused."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import hf_pelrp
from hf_pelrp.adapters import adapter_for_type, register_adapter
from hf_pelrp.adapters.base import _REGISTRY
from hf_pelrp.adapters.infer import layer_norm_one_plus
from hf_pelrp.check import _randomise, _zero_biases, tiny_config
from hf_pelrp.positions import Rotary, rotary_leaves_in_graph

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.tensor([[5, 17, 3, 42, 8, 11]])


@pytest.fixture
def scratch_registry():
    saved = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def _one_layer(model_type: str, layer_type: str):
    """A one-layer, bias-free float64 causal LM of ``model_type`` whose only layer is ``layer_type``."""
    import transformers
    from transformers.models.auto import modeling_auto

    config = tiny_config(model_type)
    config.num_hidden_layers = 1
    config.layer_types = [layer_type]
    torch.manual_seed(0)
    cls = getattr(transformers, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    model = cls(copy.deepcopy(config)).to(torch.float64).eval()
    _randomise(model, 0)
    _zero_biases(model)
    return model


def _split_gap(model) -> tuple[float, float]:
    """(relative |token(on) + position - token(off)|, max |position|) in AttnLRP mode."""
    on = hf_pelrp.attribute(model, IDS, mode="attnlrp", positional=True)
    off = hf_pelrp.attribute(model, IDS, mode="attnlrp", positional=False)
    gap = float((on.token + on.position - off.token).abs().max() / off.token.abs().max())
    return gap, float(on.position.abs().max())


@pytest.mark.parametrize("model_type", ["exaone4", "cohere2"])
def test_global_layers_do_not_rotate_and_keep_the_full_factor(model_type):
    # a global (NoPE) layer: no position relevance, and q, k keep the whole AttnLRP factor
    gap, position = _split_gap(_one_layer(model_type, "full_attention"))
    assert position == 0.0 and gap < 1e-9
    # a sliding-window layer rotates: the split is exact and positions carry relevance
    gap, position = _split_gap(_one_layer(model_type, "sliding_attention"))
    assert position > 0.0 and gap < 1e-6


@pytest.mark.parametrize("model_type", ["exaone4", "cohere2"])
def test_the_nope_check_fails_a_declaration_without_applies(scratch_registry, model_type):
    """The test above can fail: a plain Rotary() halves q and k in the global layer too."""
    right = adapter_for_type(model_type)
    register_adapter(dataclasses.replace(right, positions=Rotary()))
    # in the graph, as check_adapter's split runs: the attention-side leaf gradient follows the declaration
    with rotary_leaves_in_graph():
        gap, position = _split_gap(_one_layer(model_type, "full_attention"))
    assert position == 0.0 and gap > 1e-6  # the right declaration: < 1e-9


def test_layer_norm_one_plus_is_the_identity_rule_of_nemotrons_norm():
    """Forward: the module's own output; backward: (1 + w) / std with std a constant (explicit float64
    formula), mean subtraction kept."""
    from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P

    torch.manual_seed(0)
    norm = NemotronLayerNorm1P(8, eps=1e-5).to(torch.float64)
    with torch.no_grad():
        norm.weight.normal_(0, 0.3)
        norm.bias.normal_(0, 0.3)
    x = (torch.randn(3, 8, dtype=torch.float64) + 0.5).requires_grad_(True)
    y = layer_norm_one_plus(norm, x)
    assert torch.allclose(y, norm(x), atol=1e-12)
    g = torch.randn(3, 8, dtype=torch.float64)
    (grad,) = torch.autograd.grad(y, x, g)
    std = torch.sqrt(x.detach().var(-1, unbiased=False, keepdim=True) + 1e-5)
    gw = g * (1 + norm.weight.detach()) / std
    reference = gw - gw.mean(-1, keepdim=True)
    assert torch.allclose(grad, reference, atol=1e-12)


def test_olmoe_refuses_clip_qkv():
    """OLMoE clamps the normed q, k (and v) in place: no rule covers it, so the model is refused by name."""
    from transformers import OlmoeForCausalLM

    config = tiny_config("olmoe")
    config.clip_qkv = 0.5
    model = OlmoeForCausalLM(config).eval()
    with pytest.raises(hf_pelrp.UnsupportedModelError, match=r"clip_qkv=0\.5"):
        hf_pelrp.attribute(model, IDS)


def test_xielu_gets_the_identity_rule():
    """Apertus' xIELU (element-wise, learned scalars): with the rule, x * grad = f(x) * g per element (float64
    reference: R_x = R_y), which plain autograd does not give."""
    from transformers.activations import XIELUActivation

    from hf_pelrp.adapters.rotary_decoders import xielu_rules
    from hf_pelrp.hooks import Handles

    act = XIELUActivation(dtype=torch.float64)
    holder = torch.nn.Sequential(act)
    [(module, rule)] = xielu_rules(holder, None, None)
    assert module is act
    x = torch.randn(4, 16, dtype=torch.float64)
    g = torch.randn(4, 16, dtype=torch.float64)
    plain_x = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(act(plain_x), plain_x, g)
    handles = Handles()
    rule.attach(act, handles)
    try:
        x.requires_grad_(True)
        y = act(x)
        (grad,) = torch.autograd.grad(y, x, g)
    finally:
        handles.remove()
    assert torch.allclose(x.detach() * grad, y.detach() * g, atol=1e-12)
    assert not torch.allclose(x.detach() * plain, y.detach() * g, atol=1e-3)
