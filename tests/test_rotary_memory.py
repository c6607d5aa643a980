"""Rotary leaves get their gradient at the "lrp" attention (issue 22 section 6): the model rotates with detached
(cos, sin), so autograd keeps no q, rotate(q), k, rotate(k) for them, and the maps equal the in-graph path's."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_pelrp
from hf_pelrp import offsets
from hf_pelrp.positions import Rotary


def _model(heads: int = 4, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).double().eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def _saved_bytes(model, ids, mask, positional: bool) -> tuple[int, int]:
    """(count, bytes) of the distinct tensor storages autograd saves for the backward pass in one attribution's
    forward pass."""
    seen: dict[int, int] = {}
    kept: list[
        torch.Tensor
    ] = []  # alive to the end, so that no freed storage's address is re-used and missed

    def pack(t: torch.Tensor) -> torch.Tensor:
        if torch._C._current_graph_task_id() != -1:
            return t  # saved by a backward-time computation (the leaf gradient's own): freed with it
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hf_pelrp.attribute(model, ids, mask, config=hf_pelrp.LRPConfig(positional=positional))
    return len(seen), sum(seen.values())


def _in_graph(monkeypatch) -> None:
    monkeypatch.setattr(Rotary, "gradient_at_attention", lambda self, attention: False)


def test_rotary_leaves_keep_no_extra_saved_tensors(monkeypatch):
    model = _model()
    ids, mask = _batch()
    off = _saved_bytes(model, ids, mask, positional=False)
    on = _saved_bytes(model, ids, mask, positional=True)
    layers, heads, kv = (model.config.num_hidden_layers, 4, 2)
    # per layer, the positional leaves: cos, sin [B, T, 8] float64; and q_rot, k_rot [B, H, T, 8] (the
    # attention's own saved q and k on the fused kernels; the CPU math kernel for float64 keeps copies)
    leaves = layers * 2 * ids.numel() * 8 * 8
    rotated = layers * ids.numel() * 8 * 8 * (heads + kv)
    print("saved (count, bytes): positions off", off, "on", on)
    assert on[1] <= off[1] + leaves + rotated, (on, off)
    _in_graph(monkeypatch)
    old = _saved_bytes(model, ids, mask, positional=True)
    print("in graph", old)
    # the in-graph path keeps q, rotate(q), k, rotate(k) per layer (measured here: 39936 bytes more than with
    # positions off, against 9216 on the attention-side path): the test tells the two apart
    assert old[1] - off[1] > leaves + rotated, (old, off)
    assert old[1] - off[1] > 1.5 * (on[1] - off[1]), (old, on, off)


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_maps_equal_the_in_graph_leaves(monkeypatch, mode):
    model = _model()
    ids, mask = _batch()
    config = hf_pelrp.LRPConfig(mode=mode, positional=True)
    calls = []
    backward = offsets._RotaryLeafGradient.backward

    def counted(ctx, grad):
        calls.append(1)
        return backward(ctx, grad)

    monkeypatch.setattr(offsets._RotaryLeafGradient, "backward", staticmethod(counted))
    new = hf_pelrp.attribute(model, ids, mask, config=config)
    if mode == "attnlrp":
        assert len(calls) == 2 * model.config.num_hidden_layers  # q and k of every layer
    _in_graph(monkeypatch)
    old = hf_pelrp.attribute(model, ids, mask, config=config)
    for name in ("token", "position", "position_abs", "position_by_layer"):
        torch.testing.assert_close(getattr(new, name), getattr(old, name), rtol=1e-10, atol=1e-18)
    if mode == "attnlrp":
        assert old.position.abs().max() > 1e-8  # a real comparison, not of two zero maps


def _two_passes(model, ids, mask) -> list[dict]:
    """Two backward passes on one forward: the second accumulates on the first (no zero_grad), then a third
    after zero_grad."""
    out = []
    with hf_pelrp.lrp(model, config=hf_pelrp.LRPConfig(positional=True)) as ctx, torch.enable_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits[:, -1, 3].sum().backward(retain_graph=True)
        out.append({k: v.clone() for k, v in ctx.maps().items() if isinstance(v, torch.Tensor)})
        logits[:, -1, 5].sum().backward(retain_graph=True)
        out.append({k: v.clone() for k, v in ctx.maps().items() if isinstance(v, torch.Tensor)})
        ctx.zero_grad()
        logits[:, -2, 7].sum().backward()
        out.append({k: v.clone() for k, v in ctx.maps().items() if isinstance(v, torch.Tensor)})
    return out


def test_several_backward_passes_accumulate_like_in_graph(monkeypatch):
    model = _model()
    ids, mask = _batch()
    new = _two_passes(model, ids, mask)
    _in_graph(monkeypatch)
    old = _two_passes(model, ids, mask)
    for a, b in zip(new, old, strict=True):
        for name in ("position", "position_by_layer"):
            torch.testing.assert_close(a[name], b[name], rtol=1e-10, atol=1e-18)
    assert not torch.allclose(new[0]["position"], new[1]["position"])  # the second pass did add


def test_gqa_and_gradient_checkpointing_equal_in_graph(monkeypatch):
    model = _model(heads=4, kv_heads=1)
    ids, mask = _batch()
    config = hf_pelrp.LRPConfig(positional=True)
    new = hf_pelrp.attribute(model, ids, mask, config=config, gradient_checkpointing=True)
    _in_graph(monkeypatch)
    old = hf_pelrp.attribute(model, ids, mask, config=config, gradient_checkpointing=False)
    torch.testing.assert_close(new.position_by_layer, old.position_by_layer, rtol=1e-10, atol=1e-18)


@pytest.mark.parametrize(
    ("layout", "rotated", "width"),
    [
        ("half", "first", 8),
        ("half", "first", 4),
        ("half", "last", 4),
        ("interleaved", "first", 4),
        ("interleaved", "last", 2),
    ],
)
@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_rotary_leaf_gradient_equals_autograd_through_the_rotation(layout, rotated, width, factor):
    # the closed form (head sums, swapped pairs, per-layer coefficients) against autograd through the rotation
    # written out, with the leaves in the graph; partial rotary at either end, and a scale a = 1.3 in (cos, sin)
    gen = torch.Generator().manual_seed(5)
    batch, heads, seq, dim = 2, 3, 5, 8
    x = torch.randn(batch, heads, seq, dim, generator=gen, dtype=torch.float64)
    theta = torch.randn(
        batch, seq, width // 2 if layout == "half" else width, generator=gen, dtype=torch.float64
    )
    if layout == "half":  # channel d and d + w / 2 form a pair and share their angle
        theta = torch.cat((theta, theta), -1)
    cos_value, sin_value = 1.3 * theta.cos(), 1.3 * theta.sin()
    upstream = torch.randn(batch, heads, seq, dim, generator=gen, dtype=torch.float64)

    cos_ref, sin_ref = cos_value.clone().requires_grad_(True), sin_value.clone().requires_grad_(True)
    (offsets.rotate(x, cos_ref, sin_ref, layout, rotated) * (upstream * factor)).sum().backward()

    cos, sin = cos_value.clone().requires_grad_(True), sin_value.clone().requires_grad_(True)
    x_rot = offsets.rotate(x, cos_value, sin_value, layout, rotated).requires_grad_(True)
    rotation = offsets.Rotation(cos, sin, layout, rotated)
    offsets.rotary_leaf_gradient(x_rot, rotation, factor).backward(upstream)
    torch.testing.assert_close(cos.grad, cos_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sin.grad, sin_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_rot.grad, upstream * factor, rtol=0, atol=0)
