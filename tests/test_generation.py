"""Explaining continuations (teacher forcing), greedy generation, contrastive targets and span sums."""

from __future__ import annotations

import pytest
import torch

import hf_pelrp
from conftest import tiny_llama_family
from hf_pelrp import AttributionInputError, AttributionStateError, GenerationAttribution

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def lm():
    return tiny_llama_family()


@pytest.fixture(scope="module")
def prompt():
    torch.manual_seed(5)
    return torch.randint(1, 101, (1, 6))


@pytest.fixture(scope="module")
def continuation():
    torch.manual_seed(6)
    return torch.randint(1, 101, (4,))


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_each_row_equals_explaining_that_token_alone(lm, prompt, continuation, mode):
    gen = hf_pelrp.attribute(lm, prompt, continuation_ids=continuation, mode=mode)
    assert isinstance(gen, GenerationAttribution)
    steps, prompt_len = continuation.shape[0], prompt.shape[1]
    assert gen.token.shape == gen.position.shape == (steps, prompt_len + steps)
    assert gen.position_by_layer.shape == (steps, 2, prompt_len + steps)
    assert torch.equal(gen.generated_ids, continuation) and torch.equal(gen.target, continuation)
    for s in range(steps):
        prefix = torch.cat([prompt[0], continuation[:s]])[None]
        alone = hf_pelrp.attribute(lm, prefix, target=int(continuation[s]), mode=mode)
        length = prefix.shape[1]
        torch.testing.assert_close(gen.token[s, :length], alone.token[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gen.position[s, :length], alone.position[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            gen.position_by_layer[s, :, :length], alone.position_by_layer[0], atol=1e-6, rtol=1e-5
        )
        torch.testing.assert_close(gen.target_value[s], alone.target_value[0], atol=1e-6, rtol=1e-5)
        # causality: the token itself and everything after it carry exactly nothing
        assert not gen.token[s, length:].any() and not gen.position[s, length:].any()
    torch.testing.assert_close(gen.conservation_gap, gen.target_value - gen.relevance.sum(-1))


def test_cp_mode_conserves_on_a_bias_free_model(lm, prompt, continuation):
    # LLaMA has no biases; CP-LRP with positions as leaves is conservative (method.md section 3.3)
    gen = hf_pelrp.attribute(lm, prompt, continuation_ids=continuation, mode="cp")
    assert gen.conservation_gap.abs().max() < 1e-4 * gen.target_value.abs().max().clamp(min=1)


def test_generate_explains_the_greedy_continuation(lm, prompt):
    gen = hf_pelrp.attribute(lm, prompt, generate=True, max_new_tokens=4)
    with torch.no_grad():
        reference = lm.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False, pad_token_id=0
        )
    assert torch.equal(gen.input_ids, reference[0])
    assert gen.prompt_length == prompt.shape[1]
    # greedy: each explained token is the arg-max, so its logit is the maximum at its step
    with torch.no_grad():
        logits = lm(reference).logits[0, gen.explained_positions]
    torch.testing.assert_close(gen.target_value, logits.max(-1).values, atol=1e-5, rtol=1e-5)


def test_left_padding_of_the_prompt_is_removed(lm, prompt, continuation):
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(prompt)], 1)
    a = hf_pelrp.attribute(lm, padded, attention_mask=mask, continuation_ids=continuation)
    b = hf_pelrp.attribute(lm, prompt, continuation_ids=continuation)
    assert torch.equal(a.input_ids, b.input_ids)
    torch.testing.assert_close(a.relevance, b.relevance)


def test_span_sum_is_one_backward_of_the_summed_logits(lm, prompt, continuation):
    rows = hf_pelrp.attribute(lm, prompt, continuation_ids=continuation)
    total = hf_pelrp.attribute(lm, prompt, continuation_ids=continuation, span_reduce="sum")
    assert total.token.shape == (1, rows.token.shape[1]) and total.span_reduce == "sum"
    torch.testing.assert_close(total.target_value, rows.target_value.sum()[None])
    # the modified backward pass is linear in its seed
    torch.testing.assert_close(total.token[0], rows.token.sum(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total.position[0], rows.position.sum(0), atol=1e-6, rtol=1e-5)
    with pytest.raises(AttributionStateError, match="one row for the whole continuation"):
        total.to_attribution()


def test_contrastive_targets(lm, prompt, continuation):
    attr = hf_pelrp.attribute(lm, prompt, target=7, foil=9)
    with torch.no_grad():
        logits = lm(prompt).logits[0, -1]
    assert attr.target_value.item() == pytest.approx((logits[7] - logits[9]).item(), abs=1e-5)
    assert attr.foil.tolist() == [9]
    plain_t = hf_pelrp.attribute(lm, prompt, target=7)
    plain_f = hf_pelrp.attribute(lm, prompt, target=9)
    torch.testing.assert_close(attr.relevance, plain_t.relevance - plain_f.relevance, atol=1e-6, rtol=1e-5)
    # per-step foils of a continuation
    foils = torch.tensor([3, 4, 5, 6])
    gen = hf_pelrp.attribute(lm, prompt, continuation_ids=continuation, foil=foils)
    plain = hf_pelrp.attribute(lm, prompt, continuation_ids=continuation)
    assert torch.equal(gen.foil, foils)
    full = torch.cat([prompt[0], continuation])[None]
    with torch.no_grad():
        step_logits = lm(full).logits[0, plain.explained_positions]
    torch.testing.assert_close(
        gen.target_value, plain.target_value - step_logits.gather(1, foils[:, None])[:, 0]
    )
    # a classifier's contrast between two classes
    cls = tiny_llama_family(head="sequence_classification", seed=3)
    contrast = hf_pelrp.attribute(cls, prompt, target=2, foil=0)
    with torch.no_grad():
        class_logits = cls(prompt).logits[0]
    assert contrast.target_value.item() == pytest.approx((class_logits[2] - class_logits[0]).item(), abs=1e-5)


def test_to_attribution_rows(lm, prompt, continuation):
    gen = hf_pelrp.attribute(lm, prompt, continuation_ids=continuation)
    attr = gen.to_attribution()
    assert isinstance(attr, hf_pelrp.Attribution) and attr.batch_size == continuation.shape[0]
    assert attr.position_index.tolist() == list(range(prompt.shape[1] - 1, prompt.shape[1] - 1 + 4))
    torch.testing.assert_close(attr.conservation_gap, gen.conservation_gap)
    assert torch.equal(attr.input_ids[2], gen.input_ids)


def test_model_left_unchanged(lm, prompt, continuation):
    lm.train()
    hf_pelrp.attribute(lm, prompt, continuation_ids=continuation)
    hf_pelrp.attribute(lm, prompt, generate=True, max_new_tokens=2)
    assert all(m.training for m in lm.modules())
    lm.eval()
    for module in lm.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(p.grad is None and p.requires_grad for p in lm.parameters())


def test_bad_requests(lm, prompt, continuation):
    two = prompt.expand(2, -1)
    cases = [
        (dict(input_ids=two, continuation_ids=continuation), "batch of 1"),
        (dict(input_ids=prompt, continuation_ids=continuation, generate=True, max_new_tokens=2), "not both"),
        (dict(input_ids=prompt, generate=True), "max_new_tokens"),
        (dict(input_ids=prompt, generate=True, max_new_tokens=0), "max_new_tokens"),
        (dict(input_ids=prompt, continuation_ids=continuation, span_reduce="mean"), "span_reduce"),
        (dict(input_ids=prompt, continuation_ids=continuation, target=3), "do not apply"),
        (dict(input_ids=prompt, continuation_ids=torch.tensor([], dtype=torch.long)), "empty"),
        (dict(input_ids=prompt, continuation_ids=torch.tensor([0.5])), "integer"),
        (dict(input_ids=prompt, continuation_ids=torch.tensor([500])), "out of range"),
        (dict(input_ids=prompt, span_reduce="sum"), "no continuation"),
    ]
    for kwargs, message in cases:
        with pytest.raises(AttributionInputError, match=message):
            hf_pelrp.attribute(lm, **kwargs)
    cls = tiny_llama_family(head="sequence_classification")
    with pytest.raises(AttributionInputError, match="causal language model"):
        hf_pelrp.attribute(cls, prompt, continuation_ids=continuation)
