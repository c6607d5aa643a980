"""Low precision: bf16 / fp16 relevance close to fp32 of the same weights; overflows are named, not returned."""

from __future__ import annotations

import copy

import pytest
import torch

import hf_pelrp
from conftest import tiny_llama_family
from hf_pelrp.precision import watch_non_finite

pytestmark = pytest.mark.usefixtures("single_thread")


def relative_l1(result: torch.Tensor, reference: torch.Tensor) -> float:
    """``||result - reference||_1 / ||reference||_1`` over the whole map."""
    return float((result - reference).abs().sum() / reference.abs().sum())


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(7)
    ids = torch.randint(1, 101, (2, 14))
    return ids


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_half_precision_is_close_to_fp32_of_the_same_weights(ids, model_type, dtype, mode):
    half = tiny_llama_family(model_type, num_layers=2).to(dtype)
    # the fp32 reference uses the rounded weights, so only the arithmetic differs
    full = copy.deepcopy(half).float()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    reference = hf_pelrp.attribute(full, ids, mask, mode=mode)
    result = hf_pelrp.attribute(half, ids, mask, target=reference.target, mode=mode)

    for name in ("token", "position", "relevance", "target_value"):
        value = getattr(result, name)
        assert value.dtype == torch.float32, name  # maps are accumulated and returned in float32
        assert torch.isfinite(value).all(), name
    assert relative_l1(result.relevance, reference.relevance) <= 2e-2
    if mode == "attnlrp":
        assert relative_l1(result.position_by_layer, reference.position_by_layer) <= 5e-2
    # padding keeps its exact zero in half precision too
    assert torch.equal(result.relevance[1, :5], torch.zeros(5))


def test_fp16_overflow_names_the_module_and_suggests_bf16(ids):
    model = tiny_llama_family("llama", num_layers=2).half()
    with torch.no_grad():
        # the norm's float32 result times this weight exceeds float16's 65504
        model.model.layers[1].post_attention_layernorm.weight.mul_(3e4)
    logits = model(ids).logits
    with pytest.raises(hf_pelrp.AttributionStateError) as error:
        hf_pelrp.attribute(model, ids)
    message = str(error.value)
    assert "model.layers.1.post_attention_layernorm" in message
    assert "forward pass overflowed" in message
    assert "bfloat16" in message
    # the diagnosis leaves the model as it was
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(ids).logits, logits, equal_nan=True, rtol=0, atol=0)


def test_the_same_model_in_bf16_does_not_overflow(ids):
    model = tiny_llama_family("llama", num_layers=2).to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.mul_(3e4)
    assert torch.isfinite(hf_pelrp.attribute(model, ids).relevance).all()


def test_watch_locates_a_backward_overflow():
    # finite forward, but the gradient at the first layer's output is 3e4 * 4 > 65504
    first, second = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.Sequential(first, second).half()
    with torch.no_grad():
        first.weight.fill_(3e4)
        second.weight.fill_(3e4)
    x = torch.full((1, 4), 1e-6, dtype=torch.float16, requires_grad=True)
    with watch_non_finite(model) as watch:
        out = model(x)
        assert torch.isfinite(out).all()
        out.sum().backward()
    assert watch.forward_module is None
    assert watch.backward_module == "0"
    assert "backward pass overflowed" in watch.describe()
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_half_precision_sdpa_on_cuda_matches_cpu_fp32(mode, dtype):
    torch.manual_seed(11)
    ids = torch.randint(1, 101, (2, 96))
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    model = tiny_llama_family("llama", num_layers=2, hidden_size=128, intermediate_size=256).to(dtype)
    reference = hf_pelrp.attribute(copy.deepcopy(model).float(), ids, mask, mode=mode)
    result = hf_pelrp.attribute(
        model.cuda(), ids.cuda(), mask.cuda(), target=reference.target.cuda(), mode=mode
    )
    assert result.relevance.device.type == "cuda"
    assert torch.isfinite(result.relevance).all()
    assert relative_l1(result.relevance.cpu(), reference.relevance) <= 2e-2
