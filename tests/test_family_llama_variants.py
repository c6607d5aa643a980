"""The LLaMA-layout variants (qwen3, olmo, olmo2, granite, starcoder2, phi3, smollm3, cohere) against the slow
explicit rules of reference_families.py, in both modes, with and without positions, with padding.

check_adapter proves conservation under CP-LRP, where q and k carry nothing; this test also pins the AttnLRP
paths the CP check cannot see (q / k norms, rotary variants, NoPE layers, the gate half of a fused
projection, multipliers), to float64 rounding.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_pelrp
from helpers.reference_families import reference_family_lrp
from hf_pelrp.adapters import adapter_for_type
from hf_pelrp.inputs import causal_position_ids

pytestmark = pytest.mark.usefixtures("single_thread")

FAMILIES = ("qwen3", "olmo", "olmo2", "granite", "starcoder2", "phi3", "smollm3", "cohere")
#: relative to the largest entry of the reference map (float64 rounding; Cohere rotates q.float(), so the
#: gradient reaching q and k passes a float32 cast: still below 1e-8 here)
TOL = 1e-8
#: OLMo and OLMo 2 hand float32 cos / sin to attention even in a float64 model: the leaves, and so their
#: gradients and position relevance, are float32
POSITION_TOL = {"olmo": 1e-6, "olmo2": 1e-6}
#: with the larger initialisation the q / k / v entries are ~8x larger: a clip that still cuts about a quarter
OVERRIDES = {"olmo": {"clip_qkv": 1.0}}


@cache
def family_model(model_type: str, checked: bool = False):
    """The adapter's tiny instance (float64, causal LM), as check_adapter builds it (``checked``) or with a larger
    initialisation (peaked attention, so a wrong factor on q / k / cos / sin cannot hide); random values for
    constant parameters."""
    tiny = dict(adapter_for_type(model_type).tiny)
    if not checked:
        tiny.update(initializer_range=0.15, **OVERRIDES.get(model_type, {}))
    config = AutoConfig.for_model(model_type, **tiny)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float64).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.reshape(-1)
            if bool((flat == flat[0]).all()):  # norm weights (ones), biases (zeros)
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


def batch(vocab: int = 97) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows: full, left-padded (3 pads), right-padded (2 pads)."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, vocab, (3, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, 6:] = 0
    return ids * mask, mask


def fast_maps(model, ids, mask, mode, positional, target):
    """token [B, T] and position_by_layer [B, L, T] of the fast path, read in float64 from the leaves."""
    rows = torch.arange(ids.shape[0])
    position = (torch.arange(ids.shape[1]) * mask).argmax(-1)
    with hf_pelrp.lrp(model, mode=mode, positional=positional) as ctx:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=causal_position_ids(mask)).logits
        seed = logits[rows, position, target]
        torch.autograd.backward(seed.sum(), inputs=ctx.leaves())
        maps = ctx.maps()
    by_layer = maps["position_by_layer"]
    if by_layer is None:
        by_layer = torch.zeros(ids.shape[0], len(model.model.layers), ids.shape[1], dtype=torch.float64)
    return maps["token"], by_layer, seed.detach()


def assert_close(fast, ref, tol, what):
    scale = ref.abs().max().item()
    if scale == 0:
        assert torch.equal(fast, torch.zeros_like(fast)), f"{what}: the reference is exactly 0, fast is not"
        return 0.0
    err = (fast.double() - ref).abs().max().item() / scale
    assert err < tol, f"{what}: max error {err:.3e} of the largest entry (tolerance {tol:.0e})"
    return err


@pytest.mark.parametrize("positional", [True, False])
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_fast_path_matches_explicit_rules(model_type, mode, positional):
    model = family_model(model_type)
    ids, mask = batch()
    ref = reference_family_lrp(model, ids, mask, mode=mode, positional=positional)
    token, by_layer, logit = fast_maps(model, ids, mask, mode, positional, ref.target)
    # the reference's forward is the model's own (the explained logits agree to rounding)
    torch.testing.assert_close(logit, ref.logit, rtol=1e-10, atol=1e-12)
    assert_close(token, ref.token, TOL, f"{model_type} token")
    tol = POSITION_TOL.get(model_type, TOL)
    assert_close(by_layer, ref.position_by_layer, tol, f"{model_type} position_by_layer")
    assert torch.equal(ref.token[mask == 0], torch.zeros(int((mask == 0).sum()), dtype=torch.float64))
    if mode == "attnlrp" and positional:
        # positions carry a visible share here: a wrong rotary factor would be far above the tolerance
        assert ref.position.abs().sum() > 1e-3 * ref.token.abs().sum()
    else:
        assert torch.equal(by_layer, torch.zeros_like(by_layer))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_bias_free_cp_reference_is_conservative(model_type):
    """The explicit rules on their own: with the biases zeroed, CP gives token sum = explained logit."""
    model = family_model(model_type)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
        ids, mask = batch()
        ref = reference_family_lrp(model, ids, mask, mode="cp")
        torch.testing.assert_close(ref.token.sum(-1), ref.logit, rtol=1e-6, atol=0)
    finally:
        model.load_state_dict(saved)


def test_the_tiny_instances_exercise_what_they_declare():
    """The tiny configurations really contain the features the declarations claim to cover."""
    granite = family_model("granite").config
    assert (granite.embedding_multiplier, granite.residual_multiplier, granite.logits_scaling) == (
        12.0,
        0.22,
        8.0,
    )
    assert family_model("granite").model.layers[0].self_attn.scaling == 0.125
    assert family_model("cohere").model.layers[0].self_attn.use_qk_norm
    assert family_model("cohere").logit_scale == 0.25
    phi3 = family_model("phi3")
    assert phi3.model.rotary_emb.inv_freq.numel() * 2 < phi3.model.layers[0].self_attn.head_dim  # partial
    assert [layer.self_attn.use_rope for layer in family_model("smollm3").model.layers] == [1, 0]
    assert family_model("starcoder2").model.layers[0].mlp.c_fc.bias is not None
    for olmo in (family_model("olmo"), family_model("olmo", checked=True)):
        assert olmo.config.clip_qkv is not None
        hidden = olmo.model.embed_tokens(batch()[0])
        attn = olmo.model.layers[0].self_attn
        for proj in (attn.q_proj, attn.v_proj):
            clipped = float(
                (proj(olmo.model.layers[0].input_layernorm(hidden)).abs() > olmo.config.clip_qkv)
                .double()
                .mean()
            )
            assert 0.1 < clipped < 0.6, f"the tiny OLMo clips {clipped:.0%} of a projection"


def test_every_head_class_of_the_families_is_checked():
    """check_adapter (run for every registered type in test_adapters.py) covers both heads where transformers
    has them; Granite and Cohere have a causal-LM head only."""
    from hf_pelrp.check import head_classes

    for model_type in FAMILIES:
        names = {cls.__name__ for cls in head_classes(model_type, adapter_for_type(model_type))}
        heads = {n.split("For", 1)[1] for n in names}
        expected = (
            {"CausalLM"} if model_type in ("granite", "cohere") else {"CausalLM", "SequenceClassification"}
        )
        assert heads == expected, (model_type, names)
