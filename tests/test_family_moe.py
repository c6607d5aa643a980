"""Mixture-of-experts blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3) against the rules written out by hand.

The reference below routes each token itself (softmax or sigmoid group top-k), weights and runs each selected
expert, and sends relevance back with the rules of method.md ("Mixture of experts"), in float64, without
autograd, hooks or hf_pelrp code. The fast path is the MoE block of a tiny model inside ``hf_pelrp.lrp()``: one
backward pass from a random output gradient ``g`` (relevance ``y * g`` at the block's output).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import hf_pelrp
from helpers.reference_lrp import lrp_linear
from hf_pelrp import UnsupportedModelError
from hf_pelrp.adapters import adapter_for_type
from hf_pelrp.check import tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
TOL = 1e-6  # relative to the largest reference entry (routing weights are float32 in transformers)

#: model type -> (causal LM class, config overrides, path of an MoE block)
FAMILIES = {
    "mixtral": ("MixtralForCausalLM", {}, 0),
    "qwen2_moe": ("Qwen2MoeForCausalLM", {"norm_topk_prob": True}, 0),
    "qwen3_moe": ("Qwen3MoeForCausalLM", {"norm_topk_prob": False}, 0),
    "deepseek_v3": ("DeepseekV3ForCausalLM", {}, 1),
}


def _model(model_type: str, dtype=F64, **overrides):
    name, family_overrides, _ = FAMILIES[model_type]
    config = tiny_config(model_type)
    for key, value in {"initializer_range": 0.3, **family_overrides, **overrides}.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return getattr(transformers, name)(config).to(dtype).eval()


# ---- the reference: every rule written out -------------------------------------------------------------------


def _gated_mlp(x, w_gate, w_up, w_down, r_out, attnlrp):
    """``down(silu(x Wg) * (x Wu))`` and the relevance of ``x`` for ``r_out`` at its output.

    Epsilon rule at each linear map, identity rule at SiLU, uniform rule at the product (CP-LRP: the
    activated gate is a constant, ``up`` takes all)."""
    gate, up = x @ w_gate.T, x @ w_up.T
    hidden = torch.nn.functional.silu(gate) * up
    out = hidden @ w_down.T
    r_hidden = lrp_linear(hidden, w_down, None, r_out)
    r_act, r_up = (0.5 * r_hidden, 0.5 * r_hidden) if attnlrp else (torch.zeros_like(r_hidden), r_hidden)
    r_gate = r_act  # identity rule: the activation passes its relevance on unchanged
    return out, lrp_linear(x, w_gate, None, r_gate) + lrp_linear(x, w_up, None, r_up)


def _route_softmax(router, x, normalise):
    z = x @ router.weight.detach().to(F64).T
    p = torch.softmax(z, -1)
    selected = torch.topk(p, router.top_k, -1).indices
    w = p.gather(-1, selected)
    if normalise:
        w = w / w.sum(-1, keepdim=True)
    return z, p, selected, w


def _route_sigmoid_groups(router, x):
    """DeepSeek-V3: sigmoid scores; the selection uses scores + correction bias, best ``topk_group`` groups
    (a group's score: its two best experts), then the top k experts inside them."""
    z = x @ router.weight.detach().to(F64).T
    s = torch.sigmoid(z)
    choice = s + router.e_score_correction_bias.to(F64)
    groups = choice.view(x.shape[0], router.num_group, -1)
    group_score = groups.topk(2, -1).values.sum(-1)
    best = group_score.topk(router.topk_group, -1).indices
    allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, best, True)
    allowed = allowed[:, :, None].expand_as(groups).reshape(x.shape[0], -1)
    selected = choice.masked_fill(~allowed, float("-inf")).topk(router.top_k, -1).indices
    w = s.gather(-1, selected)
    if router.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return selected, w * router.routed_scaling_factor


def reference_moe(block, x, g, mode):
    """Relevance of the MoE block input ``x`` [N, H] for the output relevance ``y * g`` (float64)."""
    attnlrp = mode == "attnlrp"
    experts = block.experts
    inter = experts.gate_up_proj.shape[1] // 2
    r_x = torch.zeros_like(x)
    y = torch.zeros_like(x)
    sigmoid_routing = hasattr(block.gate, "e_score_correction_bias")
    if sigmoid_routing:
        selected, w = _route_sigmoid_groups(block.gate, x)
    else:
        z, p, selected, w = _route_softmax(block.gate, x, getattr(block.gate, "norm_topk_prob", True))
    # routed experts: term t = w * E(x); the output relevance splits over the terms of the sum by the
    # epsilon rule: R_t = t * g
    r_w = torch.zeros_like(w)
    for n in range(x.shape[0]):
        for k, e in enumerate(selected[n].tolist()):
            gu = experts.gate_up_proj[e].detach().to(F64)
            w_gate, w_up, w_down = gu[:inter], gu[inter:], experts.down_proj[e].detach().to(F64)
            expert, _ = _gated_mlp(x[n : n + 1], w_gate, w_up, w_down, torch.zeros_like(x[:1]), attnlrp)
            term = w[n, k] * expert[0]
            y[n] += term
            r_term = term * g[n]
            if sigmoid_routing or not attnlrp:
                r_expert, r_w[n, k] = r_term, 0.0  # the weight is a constant (sigmoid: both modes; CP-LRP)
            else:
                r_expert, r_w[n, k] = 0.5 * r_term, 0.5 * r_term.sum()  # uniform rule at w * E
            _, r = _gated_mlp(x[n : n + 1], w_gate, w_up, w_down, r_expert[None], attnlrp)
            r_x[n] += r[0]
    if not sigmoid_routing and attnlrp:
        # renormalisation w = p_sel / S with S a constant: R_p = R_w on the selected experts; softmax rule
        # R_z = z * (R_p - p * sum(R_p)); the router's linear map: epsilon rule
        r_p = torch.zeros_like(p).scatter(-1, selected, r_w)
        r_z = z * (r_p - p * r_p.sum(-1, keepdim=True))
        r_x += lrp_linear(x, block.gate.weight.detach().to(F64), None, r_z)
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if shared is not None:
        lin = [m.weight.detach().to(F64) for m in (shared.gate_proj, shared.up_proj, shared.down_proj)]
        out, _ = _gated_mlp(x, *lin, torch.zeros_like(x), attnlrp)
        gate = getattr(block, "shared_expert_gate", None)
        # a sigmoid gate is a constant (signal-take-all): the shared expert takes the whole term
        scale = 1.0 if gate is None else torch.sigmoid(x @ gate.weight.detach().to(F64).T)
        _, r = _gated_mlp(x, *lin, scale * out * g, attnlrp)
        r_x += r
        y += scale * out
    return y, r_x


def _fast(model, block, x, g, mode):
    leaf = x[None].clone().requires_grad_(True)
    with hf_pelrp.lrp(model, mode=mode), torch.enable_grad():
        y = block(leaf)
        torch.autograd.backward((y * g[None]).sum(), inputs=[leaf])
    return y.detach()[0], (leaf.detach() * leaf.grad)[0]


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_moe_block_matches_the_rules_written_out(model_type, mode):
    model = _model(model_type)
    block = model.model.layers[FAMILIES[model_type][2]].mlp
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, model.config.hidden_size, generator=gen, dtype=F64)
    g = torch.randn(7, model.config.hidden_size, generator=gen, dtype=F64)
    y_ref, r_ref = reference_moe(block, x, g, mode)
    y, r = _fast(model, block, x, g, mode)
    assert torch.allclose(y, y_ref, rtol=0, atol=TOL * float(y_ref.abs().max()))
    scale = float(r_ref.abs().max())
    assert scale > 1e-3
    assert float((r - r_ref).abs().max()) <= TOL * scale, float((r - r_ref).abs().max()) / scale
    if mode == "cp" or model_type == "deepseek_v3":
        # conservative at the block (bias-free, constant gates and weights): sum R_x = sum y * g
        assert float(r.sum()) == pytest.approx(float((y * g).sum()), rel=1e-7)


def test_grouped_mm_experts_get_the_same_rules():
    """The rule re-computes the experts whatever transformers' experts implementation: grouped_mm (float32)
    gives the relevance of the eager loop."""
    model = _model("qwen2_moe", dtype=torch.float32)
    block = model.model.layers[0].mlp
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(6, model.config.hidden_size, generator=gen)
    g = torch.randn(6, model.config.hidden_size, generator=gen)
    maps = {}
    for implementation in ("eager", "grouped_mm"):
        model.set_experts_implementation(implementation)
        assert block.experts.config._experts_implementation == implementation
        maps[implementation] = _fast(model, block, x, g, "attnlrp")
    assert torch.allclose(maps["eager"][0], maps["grouped_mm"][0], atol=1e-6)
    assert torch.allclose(maps["eager"][1], maps["grouped_mm"][1], atol=1e-6)


def test_an_expert_implementation_with_other_arithmetic_is_refused():
    """The re-computation must reproduce the module's output: an implementation computing something else is
    refused with the module's name, never explained with the wrong rules."""
    model = _model("qwen3_moe", dtype=torch.float32)
    model.set_experts_implementation("grouped_mm")
    experts = model.model.layers[0].mlp.experts
    # a gating variant (e.g. a clamped SwiGLU) that the rule does not know
    experts._apply_gate = lambda out: (
        torch.nn.functional.silu(out.chunk(2, -1)[0]) * out.chunk(2, -1)[1].clamp(max=0.01)
    )
    with pytest.raises(UnsupportedModelError, match=r"layers\.0\.mlp\.experts.*does not reproduce"):
        hf_pelrp.attribute(model, torch.tensor([[5, 6, 7, 8]]))


def test_an_unknown_experts_layout_is_refused():
    model = _model("mixtral")
    model.model.layers[1].mlp.experts.has_bias = True
    with pytest.raises(UnsupportedModelError, match="not the fused experts layout"):
        hf_pelrp.attribute(model, torch.tensor([[5, 6, 7]]))


def test_mixed_dense_and_moe_blocks_get_their_gated_products():
    """qwen2_moe's tiny model has one MoE block (gated shared expert) and one dense block: both gated MLPs
    get the product rule (the declaration's optional gated products), the shared gate is a constant."""
    adapter = adapter_for_type("qwen2_moe")
    model = _model("qwen2_moe")
    from hf_pelrp.config import LRPConfig
    from hf_pelrp.hooks import Activation, LeafStore, OutputGradient

    rules = adapter.module_rules(model, LRPConfig(), LeafStore())
    names = {m: n for n, m in model.named_modules()}
    gates = {names[m]: r.product_factor for m, r in rules if isinstance(r, Activation)}
    assert gates["model.layers.0.mlp.shared_expert.act_fn"] == 0.5
    assert gates["model.layers.1.mlp.act_fn"] == 0.5
    assert gates["model.layers.0.mlp.experts.act_fn"] == 1.0  # re-computed by the experts rule
    constants = {names[m] for m, r in rules if isinstance(r, OutputGradient) and r.factor == 0.0}
    assert constants == {"model.layers.0.mlp.shared_expert_gate"}


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_check_adapter_without_top_k_renormalisation(model_type):
    config = tiny_config(model_type)
    config.norm_topk_prob = False
    config.mlp_only_layers = []
    assert hf_pelrp.check_adapter(config).passed
