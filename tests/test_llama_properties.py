"""Properties of PE-LRP on the LLaMA family (method.md section 3): llama, mistral, qwen2; LM and classifier heads."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch

import hf_pelrp
from conftest import tiny_llama_family
from hf_pelrp.rules import relevance_of

TYPES = ["llama", "mistral", "qwen2"]
HEADS = ["causal_lm", "sequence_classification"]
MODES = ["attnlrp", "cp"]

pytestmark = pytest.mark.usefixtures("single_thread")


@cache
def _model(model_type: str = "llama", head: str = "causal_lm", num_layers: int = 2):
    """Shared read-only tiny models (attribution leaves them unchanged; tests that change one make a copy)."""
    return tiny_llama_family(model_type, head, num_layers=num_layers, seed=0)


def _ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 101, (batch, seq), generator=gen)


def _padded(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token rows of different lengths with id 0 (the models' pad_token_id) on ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    return ids, mask


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().sum() / b.abs().sum()).item()


# ---------------------------------------------------------------- 3.1 forward equivalence


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("model_type", TYPES)
def test_forward_equivalence_inside_lrp(model_type, head):
    model = _model(model_type, head)
    ids, mask = _padded([_ids(1, 9)[0], _ids(1, 6, seed=2)[0]], "left")
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
    with torch.no_grad():
        plain = model(**inputs).logits
    for mode in MODES:
        for positional in (True, False):
            with hf_pelrp.lrp(model, mode=mode, positional=positional):
                inside = model(**inputs).logits
            assert inside.requires_grad  # the relevance graph was built
            diff = (inside.detach() - plain).abs().max().item()
            assert diff < 1e-5, f"{model_type}/{head} {mode} positional={positional}: max abs diff {diff}"


# ---------------------------------------------------------------- 3.2 local conservation at RoPE


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_rope_split_is_locally_conservative_in_one_layer(model_type):
    model = _model(model_type, "causal_lm", num_layers=1)
    ids = _ids(2, 9)
    on = hf_pelrp.attribute(model, ids, mode="attnlrp", positional=True)
    off = hf_pelrp.attribute(model, ids, mode="attnlrp", positional=False, target=on.target)
    assert torch.equal(off.position, torch.zeros_like(off.position))
    assert on.position.abs().sum() > 0
    # one layer, bias-free: the relevance cos / sin take at a position is exactly what q / k (and so the
    # token at that position) give up, so the identity holds per position, not only in total
    scale = off.token.abs().max()
    torch.testing.assert_close(on.token + on.position, off.token, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(
        on.token.sum(-1) + on.position.sum(-1), off.token.sum(-1), rtol=0, atol=1e-6 * scale
    )


# ---------------------------------------------------------------- 3.3 global conservation


@pytest.mark.parametrize("positional", [True, False])
def test_cp_mode_is_globally_conservative_for_llama(positional):
    model = _model("llama", "causal_lm")
    attr = hf_pelrp.attribute(model, _ids(3, 9), mode="cp", positional=positional)
    total = attr.token.sum(-1) + attr.position.sum(-1)
    rel_gap = ((total - attr.target_value).abs() / attr.target_value.abs()).max().item()
    print(f"CP conservation, positional={positional}: max relative gap {rel_gap:.2e}")
    assert rel_gap < 1e-5
    torch.testing.assert_close(
        attr.conservation_gap, torch.zeros(3), rtol=0, atol=1e-5 * attr.target_value.abs().max().item()
    )


def test_attnlrp_softmax_rule_absorbs_relevance():
    model = _model("llama", "causal_lm")
    attr = hf_pelrp.attribute(model, _ids(3, 9), mode="attnlrp")
    gap = attr.conservation_gap
    rel = gap.abs() / attr.target_value.abs()
    print(f"AttnLRP conservation gap (bias-free llama, 2 layers): {gap.tolist()} relative {rel.tolist()}")
    assert torch.isfinite(gap).all()
    # the softmax rule is not conservative: the gap is real (its exact value is checked against the explicit
    # per-softmax loss in test_llama_reference.py)
    assert (rel > 1e-3).all()


def test_cp_mode_gives_rotary_positions_exactly_zero():
    model = _model("llama", "causal_lm")
    attr = hf_pelrp.attribute(model, _ids(2, 9), mode="cp", positional=True)
    assert torch.equal(attr.position, torch.zeros_like(attr.position))
    assert torch.equal(attr.position_by_layer, torch.zeros_like(attr.position_by_layer))
    assert attr.token.abs().sum() > 0


# ---------------------------------------------------------------- 3.4 structural zeros


@pytest.mark.parametrize("mode", MODES)
def test_positions_after_the_explained_one_are_exactly_zero(mode):
    model = _model("llama", "causal_lm")
    k = 4
    attr = hf_pelrp.attribute(model, _ids(2, 9), mode=mode, position=k)
    assert attr.position_index.tolist() == [k, k]
    assert torch.equal(attr.token[:, k + 1 :], torch.zeros(2, 9 - k - 1))
    assert torch.equal(attr.position[:, k + 1 :], torch.zeros(2, 9 - k - 1))
    assert torch.equal(attr.position_by_layer[..., k + 1 :], torch.zeros(2, 2, 9 - k - 1))
    assert (attr.token[:, : k + 1] != 0).all()


def test_sin_relevance_at_position_zero_is_zero():
    model = _model("llama", "causal_lm")
    ids, mask = _padded([_ids(1, 9)[0], _ids(1, 6, seed=2)[0]], "left")
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    with hf_pelrp.lrp(model, mode="attnlrp", positional=True) as ctx:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
        logits.gather(1, logits.argmax(-1, keepdim=True)).sum().backward()
        assert sorted(ctx.store.layers) == [0, 1]
        for layer, (cos, sin) in ((i, (v["cos"], v["sin"])) for i, v in ctx.store.layers.items()):
            sin_rel, cos_rel = relevance_of(sin), relevance_of(cos)
            # sin(0) = 0 at the first real token of each row (position id 0): row 0 at 0, row 1 at 3
            assert sin_rel[0, 0] == 0 and sin_rel[1, 3] == 0, f"layer {layer}"
            assert cos_rel[0, 0] != 0 and cos_rel[1, 3] != 0, f"layer {layer}"
            assert (sin_rel[0, 1:] != 0).all()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("mode", MODES)
def test_padding_positions_are_exactly_zero(side, head, mode):
    model = _model("llama", head)
    ids, mask = _padded([_ids(1, 9)[0], _ids(1, 5, seed=2)[0], _ids(1, 7, seed=3)[0]], side)
    attr = hf_pelrp.attribute(model, ids, mask, mode=mode)
    pad = mask == 0
    assert pad.sum() == 6
    assert torch.equal(attr.token[pad], torch.zeros(6))
    assert torch.equal(attr.position[pad], torch.zeros(6))
    assert torch.equal(attr.position_by_layer.transpose(1, 2)[pad], torch.zeros(6, 2))
    assert (attr.token[~pad] != 0).all()


# ---------------------------------------------------------------- 3.5 linearity in the seed


@pytest.mark.parametrize("mode", MODES)
def test_maps_are_linear_in_the_seed(mode):
    model = _model("llama", "causal_lm")
    ids = _ids(2, 8)
    c = -2.5
    with hf_pelrp.lrp(model, mode=mode) as ctx:
        logit = model(input_ids=ids).logits[:, -1, 7]
        (c * logit).sum().backward(retain_graph=True)
        scaled = ctx.maps()
        ctx.zero_grad()
        logit.sum().backward()
        plain = ctx.maps()
    for name in ("token", "position", "position_by_layer"):
        # entries are sums of float32 products with cancellation: tolerance relative to the map's scale
        scale = plain[name].abs().max().item() * abs(c)
        torch.testing.assert_close(scaled[name], c * plain[name], rtol=1e-6, atol=1e-6 * scale)
    assert plain["token"].abs().sum() > 0


# ---------------------------------------------------------------- 3.6 batch invariance


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("head", HEADS)
def test_padded_batch_gives_each_row_its_own_maps(side, head):
    model = _model("llama", head)
    rows = [_ids(1, 9)[0], _ids(1, 4, seed=2)[0], _ids(1, 6, seed=3)[0]]
    ids, mask = _padded(rows, side)
    for mode in MODES:
        batch = hf_pelrp.attribute(model, ids, mask, mode=mode)
        for i, row in enumerate(rows):
            alone = hf_pelrp.attribute(model, row[None], mode=mode, target=batch.target[i : i + 1])
            real = mask[i].bool()
            for name in ("token", "position"):
                torch.testing.assert_close(
                    getattr(batch, name)[i, real], getattr(alone, name)[0], rtol=1e-4, atol=1e-5
                )
            torch.testing.assert_close(
                batch.position_by_layer[i][:, real], alone.position_by_layer[0], rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(batch.target_value[i], alone.target_value[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the family: biases, GQA, sliding window


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_mistral_and_qwen2_give_finite_per_layer_maps(model_type, head):
    model = _model(model_type, head)
    if model_type == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # the q / k / v biases are exercised
    ids, mask = _padded([_ids(1, 9)[0], _ids(1, 6, seed=2)[0]], "left")
    for mode in MODES:
        attr = hf_pelrp.attribute(model, ids, mask, mode=mode)
        assert attr.position_by_layer.shape == (2, 2, 9)  # [B, L, T] with 4 query heads sharing 2 kv heads
        assert torch.isfinite(attr.relevance).all()
        assert torch.isfinite(attr.position_by_layer).all()
        assert attr.token.abs().sum() > 0
        if mode == "attnlrp":
            assert attr.position_by_layer.abs().sum() > 0


# ---------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(dtype):
    fp32 = _model("llama", "causal_lm")
    half = copy.deepcopy(fp32).to(dtype)
    ids, mask = _padded([_ids(1, 9)[0], _ids(1, 6, seed=2)[0]], "left")
    attr = hf_pelrp.attribute(half, ids, mask)
    for name in ("token", "position", "position_by_layer", "target_value"):
        value = getattr(attr, name)
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value).all(), name
    reference = hf_pelrp.attribute(fp32, ids, mask, target=attr.target)
    diff = _rel_l1(attr.relevance, reference.relevance)
    print(f"{dtype}: relative L1 difference of relevance to float32: {diff:.3e}")
    assert diff < 5e-2
    assert next(half.parameters()).dtype == dtype
