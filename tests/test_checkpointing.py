"""Gradient checkpointing during attribution: same relevance, rules applied once, leaves made once, less memory."""

from __future__ import annotations

import pytest
import torch

import hf_pelrp
from conftest import tiny_llama_family

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(5)
    return torch.randint(1, 101, (2, 12))


def _count_calls(module: torch.nn.Module) -> tuple[list[int], object]:
    calls: list[int] = []
    return calls, module.register_forward_pre_hook(lambda *_: calls.append(1))


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
@pytest.mark.parametrize("positional", [True, False])
def test_checkpointed_attribution_equals_plain(ids, mode, positional):
    model = tiny_llama_family("llama", num_layers=2)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    plain = hf_pelrp.attribute(model, ids, mask, mode=mode, positional=positional)
    calls, handle = _count_calls(model.model.layers[0].input_layernorm)
    checkpointed = hf_pelrp.attribute(
        model, ids, mask, mode=mode, positional=positional, gradient_checkpointing=True
    )
    handle.remove()
    assert len(calls) == 2  # the block really ran again in the backward pass
    # a rule applied twice would square its factor; any difference would show here
    torch.testing.assert_close(checkpointed.token, plain.token, rtol=0, atol=1e-6)
    torch.testing.assert_close(checkpointed.position_by_layer, plain.position_by_layer, rtol=0, atol=1e-6)
    torch.testing.assert_close(checkpointed.target_value, plain.target_value, rtol=0, atol=0)


def test_model_setting_is_honoured_and_restored(ids):
    model = tiny_llama_family("llama", num_layers=2)
    plain = hf_pelrp.attribute(model, ids)
    model.gradient_checkpointing_enable()
    model.train()
    layer = model.model.layers[1]
    calls, handle = _count_calls(layer.self_attn)

    result = hf_pelrp.attribute(model, ids)
    assert len(calls) == 2
    torch.testing.assert_close(result.relevance, plain.relevance, rtol=0, atol=1e-6)

    calls.clear()
    hf_pelrp.attribute(model, ids, gradient_checkpointing=False)
    assert len(calls) == 1
    handle.remove()
    # the model is as it went in: training mode, its own checkpointing switch, no instance forward
    assert model.training and layer.training
    assert layer.gradient_checkpointing
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_leaves_are_created_once_under_recomputation(ids):
    model = tiny_llama_family("llama", num_layers=2)
    with hf_pelrp.lrp(model, gradient_checkpointing=True) as ctx, torch.enable_grad():
        logits = model(ids).logits[:, -1].max(-1).values.sum()
        leaves = ctx.leaves()
        ids_before = [id(leaf) for leaf in leaves]
        torch.autograd.backward(logits, inputs=leaves)
        assert [id(leaf) for leaf in ctx.leaves()] == ids_before
        assert len(ctx.store.layers) == 2
        assert all(leaf.grad is not None for leaf in ctx.leaves())


def test_cache_arguments_are_dropped_under_checkpointing(ids):
    model = tiny_llama_family("llama", num_layers=2)
    plain = hf_pelrp.attribute(model, ids)
    result = hf_pelrp.attribute(model, ids, gradient_checkpointing=True, use_cache=True)
    torch.testing.assert_close(result.relevance, plain.relevance, rtol=0, atol=1e-6)


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor, checkpointing: bool) -> int:
    """Bytes the autograd graph keeps for the backward pass, counted where they are saved."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with hf_pelrp.lrp(model, gradient_checkpointing=checkpointing), torch.enable_grad():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(ids).logits
        del logits
    return total


def test_checkpointing_keeps_fewer_activations(ids):
    # not a timing: what the graph holds for the backward pass, counted tensor by tensor
    model = tiny_llama_family("llama", num_layers=4)
    long_ids = ids.repeat(1, 4)
    plain = _saved_bytes(model, long_ids, checkpointing=False)
    checkpointed = _saved_bytes(model, long_ids, checkpointing=True)
    # the checkpoints keep each block's input hidden states themselves (not through the saved-tensor hooks)
    block_inputs = 4 * long_ids.numel() * model.config.hidden_size * 4
    assert checkpointed + block_inputs < plain / 3


def test_input_longer_than_the_model_maximum_is_refused():
    model = tiny_llama_family("llama", num_layers=1, max_position_embeddings=16)
    ids = torch.randint(1, 101, (2, 17))
    assert hf_pelrp.attribute(model, ids[:, :16]).relevance.shape == (2, 16)
    with pytest.raises(hf_pelrp.AttributionInputError, match=r"17 tokens .* at most 16 positions"):
        hf_pelrp.attribute(model, ids)
    # left padding counts real tokens only: 16 real tokens in 17 columns fit
    mask = torch.ones_like(ids)
    mask[:, 0] = 0
    assert torch.isfinite(hf_pelrp.attribute(model, ids, mask).relevance).all()


def _cuda_peak_mib(model, length: int, checkpointing: bool) -> float:
    ids = torch.randint(1, 101, (1, length), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    hf_pelrp.attribute(model, ids, gradient_checkpointing=checkpointing)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_grows_linearly_with_length_on_cuda(checkpointing):
    # SDPA keeps no N x N attention matrix: doubling the length doubles the extra memory (4x if quadratic)
    model = tiny_llama_family(
        "llama",
        num_layers=4,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
    )
    model = model.to("cuda", torch.bfloat16)
    _cuda_peak_mib(model, 256, checkpointing)  # warm-up: kernels, allocator
    peaks = [_cuda_peak_mib(model, n, checkpointing) for n in (4096, 8192, 16384)]
    growth = (peaks[2] - peaks[1]) / (peaks[1] - peaks[0])
    assert 1.5 < growth < 2.6, peaks


def test_continuation_attribution_with_checkpointing(ids):
    # several backward passes over one checkpointed forward: each recomputes the blocks it needs
    model = tiny_llama_family("llama", num_layers=2)
    prompt, continuation = ids[:1, :8], ids[1:, :3]
    plain = hf_pelrp.attribute(model, prompt, continuation_ids=continuation)
    calls, handle = _count_calls(model.model.layers[0].input_layernorm)
    checkpointed = hf_pelrp.attribute(
        model, prompt, continuation_ids=continuation, gradient_checkpointing=True
    )
    handle.remove()
    assert len(calls) == 1 + 3
    torch.testing.assert_close(checkpointed.relevance, plain.relevance, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "bert", "vit"])
def test_checkpointing_the_other_families(family):
    from test_offload import _other_family

    make, inputs = _other_family(family)
    model = make()
    plain = hf_pelrp.attribute(model, **inputs)
    first_block = hf_pelrp.adapter_for(model).blocks(model)[0]
    calls, handle = _count_calls(next(iter(first_block.children())))
    checkpointed = hf_pelrp.attribute(model, **inputs, gradient_checkpointing=True)
    handle.remove()
    assert len(calls) == 2
    torch.testing.assert_close(checkpointed.relevance, plain.relevance, rtol=0, atol=1e-6)
    for name, value in plain.extras.items():
        torch.testing.assert_close(checkpointed.extras[name], value, rtol=0, atol=1e-6)
