"""The fast path (one modified backward pass) against the slow explicit rules of reference_lrp.py (method.md 3.7).

Both run in float64 on the same tiny model, so they must agree to rounding: any missing or extra factor in
a rule (e.g. the 1/2 that A gets at ``A V`` before the softmax) shows up far above the tolerance.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

import hf_pelrp
from conftest import tiny_llama_family
from helpers.reference_lrp import reference_lrp
from hf_pelrp.inputs import causal_position_ids

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-8  # relative to the largest entry of the reference map


@cache
def _model64(model_type: str = "llama", num_layers: int = 2):
    # a larger initialisation than the default 0.02 makes attention peaked, so q / k / cos / sin carry
    # relevance of the same order as v and a wrong factor there cannot hide
    return tiny_llama_family(
        model_type, "causal_lm", num_layers=num_layers, seed=0, initializer_range=0.15
    ).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows: full, left-padded (3 pads), right-padded (2 pads)."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 101, (3, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, 6:] = 0
    return ids * mask, mask


def _fast_float64(model, ids, mask, mode, positional, target, position):
    """Maps of the fast path, read from the leaves of an lrp() context in float64 (no float32 rounding)."""
    rows = torch.arange(ids.shape[0])
    with hf_pelrp.lrp(model, mode=mode, positional=positional) as ctx:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=causal_position_ids(mask)).logits
        seed = logits[rows, position, target]
        leaves = ctx.leaves()
        torch.autograd.backward(seed.sum(), inputs=leaves)
        token_leaf = ctx.store.additive["token"]
        token = (token_leaf.detach() * token_leaf.grad).sum(-1)
        by_layer = torch.zeros(ids.shape[0], len(model.model.layers), ids.shape[1], dtype=torch.float64)
        for layer, (cos, sin) in ((i, (v["cos"], v["sin"])) for i, v in ctx.store.layers.items()):
            for leaf in (cos, sin):
                if leaf.grad is not None:
                    by_layer[:, layer] += (leaf.detach() * leaf.grad).sum(-1)
    return token, by_layer, seed.detach()


def _assert_maps_close(fast, ref, tol, what):
    scale = ref.abs().max().item()
    if scale == 0:
        assert torch.equal(fast, torch.zeros_like(fast)), f"{what}: the reference is exactly 0, fast is not"
        return
    err = (fast.double() - ref).abs().max().item() / scale
    assert err < tol, f"{what}: max error {err:.3e} of the largest entry (tolerance {tol:.0e})"
    return err


@pytest.mark.parametrize("positional", [True, False])
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_fast_path_matches_explicit_rules(mode, positional):
    model = _model64("llama")
    ids, mask = _batch()
    ref = reference_lrp(model, ids, mask, mode=mode, positional=positional)
    position = (torch.arange(ids.shape[1]) * mask).argmax(-1)
    token, by_layer, logit = _fast_float64(model, ids, mask, mode, positional, ref.target, position)
    torch.testing.assert_close(logit, ref.logit, rtol=1e-12, atol=1e-12)
    errs = [
        _assert_maps_close(token, ref.token, TOL, "token"),
        _assert_maps_close(by_layer, ref.position_by_layer, TOL, "position_by_layer"),
        _assert_maps_close(by_layer.sum(1), ref.position, TOL, "position"),
    ]
    print(f"reference agreement {mode} positional={positional}: {errs}")
    if mode == "attnlrp" and positional:
        assert (
            ref.position_by_layer.abs().min() >= 0 and ref.position.abs().sum() > 1e-3 * ref.token.abs().sum()
        )
    # the explicit rules give padding exactly nothing
    assert torch.equal(ref.token[mask == 0], torch.zeros(int((mask == 0).sum()), dtype=torch.float64))


@pytest.mark.parametrize("positional", [True, False])
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_attribute_matches_explicit_rules(mode, positional):
    """The public attribute() on the float64 model: float32 maps, so the tolerance is float32 rounding."""
    model = _model64("llama")
    ids, mask = _batch()
    ref = reference_lrp(model, ids, mask, mode=mode, positional=positional)
    attr = hf_pelrp.attribute(model, ids, mask, mode=mode, positional=positional)
    assert torch.equal(attr.target, ref.target)
    _assert_maps_close(attr.token, ref.token, 1e-6, "token")
    _assert_maps_close(attr.position_by_layer, ref.position_by_layer, 1e-6, "position_by_layer")
    _assert_maps_close(attr.position, ref.position, 1e-6, "position")
    torch.testing.assert_close(attr.target_value.double(), ref.logit, rtol=1e-6, atol=0)
    # bias-free: the conservation gap is exactly what the softmax rule absorbed (0 in CP mode)
    gap = attr.conservation_gap.double()
    torch.testing.assert_close(gap, ref.softmax_absorbed, rtol=0, atol=1e-6 * ref.logit.abs().max().item())
    if mode == "attnlrp":
        print(f"AttnLRP gap {gap.tolist()} = softmax-absorbed {ref.softmax_absorbed.tolist()}")
        assert (ref.softmax_absorbed.abs() > 1e-3 * ref.logit.abs()).all()


def test_explaining_an_earlier_position_with_a_given_target():
    model = _model64("llama")
    ids, mask = _batch()
    position = torch.tensor([3, 5, 2])
    target = torch.tensor([7, 42, 99])
    ref = reference_lrp(model, ids, mask, mode="attnlrp", positional=True, target=target, position=position)
    attr = hf_pelrp.attribute(model, ids, mask, target=target, position=position)
    token, by_layer, _ = _fast_float64(model, ids, mask, "attnlrp", True, target, position)
    _assert_maps_close(token, ref.token, TOL, "token")
    _assert_maps_close(by_layer, ref.position_by_layer, TOL, "position_by_layer")
    _assert_maps_close(attr.token, ref.token, 1e-6, "attribute token")
    for row, k in enumerate(position.tolist()):
        assert torch.equal(ref.token[row, k + 1 :], torch.zeros(8 - k - 1, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_qwen2_biases_match_explicit_rules(mode):
    """Qwen2 has q / k / v biases: the epsilon rule lets them absorb their share on both sides."""
    model = _model64("qwen2")
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():  # random init leaves biases at 0; give them a value so they absorb something
        gen = torch.Generator().manual_seed(11)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.copy_(0.3 * torch.randn(proj.bias.shape, generator=gen, dtype=torch.float64))
    ids, mask = _batch()
    ref = reference_lrp(model, ids, mask, mode=mode, positional=True)
    position = (torch.arange(ids.shape[1]) * mask).argmax(-1)
    token, by_layer, _ = _fast_float64(model, ids, mask, mode, True, ref.target, position)
    _assert_maps_close(token, ref.token, TOL, "token")
    _assert_maps_close(by_layer, ref.position_by_layer, TOL, "position_by_layer")
    if mode == "cp":  # biases absorb relevance even in CP mode
        lost = ref.logit - ref.token.sum(-1) - ref.position.sum(-1)
        assert (lost.abs() > 1e-4 * ref.logit.abs()).all()


# ---------------------------------------------------------------- the reference checks itself


def test_reference_cp_is_conservative_and_rope_split_is_local():
    """The explicit rules on their own: CP conservation, and the RoPE split of a one-layer model."""
    model = _model64("llama")
    ids, mask = _batch()
    cp = reference_lrp(model, ids, mask, mode="cp")
    # not 1e-12: the model computes RMSNorm in float32, so y = (w s) x holds only to float32 rounding
    torch.testing.assert_close(cp.token.sum(-1), cp.logit, rtol=1e-6, atol=0)
    assert torch.equal(cp.position_by_layer, torch.zeros_like(cp.position_by_layer))
    one = _model64("llama", num_layers=1)
    on = reference_lrp(one, ids, mask, mode="attnlrp", positional=True)
    off = reference_lrp(one, ids, mask, mode="attnlrp", positional=False, target=on.target)
    torch.testing.assert_close(
        on.token + on.position, off.token, rtol=0, atol=1e-6 * off.token.abs().max().item()
    )
    assert on.position.abs().sum() > 1e-3 * on.token.abs().sum()
