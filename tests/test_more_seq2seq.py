"""Issue 18, encoder-decoders: plbart is declared (check_adapter, tests/test_adapters.py); the types whose
attention transformers computes inline are refused by name, and the reason each refusal states holds in the
installed transformers (a refusal whose reason went stale fails here)."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import hf_pelrp
from hf_pelrp.adapters import refused_model_types
from hf_pelrp.adapters.refusals import REFUSED
from hf_pelrp.errors import UnsupportedModelError

#: refused type -> (modeling module, the attention classes computed inline, a word of the stated reason)
INLINE = {
    "mvp": ("mvp", ("MvpAttention",), "MvpAttention"),
    "fsmt": ("fsmt", ("Attention",), "inline"),
    "led": ("led", ("LEDEncoderSelfAttention",), "Longformer"),
    "bigbird_pegasus": ("bigbird_pegasus", ("BigBirdPegasusBlockSparseAttention",), "block-sparse"),
    "pegasus_x": ("pegasus_x", ("PegasusXGlobalLocalAttention",), "GlobalLocal"),
    "prophetnet": ("prophetnet", ("ProphetNetNgramSelfAttention",), "n-gram"),
    "xglm": ("xglm", ("XGLMAttention",), "float64"),
}


@pytest.mark.parametrize("model_type", sorted(INLINE))
def test_inline_attention_types_are_refused_by_name_and_the_reason_holds(model_type):
    module_name, classes, word = INLINE[model_type]
    assert model_type in refused_model_types() and word in REFUSED[model_type]
    modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    for name in classes:
        source = inspect.getsource(getattr(modeling, name))
        # the reason: these attention modules never dispatch through transformers' AttentionInterface
        assert "ALL_ATTENTION_FUNCTIONS" not in source and "attention_interface" not in source, name


def test_a_refused_seq2seq_model_raises_the_reason_not_an_inferred_declaration():
    from transformers import MvpConfig, MvpForConditionalGeneration

    config = MvpConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
    )  # fmt: skip
    model = MvpForConditionalGeneration(config).eval()
    ids = torch.tensor([[5, 6, 7, 2]])
    with pytest.raises(UnsupportedModelError, match="'mvp'") as err:
        hf_pelrp.attribute(model, ids, decoder_input_ids=torch.tensor([[2, 5]]))
    assert "MvpAttention" in str(err.value) and "inferred" not in str(err.value)


def test_xglm_does_not_run_in_float64_in_transformers():
    """The second half of xglm's stated reason: a float64 XGLM forward raises inside transformers."""
    from transformers import XGLMConfig, XGLMForCausalLM

    config = XGLMConfig(
        vocab_size=50, d_model=16, ffn_dim=32, num_layers=1, attention_heads=2, max_position_embeddings=32
    )
    model = XGLMForCausalLM(config).to(torch.float64).eval()
    with pytest.raises(RuntimeError, match="overflow"):
        model(torch.tensor([[3, 4, 5]]))


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_switch_top1_routing_rule_equals_the_explicit_rules_in_float64(mode):
    """p_e(x) * E_e(x) of a SwitchTransformersSparseMLP: uniform rule (1/2 each) under AttnLRP, p_e a constant
    under CP; p's share flows through max and the router softmax (plain gradient, Prop. 3.1). Written out."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    from hf_pelrp.adapters import adapter_for_type
    from hf_pelrp.adapters.more_seq2seq import switch_routing_rules
    from hf_pelrp.config import LRPConfig
    from hf_pelrp.hooks import Handles

    torch.manual_seed(0)
    config = SwitchTransformersConfig(**adapter_for_type("switch_transformers").tiny)
    model = SwitchTransformersForConditionalGeneration(config).to(torch.float64).eval()
    mlp = model.encoder.block[0].layer[-1].mlp
    mlp.router.dtype = torch.float64  # the router in float64 too (transformers computes it in router_dtype)
    x = torch.randn(1, 6, config.d_model, dtype=torch.float64, requires_grad=True)
    cfg = LRPConfig(mode=mode)
    handles = Handles()
    for module, rule in switch_routing_rules(model, cfg, None):
        rule.attach(module, handles)
    try:
        out = mlp(x)
        seed = torch.randn_like(out)
        (gx,) = torch.autograd.grad(out, x, seed)
    finally:
        handles.remove()
    torch.testing.assert_close(out, mlp(x), rtol=0, atol=0)

    f_w, f_e = (0.5, 0.5) if mode == "attnlrp" else (0.0, 1.0)
    xs, g = x.detach()[0], seed[0]
    wr = mlp.router.classifier.weight.detach()
    p = torch.softmax(xs @ wr.T, -1)
    e = p.argmax(-1)
    ex = torch.zeros_like(xs)
    for t in range(xs.shape[0]):
        expert = mlp.experts[f"expert_{int(e[t])}"]
        wi, wo = expert.wi.weight.detach(), expert.wo.weight.detach()
        pre = wi @ xs[t]
        hidden = pre.clamp(min=0)
        E = wo @ hidden
        w = p[t, e[t]]
        d_hidden = wo.T @ (f_e * w * g[t])
        ex[t] += wi.T @ (d_hidden * (pre > 0))  # identity rule on ReLU = its gradient
        dp = torch.zeros_like(p[t])
        dp[e[t]] = f_w * (g[t] * E).sum()
        dl = p[t] * (dp - (p[t] * dp).sum())
        ex[t] += wr.T @ dl
    torch.testing.assert_close(gx[0], ex, rtol=1e-10, atol=1e-12)
