"""Falcon with rotary positions (alibi=False: Falcon-7B / 40B / 180B), a config-aware variant of the ``falcon``
type: the registry picks the declaration from config.alibi, check_adapter proves both variants, the layouts
conserve under bias-free CP, and the maps equal GPT-NeoX's on the same weights (the same computation written by
another family: parallel LayerNorm'd branches, fused per-head q k v, full rotary, GELU MLP)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, FalconForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

import hf_pelrp
from hf_pelrp.adapters.alibi import FALCON_ALIBI, FALCON_ROTARY
from hf_pelrp.adapters.base import adapter_for, adapter_variants
from hf_pelrp.positions import Rotary

pytestmark = pytest.mark.usefixtures("single_thread")


def _falcon(seed: int = 0, zero_bias: bool = False, **overrides) -> FalconForCausalLM:
    config = AutoConfig.for_model("falcon", **{**FALCON_ROTARY.tiny, **overrides})
    torch.manual_seed(seed)
    model = FalconForCausalLM(config).double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # larger weights: peaked attention, so q, k and cos / sin carry visible relevance
        for name, p in model.named_parameters():
            if zero_bias and name.endswith("bias"):  # every bias, LayerNorm shifts included
                p.zero_()
                continue
            scale = 0.5 if p.dim() > 1 else 0.1
            p.copy_(
                torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
                + (1.0 if ("ln" in name or "layernorm" in name) and name.endswith("weight") else 0.0)
            )
    return model


def _batch():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 97, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    return ids * mask, mask


def test_the_registry_chooses_the_declaration_from_config_alibi():
    assert adapter_variants("falcon") == (FALCON_ALIBI, FALCON_ROTARY)
    assert adapter_for(_falcon()) is FALCON_ROTARY
    assert isinstance(FALCON_ROTARY.positions, Rotary)
    alibi = FalconForCausalLM(AutoConfig.for_model("falcon", **FALCON_ALIBI.tiny))
    assert adapter_for(alibi) is FALCON_ALIBI
    # a variant refuses the other variant's models (were it ever handed one directly)
    with pytest.raises(hf_pelrp.UnsupportedModelError, match="ALiBi"):
        FALCON_ROTARY.check_model(alibi)
    with pytest.raises(hf_pelrp.UnsupportedModelError, match="rotary"):
        FALCON_ALIBI.check_model(_falcon())


def test_check_adapter_proves_both_variants():
    report = hf_pelrp.check_adapter("falcon")
    heads = report.heads
    for variant in ("falcon", "falcon (rotary)"):
        for cls in ("FalconForCausalLM", "FalconForSequenceClassification"):
            assert f"{cls} [{variant}]" in heads, heads
    rotary = [r for r in report.results if "(rotary)" in r.head]
    names = {r.name for r in rotary}
    assert any(n.startswith("rotary split") for n in names)
    assert any(n.startswith("bias-free CP conservation") for n in names)
    # a config checks the variant it selects, only that one
    report = hf_pelrp.check_adapter(
        AutoConfig.for_model("falcon", **FALCON_ROTARY.tiny), classes=[FalconForCausalLM]
    )
    assert report.heads == ["FalconForCausalLM"]
    assert any(r.name.startswith("rotary split") for r in report.results)


@pytest.mark.parametrize(
    "layout",
    [
        {"new_decoder_architecture": False, "parallel_attn": False, "multi_query": False, "num_kv_heads": 4},
        {"new_decoder_architecture": False, "parallel_attn": True, "multi_query": True},  # Falcon-7B
        {"new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 2},  # 40B / 180B
        {"new_decoder_architecture": True, "num_kv_heads": 1, "num_ln_in_parallel_attn": 1},
    ],
)
def test_rotary_layouts_conserve_under_bias_free_cp_and_attnlrp_gives_positions(layout):
    model = _falcon(zero_bias=True, **layout)
    ids, mask = _batch()
    cp = hf_pelrp.attribute(model, ids, attention_mask=mask, mode="cp")
    gap = (cp.conservation_gap.abs() / cp.target_value.abs()).max()
    assert float(gap) < 1e-8, layout
    assert float(cp.position.abs().max()) == 0.0  # CP: nothing reaches cos / sin
    lrp = hf_pelrp.attribute(model, ids, attention_mask=mask)
    assert lrp.position_by_layer.shape == (3, model.config.num_hidden_layers, 7)
    assert float(lrp.position.abs().max()) > 1e-3 * float(lrp.token.abs().max())
    for row in (1, 2):  # padding carries nothing
        assert float(lrp.position[row][mask[row] == 0].abs().max()) == 0.0


def _neox_twin(falcon: FalconForCausalLM) -> GPTNeoXForCausalLM:
    """GPT-NeoX with ``falcon``'s weights: new_decoder_architecture with num_kv_heads = num_heads and two input
    LayerNorms is NeoX's parallel residual (``x + attn(ln1(x)) + mlp(ln2(x))``) with the same per-head
    [q, k, v] fused layout and full rotary."""
    c = falcon.config
    config = GPTNeoXConfig(
        hidden_size=c.hidden_size,
        intermediate_size=c.ffn_hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings,
        hidden_act="gelu",
        layer_norm_eps=c.layer_norm_epsilon,
        use_parallel_residual=True,
        attention_bias=True,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
        pad_token_id=0,
    )
    neox = GPTNeoXForCausalLM(config).double().eval()
    src = falcon.state_dict()
    pairs = {
        "gpt_neox.embed_in.weight": "transformer.word_embeddings.weight",
        "gpt_neox.final_layer_norm.weight": "transformer.ln_f.weight",
        "gpt_neox.final_layer_norm.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight",
    }
    for i in range(c.num_hidden_layers):
        for mine, theirs in (
            ("input_layernorm", "ln_attn"),
            ("post_attention_layernorm", "ln_mlp"),
            ("attention.query_key_value", "self_attention.query_key_value"),
            ("attention.dense", "self_attention.dense"),
            ("mlp.dense_h_to_4h", "mlp.dense_h_to_4h"),
            ("mlp.dense_4h_to_h", "mlp.dense_4h_to_h"),
        ):
            for p in ("weight", "bias"):
                pairs[f"gpt_neox.layers.{i}.{mine}.{p}"] = f"transformer.h.{i}.{theirs}.{p}"
    state = neox.state_dict()
    assert set(pairs) == {k for k in state if not k.endswith("inv_freq")}
    with torch.no_grad():
        for mine, theirs in pairs.items():
            state[mine].copy_(src[theirs])
    return neox


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_rotary_falcon_maps_equal_gpt_neox_on_the_same_weights(mode):
    falcon = _falcon(new_decoder_architecture=True, num_kv_heads=4, num_ln_in_parallel_attn=2)
    neox = _neox_twin(falcon)
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(
            falcon(ids, attention_mask=mask).logits, neox(ids, attention_mask=mask).logits, rtol=0, atol=1e-10
        )
    a = hf_pelrp.attribute(falcon, ids, attention_mask=mask, mode=mode)
    b = hf_pelrp.attribute(neox, ids, attention_mask=mask, mode=mode, target=a.target)
    scale = float(b.token.abs().max())
    for name in ("target_value", "token", "position", "position_by_layer"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-9 * scale)
    if mode == "attnlrp":
        assert float(a.position.abs().max()) > 1e-3 * scale


def test_describe_and_the_layer_chart_know_both_variants():
    """describe_adapter calls either variant a registered declaration (not an inferred one), and the layer
    chart of a rotary Falcon is not titled after the ALiBi default (the result does not say which ran)."""
    from hf_pelrp.viz.view import layer_chart_title

    for alibi in (True, False):
        model = _falcon(alibi=alibi)
        assert "registered declaration" in hf_pelrp.describe_adapter(model, print_it=False)
    ids, mask = _batch()
    rotary = hf_pelrp.attribute(_falcon(alibi=False), ids, attention_mask=mask)
    assert "ALiBi" not in layer_chart_title(rotary) and "bias" not in layer_chart_title(rotary)
    assert "bias" in layer_chart_title(hf_pelrp.attribute(_falcon(alibi=True), ids, attention_mask=mask))
