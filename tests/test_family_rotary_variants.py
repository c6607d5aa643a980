"""Rotary variants (method.md "Rotary variants"): partial rotary (GPT-NeoX, Phi, StableLM) and interleaved
rotary (GPT-J), against the slow explicit float64 rules of reference_attention.py, plus the family options
(parallel residual, q / k LayerNorms) through check_adapter.

The explicit reference applies the rotary 1/2 to the rotated channels only; the same reference with a
whole-head 1/2 is shown to disagree, so the tests can tell the two rules apart.
"""

from __future__ import annotations

import pytest
import torch

import hf_pelrp
from helpers.reference_attention import AttentionWeights, reference_attention_lrp
from hf_pelrp.attention import attention_rule

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
SEQ = 7


def _lin(module):
    weight = module.weight.detach().to(F64)
    bias = None if module.bias is None else module.bias.detach().to(F64)
    return weight, bias


# ---- tiny float64 models, one per family ------------------------------------------------------------------


def _gpt_neox(layers=1, **overrides):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=97,
        max_position_embeddings=64,
        pad_token_id=0,
        initializer_range=0.15,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**{**kwargs, **overrides})).to(F64).eval()


def _phi(layers=1, **overrides):
    from transformers import PhiConfig, PhiForCausalLM

    kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=64,
        pad_token_id=0,
        initializer_range=0.15,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )
    torch.manual_seed(0)
    return PhiForCausalLM(PhiConfig(**{**kwargs, **overrides})).to(F64).eval()


def _stablelm(layers=1, **overrides):
    from transformers import StableLmConfig, StableLmForCausalLM

    kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=64,
        pad_token_id=0,
        initializer_range=0.15,
        use_qkv_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )
    torch.manual_seed(0)
    return StableLmForCausalLM(StableLmConfig(**{**kwargs, **overrides})).to(F64).eval()


def _gptj(layers=1, **overrides):
    from transformers import GPTJConfig, GPTJForCausalLM

    kwargs = dict(
        n_embd=32,
        n_layer=layers,
        n_head=4,
        rotary_dim=4,
        vocab_size=97,
        n_positions=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        initializer_range=0.15,
    )
    torch.manual_seed(0)
    return GPTJForCausalLM(GPTJConfig(**{**kwargs, **overrides})).to(F64).eval()


# ---- each family's attention as explicit weights ----------------------------------------------------------


def _neox_weights(model):
    attn = model.gpt_neox.layers[0].attention
    hs, heads = attn.head_size, model.config.num_attention_heads
    w, b = _lin(attn.query_key_value)
    # the fused projection is viewed as [heads, 3 * head_size]: q, k, v of head h are consecutive blocks
    rows = torch.arange(heads * 3 * hs).view(heads, 3, hs)
    wq, wk, wv = (w[rows[:, i].reshape(-1)] for i in range(3))
    bq, bk, bv = (b[rows[:, i].reshape(-1)] for i in range(3))
    return attn, AttentionWeights(
        wq, bq, wk, bk, wv, bv, *_lin(attn.dense), heads, heads, hs, attn.scaling, attn.rotary_ndims
    )


def _llama_layout_weights(attn, out, config, rotary_dim, layout="half", **extra):
    return AttentionWeights(
        *_lin(attn.q_proj),
        *_lin(attn.k_proj),
        *_lin(attn.v_proj),
        *_lin(out),
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", config.num_attention_heads),
        attn.head_dim,
        attn.scaling,
        rotary_dim,
        layout,
        **extra,
    )


FAMILIES = {
    "gpt_neox": (_gpt_neox, _neox_weights, ("cos", "sin")),
    "phi": (
        _phi,
        lambda m: (
            m.model.layers[0].self_attn,
            _llama_layout_weights(
                m.model.layers[0].self_attn,
                m.model.layers[0].self_attn.dense,
                m.config,
                m.model.layers[0].self_attn.rotary_ndims,
            ),
        ),
        ("cos", "sin"),
    ),
    "stablelm": (
        _stablelm,
        lambda m: (
            m.model.layers[0].self_attn,
            _llama_layout_weights(
                m.model.layers[0].self_attn,
                m.model.layers[0].self_attn.o_proj,
                m.config,
                m.model.layers[0].self_attn.rotary_ndims,
            ),
        ),
        ("cos", "sin"),
    ),
    "gptj": (
        _gptj,
        lambda m: (
            m.transformer.h[0].attn,
            _llama_layout_weights(
                m.transformer.h[0].attn, m.transformer.h[0].attn.out_proj, m.config, 4, "interleaved"
            ),
        ),
        ("sin", "cos"),
    ),
}


def _rotary_inputs(model, x):
    """The pair the model passes to its attention for positions 0..T-1 (in the model's own order)."""
    rotary = model.base_model.rotary_emb
    return rotary(x, torch.arange(x.shape[1])[None])


def _fast(model, attn, names, x, pair, seed, mode):
    """Relevance of the attention input x and of the rotary leaves of the fast path (one module call)."""
    with hf_pelrp.lrp(model, mode=mode, positional=True) as ctx:
        leaf = x.clone().requires_grad_(True)
        out = attn(hidden_states=leaf, attention_mask=None, position_embeddings=pair)[0]
        (out * seed).sum().backward()
        rotated = attention_rule(attn).rotated
        leaves = ctx.store.layers[0]
        r_pe = {
            n: torch.zeros_like(leaves[n][0])
            if leaves[n].grad is None
            else (leaves[n].detach() * leaves[n].grad)[0]
            for n in names
        }
    return (leaf.detach() * leaf.grad)[0], r_pe, out.detach()[0], rotated


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_rotary_variant_matches_explicit_rules(family, mode):
    build, weights, names = FAMILIES[family]
    model = build()
    attn, w = weights(model)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, SEQ, model.config.hidden_size, generator=gen, dtype=F64)
    seed = torch.randn(1, SEQ, model.config.hidden_size, generator=gen, dtype=F64)
    pair = _rotary_inputs(model, x)
    r_x, r_pe, out, rotated = _fast(model, attn, names, x, pair, seed, mode)
    # the framework recorded the rotated channels of this forward: rotary_dim of head_dim, the first ones
    assert rotated == (w.rotary_dim, "first") and w.rotary_dim < w.head_dim
    cos, sin = (pair[names.index(n)][0] for n in ("cos", "sin"))
    ref = reference_attention_lrp(w, x[0], cos, sin, out * seed[0], mode=mode)
    assert _rel_err(r_x, ref.x) < 1e-9
    for name in ("cos", "sin"):
        expected = getattr(ref, name)
        if mode == "cp":
            assert float(r_pe[name].abs().max()) == 0.0
        else:
            assert _rel_err(r_pe[name], expected) < 1e-9
    if mode == "attnlrp":
        # a whole-head 1/2 (pass-through channels halved too) is measurably different
        wrong = reference_attention_lrp(w, x[0], cos, sin, out * seed[0], whole_head_half=True)
        assert _rel_err(wrong.x, ref.x) > 1e-3
        assert _rel_err(r_x, wrong.x) > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_layer_rotary_split_is_conservative(family):
    """method.md 3.2: in a one-layer model, token (PE on) + position (PE on) = token (PE off), per row: the
    rotary split moves relevance from q / k to cos / sin and loses none (a whole-head 1/2 would lose the
    pass-through channels' half)."""
    model = FAMILIES[family][0](layers=1)
    ids = torch.randint(1, 97, (2, SEQ), generator=torch.Generator().manual_seed(4))
    on = hf_pelrp.attribute(model, ids, mode="attnlrp", positional=True)
    off = hf_pelrp.attribute(model, ids, mode="attnlrp", positional=False)
    assert torch.equal(on.target, off.target)
    total_on = on.token.sum(-1) + on.position.sum(-1)
    torch.testing.assert_close(total_on, off.token.sum(-1), rtol=1e-9, atol=1e-9)
    assert float(on.position.abs().sum()) > 1e-6 * float(on.token.abs().sum())


# ---- the options of each family, through check_adapter ------------------------------------------------------


def _check(model_type, **overrides):
    adapter = hf_pelrp.adapters.adapter_for_type(model_type)
    config = hf_pelrp.check.tiny_config(model_type, adapter)
    for key, value in overrides.items():
        setattr(config, key, value)
    import transformers

    lm = getattr(
        transformers, transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    )
    report = hf_pelrp.check_adapter(config, classes=[lm])
    assert report.passed


@pytest.mark.parametrize("parallel", [True, False])
def test_gpt_neox_both_residual_layouts(parallel):
    _check("gpt_neox", use_parallel_residual=parallel)


def test_phi_without_qk_layernorm():
    _check("phi", qk_layernorm=False)  # the registered tiny instance has qk_layernorm=True


def test_stablelm_parallel_residual_and_plain_attention():
    _check("stablelm", use_parallel_residual=True, qk_layernorm=False, use_qkv_bias=False)


def test_gptj_token_types_are_a_segment_leaf():
    """GPT-J embeds token_type_ids with its token table: a `segment` map, conserved in bias-free CP."""
    model = _gptj(layers=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    ids = torch.randint(1, 97, (1, SEQ), generator=torch.Generator().manual_seed(6))
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    attr = hf_pelrp.attribute(model, ids, token_type_ids=types, mode="cp")
    assert attr.segment is not None and float(attr.segment.abs().sum()) > 0
    relative_gap = float(attr.conservation_gap.abs().max() / attr.target_value.abs().max())
    assert relative_gap < 1e-6
