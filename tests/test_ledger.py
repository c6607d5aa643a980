"""The conservation ledger (hf_pelrp.conservation_ledger): its entries sum to the conservation gap, it changes no
map, and each entry is where the rules absorb relevance (zero where they conserve, non-zero where a bias sits)."""

from __future__ import annotations

import pytest
import torch

import hf_pelrp
from helpers.builders import (
    BERT_VOCAB,
    GPT2_VOCAB,
    padded_batch,
    tiny_bert_family,
    tiny_gpt2,
    tiny_llama_family,
)

MODES = ("attnlrp", "cp")


def _inputs(family: str):
    if family == "llama":
        return padded_batch("left")  # ids < 60 fit the tiny LLaMA's vocabulary of 101
    gen = torch.Generator().manual_seed(3)
    vocab = GPT2_VOCAB if family == "gpt2" else BERT_VOCAB
    ids = torch.randint(2, vocab - 1, (2, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding (GPT-2 reads the last real token)
    return ids, mask


def _model(family: str, biases: bool = True):
    if family == "llama":
        return tiny_llama_family()
    if family == "gpt2":
        return tiny_gpt2(biases=biases)
    return tiny_bert_family("bert", biases=biases)


def _tolerance(ledger) -> float:
    return 1e-5 * max(1.0, float(ledger.target_value.abs().max()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_entries_sum_to_the_gap_and_the_maps_are_unchanged(family, mode):
    model = _model(family)
    ids, mask = _inputs(family)
    ledger = hf_pelrp.conservation_ledger(model, ids, mask, mode=mode)
    plain = hf_pelrp.attribute(model, ids, mask, mode=mode)
    n = model.config.num_hidden_layers
    assert ledger.values.shape == (ids.shape[0], len(ledger.stages))
    assert ledger.stages[0] == "embeddings" and ledger.stages[-1] == "head"
    assert sum(name.endswith("attention") for name in ledger.stages) == n
    assert sum(name.endswith("mlp") for name in ledger.stages) == (0 if family == "bert" else n)
    # the hooks only read: the maps and the explained logit are those of attribute() (up to the order in which
    # the backward pass sums the gradients of a split tensor)
    torch.testing.assert_close(ledger.attribution.token, plain.token, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ledger.attribution.position, plain.position, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ledger.target_value, plain.target_value, rtol=0, atol=0)
    gap = plain.conservation_gap.double()
    if not (family == "llama" and mode == "cp"):  # bias-free LLaMA under CP conserves (the next test)
        assert gap.abs().max() > 1e-3  # random biases / the softmax rule: something to split
    torch.testing.assert_close(ledger.values.sum(-1), gap, rtol=0, atol=_tolerance(ledger))
    # the stream holds what the stages pass down: last block output = logit - head
    torch.testing.assert_close(
        ledger.stream[:, -1], ledger.target_value.double() - ledger.values[:, -1], rtol=0, atol=1e-9
    )
    kinds = ledger.by_kind()
    torch.testing.assert_close(sum(kinds.values()), ledger.values.sum(-1), rtol=0, atol=1e-9)
    table = ledger.to_markdown(row=1)
    assert all(name in table for name in ledger.stages) and "total gap" in table
    layers = ledger.layer_table(row=1).splitlines()
    assert len(layers) == 2 + n + 1 and layers[-1].startswith("| out |")


def test_bias_free_llama_cp_every_entry_is_zero_and_attnlrp_loses_only_in_attention():
    model = tiny_llama_family()
    ids, mask = padded_batch("left")
    cp = hf_pelrp.conservation_ledger(model, ids, mask, mode="cp")
    tol = _tolerance(cp)
    # the stream carries the logit undiminished (CP conserves at every stage) ...
    assert cp.stream.abs().min() > 1e-3
    assert cp.values.abs().max() < tol, dict(
        zip(cp.stages, cp.values.abs().max(0).values.tolist(), strict=True)
    )
    att = hf_pelrp.conservation_ledger(model, ids, mask, mode="attnlrp")
    attention = [i for i, name in enumerate(att.stages) if name.endswith("attention")]
    others = [i for i in range(len(att.stages)) if i not in attention]
    # AttnLRP's softmax rule is its only non-conservative rule on a bias-free LLaMA: norms (identity rule), the
    # gated MLP (uniform rule), residual additions and the head conserve exactly
    assert att.values[:, others].abs().max() < _tolerance(att)
    assert att.values[:, attention].abs().max() > 1e-3
    # the rotary relevance of each layer is explained, not lost: the ledger took it out of the attention entry
    assert att.attribution.position_by_layer.abs().sum() > 1e-3


@pytest.mark.parametrize(
    ("bias", "stage"),
    [
        ("transformer.h.1.attn.c_proj.bias", "layer 1 attention"),
        ("transformer.h.1.mlp.c_proj.bias", "layer 1 mlp"),
        ("transformer.h.0.ln_2.bias", "layer 0 rest"),  # a LayerNorm bias's share: outside attention / MLP
        ("transformer.ln_f.bias", "head"),
    ],
)
def test_a_bias_shows_up_in_its_own_stage_only(bias, stage):
    model = tiny_gpt2(biases=False)
    ids, mask = _inputs("gpt2")
    clean = hf_pelrp.conservation_ledger(model, ids, mask, mode="cp")
    assert clean.values.abs().max() < _tolerance(clean)  # bias-free GPT-2 under CP conserves at every stage
    with torch.no_grad():
        model.get_parameter(bias).copy_(
            torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(5))
        )
    biased = hf_pelrp.conservation_ledger(model, ids, mask, mode="cp")
    where = biased.stages.index(stage)
    assert biased.values[:, where].abs().min() > 1e-3
    others = [i for i in range(len(biased.stages)) if i != where]
    assert biased.values[:, others].abs().max() < _tolerance(biased)
    torch.testing.assert_close(
        biased.values[:, where], biased.attribution.conservation_gap.double(), rtol=0, atol=_tolerance(biased)
    )


def test_bias_free_bert_cp_conserves_at_every_stage():
    model = tiny_bert_family("bert", biases=False)
    ids, mask = _inputs("bert")
    ledger = hf_pelrp.conservation_ledger(model, ids, mask, mode="cp")
    assert ledger.values.abs().max() < _tolerance(ledger)
    assert "n/a" in ledger.to_markdown()  # no shares of a gap at float rounding


def test_html_report_shows_the_ledger_of_each_row():
    model = tiny_llama_family(num_layers=1)
    ids, mask = padded_batch("left", lengths=(5, 3))
    ledger = hf_pelrp.conservation_ledger(model, ids, mask, mode="attnlrp")
    page = ledger.to_html(full_page=False)
    assert page.count("where the unexplained logit goes") == 2  # one table per row
    for stage in ledger.stages:
        assert f"<td>{stage}</td>" in page
    gap = float(ledger.gap[1])
    assert f"{gap:.4g}" in page
    assert "where the unexplained logit goes" not in ledger.attribution.to_html(full_page=False)
    many = hf_pelrp.conservation_ledger(tiny_llama_family(num_layers=3), ids, mask, mode="attnlrp")
    assert "attention (all layers)" in many.to_html(full_page=False)  # 11 stages: summed by kind


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_the_model_keeps_no_hook_after_the_ledger_or_its_failure():
    model = tiny_llama_family(num_layers=1)
    ids, mask = padded_batch("left", lengths=(4,))
    before = _hook_count(model)
    hf_pelrp.conservation_ledger(model, ids, mask)
    assert _hook_count(model) == before
    with pytest.raises(hf_pelrp.AttributionInputError):
        hf_pelrp.conservation_ledger(model, ids, mask, target=" Paris")  # a string target needs a tokenizer
    assert _hook_count(model) == before
