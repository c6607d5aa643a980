"""The conservation remedies of issue 21: the conservative softmax rules (softmax='identity' / 'split', with an
epsilon) and ResLRP's residual rule (residual_gamma=), each against a slow float64 reference, then in models."""

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
from hf_pelrp import LRPConfig
from hf_pelrp.errors import UnsupportedModelError
from hf_pelrp.rules import residual_rule, softmax_rule

# ---------------------------------------------------------------------------------------------- the rules


def _softmax_case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64) * 2
    z[0, 0, 3] = 0.0  # an exactly zero score passes on nothing
    z[1, 2, :2] = torch.finfo(torch.float64).min  # masked keys: probability 0, relevance 0
    g = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)  # gradient arriving at A
    return z, g


def _softmax_reference(z: torch.Tensor, g: torch.Tensor, rule: str, eps: float) -> torch.Tensor:
    """R_z written out per row and key, from the definitions (not from the library's vectorised form)."""
    out = torch.zeros_like(z)
    rows, queries, keys = z.shape
    for b in range(rows):
        for i in range(queries):
            a = torch.softmax(z[b, i], -1)
            r_a = [float(a[j] * g[b, i, j]) for j in range(keys)]
            for k in range(keys):
                zk = float(z[b, i, k])
                # split: half to exp(z_k), half of the normaliser's total in proportion to exp(z_k)
                r = r_a[k] if rule == "identity" else 0.5 * r_a[k] + 0.5 * float(a[k]) * sum(r_a)
                if zk == 0.0:
                    continue
                out[b, i, k] = r * abs(zk) / (abs(zk) + eps)  # the epsilon keeps the rest
    return out


@pytest.mark.parametrize("rule", ["identity", "split"])
@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_softmax_rule_matches_the_float64_reference(rule, eps):
    z, g = _softmax_case()
    leaf = z.clone().requires_grad_(True)
    probs = torch.softmax(leaf, -1)
    out = softmax_rule(leaf, probs, rule, eps)
    assert torch.equal(out, probs)  # forward unchanged
    out.backward(g)
    relevance = leaf.detach() * leaf.grad
    torch.testing.assert_close(relevance, _softmax_reference(z, g, rule, eps), rtol=1e-10, atol=1e-12)
    if eps == 0.0:  # exactly conservative per row, except the zero score's share
        r_a = probs.detach() * g
        if rule == "split":
            r_a = 0.5 * r_a + 0.5 * probs.detach() * r_a.sum(-1, keepdim=True)
        r_a[0, 0, 3] = 0.0
        torch.testing.assert_close(relevance.sum(-1), r_a.sum(-1), rtol=1e-10, atol=1e-12)


def test_gxi_softmax_rule_is_plain_autograd_and_no_row_reference_changes_its_total():
    z, g = _softmax_case(1)
    z, g = z[2:], g[2:]  # no masked entries
    leaf = z.clone().requires_grad_(True)
    probs = torch.softmax(leaf, -1)
    assert softmax_rule(leaf, probs, "gxi") is probs
    probs.backward(g)
    # Gradient x Input at any reference c per row, (z - c) * grad, has the same total: the softmax Jacobian's
    # columns sum to 0. So the reference point of AttnLRP's softmax rule cannot change the conservation gap.
    totals = [((leaf.detach() - c) * leaf.grad).sum(-1) for c in (0.0, -3.0, 7.5)]
    totals.append(((leaf.detach() - leaf.detach().max(-1, keepdim=True).values) * leaf.grad).sum(-1))
    for t in totals[1:]:
        torch.testing.assert_close(t, totals[0], rtol=1e-10, atol=1e-12)
    gap = (probs.detach() * g).sum(-1) - totals[0]
    assert gap.abs().max() > 1e-3  # and it is not conservative


def test_softmax_rule_refuses_an_unknown_rule():
    z = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="softmax rule must be one of"):
        softmax_rule(z, torch.softmax(z, -1), "max")


def _residual_reference(terms: list[torch.Tensor], gamma: float, r_y: torch.Tensor) -> list[torch.Tensor]:
    """ResLRP's rule element by element: R_i = (1 + gamma [z_i y > 0]) z_i / sum_k (...) z_k * R_y."""
    y = sum(terms)
    out = [torch.zeros_like(t) for t in terms]
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in y.shape]):
        e = tuple(int(i) for i in idx)
        yv = float(y[e])
        weights = [(1 + gamma * (float(t[e]) * yv > 0)) * float(t[e]) for t in terms]
        den = sum(weights)
        for i, w in enumerate(weights):
            out[i][e] = 0.0 if den == 0 else w / den * float(r_y[e])
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.25, 2.0])
def test_residual_rule_matches_the_float64_reference_and_conserves(gamma):
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    b[0, 0] = -a[0, 0]  # y = 0: passes on nothing
    g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    la, lb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y = la + lb
    out = residual_rule((la, lb), y, gamma)
    assert torch.equal(out, y)
    out.backward(g)
    r_y = y.detach() * g
    ref_a, ref_b = _residual_reference([a, b], gamma, r_y)
    torch.testing.assert_close(a * la.grad, ref_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b * lb.grad, ref_b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a * la.grad + b * lb.grad, r_y, rtol=1e-10, atol=1e-12)  # exactly conservative
    if gamma == 0.0:  # the plain sum's gradient (except where y = 0)
        keep = y.detach() != 0
        torch.testing.assert_close(la.grad[keep], g[keep])


def test_residual_rule_refuses_a_negative_gamma():
    a = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        residual_rule((a, a), a + a, -1.0)


# ---------------------------------------------------------------------------------------------- the config


def test_config_validates_the_remedy_fields():
    assert LRPConfig().softmax == "gxi" and LRPConfig().residual_gamma is None
    assert LRPConfig(softmax_eps=1).softmax_eps == 1.0
    with pytest.raises(ValueError, match="softmax must be one of"):
        LRPConfig(softmax="exp")
    with pytest.raises(ValueError, match="applies to mode='attnlrp' only"):
        LRPConfig(mode="cp", softmax="identity")
    with pytest.raises(ValueError, match="softmax_eps"):
        LRPConfig(softmax_eps=-0.1)
    with pytest.raises(ValueError, match="residual_gamma"):
        LRPConfig(residual_gamma=-1.0)
    LRPConfig(mode="cp", residual_gamma=0.5)  # the residual rule composes with both modes


# ---------------------------------------------------------------------------------------------- in models


def _gap(attr) -> torch.Tensor:
    return attr.conservation_gap.abs() / attr.target_value.abs()


@pytest.mark.parametrize("rule", ["identity", "split"])
@pytest.mark.parametrize("positional", [True, False])
def test_conservative_softmax_closes_the_attention_gap_of_a_bias_free_llama(rule, positional):
    model = tiny_llama_family(num_layers=3)
    ids, mask = padded_batch("left")
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    default = hf_pelrp.attribute(model, ids, mask, positional=positional)
    assert _gap(default).max() > 1e-3  # AttnLRP's softmax rule absorbs relevance
    attr = hf_pelrp.attribute(model, ids, mask, config=LRPConfig(softmax=rule, positional=positional))
    assert _gap(attr).max() < 1e-4
    # the eager path computes what SDPA computes, up to float rounding
    torch.testing.assert_close(attr.target_value, default.target_value, rtol=1e-5, atol=1e-6)
    if positional:  # and the rotary positions keep a non-zero map
        assert attr.position.abs().sum() > 1e-3 * attr.relevance.abs().sum()
    with torch.no_grad():  # the model is what it was
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=0)
    # epsilon absorbs part of it: between the exact rule and AttnLRP
    eps = hf_pelrp.attribute(
        model, ids, mask, config=LRPConfig(softmax=rule, softmax_eps=1.0, positional=positional)
    )
    assert (_gap(eps) > _gap(attr)).all()


def test_conservative_softmax_is_refused_for_inline_attention():
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=32, n_layer=1, n_head=4)).eval()
    with pytest.raises(UnsupportedModelError, match="written inline"):
        hf_pelrp.attribute(model, torch.tensor([[1, 2, 3]]), config=LRPConfig(softmax="identity"))


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
@pytest.mark.parametrize("positional", [True, False])
def test_residual_rule_in_a_llama_block(mode, positional):
    model = tiny_llama_family(num_layers=2)
    ids, mask = padded_batch("left")
    plain = hf_pelrp.attribute(model, ids, mask, mode=mode, positional=positional)
    zero = hf_pelrp.attribute(
        model, ids, mask, config=LRPConfig(mode=mode, positional=positional, residual_gamma=0.0)
    )
    # gamma = 0 is the plain sum: the same maps
    torch.testing.assert_close(zero.relevance, plain.relevance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zero.position, plain.position, rtol=1e-5, atol=1e-6)
    cfg = LRPConfig(mode=mode, positional=positional, residual_gamma=1.0)
    attr = hf_pelrp.attribute(model, ids, mask, config=cfg)
    assert (attr.relevance - plain.relevance).abs().max() > 1e-4  # the rule changes the split
    # the residual additions stay exactly conservative: the ledger finds nothing lost outside attention
    ledger = hf_pelrp.conservation_ledger(model, ids, mask, config=cfg)
    kinds = ledger.by_kind()
    scale = 1e-5 * float(ledger.target_value.abs().max())
    for kind in ("rest", "mlp", "head", "embeddings"):
        assert kinds[kind].abs().max() < scale, kind
    torch.testing.assert_close(ledger.values.sum(-1), ledger.gap.double(), rtol=0, atol=scale)
    if mode == "cp":
        assert _gap(attr).max() < 1e-4
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_residual_rule_with_a_conservative_softmax_conserves_everything():
    model = tiny_llama_family(num_layers=2)
    ids, mask = padded_batch("left")
    attr = hf_pelrp.attribute(model, ids, mask, config=LRPConfig(softmax="identity", residual_gamma=0.5))
    assert _gap(attr).max() < 1e-4 and attr.position.abs().sum() > 0


def test_residual_rule_in_gpt2_and_refusals():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, GPT2_VOCAB - 1, (2, 6), generator=gen)
    model = tiny_gpt2(biases=False)
    plain = hf_pelrp.attribute(model, ids, mode="cp")
    attr = hf_pelrp.attribute(model, ids, config=LRPConfig(mode="cp", residual_gamma=0.5))
    assert (attr.relevance - plain.relevance).abs().max() > 1e-5
    assert _gap(attr).max() < 1e-4 and _gap(plain).max() < 1e-4  # bias-free GPT-2 under CP: conservative
    bert = tiny_bert_family("bert")
    bert_ids = torch.randint(2, BERT_VOCAB - 1, (1, 5), generator=gen)
    with pytest.raises(UnsupportedModelError, match="not a pre-norm block"):
        hf_pelrp.attribute(bert, bert_ids, config=LRPConfig(residual_gamma=0.5))
    with pytest.raises(UnsupportedModelError, match="gradient checkpointing"):
        hf_pelrp.attribute(model, ids, config=LRPConfig(residual_gamma=0.5), gradient_checkpointing=True)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in bert.modules())


def test_the_conservative_preset():
    from hf_pelrp.config import preset

    cfg = preset("attnlrp-conservative")
    assert (cfg.mode, cfg.softmax, cfg.softmax_eps, cfg.positional) == ("attnlrp", "identity", 0.1, True)
    model = tiny_llama_family(num_layers=2)
    ids, mask = padded_batch("left")
    attr = hf_pelrp.attribute(model, ids, mask, mode="attnlrp-conservative")
    default = hf_pelrp.attribute(model, ids, mask)
    assert (_gap(attr) < _gap(default)).all() and attr.position.abs().sum() > 0


def test_conservative_softmax_with_a_relative_position_bias_leaf():
    """T5's relative bias is a leaf inside the scores: the identity rule passes its share on and conserves."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0
    )
    model = T5ForConditionalGeneration(config).eval()
    ids, dec = torch.tensor([[3, 5, 7, 9, 11]]), torch.tensor([[0, 4, 6]])
    default = hf_pelrp.attribute(model, ids, decoder_input_ids=dec)
    attr = hf_pelrp.attribute(model, ids, decoder_input_ids=dec, config=LRPConfig(softmax="split"))
    assert _gap(default).max() > 1e-3 and _gap(attr).max() < 1e-4
    assert attr.position.abs().sum() > 1e-3
