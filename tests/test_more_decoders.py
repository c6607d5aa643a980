"""Decoders of issue 18 (``hf_pelrp.adapters.more_decoders``): the rules they add against slow explicit float64
references (plain tensor math on the model's weights, no autograd, no hf_pelrp code)."""

from __future__ import annotations

import pytest
import torch
from transformers import OpenAIGPTConfig, OpenAIGPTForSequenceClassification, OpenAIGPTLMHeadModel

import hf_pelrp
from helpers.reference_absolute import (
    F64,
    _apply,
    _flat,
    _heads,
    _lin,
    attention_forward,
    layer_norm,
    lrp_attention,
    lrp_layer_norm,
    lrp_linear,
    split_sum,
)

pytestmark = pytest.mark.usefixtures("single_thread")

MODES = ("attnlrp", "cp")

# ---- openai-gpt (GPT-1): post-LN blocks, inline attention on a fused c_attn ----------------------------------


def _tiny_openai_gpt(head: str, seed: int = 0):
    config = OpenAIGPTConfig(
        n_embd=16, n_layer=2, n_head=2, vocab_size=31, n_positions=16, pad_token_id=0, num_labels=3
    )
    torch.manual_seed(seed)
    cls = OpenAIGPTLMHeadModel if head == "lm" else OpenAIGPTForSequenceClassification
    model = cls(config).to(F64).eval()
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # LayerNorms away from (1, 0), biases non-zero: a rule that ignores them shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=F64))
    return model


def _gpt1_row(model, ids, mask, token_types, position, target, mode):
    """Explicit PE-LRP of one row (rules of ``helpers/reference_absolute.py``), post-LN:
    ``n = ln_1(x + attn(x))``, ``h = ln_2(n + mlp(n))``."""
    base, cfg = model.transformer, model.config
    seq, n_heads, width = ids.shape[0], cfg.n_head, cfg.n_embd
    pos_ids = (mask.cumsum(0) - 1).clamp(min=0) * mask
    table = base.tokens_embed.weight.detach().to(F64)
    t = table[ids]
    p = base.positions_embed.weight.detach().to(F64)[pos_ids]
    s = table[token_types] if token_types is not None else torch.zeros_like(t)
    allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool)) & mask.bool()[None, :]
    scaling = (width // n_heads) ** -0.5
    x = t + p + s
    acts = []
    for block in base.h:
        a = {"x": x}
        q, k, v = _apply(_lin(block.attn.c_attn, conv1d=True), x).split(width, dim=-1)
        a["q"], a["k"], a["v"] = _heads(q, n_heads), _heads(k, n_heads), _heads(v, n_heads)
        a["S"], a["A"], a["o"] = attention_forward(a["q"], a["k"], a["v"], scaling, allowed)
        a["o_flat"] = _flat(a["o"])
        a["attn"] = _apply(_lin(block.attn.c_proj, conv1d=True), a["o_flat"])
        a["y1"] = x + a["attn"]
        a["n"], a["w1"], a["s1"] = layer_norm(a["y1"], block.ln_1)
        a["f"] = _apply(_lin(block.mlp.c_fc, conv1d=True), a["n"])
        a["g"] = block.mlp.act(a["f"])
        a["m"] = _apply(_lin(block.mlp.c_proj, conv1d=True), a["g"])
        a["y2"] = a["n"] + a["m"]
        x, a["w2"], a["s2"] = layer_norm(a["y2"], block.ln_2)
        a["h"] = x
        acts.append(a)
    head = _lin(model.lm_head if hasattr(model, "lm_head") else model.score)
    logits = _apply(head, x[position])
    tgt = int(logits.argmax()) if target is None else int(target)

    r_logits = torch.zeros_like(logits)
    r_logits[tgt] = logits[tgt]
    r_x = torch.zeros_like(x)
    r_x[position] = lrp_linear(x[position : position + 1], *head, r_logits[None])[0]
    for block, a in zip(reversed(base.h), reversed(acts), strict=True):
        r_y2 = lrp_layer_norm(a["y2"], a["h"], a["w2"], a["s2"], r_x)
        r_n, r_m = split_sum([a["n"], a["m"]], r_y2)
        r_g = lrp_linear(a["g"], *_lin(block.mlp.c_proj, conv1d=True), r_m)
        r_n = r_n + lrp_linear(a["n"], *_lin(block.mlp.c_fc, conv1d=True), r_g)  # identity rule: R_f = R_g
        r_y1 = lrp_layer_norm(a["y1"], a["n"], a["w1"], a["s1"], r_n)
        r_xin, r_attn = split_sum([a["x"], a["attn"]], r_y1)
        r_o = _heads(lrp_linear(a["o_flat"], *_lin(block.attn.c_proj, conv1d=True), r_attn), n_heads)
        r_q, r_k, r_v = lrp_attention(
            a["q"], a["k"], a["v"], scaling, allowed, a["S"], a["A"], a["o"], r_o, mode
        )
        r_qkv = torch.cat([_flat(r_q), _flat(r_k), _flat(r_v)], dim=-1)
        r_x = r_xin + lrp_linear(a["x"], *_lin(block.attn.c_attn, conv1d=True), r_qkv)
    r_t, r_p, r_s = split_sum([t, p, s], r_x)
    return r_t.sum(-1), r_p.sum(-1), r_s.sum(-1), logits[tgt]


@torch.no_grad()
def _gpt1_reference(model, ids, mask, *, mode, target, token_type_ids=None):
    rows = []
    for b in range(ids.shape[0]):
        m = mask[b].long()
        tt = None if token_type_ids is None else token_type_ids[b]
        rows.append(_gpt1_row(model, ids[b], m, tt, int(m.nonzero().max()), target[b], mode))
    return [torch.stack(col) for col in zip(*rows, strict=True)]


def _batch(side: str):
    ids = torch.tensor([[5, 9, 3, 17, 22, 8], [0, 0, 4, 11, 29, 2]])
    mask = (ids != 0).long()
    if side == "right":
        ids = torch.tensor([[5, 9, 3, 17, 22, 8], [4, 11, 29, 2, 0, 0]])
        mask = (ids != 0).long()
    return ids, mask


@pytest.mark.parametrize("token_types", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", ["lm", "cls"])
def test_openai_gpt_matches_the_explicit_float64_reference(head, mode, side, token_types):
    """Token, position and segment maps of GPT-1 (post-LN, q / k / v factors on the fused ``c_attn``) equal the
    explicit rules, row by row, with padding on either side."""
    model = _tiny_openai_gpt(head)
    ids, mask = _batch(side)
    types = torch.tensor([[1, 1, 2, 2, 3, 3], [1, 2, 2, 3, 3, 1]]) if token_types else None
    attr = hf_pelrp.attribute(model, ids, mask, token_type_ids=types, mode=mode)
    token, position, segment, logit = _gpt1_reference(
        model, ids, mask, mode=mode, target=attr.target, token_type_ids=types
    )
    scale = float(token.abs().max())
    assert (
        float(position.abs().max()) > 1e-3 * scale
    )  # the positions carry relevance: the check is not vacuous
    for fast, slow in ((attr.token, token), (attr.position, position)):
        torch.testing.assert_close(fast.double(), slow, rtol=0, atol=1e-8 * scale)
    if token_types:
        torch.testing.assert_close(attr.segment.double(), segment, rtol=0, atol=1e-8 * scale)
    torch.testing.assert_close(attr.target_value.double(), logit, rtol=1e-10, atol=1e-10)


def test_openai_gpt_without_the_qkv_factors_differs_from_the_reference(monkeypatch):
    """The reference sees the factors on c_attn: with them removed (plain gradients through q, k, v) the AttnLRP
    maps no longer match, so the test above would fail for a missing or misplaced factor."""
    import dataclasses

    from hf_pelrp.adapters import more_decoders
    from hf_pelrp.adapters.base import _REGISTRY

    model = _tiny_openai_gpt("lm")
    ids, mask = _batch("left")
    monkeypatch.setitem(
        _REGISTRY, "openai-gpt", dataclasses.replace(more_decoders.OPENAI_GPT, extra_rules=None)
    )
    attr = hf_pelrp.attribute(model, ids, mask, mode="attnlrp")
    token, *_ = _gpt1_reference(model, ids, mask, mode="attnlrp", target=attr.target)
    assert float((attr.token.double() - token).abs().max()) > 1e-3 * float(token.abs().max())


# ---- nanochat: weightless RMSNorm (also on q and k after the rotation) ----------------------------------------


def _weightless_rms_reference(module, x, y, r_y):
    """Identity rule of ``y = x / rms(x)`` (the scale a constant): ``R_x = x * s * R_y / y``, plain float64."""
    eps = getattr(module, "variance_epsilon", None) or module.eps  # NanoChatRMSNorm / nn.RMSNorm
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    zero = y == 0
    return (
        x * scale * torch.where(zero, torch.zeros_like(r_y), r_y / torch.where(zero, torch.ones_like(y), y))
    )


@pytest.mark.parametrize(("model_type", "sites"), [("nanochat", 9), ("diffllama", 7), ("llama4_text", 6)])
def test_weightless_norms_match_the_explicit_float64_rule(monkeypatch, model_type, sites):
    """Every weightless RMSNorm call against the explicit identity rule in both modes, through check_adapter's
    site probes, which have no reference of their own for this surrogate: NanoChat's (before the blocks, in the
    blocks, on q and k after the rotation, final) and DiffLlama's ``groupnorm`` on the differential attention
    output (an ``nn.RMSNorm`` without weight), beside its weighted RMSNorms."""
    from hf_pelrp import check_sites
    from hf_pelrp.adapters.more_decoders import weightless_rms_norm

    monkeypatch.setitem(check_sites.NORM_REFERENCES, weightless_rms_norm, _weightless_rms_reference)
    report = hf_pelrp.check_adapter(model_type)
    norms = [r for r in report.results if r.name.startswith("norm sites")]
    assert norms and all(r.passed and "skipped" not in r.detail for r in norms), str(report)
    assert all(r.detail.startswith(f"{sites} sites") for r in norms)


def test_a_wrong_weightless_reference_is_caught(monkeypatch):
    """The site probe compares against the reference: a reference off by a factor 2 fails (the test above is not
    vacuous)."""
    from hf_pelrp import check_sites
    from hf_pelrp.adapters.more_decoders import weightless_rms_norm

    def wrong(module, x, y, r_y):
        return 2.0 * _weightless_rms_reference(module, x, y, r_y)

    monkeypatch.setitem(check_sites.NORM_REFERENCES, weightless_rms_norm, wrong)
    report = hf_pelrp.check_adapter("nanochat", raise_on_failure=False)
    assert any(r.name.startswith("norm sites") and not r.passed for r in report.results)


# ---- hunyuan_v1_moe: the softmax-router rule on a router whose linear map is ``wg`` --------------------------


def test_hunyuan_router_rule_matches_the_explicit_float64_formula():
    """``w_k = p_{e_k} / S`` with ``p = softmax(x W^T)``, ``S = sum_k p_{e_k}`` a constant, the softmax by its
    Gradient x Input rule, the selection a constant: for an upstream gradient ``g`` at the weights,
    ``grad_l_j = sum_k p_{e_k} (delta_{e_k j} - p_j) g_k / S`` and ``R_x = x * (grad_l W)``, written out."""
    from transformers import HunYuanMoEV1Config
    from transformers.models.hunyuan_v1_moe.modeling_hunyuan_v1_moe import HunYuanMoEV1Gate

    from hf_pelrp.adapters.more_moe import WgSoftmaxRouter
    from hf_pelrp.hooks import Handles

    config = HunYuanMoEV1Config(hidden_size=8, num_experts=5, moe_topk=2, head_dim=4, num_attention_heads=2)
    torch.manual_seed(0)
    gate = HunYuanMoEV1Gate(config).to(F64)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        gate.wg.weight.copy_(torch.randn(gate.wg.weight.shape, generator=gen, dtype=F64))
    x = torch.randn(6, 8, generator=gen, dtype=F64, requires_grad=True)
    g = torch.randn(6, 2, generator=gen, dtype=F64)
    handles = Handles()
    WgSoftmaxRouter().attach(gate, handles)
    try:
        _, weights, index = gate(x)
    finally:
        handles.remove()
    (weights * g).sum().backward()
    fast = (x * x.grad).detach()

    w = gate.wg.weight.detach()
    with torch.no_grad():
        p = torch.softmax(x @ w.T, -1)
        top = p.gather(1, index)
        s = top.sum(-1, keepdim=True)
        grad_p = torch.zeros_like(p).scatter_add(1, index, g / s)  # w_k = p_{e_k} / S, S constant
        grad_l = p * (grad_p - (grad_p * p).sum(-1, keepdim=True))  # softmax Jacobian^T
        ref = x * (grad_l @ w)
    # (transformers and the rule take the softmax in float32: float32 rounding)
    scale = float(ref.abs().max())
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5 * scale)
    # not the plain gradient: with S differentiated the relevance differs
    plain_x = x.detach().clone().requires_grad_(True)
    _, plain_weights, _ = gate(plain_x)
    (plain_weights * g).sum().backward()
    assert float((plain_x.detach() * plain_x.grad - ref).abs().max()) > 1e-2 * scale


def test_minicpm3_rotated_slice_declared_at_the_wrong_end_is_caught(monkeypatch):
    """MiniCPM3's latent attention rotates the LAST qk_rope_head_dim channels of each head with plain half-split
    cos / sin: its declaration passes check_adapter, and the same declaration with the rotated slice at the start
    fails the one-layer rotary split (so the passing check is evidence about the slice)."""
    import dataclasses

    from hf_pelrp.adapters import more_decoders
    from hf_pelrp.adapters.base import _REGISTRY

    right = more_decoders.MINICPM3
    wrong = dataclasses.replace(right, positions=dataclasses.replace(right.positions, rotated="first"))
    monkeypatch.setitem(_REGISTRY, "minicpm3", wrong)
    report = hf_pelrp.check_adapter("minicpm3", raise_on_failure=False)
    assert any(r.name.startswith("rotary split") for r in report.failures), str(report)


# ---- ctrl: fixed sinusoidal positions read from a buffer, scaled embeddings -----------------------------------


def _tiny_ctrl(head: str, seed: int = 0):
    from transformers import CTRLConfig, CTRLForSequenceClassification, CTRLLMHeadModel

    config = CTRLConfig(n_embd=16, dff=32, n_layer=2, n_head=2, vocab_size=31, n_positions=16, pad_token_id=0)
    config.num_labels = 3
    torch.manual_seed(seed)
    model = (CTRLLMHeadModel if head == "lm" else CTRLForSequenceClassification)(config).to(F64).eval()
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=F64))
    return model


def _ctrl_row(model, ids, mask, token_types, position, target, mode):
    """Explicit PE-LRP of one CTRL row: ``e = sqrt(d) t + p + sqrt(d) s`` (p: the sinusoidal row of each counted
    position), pre-LN blocks with separate q / k / v projections, ReLU MLP, final LayerNorm."""
    base, cfg = model.transformer, model.config
    seq, n_heads, width = ids.shape[0], cfg.n_head, cfg.n_embd
    pos_ids = (mask.cumsum(0) - 1).clamp(min=0) * mask
    table = base.w.weight.detach().to(F64)
    root = width**0.5
    t = root * table[ids]
    p = base.pos_encoding.to(F64)[pos_ids]
    s = root * table[token_types] if token_types is not None else torch.zeros_like(t)
    allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool)) & mask.bool()[None, :]
    scaling = (width // n_heads) ** -0.5
    x = t + p + s
    acts = []
    for block in base.h:
        att = block.multi_head_attention
        a = {"x": x}
        a["n1"], a["w1"], a["s1"] = layer_norm(x, block.layernorm1)
        q, k, v = (_apply(_lin(m), a["n1"]) for m in (att.Wq, att.Wk, att.Wv))
        a["q"], a["k"], a["v"] = _heads(q, n_heads), _heads(k, n_heads), _heads(v, n_heads)
        a["S"], a["A"], a["o"] = attention_forward(a["q"], a["k"], a["v"], scaling, allowed)
        a["o_flat"] = _flat(a["o"])
        a["attn"] = _apply(_lin(att.dense), a["o_flat"])
        a["x1"] = x + a["attn"]
        a["n2"], a["w2"], a["s2"] = layer_norm(a["x1"], block.layernorm2)
        a["f"] = _apply(_lin(block.ffn[0]), a["n2"])
        a["g"] = torch.relu(a["f"])
        a["m"] = _apply(_lin(block.ffn[2]), a["g"])
        x = a["x1"] + a["m"]
        acts.append(a)
    nf, wf, sf = layer_norm(x, base.layernorm)
    head = _lin(model.lm_head if hasattr(model, "lm_head") else model.classifier)
    logits = _apply(head, nf[position])
    tgt = int(target)

    r_logits = torch.zeros_like(logits)
    r_logits[tgt] = logits[tgt]
    r_nf = torch.zeros_like(nf)
    r_nf[position] = lrp_linear(nf[position : position + 1], *head, r_logits[None])[0]
    r_x = lrp_layer_norm(x, nf, wf, sf, r_nf)
    for block, a in zip(reversed(base.h), reversed(acts), strict=True):
        att = block.multi_head_attention
        r_x1, r_m = split_sum([a["x1"], a["m"]], r_x)
        r_g = lrp_linear(a["g"], *_lin(block.ffn[2]), r_m)
        r_n2 = lrp_linear(a["n2"], *_lin(block.ffn[0]), r_g)  # identity rule: R_f = R_g
        r_x1 = r_x1 + lrp_layer_norm(a["x1"], a["n2"], a["w2"], a["s2"], r_n2)
        r_xin, r_attn = split_sum([a["x"], a["attn"]], r_x1)
        r_o = _heads(lrp_linear(a["o_flat"], *_lin(att.dense), r_attn), n_heads)
        r_q, r_k, r_v = lrp_attention(
            a["q"], a["k"], a["v"], scaling, allowed, a["S"], a["A"], a["o"], r_o, mode
        )
        r_n1 = sum(
            lrp_linear(a["n1"], *_lin(m), _flat(r)) for m, r in ((att.Wq, r_q), (att.Wk, r_k), (att.Wv, r_v))
        )
        r_x = r_xin + lrp_layer_norm(a["x"], a["n1"], a["w1"], a["s1"], r_n1)
    r_t, r_p, r_s = split_sum([t, p, s], r_x)
    return r_t.sum(-1), r_p.sum(-1), r_s.sum(-1), logits[tgt]


@pytest.mark.parametrize("token_types", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", ["lm", "cls"])
def test_ctrl_matches_the_explicit_float64_reference(head, mode, side, token_types):
    """CTRL's token, sinusoidal position and segment maps equal the explicit rules, row by row, with padding on
    either side (the position leaf takes exactly the epsilon share of the buffer's rows)."""
    model = _tiny_ctrl(head)
    ids, mask = _batch(side)
    types = torch.tensor([[1, 1, 2, 2, 3, 3], [1, 2, 2, 3, 3, 1]]) if token_types else None
    attr = hf_pelrp.attribute(model, ids, mask, token_type_ids=types, mode=mode)
    rows = []
    with torch.no_grad():
        for b in range(ids.shape[0]):
            m = mask[b].long()
            tt = None if types is None else types[b]
            rows.append(_ctrl_row(model, ids[b], m, tt, int(m.nonzero().max()), attr.target[b], mode))
    token, position, segment, logit = (torch.stack(col) for col in zip(*rows, strict=True))
    scale = float(token.abs().max())
    assert float(position.abs().max()) > 1e-3 * scale
    for fast, slow in ((attr.token, token), (attr.position, position)):
        torch.testing.assert_close(fast.double(), slow, rtol=0, atol=1e-8 * scale)
    if token_types:
        torch.testing.assert_close(attr.segment.double(), segment, rtol=0, atol=1e-8 * scale)
    torch.testing.assert_close(attr.target_value.double(), logit, rtol=1e-10, atol=1e-10)


def test_ctrl_without_positions_leaves_the_sinusoids_as_constants():
    """``positional=False``: no position leaf, the position map is 0 and the token map is unchanged in CP mode
    (the sinusoids absorb their share as a constant)."""
    model = _tiny_ctrl("lm")
    ids, mask = _batch("left")
    on = hf_pelrp.attribute(model, ids, mask, mode="cp")
    off = hf_pelrp.attribute(model, ids, mask, mode="cp", positional=False)
    assert float(off.position.abs().max()) == 0.0 and float(on.position.abs().max()) > 0.0
    torch.testing.assert_close(on.token, off.token)


# ---- gpt_neox_japanese: the "lrp" attention's factors on an inline attention with partial rotary --------------


@pytest.mark.parametrize("wrong", ["whole head halved", "leaves without the 1/2", "no rotary 1/2"])
def test_neox_japanese_factors_declared_wrongly_are_caught(monkeypatch, wrong):
    """The declaration passes check_adapter (test_adapters.py); each of three plausible mistakes in its factors
    (the rotary 1/2 on every channel of q and k, the leaves given qk_factor instead of qk_factor / 2, no rotary
    1/2 at all) fails the one-layer rotary split, so the passing check is evidence about the factors."""
    import dataclasses

    from hf_pelrp.adapters import more_decoders
    from hf_pelrp.adapters.base import _REGISTRY

    def rules(model, config, store):
        out = []
        for block in model.base_model.layers:
            attention = block.attention
            width, rotated = attention.head_size, attention.rotary_ndims
            head = torch.full((3 * width,), float(config.qk_factor), dtype=torch.float64)
            head[2 * width :] = config.v_factor
            if config.positional:
                halved = (
                    width if wrong == "whole head halved" else (0 if wrong == "no rotary 1/2" else rotated)
                )
                head[:halved] *= 0.5
                head[width : width + halved] *= 0.5
                leaf_factor = config.qk_factor * (1.0 if wrong == "leaves without the 1/2" else 0.5)
                out.append((attention, more_decoders._ScaleRotaryLeaves(leaf_factor)))
            out.append(
                (
                    attention.query_key_value,
                    more_decoders._ChannelFactors(head.repeat(attention.num_attention_heads)),
                )
            )
        return out

    wrong_adapter = dataclasses.replace(more_decoders.GPT_NEOX_JAPANESE, extra_rules=rules)
    monkeypatch.setitem(_REGISTRY, "gpt_neox_japanese", wrong_adapter)
    report = hf_pelrp.check_adapter("gpt_neox_japanese", raise_on_failure=False)
    assert any(r.name.startswith("rotary split") for r in report.failures), str(report)


# ---- dbrx: routed experts of DBRX's own layout, routing re-computed at the experts ----------------------------


@pytest.mark.parametrize("mode", MODES)
def test_dbrx_experts_rule_matches_the_explicit_float64_formula(mode):
    """``sum_k w_k E_{e_k}(x)`` with ``E_e(x) = (act(x W1_e^T) * (x V1_e^T)) W2_e`` and ``w_k = p_{e_k} / S``
    (``p = softmax(x Wr^T)``, ``S`` a constant), written out: the identity rule at ``act`` (local gradient
    ``act(z) / z``), AttnLRP 1/2 at ``act * up`` and at ``w * E`` (CP: gate and weight constants), the softmax
    by its Gradient x Input rule. Relevance at the experts' input ``x`` for an upstream gradient ``g``."""
    from transformers import DbrxConfig
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    from hf_pelrp.adapters.moe import MixtureOfExperts
    from hf_pelrp.adapters.more_moe import DbrxExpertsRule
    from hf_pelrp.config import LRPConfig
    from hf_pelrp.hooks import Handles

    config = DbrxConfig(
        d_model=8,
        n_heads=2,
        n_layers=1,
        attn_config={"kv_n_heads": 1, "rope_theta": 10000.0, "clip_qkv": 1.0},
        ffn_config={"hidden_size": 8, "ffn_hidden_size": 6, "moe_num_experts": 4, "moe_top_k": 2},
    )
    ffn = DbrxFFN(config).to(F64).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ffn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.5)
    x = torch.randn(1, 5, 8, generator=gen, dtype=F64, requires_grad=True)
    g = torch.randn(1, 5, 8, generator=gen, dtype=F64)
    factors = MixtureOfExperts(experts="DbrxExperts").factors(LRPConfig(mode=mode))
    handles = Handles()
    DbrxExpertsRule(ffn.router, factors, "experts").attach(ffn.experts, handles)
    try:
        out = ffn(x)
    finally:
        handles.remove()
    (out * g).sum().backward()
    fast = (x.detach() * x.grad)[0]

    with torch.no_grad():
        xs, gs = x[0].detach(), g[0]
        wr = ffn.router.layer.weight.detach()
        p = torch.softmax(xs @ wr.T, -1)
        top, index = torch.topk(p, 2, dim=-1)
        s = top.sum(-1, keepdim=True)
        w = top / s
        glu = ffn.experts.mlp
        w1, v1, w2 = (t.detach().view(4, 6, 8) for t in (glu.w1, glu.v1, glu.w2))
        grad_x = torch.zeros_like(xs)
        grad_p = torch.zeros_like(p)
        for n in range(5):
            for k in range(2):
                e = int(index[n, k])
                gate, up = xs[n] @ w1[e].T, xs[n] @ v1[e].T
                act = gate * torch.sigmoid(gate)  # SiLU
                expert = (act * up) @ w2[e]
                grad_expert = factors["expert_factor"] * w[n, k] * gs[n]
                grad_p[n, e] += factors["weight_factor"] * (expert * gs[n]).sum() / s[n, 0]
                grad_h = grad_expert @ w2[e].T
                grad_gate = factors["gate_factor"] * grad_h * up * (act / gate)  # identity rule
                grad_up = factors["up_factor"] * grad_h * act
                grad_x[n] += grad_gate @ w1[e] + grad_up @ v1[e]
        grad_l = p * (grad_p - (grad_p * p).sum(-1, keepdim=True))
        ref = xs * (grad_x + grad_l @ wr)
    scale = float(ref.abs().max())
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5 * scale)  # (the router's softmax runs in float32)


# ---- the explicit declarations of types the inference used to explain -----------------------------------------


@pytest.mark.parametrize("model_type", ["helium", "flex_olmo", "mellum", "granitemoeshared"])
def test_the_inference_agrees_with_the_new_explicit_declarations(monkeypatch, model_type):
    """helium, flex_olmo, mellum and granitemoeshared were explained by the inference before they were declared:
    with the declaration taken out of the registry, the inference still builds and proves a declaration for a
    real transformers type (the coverage tests/test_inferred_adapters.py had from them), and it equals the
    explicit one (layout, leaves, norms, gated products, rotary layout, mixture of experts)."""
    import transformers
    from transformers.models.auto import modeling_auto

    from hf_pelrp.adapters.base import _REGISTRY
    from hf_pelrp.check import tiny_config

    explicit = _REGISTRY[model_type]
    config = tiny_config(model_type)
    monkeypatch.delitem(_REGISTRY, model_type)
    cls = getattr(transformers, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    torch.manual_seed(0)
    model = cls(config).eval()
    inferred = hf_pelrp.adapter_for(model)  # inferred and proven by check_adapter, or an error
    assert "inferred" in inferred.name
    assert (inferred.layers, inferred.attention, dict(inferred.embeddings)) == (
        explicit.layers,
        explicit.attention,
        dict(explicit.embeddings),
    )
    assert (inferred.positions.names, inferred.positions.layout) == (
        explicit.positions.names,
        explicit.positions.layout,
    )
    assert dict(inferred.norms) == dict(explicit.norms)
    assert {(g.act, g.up, g.up_channels) for g in inferred.gated} == {
        (g.act, g.up, g.up_channels) for g in explicit.gated
    }
    assert (inferred.extra_rules is None) == (explicit.extra_rules is None)
    if explicit.extra_rules is not None:
        assert inferred.extra_rules == explicit.extra_rules
    assert inferred.experts == explicit.experts  # the same MixtureOfExperts declaration (or none)
    attr = hf_pelrp.attribute(model, torch.tensor([[5, 6, 7, 8]]), mode="cp")
    assert float(attr.position.abs().max()) == 0.0 and bool(torch.isfinite(attr.token).all())


# ---- deepseek_v2: complex rotary leaves, scaled softmax router ------------------------------------------------


def test_complex_rotary_leaves_match_the_explicit_interleaved_rule():
    """``view_as_complex(x) * complex(cos, sin)`` (DeepSeek-V2's apply_rotary_emb) on leaves built from the real
    and imaginary parts: for an upstream gradient ``g`` at the rotated pairs,
    ``R_cos_j = cos_j (g_2j x_2j + g_2j+1 x_2j+1)``, ``R_sin_j = sin_j (g_2j+1 x_2j - g_2j x_2j+1)`` and
    ``R_x`` = the same two products seen from x, so ``R_cos + R_sin = R_x`` per pair (conservation), written out."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb

    gen = torch.Generator().manual_seed(11)
    angles = torch.rand(1, 5, 3, generator=gen, dtype=F64) * 6
    freqs = torch.polar(torch.ones_like(angles), angles) * 1.3
    cos = freqs.real.clone().requires_grad_(True)
    sin = freqs.imag.clone().requires_grad_(True)
    q = torch.randn(1, 2, 5, 6, generator=gen, dtype=F64, requires_grad=True)
    k = torch.randn(1, 1, 5, 6, generator=gen, dtype=F64, requires_grad=True)
    gq, gk = (
        torch.randn(1, 2, 5, 6, generator=gen, dtype=F64),
        torch.randn(1, 1, 5, 6, generator=gen, dtype=F64),
    )
    q_rot, k_rot = apply_rotary_emb(q, k, torch.complex(cos, sin))
    ((q_rot * gq).sum() + (k_rot * gk).sum()).backward()

    def explicit(x, g):
        x0, x1, g0, g1 = x[..., 0::2], x[..., 1::2], g[..., 0::2], g[..., 1::2]
        c, s = cos.detach()[:, None], sin.detach()[:, None]
        r_cos = c * (g0 * x0 + g1 * x1)
        r_sin = s * (g1 * x0 - g0 * x1)
        return r_cos.sum(1), r_sin.sum(1)  # heads summed

    rq_cos, rq_sin = explicit(q.detach(), gq)
    rk_cos, rk_sin = explicit(k.detach(), gk)
    # (the model rotates in float32: float32 rounding)
    torch.testing.assert_close(cos.detach() * cos.grad, rq_cos + rk_cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sin.detach() * sin.grad, rq_sin + rk_sin, rtol=1e-5, atol=1e-6)
    r_x = (q.detach() * q.grad).sum() + (k.detach() * k.grad).sum()
    total = (rq_cos + rk_cos + rq_sin + rk_sin).sum()
    torch.testing.assert_close(r_x, total, rtol=1e-5, atol=1e-6)


def test_deepseek_v2_rotated_slice_declared_at_the_wrong_end_is_caught(monkeypatch):
    """The complex-rotary declaration passes check_adapter; the same with the rotated slice at the start of each
    head fails the one-layer rotary split."""
    import dataclasses

    from hf_pelrp.adapters import more_moe
    from hf_pelrp.adapters.base import _REGISTRY

    right = more_moe.DEEPSEEK_V2
    wrong = dataclasses.replace(right, positions=dataclasses.replace(right.positions, rotated="first"))
    monkeypatch.setitem(_REGISTRY, "deepseek_v2", wrong)
    report = hf_pelrp.check_adapter("deepseek_v2", raise_on_failure=False)
    assert any(r.name.startswith("rotary split") for r in report.failures), str(report)


def test_scaled_softmax_router_matches_the_explicit_float64_formula():
    """``w_k = c p_{e_k}`` (``p = softmax(x W^T)``, no renormalisation, ``c`` = routed_scaling_factor): for an
    upstream gradient ``g`` at the weights, ``grad_l = p * (grad_p - sum(grad_p p))`` with ``grad_p[e_k] = c g_k``
    and ``R_x = x * (grad_l W)``, written out."""
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    from hf_pelrp.adapters.more_moe import ScaledSoftmaxRouter
    from hf_pelrp.hooks import Handles

    config = DeepseekV2Config(
        hidden_size=8,
        num_attention_heads=2,
        n_routed_experts=6,
        num_experts_per_tok=2,
        routed_scaling_factor=2.5,
        topk_method="greedy",
    )
    router = DeepseekV2TopkRouter(config).to(F64)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen, dtype=F64))
    x = torch.randn(5, 8, generator=gen, dtype=F64, requires_grad=True)
    g = torch.randn(5, 2, generator=gen, dtype=F64)
    handles = Handles()
    ScaledSoftmaxRouter().attach(router, handles)
    try:
        _, weights, index = router(x)
    finally:
        handles.remove()
    (weights * g).sum().backward()
    fast = x.detach() * x.grad
    with torch.no_grad():
        w = router.weight.detach()
        p = torch.softmax(x @ w.T, -1)
        grad_p = torch.zeros_like(p).scatter_add(1, index, 2.5 * g)
        grad_l = p * (grad_p - (grad_p * p).sum(-1, keepdim=True))
        ref = x * (grad_l @ w)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))  # float32 softmax


def test_dbrx_top_k_normalisation_none_is_explained_and_other_norms_are_refused():
    """``moe_normalize_expert_weights=None`` (no renormalisation) passes check_adapter; a 2-norm is refused by
    name, never explained with the 1-norm's rule."""
    from hf_pelrp.check import tiny_config

    config = tiny_config("dbrx")
    config.ffn_config.moe_normalize_expert_weights = None
    assert hf_pelrp.check_adapter(config).passed
    config = tiny_config("dbrx")
    config.ffn_config.moe_normalize_expert_weights = 2.0
    report = hf_pelrp.check_adapter(config, raise_on_failure=False)
    assert not report.passed and "2.0-norm" in report.failures[0].detail


# ---- llama4_text: batched experts on score-scaled inputs, constant sigmoid scores, temperature tuning -----------


@pytest.mark.parametrize("mode", MODES)
def test_llama4_experts_rule_matches_the_explicit_float64_formula(mode):
    """``E_e(z) = (act(z G_e) * (z U_e)) D_e`` for every expert on its rows (``gate_up_proj = [G | U]``), written
    out: the identity rule at ``act`` (local gradient ``act(a) / a``), AttnLRP 1/2 on each factor of the product
    (CP: the activated gate a constant). Relevance at the experts' input for an upstream gradient ``g``."""
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    from hf_pelrp.adapters.more_moe import Llama4ExpertsRule
    from hf_pelrp.config import LRPConfig
    from hf_pelrp.hooks import Handles

    config = Llama4TextConfig(hidden_size=8, intermediate_size=6, num_local_experts=3, num_attention_heads=2)
    experts = Llama4TextExperts(config).to(F64)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.5)
    z = torch.randn(3 * 4, 8, generator=gen, dtype=F64, requires_grad=True)  # 3 experts x 4 tokens
    g = torch.randn(3 * 4, 8, generator=gen, dtype=F64)
    cfg = LRPConfig(mode=mode)
    handles = Handles()
    Llama4ExpertsRule(cfg.gate_factor, cfg.up_factor).attach(experts, handles)
    try:
        out = experts(z)
    finally:
        handles.remove()
    (out * g).sum().backward()
    fast = z.detach() * z.grad

    with torch.no_grad():
        zs, gs = z.detach().view(3, 4, 8), g.view(3, 4, 8)
        w = experts.gate_up_proj.detach()
        gate, up = zs @ w[..., :6], zs @ w[..., 6:]
        act = gate * torch.sigmoid(gate)  # SiLU
        grad_h = gs @ experts.down_proj.detach().transpose(1, 2)
        grad_gate = cfg.gate_factor * grad_h * up * (act / gate)  # identity rule
        grad_up = cfg.up_factor * grad_h * act
        ref = (zs * (grad_gate @ w[..., :6].transpose(1, 2) + grad_up @ w[..., 6:].transpose(1, 2))).view(
            12, 8
        )
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)


def test_llama4_router_scores_are_constants_and_temperature_tuning_is_refused():
    """The sigmoid scores reach the experts as constants (no gradient to the router in either mode), and a model
    with attn_temperature_tuning (on in transformers' default config) is refused with the reason."""
    from hf_pelrp.check import tiny_config

    config = tiny_config("llama4_text")
    import transformers

    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(config).to(F64).eval()
    router = model.model.layers[1].feed_forward.router
    for mode in MODES:
        router.weight.grad = None
        with hf_pelrp.lrp(model, mode=mode):
            router.weight.requires_grad_(True)
            try:
                model(torch.tensor([[5, 6, 7, 8]])).logits[0, -1, 3].backward()
            finally:
                router.weight.requires_grad_(False)
        assert router.weight.grad is None or float(router.weight.grad.abs().max()) == 0.0
    config.attn_temperature_tuning = True
    report = hf_pelrp.check_adapter(config, raise_on_failure=False)
    assert not report.passed and "attn_temperature_tuning" in report.failures[0].detail


def test_cohere2_moe_sigmoid_selection_is_refused_with_the_reason():
    """Cohere2-MoE's softmax router is declared; its sigmoid expert selection is refused by name."""
    from hf_pelrp.check import tiny_config

    config = tiny_config("cohere2_moe")
    config.expert_selection_fn = "sigmoid"
    report = hf_pelrp.check_adapter(config, raise_on_failure=False)
    assert not report.passed and "expert_selection_fn" in report.failures[0].detail


# ---- phimoe: SparseMixer routing needs no hook ------------------------------------------------------------------


def test_phimoe_sparsemixer_router_gradient_is_the_softmax_rule():
    """The eval-mode SparseMixer weights are ``softmax_{M1}(l)[e1]`` and ``softmax_{M2}(l')[e2]`` (``l = x W^T``,
    ``M1``, ``M2`` relative-threshold masks computed without gradient, ``l'`` = ``l`` without ``e1``): entries of
    softmaxes of constant-masked logits, with no renormalisation. Their rule (Gradient x Input, masked entries 0)
    is what plain autograd through the router gives, so the declaration attaches no router hook: for an upstream
    gradient ``g``, ``R_x = x * (grad_l W)`` with ``grad_l = sum_m p_m (gp_m - sum(gp_m p_m))``, written out."""
    from transformers import PhimoeConfig
    from transformers.models.phimoe.modeling_phimoe import PhimoeTopKRouter

    config = PhimoeConfig(hidden_size=8, num_local_experts=6, num_attention_heads=2, router_jitter_noise=0.3)
    router = PhimoeTopKRouter(config).to(F64).eval()
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen, dtype=F64))
    x = torch.randn(7, 8, generator=gen, dtype=F64, requires_grad=True)
    g = torch.randn(7, 2, generator=gen, dtype=F64)
    _, weights, index = router(x)
    (weights * g).sum().backward()
    fast = x.detach() * x.grad

    eps = 2 * config.router_jitter_noise
    with torch.no_grad():
        w = router.weight.detach()
        logits = x.detach() @ w.T
        grad_l = torch.zeros_like(logits)
        current = logits.clone()
        for slot in range(2):
            top, arg = current.max(-1, keepdim=True)
            masked = ((top - logits) / logits.abs().clamp(min=top)) > eps
            masked |= torch.isinf(current)  # the expert already taken
            p = torch.softmax(logits.masked_fill(masked, float("-inf")), -1)
            assert torch.equal(arg[:, 0], index[:, slot])
            torch.testing.assert_close(p.gather(1, arg)[:, 0], weights[:, slot].detach())
            gp = torch.zeros_like(p).scatter(1, arg, g[:, slot : slot + 1])
            grad_l += p * (gp - (gp * p).sum(-1, keepdim=True))
            current = current.scatter(1, arg, float("-inf"))
        ref = x.detach() * (grad_l @ w)
    assert (
        int((~torch.isinf(logits.masked_fill(masked, float("-inf")))).sum()) > 7
    )  # masks keep several experts
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)


def test_complex_rotary_is_not_taken_for_a_cos_sin_pair_by_the_position_tests():
    """The evaluation's position flipping intervenes on (cos, sin) pairs; DeepSeek-V2 passes one complex tensor,
    so the position tests refuse it by its kind instead of passing it a pair."""
    import transformers

    from hf_pelrp import UnsupportedModelError
    from hf_pelrp.check import tiny_config
    from hf_pelrp.evaluation._engine_gaps import positional_site

    torch.manual_seed(0)
    model = transformers.DeepseekV2ForCausalLM(tiny_config("deepseek_v2")).eval()
    with pytest.raises(UnsupportedModelError, match="complex rotary"):
        positional_site(model)
