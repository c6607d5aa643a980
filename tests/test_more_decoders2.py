"""Issue 18, decoders: minimax_m2, apertus1p5_text and aria_text are proven by check_adapter
(tests/test_adapters.py); the one new piece of code, the fused-experts rule on transposed weights (Aria), is
checked here against the explicit rules in float64, and the tiny instances are shown to exercise what the
declarations claim (partial rotary, mixtures in every block)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_pelrp.adapters import adapter_for_type
from hf_pelrp.adapters.more_decoders2 import ARIA_TEXT_EXPERTS, _TransposedRule
from hf_pelrp.errors import UnsupportedModelError
from hf_pelrp.hooks import Handles


def _tiny(model_type):
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    adapter = adapter_for_type(model_type)
    config = AutoConfig.for_model(model_type, **adapter.tiny)
    torch.manual_seed(0)
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    return cls(config).to(torch.float64).eval()


def _explicit(experts, x, index, weights, seed, f):
    """The relevance-carrying gradients of sum_k w_k E_{e_k}(x), written out (identity rule on act, the
    factors f = (gate, up, weight, expert) at the two products), for x @ W weights (Aria's layout)."""
    gx = torch.zeros_like(x)
    gw = torch.zeros_like(weights)
    gu_w, d_w = experts.gate_up_proj.detach(), experts.down_proj.detach()
    for n in range(x.shape[0]):
        for k in range(index.shape[1]):
            e = int(index[n, k])
            g, u = (x[n] @ gu_w[e]).chunk(2)
            a = F.silu(g)
            out = (a * u) @ d_w[e]
            gw[n, k] = f[2] * (seed[n] * out).sum()
            dh = (f[3] * weights[n, k] * seed[n]) @ d_w[e].T
            dg = f[0] * dh * u * (a / g)  # identity rule: act's local gradient is act(g) / g
            du = f[1] * dh * a
            gx[n] += torch.cat([dg, du]) @ gu_w[e].T
    return gx, gw


@pytest.mark.parametrize("factors", [(0.5, 0.5, 0.5, 0.5), (0.0, 1.0, 0.0, 1.0)], ids=["attnlrp", "cp"])
def test_transposed_experts_rule_equals_the_explicit_rules_in_float64(factors):
    model = _tiny("aria_text")
    experts = model.model.layers[0].mlp.experts
    torch.manual_seed(1)
    x = torch.randn(5, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 2], [1, 3], [3, 0], [2, 1], [0, 1]])
    weights = torch.softmax(torch.randn(5, 2, dtype=torch.float64), -1).requires_grad_()
    handles = Handles()
    rule = _TransposedRule(*factors, name="experts")
    rule.attach(experts, handles)
    try:
        out = experts(x, index, weights)
        seed = torch.randn_like(out)
        gx, gw = torch.autograd.grad(out, (x, weights), seed, allow_unused=True)
    finally:
        handles.remove()
    plain = experts(x, index, weights)
    gw = torch.zeros_like(weights) if gw is None else gw  # CP: the routing weight is a constant
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # forward value unchanged
    ex, ew = _explicit(experts, x.detach(), index, weights.detach(), seed, factors)
    torch.testing.assert_close(gx, ex, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, ew, rtol=1e-10, atol=1e-12)


def test_untransposed_experts_are_refused_by_the_transposed_declaration():
    model = _tiny("aria_text")
    model.model.layers[0].mlp.experts.is_transposed = False
    with pytest.raises(UnsupportedModelError, match="transposed fused experts layout"):
        ARIA_TEXT_EXPERTS.check(model)


def test_tiny_instances_exercise_what_the_declarations_claim():
    minimax = _tiny("minimax_m2")
    # the rotary split is checked on a partial slice: 2 * len(inv_freq) rotated channels of head_dim
    assert 2 * minimax.model.rotary_emb.inv_freq.numel() < minimax.config.head_dim
    assert all(type(layer.mlp).__name__ == "MiniMaxM2SparseMoeBlock" for layer in minimax.model.layers)
    aria = _tiny("aria_text")
    assert all(type(layer.mlp).__name__ == "AriaTextMoELayer" for layer in aria.model.layers)
    apertus = _tiny("apertus1p5_text")
    assert type(apertus.model.layers[0].mlp.act_fn).__name__ == "XIELUActivation"
    # dense first block, then a mixture of experts (the sigmoid-routed declarations are checked on both)
    for model_type in ("hy_v3", "axk1", "glm4_moe_lite"):
        names = [type(layer.mlp).__name__ for layer in _tiny(model_type).model.layers]
        assert names[0].endswith("MLP") and not names[1].endswith("MLP"), (model_type, names)
    # kolibri1: layer 1 is a NoPE (full-attention) layer, so check_adapter's rotary split sees both kinds
    kolibri = _tiny("kolibri1")
    assert [layer.self_attn.is_sliding for layer in kolibri.model.layers] == [True, False]


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
@pytest.mark.parametrize("model_type, gate", [("afmoe", "gate_proj"), ("laguna", "g_proj")])
def test_attention_output_gates_are_constants(model_type, gate, mode):
    """sigmoid(gate_proj(x)) (afmoe) and softplus(g_proj(x)) (laguna) multiply the attention output: constants in
    both modes (signal-take-all), so no gradient reaches the gate projection's output under the rules, while the
    plain backward pass sends it one."""
    import hf_pelrp

    model = _tiny(model_type)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    gates = [getattr(layer.self_attn, gate) for layer in model.model.layers]

    def run(inside):
        seen = []
        handles = [
            g.register_forward_hook(lambda m, a, out: seen.append(out) or out.retain_grad()) for g in gates
        ]
        try:
            if inside:
                with hf_pelrp.lrp(model, mode=mode):
                    model(ids).logits[0, -1, 5].backward()
            else:
                embeds = model.model.embed_tokens(ids).detach().requires_grad_()
                model(inputs_embeds=embeds).logits[0, -1, 5].backward()
        finally:
            for h in handles:
                h.remove()
        return [out.grad for out in seen]

    assert all(g is not None and g.abs().max() > 0 for g in run(inside=False))
    assert all(g is None or g.abs().max() == 0 for g in run(inside=True))
    # the global (full-attention) layer is NoPE: the declaration rotates the sliding-window layer only
    if model_type == "afmoe":
        assert [layer.self_attn.is_local_attention for layer in model.model.layers] == [True, False]


#: refused decoder -> (modeling module, names the stated reason cites, which must exist in transformers)
REFUSED_DECODERS = {
    "gemma3n_text": ("gemma3n", ("Gemma3nTextAltUp", "Gemma3nTextLaurelBlock", "_gaussian_topk")),
    "gemma3n": ("gemma3n", ("Gemma3nTextAltUp", "Gemma3nTextLaurelBlock")),
    "deepseek_v32": ("deepseek_v32", ("DeepseekV32Indexer",)),
    "longcat_flash": ("longcat_flash", ("LongcatFlashDecoderLayer",)),
    "flint": ("flint", ("s_aux",)),  # the attention-sinks reason: FlintAttention's sinks (s_aux=)
    "mimo_v2_flash": ("mimo_v2_flash", ("sinks",)),  # its sliding-window layers' sinks
    "axk2": ("axk2", ("AXK2Indexer",)),
    "hy_v4": ("hy_v4", ("HYV4Indexer", "HYV4HyperConnection")),
    "lfm3": ("lfm3", ("Lfm3ShortConv",)),
    "zaya": ("zaya", ("ZayaCCAProjection", "ZayaRouterMLP")),
    "qwen4_exp_text": ("qwen4_exp", ("DeltaNet",)),
}


@pytest.mark.parametrize("model_type", sorted(REFUSED_DECODERS))
def test_refused_decoders_are_refused_by_name_and_the_cited_parts_exist(model_type):
    import importlib
    import inspect

    from hf_pelrp.adapters import refused_model_types
    from hf_pelrp.adapters.refusals import REFUSED

    module_name, names = REFUSED_DECODERS[model_type]
    assert model_type in refused_model_types()
    source = inspect.getsource(
        importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    )
    for name in names:
        assert name in REFUSED[model_type] and name in source, name
    if model_type == "longcat_flash":  # two attention sublayers per block
        assert "nn.ModuleList([LongcatFlashMLA(" in source


def test_mistral4_refuses_llama4_scaled_positions_and_routing_scale():
    """Past original_max_position_embeddings Llama-4 scaling multiplies q by a position-dependent factor with no
    leaf: the input limit stops there (below it the factor is exactly 1, checked in transformers' own formula);
    a routed_scaling_factor other than 1 is refused by name."""
    from transformers import Mistral4Config, Mistral4ForSequenceClassification
    from transformers.models.mistral4.modeling_mistral4 import get_llama_4_attn_scale

    from hf_pelrp.adapters.more_decoders2 import _mistral4_limit, _unit_routed_scaling

    config = Mistral4Config(**adapter_for_type("mistral4").tiny)
    original = config.rope_parameters["original_max_position_embeddings"]
    assert config.rope_parameters["llama_4_scaling_beta"] > 0
    assert _mistral4_limit(config) <= original
    scale = get_llama_4_attn_scale(torch.arange(original + 2)[None], 0.1, original)
    assert torch.all(scale[..., :original, :] == 1) and torch.all(scale[..., original:, :] > 1)
    config.routed_scaling_factor = 2.5
    model = Mistral4ForSequenceClassification(config)
    with pytest.raises(UnsupportedModelError, match="routed_scaling_factor=2.5"):
        _unit_routed_scaling(model)


def test_gate_half_constant_equals_the_explicit_rule_in_float64():
    """MiniCPM5-MoE's q_gate_proj gives [q_h; g_h] per head: the gate halves are constants (no gradient), the
    query halves keep theirs; the output value is unchanged. Written out: dx = W^T (G with the gate halves 0)."""
    from hf_pelrp.adapters.more_decoders2 import GateHalfConstant

    torch.manual_seed(0)
    heads, head_dim, hidden = 3, 4, 5
    proj = torch.nn.Linear(hidden, heads * 2 * head_dim, bias=False).to(torch.float64)
    x = torch.randn(2, 7, hidden, dtype=torch.float64, requires_grad=True)
    handles = Handles()
    GateHalfConstant(head_dim).attach(proj, handles)
    try:
        y = proj(x)
        seed = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, seed)
    finally:
        handles.remove()
    torch.testing.assert_close(y, proj(x), rtol=0, atol=0)
    keep = torch.tensor(([1.0] * head_dim + [0.0] * head_dim) * heads, dtype=torch.float64)
    torch.testing.assert_close(gx, (seed * keep) @ proj.weight.detach(), rtol=1e-12, atol=1e-12)
    model = _tiny("minicpm5_moe")  # the tiny instance has a dense and a sparse block
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["MiniCPM5MoeMLP", "MiniCPM5MoeMoE"]
