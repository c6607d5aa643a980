"""Gemma, Gemma 2, Gemma 3 (text): the rules that differ from LLaMA, each against an explicit float64 reference.

- the ``(1 + w)`` RMSNorm identity rule (every norm class, Gemma 3's per-head q / k norms included);
- the ``sqrt(hidden)`` embedding scale lives inside the token leaf;
- Gemma 2 attention soft-capping through the ``"lrp"`` attention's eager path: forward identical to the
  model's own eager attention (sliding-window and global layers, padding), identity rule at the cap;
- final-logit soft-capping ``c * tanh(z / c)``: identity rule (``R_z = R_y``) at the LM head's output;
- sliding-window and global layers alternate: the ``"lrp"`` masks reproduce the model's outputs.
"""

from __future__ import annotations

import pytest
import torch

import hf_pelrp
from helpers.reference_attention import AttentionWeights, reference_attention_lrp
from hf_pelrp import UnsupportedModelError
from hf_pelrp.adapters.norms import rms_norm, rms_norm_one_plus
from hf_pelrp.hooks import Handles, Norm
from hf_pelrp.inputs import causal_position_ids

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
SEQ = 8


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def _tiny(kind: str, layers: int = 2, seed: int = 0, **overrides):
    """A float64 Gemma / Gemma 2 / Gemma 3 causal LM with random (1 + w) norm weights."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GemmaConfig,
        GemmaForCausalLM,
    )

    config_cls, model_cls = {
        "gemma": (GemmaConfig, GemmaForCausalLM),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM),
        "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
    }[kind]
    kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=97,
        max_position_embeddings=64,
        pad_token_id=0,
        initializer_range=0.15,
    )
    if kind != "gemma":
        kwargs.update(
            query_pre_attn_scalar=8,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"][:layers],
        )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).to(F64).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=F64))
    return model


def _padded_batch():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 97, (3, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    return ids * mask, mask


# ---- (1 + w) RMSNorm ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, path",
    [
        ("gemma", "model.layers.0.input_layernorm"),
        ("gemma2", "model.layers.0.post_feedforward_layernorm"),
        ("gemma3_text", "model.layers.0.self_attn.q_norm"),  # per head: [B, heads, T, head_dim]
    ],
)
def test_one_plus_rms_norm_identity_rule_matches_explicit_reference(kind, path):
    model = _tiny(kind, layers=1)
    norm = model.get_submodule(path)
    width = norm.weight.shape[0]
    shape = (2, 4, 5, width) if "q_norm" in path else (2, 5, width)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=F64).requires_grad_(True)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    handles = Handles()
    try:
        Norm(rms_norm_one_plus, name=path).attach(norm, handles)
        y = norm(x)
        (y * g).sum().backward()
    finally:
        handles.remove()
    # explicit: y = (1 + w) * s * x with s = 1 / rms(x) a constant, so R_x = x * (1 + w) * s * R_y / y
    w, eps = norm.weight.detach(), norm.eps
    s = torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + eps)
    r_y = y.detach() * g
    r_x_ref = x.detach() * (1.0 + w) * s * r_y / y.detach()
    assert _rel_err(x.detach() * x.grad, r_x_ref) < 1e-6  # the model computes (1 + w) in float32
    # identity rule: element-wise, the relevance passes unchanged
    assert _rel_err(x.detach() * x.grad, r_y) < 1e-6


def test_plain_w_surrogate_is_refused_on_gemma_norms():
    model = _tiny("gemma3_text", layers=1)
    norm = model.model.layers[0].self_attn.k_norm
    handles = Handles()
    try:
        Norm(rms_norm, name="k_norm").attach(norm, handles)
        with pytest.raises(UnsupportedModelError, match="does not reproduce"):
            norm(torch.randn(1, 2, 3, 8, dtype=F64, requires_grad=True))
    finally:
        handles.remove()


def test_every_gemma3_norm_gets_the_one_plus_rule():
    """The q / k norms inside attention are the same class as the block norms: all get the identity rule."""
    from hf_pelrp.adapters import adapter_for_type
    from hf_pelrp.config import resolve_rules
    from hf_pelrp.hooks import LeafStore

    model = _tiny("gemma3_text", layers=1)
    rules = adapter_for_type("gemma3_text").module_rules(
        model, resolve_rules(model, None, None, None), LeafStore()
    )
    with_norm = {id(m) for m, r in rules if isinstance(r, Norm) and r.surrogate is rms_norm_one_plus}
    norms = [m for n, m in model.named_modules() if type(m).__name__ == "Gemma3RMSNorm"]
    assert len(norms) == 7  # input, post-attention, pre- / post-feedforward, q_norm, k_norm, final
    assert all(id(m) in with_norm for m in norms)


# ---- embedding scale ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3_text"])
def test_embedding_scale_is_inside_the_token_leaf(kind):
    model = _tiny(kind, layers=1)
    ids = torch.tensor([[5, 6, 7, 8]])
    table = model.model.embed_tokens
    with hf_pelrp.lrp(model) as ctx:
        model(input_ids=ids)
        leaf = ctx.store.additive["token"]
    expected = table.weight[ids] * table.embed_scale.to(F64)
    assert float(table.embed_scale) == pytest.approx(32**0.5, rel=1e-6)
    torch.testing.assert_close(leaf.detach(), expected.detach(), rtol=0, atol=0)


# ---- sliding-window / global layers and soft-capping: forward equivalence -------------------------------------


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_lrp_attention_reproduces_eager_on_sliding_and_global_layers(kind):
    """The model's own eager attention is the reference (Gemma 2 supports no other). Float64 without left
    padding (transformers' float64 eager turns a query that sees only padding into NaN, which then reaches
    every later token), float32 with all paddings."""
    extra = {"attn_logit_softcapping": 1.0, "final_logit_softcapping": 2.0} if kind == "gemma2" else {}
    model = _tiny(kind, attn_implementation="eager", **extra)
    ids, mask = _padded_batch()
    # Gemma 3's eager softmax runs in float32 where the "lrp" attention (SDPA) stays in float64
    for dtype, rows, tol in (
        (F64, [0, 2], 1e-12 if kind == "gemma2" else 1e-6),
        (torch.float32, [0, 1, 2], 1e-5),
    ):
        model.to(dtype)
        inputs = dict(
            input_ids=ids[rows], attention_mask=mask[rows], position_ids=causal_position_ids(mask[rows])
        )
        real = mask[rows].bool()
        with torch.no_grad():
            eager = model(**inputs).logits
        for mode in ("attnlrp", "cp"):
            with hf_pelrp.lrp(model, mode=mode), torch.enable_grad():
                lrp = model(**inputs).logits.detach()
            assert float((lrp - eager)[real].abs().max()) < tol * float(eager.abs().max())
    # the window matters here: the same weights with global attention everywhere give other logits
    model.to(F64)
    glob = _tiny(kind, attn_implementation="eager", layer_types=["full_attention"] * 2, **extra)
    glob.load_state_dict(model.state_dict())
    inputs = dict(input_ids=ids[:1], attention_mask=mask[:1])
    with torch.no_grad():
        assert float((glob(**inputs).logits - model(**inputs).logits).abs().max()) > 1e-6


def test_gemma3_lrp_attention_reproduces_sdpa():
    model = _tiny("gemma3_text", attn_implementation="sdpa")
    ids, mask = _padded_batch()
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=causal_position_ids(mask))
    with torch.no_grad():
        sdpa = model(**inputs).logits
    with hf_pelrp.lrp(model), torch.enable_grad():
        lrp = model(**inputs).logits.detach()
    assert float((lrp - sdpa)[mask.bool()].abs().max()) < 1e-12


# ---- attention soft-capping and q / k norms: one attention module against the explicit rules ------------------


def _attention_case(kind):
    extra = {"attn_logit_softcapping": 1.0} if kind == "gemma2" else {}
    model = _tiny(kind, layers=1, **extra)
    attn = model.model.layers[0].self_attn
    cfg = model.config

    def lin(m):
        return m.weight.detach(), None if m.bias is None else m.bias.detach()

    qk_norm = None
    if kind == "gemma3_text":
        qk_norm = (attn.q_norm.weight.detach(), attn.k_norm.weight.detach(), attn.q_norm.eps)
    weights = AttentionWeights(
        *lin(attn.q_proj),
        *lin(attn.k_proj),
        *lin(attn.v_proj),
        *lin(attn.o_proj),
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        attn.head_dim,
        attn.scaling,
        attn.head_dim,
        softcap=getattr(attn, "attn_logit_softcapping", None) if kind == "gemma2" else None,
        float32_softmax=kind == "gemma2",  # the eager path's softmax runs in float32, as the model's does
        qk_norm=qk_norm,
    )
    return model, attn, weights


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_gemma_attention_matches_explicit_rules(kind):
    """Gemma 2: soft-capped scores (identity rule at the cap) on the eager path; Gemma 3: (1 + w) q / k norms
    before the rotation, SDPA path. AttnLRP, positions as leaves."""
    model, attn, w = _attention_case(kind)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, SEQ, 32, generator=gen, dtype=F64)
    seed = torch.randn(1, SEQ, 32, generator=gen, dtype=F64)
    rotary = model.model.rotary_emb
    pair = rotary(x, torch.arange(SEQ)[None], *(("sliding_attention",) if kind == "gemma3_text" else ()))
    with hf_pelrp.lrp(model, mode="attnlrp") as ctx:
        leaf = x.clone().requires_grad_(True)
        out = attn(hidden_states=leaf, attention_mask=None, position_embeddings=pair)[0]
        (out * seed).sum().backward()
        leaves = ctx.store.layers[0]
        r_cos, r_sin = ((leaves[n].detach() * leaves[n].grad)[0] for n in ("cos", "sin"))
    r_x = (leaf.detach() * leaf.grad)[0]
    ref = reference_attention_lrp(w, x[0], pair[0][0], pair[1][0], out.detach()[0] * seed[0])
    # float32 rounding of the model's own softmax (Gemma 2) and (1 + w) norms (Gemma 3) only
    tol = 1e-5
    assert _rel_err(r_x, ref.x) < tol
    assert _rel_err(r_cos, ref.cos) < tol and _rel_err(r_sin, ref.sin) < tol
    if kind == "gemma2":
        # the cap is far from linear here, so the identity rule (not tanh') is what the match shows
        with torch.no_grad():
            q = attn.q_proj(x).view(1, SEQ, 4, 8).transpose(1, 2)
            k = attn.k_proj(x).view(1, SEQ, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
            assert float((q @ k.transpose(2, 3) * attn.scaling).abs().max()) > 2 * w.softcap


# ---- final-logit soft-capping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_final_logit_softcap_identity_rule(kind):
    """``y = c tanh(z / c)`` after ``z = lm_head(h)``: R_z = R_y = y, so the epsilon rule at the head gives
    ``R_h = h * W_t * y / z_t`` (explicit) and sum(R_h) = y, the explained capped logit."""
    model = _tiny(kind, layers=1, final_logit_softcapping=0.5)
    ids = torch.randint(1, 97, (1, SEQ), generator=torch.Generator().manual_seed(7))
    seen = {}

    def keep(_m, _a, out):
        out.retain_grad()
        seen["h"] = out

    with hf_pelrp.lrp(model, mode="attnlrp") as ctx:
        # registered after the rules: it sees the norm's output as the rules leave it
        handle = model.model.norm.register_forward_hook(keep)
        try:
            logits = model(input_ids=ids).logits
            target = int(logits[0, -1].argmax())
            logit = logits[0, -1, target]
            logit.backward()
            y = float(logit.detach())
            r_h = (seen["h"].detach() * seen["h"].grad)[0, -1]
            token_sum = float((ctx.store.additive["token"].detach() * ctx.store.additive["token"].grad).sum())
        finally:
            handle.remove()
    h = seen["h"].detach()[0, -1]
    wt = model.lm_head.weight.detach()[target]
    z = float(h @ wt)
    assert abs(y - 0.5 * torch.tanh(torch.tensor(z / 0.5, dtype=F64)).item()) < 1e-12
    assert abs(z) > 0.5  # the cap is far from the identity: tanh' would give a different result
    reference = h * wt * y / z
    assert _rel_err(r_h, reference) < 1e-10
    assert abs(float(r_h.sum()) - y) < 1e-10 * abs(y)
    assert torch.isfinite(torch.tensor(token_sum))


def test_no_final_softcap_rule_without_the_option():
    from hf_pelrp.adapters.gemma import final_logit_softcap

    model = _tiny("gemma3_text", layers=1)
    assert model.config.final_logit_softcapping is None
    assert final_logit_softcap(model, None, None) == []
    capped = _tiny("gemma2", layers=1, final_logit_softcapping=3.0)
    assert len(final_logit_softcap(capped, None, None)) == 1


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_soft_capped_models_conserve_in_bias_free_cp(kind):
    """With both caps active the explained (capped) logit is conserved exactly in CP mode."""
    extra = {"attn_logit_softcapping": 1.0} if kind == "gemma2" else {}
    model = _tiny(kind, final_logit_softcapping=0.5, **extra)
    ids, mask = _padded_batch()
    attr = hf_pelrp.attribute(model, ids, attention_mask=mask, mode="cp")
    gap = attr.conservation_gap.abs() / attr.target_value.abs()
    assert float(gap.max()) < 1e-6
    assert float(attr.target_value.abs().max()) < 0.5  # the capped logits, |y| < c


def test_gemma2_eager_path_under_gradient_checkpointing():
    """The eager path keeps the N x N scores of every layer; with gradient checkpointing only one layer's at a
    time. The maps are the same."""
    model = _tiny("gemma2", attn_logit_softcapping=1.0, final_logit_softcapping=2.0)
    ids, mask = _padded_batch()
    plain = hf_pelrp.attribute(model, ids, attention_mask=mask)
    checkpointed = hf_pelrp.attribute(model, ids, attention_mask=mask, gradient_checkpointing=True)
    torch.testing.assert_close(checkpointed.token, plain.token, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        checkpointed.position_by_layer, plain.position_by_layer, rtol=1e-10, atol=1e-12
    )
