"""ModernBERT: the fused GeGLU rule against its explicit formula, the sliding window, per-layer rotary leaves
of local and global layers, the rotary split in one layer, mean pooling."""

from __future__ import annotations

import pytest
import torch
from transformers import ModernBertForMaskedLM, ModernBertForSequenceClassification

import hf_pelrp
from helpers.reference_absolute import lrp_linear
from hf_pelrp.check import _randomise, _zero_biases, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64


def _model(cls=ModernBertForMaskedLM, seed: int = 0, **overrides):
    config = tiny_config("modernbert")
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = cls(config).to(F64).eval()
    _randomise(model, seed)
    return model


def _ids(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 4] = 3  # the [MASK] id used below
    return ids


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_geglu_matches_the_explicit_uniform_rule(mode):
    """``Wo(act(a) * b)`` with ``a, b = Wi(x).chunk(2)``: the FIRST half feeds GELU, the second is the linear
    factor. Explicit rules (float64, eps -> 0): epsilon at ``Wo``; uniform rule at the product (1/2 each under
    AttnLRP; CP: the activated half is a constant, all to ``b``); identity rule at GELU (``R_a = R_act``);
    epsilon at ``Wi``. Under AttnLRP the up factor 1/2 must land on the second half of ``Wi``'s channels (on
    the first, the activated path would get 1/4 and the linear one all of it)."""
    model = _model(mlp_bias=True)
    mlp = model.model.layers[1].mlp
    x = torch.randn(2, 5, 32, dtype=F64, generator=torch.Generator().manual_seed(3))
    with hf_pelrp.lrp(model, mode=mode), torch.enable_grad():
        leaf = x.clone().requires_grad_(True)
        out = mlp(leaf)
        out.sum().backward()  # gradient 1 at every output: R_out = out
    fast = (leaf * leaf.grad).detach()

    wi, bi = mlp.Wi.weight.detach(), mlp.Wi.bias.detach()
    wo, bo = mlp.Wo.weight.detach(), mlp.Wo.bias.detach()
    half = wi.shape[0] // 2
    z = x @ wi.T + bi
    a, b = z[..., :half], z[..., half:]
    act = torch.nn.functional.gelu(a)
    h = act * b
    r_out = h @ wo.T + bo
    r_h = lrp_linear(h, wo, bo, r_out)
    act_share, up_share = (0.5, 0.5) if mode == "attnlrp" else (0.0, 1.0)
    r_a, r_b = act_share * r_h, up_share * r_h  # identity rule at GELU: R_a = R_act
    ref = lrp_linear(x, wi[:half], bi[:half], r_a) + lrp_linear(x, wi[half:], bi[half:], r_b)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-12)


def test_the_sliding_window_is_part_of_the_lrp_forward():
    """Local layers see +-2 tokens (local_attention=4): the "lrp" attention reproduces transformers' eager
    attention (which applies the window), and the window changes the output (it is active at length 10)."""
    model = _model()
    ids = _ids()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(ids).logits
    global_only = _model(layer_types=["full_attention"] * 3)
    global_only.load_state_dict(model.state_dict())
    with torch.no_grad():
        without_window = global_only(ids).logits
    with hf_pelrp.lrp(model), torch.enable_grad():
        inside = model(ids).logits.detach()
    # eager computes its softmax in float32, the "lrp" (SDPA) one in float64
    assert (inside - eager).abs().max() < 1e-5
    assert (without_window - eager).abs().max() > 1e-2


def test_local_and_global_layers_have_their_own_rotary_leaves():
    model = _model()
    ids = _ids()
    attr = hf_pelrp.attribute(model, ids, position=4, mask_token_id=3, mode="attnlrp")
    assert attr.position_by_layer.shape == (2, 3, 10)
    per_layer = attr.position_by_layer.abs().sum(-1)
    assert (per_layer > 0).all()  # layers 0, 2 global (base 160k), layer 1 local (base 10k)
    torch.testing.assert_close(attr.position, attr.position_by_layer.sum(1))
    cp = hf_pelrp.attribute(model, ids, position=4, mask_token_id=3, mode="cp")
    assert torch.equal(cp.position_by_layer, torch.zeros_like(cp.position_by_layer))


def test_rotary_split_is_locally_conservative_in_one_layer():
    """One bias-free layer: what cos / sin take at a position is what q / k (so the token there) give up."""
    model = _model(num_hidden_layers=1, layer_types=["full_attention"])
    _zero_biases(model)
    ids = _ids()
    on = hf_pelrp.attribute(model, ids, position=4, mask_token_id=3, mode="attnlrp", positional=True)
    off = hf_pelrp.attribute(
        model, ids, position=4, mask_token_id=3, mode="attnlrp", positional=False, target=on.target
    )
    assert torch.equal(off.position, torch.zeros_like(off.position))
    assert on.position.abs().sum() > 0
    scale = off.token.abs().max()
    torch.testing.assert_close(on.token + on.position, off.token, rtol=0, atol=1e-9 * scale)


def test_mean_pooling_classifier_passes_check_adapter():
    config = tiny_config("modernbert")
    config.classifier_pooling = "mean"
    report = hf_pelrp.check_adapter(config, classes=[ModernBertForSequenceClassification])
    assert report.passed


def test_padding_is_exactly_zero_with_mean_pooling_and_left_padding():
    model = _model(ModernBertForSequenceClassification, classifier_pooling="mean")
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    attr = hf_pelrp.attribute(model, ids, attention_mask=mask, mode="attnlrp")
    alone = hf_pelrp.attribute(model, ids[1:, 3:], mode="attnlrp")
    assert torch.equal(attr.token[1, :3], torch.zeros(3, dtype=F64))
    assert torch.equal(attr.position_by_layer[1, :, :3], torch.zeros(3, 3, dtype=F64))
    torch.testing.assert_close(attr.relevance[1, 3:], alone.relevance[0], rtol=0, atol=1e-10)
