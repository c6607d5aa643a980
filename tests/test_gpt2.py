"""GPT-2 adapter: learned absolute positions (``wte + wpe``), method.md section 3 properties on tiny models."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hf_pelrp
from helpers.builders import GPT2_VOCAB as VOCAB
from helpers.builders import padded_batch, tiny_gpt2
from helpers.reference_absolute import gpt2_reference
from hf_pelrp import AttributionInputError, UnsupportedModelError
from hf_pelrp.inputs import causal_position_ids

HEADS = ("lm", "cls")
MODES = ("attnlrp", "cp")


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("positional", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", HEADS)
def test_forward_equivalence_and_clean_exit(head, mode, positional):
    model = tiny_gpt2(head)
    ids, mask = padded_batch("left")
    pos = causal_position_ids(mask)
    hooks = _hook_count(model)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask, position_ids=pos).logits
    with hf_pelrp.lrp(model, mode, positional):
        inside = model(ids, attention_mask=mask, position_ids=pos).logits
    assert (inside - plain).abs().max().item() < 1e-5
    with torch.no_grad():
        after = model(ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(after, plain)
    assert _hook_count(model) == hooks
    assert model.config._attn_implementation != hf_pelrp.LRP_ATTENTION

    attr = hf_pelrp.attribute(model, ids, mask, mode=mode, positional=positional)
    rows = torch.arange(ids.shape[0])
    explained = plain[rows, mask.shape[1] - 1] if head == "lm" else plain
    torch.testing.assert_close(attr.target_value, explained.gather(1, attr.target[:, None]).squeeze(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", HEADS)
def test_split_completeness_at_embedding_sum(head, mode):
    """R_t + R_p + R_s = R_e at e = wte(ids) + wpe(pos) + wte(token_type_ids), read at the dropout input."""
    model = tiny_gpt2(head)
    ids, mask = padded_batch("right")
    token_types = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(3))
    seen = {}

    def keep(_module, args):
        args[0].retain_grad()
        seen["e"] = args[0]

    handle = model.transformer.drop.register_forward_pre_hook(keep)
    try:
        with hf_pelrp.lrp(model, mode) as ctx:
            logits = model(ids, attention_mask=mask, token_type_ids=token_types).logits
            if head == "lm":
                logits = logits[torch.arange(3), mask.sum(-1) - 1]
            logits.max(-1).values.sum().backward()
            maps = ctx.maps()
    finally:
        handle.remove()
    e = seen["e"]
    r_e = (e * e.grad).sum(-1)
    assert maps["segment"] is not None and maps["segment"].abs().sum() > 0
    total = maps["token"] + maps["position"] + maps["segment"]
    torch.testing.assert_close(total, r_e, rtol=1e-5, atol=1e-6 * r_e.abs().max().item())


@pytest.mark.parametrize("head", HEADS)
def test_global_conservation_cp_bias_free(head):
    """No biases, CP mode, identity rules: token + position (+ segment) relevance sums to the explained logit."""
    model = tiny_gpt2(head, biases=False)
    ids, mask = padded_batch("left")
    attr = hf_pelrp.attribute(model, ids, mask, mode="cp")
    assert attr.position.abs().sum() > 0
    torch.testing.assert_close(attr.relevance.sum(-1), attr.target_value, rtol=1e-5, atol=1e-6)

    token_types = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(4))
    seg = hf_pelrp.attribute(model, ids, mask, mode="cp", token_type_ids=token_types)
    assert seg.segment is not None and seg.segment.abs().sum() > 0
    torch.testing.assert_close(seg.relevance.sum(-1), seg.target_value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_positional_false_absorbs_exactly_the_position_relevance(mode):
    """Without position leaves the token map is unchanged and the position share moves into the gap."""
    model = tiny_gpt2("lm", biases=False)
    ids, mask = padded_batch("right")
    on = hf_pelrp.attribute(model, ids, mask, mode=mode, positional=True)
    off = hf_pelrp.attribute(model, ids, mask, mode=mode, positional=False)
    torch.testing.assert_close(off.token, on.token, rtol=1e-5, atol=1e-7)
    assert torch.equal(off.position, torch.zeros_like(off.position))
    torch.testing.assert_close(
        off.conservation_gap - on.conservation_gap, on.position.sum(-1), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("head", HEADS)
def test_batch_invariance_and_padding_zero(head, side):
    model = tiny_gpt2(head)
    ids, mask = padded_batch(side)
    batch = hf_pelrp.attribute(model, ids, mask)
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        alone = hf_pelrp.attribute(model, ids[b, real][None])
        torch.testing.assert_close(batch.token[b, real], alone.token[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(batch.position[b, real], alone.position[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(batch.target_value[b], alone.target_value[0], rtol=1e-5, atol=1e-6)
        assert torch.equal(batch.target[b], alone.target[0])
        assert (batch.token[b, ~real] == 0).all() and (batch.position[b, ~real] == 0).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", HEADS)
def test_matches_explicit_reference(head, mode):
    """Fast path (fp32, Gradient x Input) against the explicit float64 rules of reference_absolute.py."""
    model = tiny_gpt2(head, num_layers=1)
    ids, mask = padded_batch("left")
    token_types = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(5))
    attr = hf_pelrp.attribute(model, ids, mask, mode=mode, token_type_ids=token_types)
    ref = gpt2_reference(model, ids, mask, mode=mode, target=attr.target, token_type_ids=token_types)
    scale = ref.token.abs().max().item()
    for fast, slow in ((attr.token, ref.token), (attr.position, ref.position), (attr.segment, ref.segment)):
        torch.testing.assert_close(fast.double(), slow, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(attr.target_value.double(), ref.logit, rtol=1e-5, atol=1e-6)


def test_inputs_embeds_gives_the_same_maps():
    """With inputs_embeds, wte's only call embeds the token types: it must become the segment leaf."""
    model = tiny_gpt2("lm")
    ids, mask = padded_batch("right")
    token_types = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(6))
    embeds = model.transformer.wte(ids).detach()
    for types in (None, token_types):
        from_ids = hf_pelrp.attribute(model, ids, mask, token_type_ids=types)
        from_embeds = hf_pelrp.attribute(
            model, inputs_embeds=embeds, attention_mask=mask, token_type_ids=types
        )
        assert (from_embeds.segment is None) == (types is None)
        for name in ("token", "position", "segment"):
            if getattr(from_ids, name) is not None:
                torch.testing.assert_close(getattr(from_embeds, name), getattr(from_ids, name))


@pytest.mark.parametrize("mode", MODES)
def test_causal_structural_zeros(mode):
    """Explaining the prediction at position i: tokens and positions after i get exactly 0."""
    model = tiny_gpt2("lm")
    ids, mask = padded_batch("right", lengths=(7, 7))
    attr = hf_pelrp.attribute(model, ids, mask, mode=mode, position=3)
    assert (attr.token[:, 4:] == 0).all() and (attr.position[:, 4:] == 0).all()
    assert (attr.token[:, :4] != 0).all() and (attr.position[:, :4] != 0).all()


def test_linearity_in_the_seed():
    model = tiny_gpt2("cls")
    ids, mask = padded_batch("left")
    maps = []
    for scale in (1.0, -2.5):
        with hf_pelrp.lrp(model) as ctx:
            logits = model(ids, attention_mask=mask, position_ids=causal_position_ids(mask)).logits
            (scale * logits[:, 1]).sum().backward()
            maps.append(ctx.maps())
    for name in ("token", "position"):
        torch.testing.assert_close(maps[1][name], -2.5 * maps[0][name])


def test_bad_token_type_ids_shape():
    model = tiny_gpt2("lm")
    ids, mask = padded_batch("right")
    with pytest.raises(AttributionInputError, match="token_type_ids has shape"):
        hf_pelrp.attribute(model, ids, mask, token_type_ids=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(AttributionInputError, match="integer"):
        hf_pelrp.attribute(model, ids, mask, token_type_ids=torch.zeros(ids.shape))


def test_input_longer_than_the_position_table():
    model = tiny_gpt2("lm")
    ids = torch.randint(2, VOCAB, (1, model.config.n_positions + 1))
    with pytest.raises(AttributionInputError, match="supports at most 24 positions"):
        hf_pelrp.attribute(model, ids)


def test_cross_attention_is_refused():
    config = GPT2Config(
        n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB, n_positions=24, add_cross_attention=True
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(2, VOCAB, (1, 5))
    with pytest.raises(UnsupportedModelError, match="cross-attention.*add_cross_attention"):
        hf_pelrp.attribute(model, ids)
    with pytest.raises(UnsupportedModelError, match="cross-attention"), hf_pelrp.lrp(model):
        pass
