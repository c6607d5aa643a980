"""Phi-3: the fused ``gate_up_proj`` split (uniform rule on ``act(gate) * up``) against a hand computation in
float64, and partial rotary through the rotary leaves' rotated-channel record."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Phi3Config, Phi3ForCausalLM

import hf_pelrp
from hf_pelrp.attention import attention_rule

pytestmark = pytest.mark.usefixtures("single_thread")


def phi3(num_layers: int = 1, partial_rotary_factor: float = 0.5) -> Phi3ForCausalLM:
    config = Phi3Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=64,
        pad_token_id=0,
        initializer_range=0.15,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": partial_rotary_factor,
        },
    )
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return model


IDS = torch.tensor([[5, 17, 42, 8, 63, 21, 9]])


def _safe_div(a, b):
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_fused_gate_up_split_equals_the_hand_computation(mode):
    """Relevance R_out at the MLP output (read from the fast path) is propagated by hand through
    ``down_proj(up * silu(gate))`` with ``gate, up = gate_up_proj(x).chunk(2)``: epsilon rule at ``down_proj``,
    uniform rule at the product (AttnLRP: half to each factor; CP: all to ``up``), identity rule at SiLU; the
    fast path's relevance at the two halves of ``gate_up_proj`` and at the MLP input must equal it."""
    model = phi3()
    mlp = model.model.layers[0].mlp
    seen = {}

    def keep_input(_module, args):
        args[0].retain_grad()
        seen["x"] = args[0]

    def keep_output(name):
        def hook(_module, _args, output):
            output.retain_grad()
            seen[name] = output

        return hook

    handles = [
        mlp.register_forward_pre_hook(keep_input),
        mlp.register_forward_hook(keep_output("out")),
        # registered before the lrp rules: sees the projection's own output, before the rule's gradient factor
        mlp.gate_up_proj.register_forward_hook(keep_output("gate_up")),
    ]
    try:
        with hf_pelrp.lrp(model, mode=mode, positional=True):
            logits = model(input_ids=IDS).logits
            logits[0, -1, 11].backward()
    finally:
        for h in handles:
            h.remove()
    x, out, gate_up = (seen[k].detach() for k in ("x", "out", "gate_up"))
    r_out = out * seen["out"].grad
    fast_gate_up = gate_up * seen["gate_up"].grad
    fast_in = x * seen["x"].grad

    # ---- by hand, float64
    w = mlp.gate_up_proj.weight.detach()
    inter = w.shape[0] // 2
    w_gate, w_up, w_down = w[:inter], w[inter:], mlp.down_proj.weight.detach()
    gate, up = x @ w_gate.T, x @ w_up.T
    prod = up * F.silu(gate)
    assert torch.allclose(prod @ w_down.T, out, rtol=1e-12, atol=1e-14)
    r_prod = prod * (_safe_div(r_out, prod @ w_down.T) @ w_down)  # epsilon rule at down_proj
    if mode == "attnlrp":
        r_act, r_up = 0.5 * r_prod, 0.5 * r_prod  # uniform rule
    else:
        r_act, r_up = torch.zeros_like(r_prod), r_prod  # CP: the gate is a constant
    r_gate = r_act  # identity rule at SiLU
    r_in = x * (_safe_div(r_gate, gate) @ w_gate) + x * (_safe_div(r_up, up) @ w_up)

    scale = r_prod.abs().max()
    assert scale > 0
    torch.testing.assert_close(fast_gate_up[..., :inter], r_gate, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(fast_gate_up[..., inter:], r_up, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(fast_in, r_in, rtol=0, atol=1e-12 * scale)
    # the split conserves: what reaches the product leaves through its two factors
    torch.testing.assert_close(fast_gate_up.sum(), r_prod.sum(), rtol=1e-12, atol=0)


def test_partial_rotary_halves_only_the_rotated_channels():
    """partial_rotary_factor 0.5: cos / sin are 4 of 8 channels wide, the rule records it, and in a one-layer
    model the rotary split is local: token + position with positions = token without (AttnLRP, method.md 3.2).
    A whole-head 1/2 would also halve the pass-through channels and lose their relevance (a gap of 5% of the
    largest token entry here); the tolerance is the float32 rounding of the RMSNorm statistics, which the model
    computes in float32 even in float64."""
    model = phi3(num_layers=1)
    attn = model.model.layers[0].self_attn
    recorded = []
    handle = attn.register_forward_hook(lambda m, a, o: recorded.append(attention_rule(m).rotated))
    try:
        on = hf_pelrp.attribute(model, IDS, mode="attnlrp", positional=True)
    finally:
        handle.remove()
    assert recorded == [(4, "first")] and attn.head_dim == 8
    off = hf_pelrp.attribute(model, IDS, mode="attnlrp", positional=False, target=on.target)
    assert on.position.abs().sum() > 1e-3 * on.token.abs().sum()
    torch.testing.assert_close(
        on.token + on.position, off.token, rtol=0, atol=1e-7 * off.token.abs().max().item()
    )
