"""BERT-family adapters (``bert``, ``roberta``, ``distilbert`` learned and sinusoidal): method.md section 3."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
)

import hf_pelrp
from helpers.builders import BERT_VOCAB as VOCAB
from helpers.builders import MASK_ID, right_padded, tiny_bert_family
from helpers.reference_absolute import bert_reference
from hf_pelrp import AttributionInputError

MODES = ("attnlrp", "cp")
FAMILIES = ("bert", "roberta", "distilbert", "distilbert-sinusoidal")
HEADS = ("cls", "mlm")


def run(model, ids, mask, **kwargs):
    """``attribute`` with the masked-LM keywords where the head needs them (the [MASK] sits at position 2)."""
    if type(model).__name__.endswith("ForMaskedLM"):
        kwargs = {"position": 2, "mask_token_id": MASK_ID, **kwargs}
    return hf_pelrp.attribute(model, ids, mask, **kwargs)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("positional", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_equivalence_and_clean_exit(family, head, mode, positional):
    model = tiny_bert_family(family, head)
    ids, mask = right_padded(family, mask_at=2)
    hooks = _hook_count(model)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
    with hf_pelrp.lrp(model, mode, positional):
        inside = model(ids, attention_mask=mask).logits
    assert (inside - plain).abs().max().item() < 1e-5
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, plain)
    assert _hook_count(model) == hooks

    # attribute() leaves the model's own position ids alone (RoBERTa counts them after padding_idx)
    attr = run(model, ids, mask, mode=mode, positional=positional)
    explained = plain[:, 2] if head == "mlm" else plain
    torch.testing.assert_close(attr.target_value, explained.gather(1, attr.target[:, None]).squeeze(1))
    assert torch.isfinite(attr.relevance).all()
    assert (attr.position == 0).all() if not positional else attr.position.abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_split_completeness_at_embedding_sum(family, head, mode):
    """R_t + R_p (+ R_s) = R_e, with R_e read at the input of the embedding LayerNorm."""
    model = tiny_bert_family(family, head)
    ids, mask = right_padded(family, mask_at=2)
    kwargs = {}
    if family == "bert":
        kwargs["token_type_ids"] = (torch.arange(ids.shape[1]) >= 3).long().expand_as(ids)
    seen = {}

    def keep(_module, args):
        args[0].retain_grad()
        seen["e"] = args[0]

    emb = model.base_model.embeddings
    handles = [emb.LayerNorm.register_forward_pre_hook(keep)]
    try:
        with hf_pelrp.lrp(model, mode) as ctx:
            logits = model(ids, attention_mask=mask, **kwargs).logits
            if head == "mlm":
                logits = logits[:, 2]
            logits.max(-1).values.sum().backward()
            maps = ctx.maps()
    finally:
        for handle in handles:
            handle.remove()
    e = seen["e"]
    r_e = (e * e.grad).sum(-1)
    total = maps["token"] + maps["position"]
    # BERT's token types and RoBERTa's single token-type vector are both the segment leaf
    if not family.startswith("distilbert"):
        assert maps["segment"] is not None and maps["segment"].abs().sum() > 0
    if family.startswith("distilbert"):
        assert maps["segment"] is None
    else:
        total = total + maps["segment"]
    torch.testing.assert_close(total, r_e, rtol=1e-5, atol=1e-6 * r_e.abs().max().item())


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_global_conservation_cp_bias_free(family, head):
    """No biases, CP mode, identity rules (LayerNorm, GELU, the pooler's / RoBERTa head's tanh): exact."""
    model = tiny_bert_family(family, head, biases=False)
    ids, mask = right_padded(family, mask_at=2)
    kwargs = (
        {"token_type_ids": (torch.arange(ids.shape[1]) >= 3).long().expand_as(ids)}
        if family == "bert"
        else {}
    )
    attr = run(model, ids, mask, mode="cp", **kwargs)
    assert attr.position.abs().sum() > 0
    torch.testing.assert_close(attr.relevance.sum(-1), attr.target_value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_invariance_and_padding_zero(family, head, mode):
    model = tiny_bert_family(family, head)
    ids, mask = right_padded(family, mask_at=2)
    batch = run(model, ids, mask, mode=mode)
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        alone = run(model, ids[b, real][None], None, mode=mode)
        for name in ("token", "position"):
            torch.testing.assert_close(
                getattr(batch, name)[b, real], getattr(alone, name)[0], rtol=1e-4, atol=1e-6
            )
            assert (getattr(batch, name)[b, ~real] == 0).all()
        torch.testing.assert_close(batch.target_value[b], alone.target_value[0], rtol=1e-5, atol=1e-6)
        if batch.segment is not None:
            assert (batch.segment[b, ~real] == 0).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", HEADS)
def test_bert_matches_explicit_reference(head, mode):
    """Fast path (fp32, Gradient x Input) against the explicit float64 rules of reference_absolute.py."""
    model = tiny_bert_family("bert", head, num_layers=1)
    ids, mask = right_padded("bert", mask_at=2)
    token_types = (torch.arange(ids.shape[1]) >= 3).long().expand_as(ids).clone()
    attr = run(model, ids, mask, mode=mode, token_type_ids=token_types)
    position = torch.full((ids.shape[0],), 2) if head == "mlm" else None
    ref = bert_reference(
        model, ids, mask, mode=mode, target=attr.target, position=position, token_type_ids=token_types
    )
    scale = ref.token.abs().max().item()
    for fast, slow in ((attr.token, ref.token), (attr.position, ref.position), (attr.segment, ref.segment)):
        torch.testing.assert_close(fast.double(), slow, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(attr.target_value.double(), ref.logit, rtol=1e-5, atol=1e-6)


def test_distilbert_sinusoidal_table_receives_relevance_and_is_unchanged():
    model = tiny_bert_family("distilbert-sinusoidal", "cls")
    table = model.distilbert.embeddings.position_embeddings.weight
    dim = table.shape[1]
    pos = torch.arange(table.shape[0], dtype=torch.float64)[:, None]
    j = torch.arange(dim)[None, :]
    angle = pos / 10000 ** (2 * (j // 2) / dim)
    sinusoid = torch.where(j % 2 == 0, angle.sin(), angle.cos())
    torch.testing.assert_close(table.detach().double(), sinusoid, rtol=0, atol=1e-6)  # the fixed case
    before = table.detach().clone()
    ids, mask = right_padded("distilbert-sinusoidal")

    attr = hf_pelrp.attribute(model, ids, mask, mode="attnlrp")
    real = mask.bool()
    assert (attr.position[real] != 0).all() and (attr.position[~real] == 0).all()
    assert torch.equal(table.detach(), before) and table.grad is None

    # inside lrp() with trainable parameters the user's own backward pass still leaves the table's values alone
    with hf_pelrp.lrp(model, "cp") as ctx:
        model(ids, attention_mask=mask).logits[:, 0].sum().backward()
        assert ctx.maps()["position"].abs().sum() > 0
    assert torch.equal(table.detach(), before)
    model.zero_grad(set_to_none=True)


def test_segment_map_for_models_with_a_token_type_table():
    assert hf_pelrp.attribute(tiny_bert_family("bert"), *right_padded("bert")).segment is not None
    assert hf_pelrp.attribute(tiny_bert_family("roberta"), *right_padded("roberta")).segment is not None
    assert hf_pelrp.attribute(tiny_bert_family("distilbert"), *right_padded("distilbert")).segment is None


def test_roberta_single_token_type_is_a_leaf_so_bias_free_cp_is_exact():
    """RoBERTa's one token-type vector (added at every position) is the segment leaf: its share is reported,
    not absorbed, so with every bias zero the CP gap is 0 and the segment map is exactly that share."""
    model = tiny_bert_family("roberta", biases=False)
    with torch.no_grad():
        model.roberta.embeddings.token_type_embeddings.weight.normal_()
    ids, mask = right_padded("roberta")
    seen = {}
    with hf_pelrp.lrp(model, "cp") as ctx:
        # registered after lrp()'s own hook: it sees the leaf the rules made of the token-type vector
        handle = model.roberta.embeddings.token_type_embeddings.register_forward_hook(
            lambda _m, _a, out: seen.update(s=out)
        )
        try:
            logit = model(ids, attention_mask=mask).logits[:, 0]
            logit.sum().backward()
            maps = ctx.maps()
        finally:
            handle.remove()
    share = (seen["s"] * seen["s"].grad).sum(-1)
    gap = logit.detach() - (maps["token"] + maps["position"] + maps["segment"]).sum(-1)
    assert share.sum(-1).abs().min() > 1e-4
    torch.testing.assert_close(maps["segment"], share.detach(), rtol=1e-5, atol=1e-8)
    # float32: exact up to rounding (a bias left out would leave a gap of the size of `share`)
    torch.testing.assert_close(
        gap, torch.zeros_like(gap), rtol=0, atol=1e-4 * float(logit.detach().abs().max())
    )


def test_masked_lm_position_checks():
    model = tiny_bert_family("bert", "mlm")
    ids, mask = right_padded("bert", mask_at=2)
    with pytest.raises(AttributionInputError, match="pass position="):
        hf_pelrp.attribute(model, ids, mask, mask_token_id=MASK_ID)
    with pytest.raises(AttributionInputError, match="not the mask token"):
        hf_pelrp.attribute(model, ids, mask, position=1, mask_token_id=MASK_ID)
    with pytest.raises(AttributionInputError, match="mask_token_id"):
        hf_pelrp.attribute(model, ids, mask, position=2)
    with pytest.raises(AttributionInputError, match="padding"):
        hf_pelrp.attribute(model, ids, mask, position=torch.tensor([2, 5, 2]), mask_token_id=MASK_ID)
    attr = hf_pelrp.attribute(model, ids, mask, position=2, mask_token_id=MASK_ID)
    with torch.no_grad():
        assert torch.equal(attr.target, model(ids, attention_mask=mask).logits[:, 2].argmax(-1))
    assert torch.equal(attr.position_index, torch.full((3,), 2))
    classifier = tiny_bert_family("bert", "cls")
    with pytest.raises(AttributionInputError, match="position= is only meaningful"):
        hf_pelrp.attribute(classifier, ids, mask, position=2)


def test_bad_token_type_ids():
    ids, mask = right_padded("bert")
    bert = tiny_bert_family("bert")
    with pytest.raises(AttributionInputError, match="token_type_ids has shape"):
        hf_pelrp.attribute(bert, ids, mask, token_type_ids=torch.zeros(3, ids.shape[1] - 1, dtype=torch.long))
    with pytest.raises(AttributionInputError, match="token_type_ids has shape"):
        hf_pelrp.attribute(bert, ids, mask, token_type_ids=torch.zeros(1, ids.shape[1], dtype=torch.long))
    with pytest.raises(AttributionInputError, match="outside the model's 2 token-type ids"):
        hf_pelrp.attribute(bert, ids, mask, token_type_ids=torch.full(ids.shape, 2))
    with pytest.raises(AttributionInputError, match="no token types"):
        hf_pelrp.attribute(tiny_bert_family("distilbert"), ids, mask, token_type_ids=torch.zeros_like(ids))


def test_input_longer_than_the_position_table():
    for family in ("bert", "roberta", "distilbert"):
        model = tiny_bert_family(family)
        limit = 24  # the tiny configs' usable positions (RoBERTa's table is larger by padding_idx + 1)
        ids = torch.randint(3, MASK_ID, (1, limit + 1))
        with pytest.raises(AttributionInputError, match="truncate"):
            hf_pelrp.attribute(model, ids)
        assert hf_pelrp.attribute(model, ids[:, :limit]).token.shape == (1, limit)


def test_deberta_v2_with_its_default_absolute_positions_is_explained():
    """DeBERTa-v2's default config adds absolute positions (position_biased_input=True, no relative attention):
    once refused, now the absolute-positions variant of the declaration, proven by check_adapter."""
    config = DebertaV2Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32
    )
    assert config.position_biased_input and not config.relative_attention
    model = DebertaV2ForSequenceClassification(config).eval()
    ids = torch.randint(3, VOCAB, (1, 5))
    attr = hf_pelrp.attribute(model, ids)
    assert attr.position.abs().sum() > 0
    assert hf_pelrp.check_adapter(config).passed
