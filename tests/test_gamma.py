"""The generalised Gamma rule against its explicit formula, and the rule configuration (gamma fields, presets)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_llama_family
from hf_pelrp import attribute, lrp
from hf_pelrp.config import PRESETS, LRPConfig, preset, resolve_config
from hf_pelrp.errors import UnsupportedModelError
from hf_pelrp.hooks import Gamma, Handles
from hf_pelrp.rules import gamma_rule

F64 = torch.float64


def reference_gamma(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, r_out: torch.Tensor, gamma
):
    """Generalised Gamma rule written out term by term (float64): x [N, I], weight [O, I], r_out [N, O].

    ``R_i = sum_j (z_ij + gamma (z_ij)^s_j) / (z_j + gamma (sum_k (z_kj)^s_j + (b_j)^s_j)) R_j`` with
    ``z_ij = x_i w_ji``, ``z_j = sum_i z_ij + b_j``, ``s_j = sign(z_j)``; outputs with ``z_j = 0`` pass nothing.
    """
    b = torch.zeros(weight.shape[0], dtype=F64) if bias is None else bias.to(F64)
    z = x.to(F64)[:, :, None] * weight.to(F64).T[None]  # [N, I, O]
    z_out = z.sum(1) + b
    positive = z_out > 0
    z_sel = torch.where(positive[:, None, :], z.clamp(min=0), z.clamp(max=0))
    b_sel = torch.where(positive, b.clamp(min=0), b.clamp(max=0))
    den = z_out + gamma * (z_sel.sum(1) + b_sel)
    share = torch.where(z_out == 0, torch.zeros_like(den), r_out.to(F64) / torch.where(den == 0, 1.0, den))
    return ((z + gamma * z_sel) * share[:, None, :]).sum(2)


def fast_relevance(layer_map, x, weight, bias, gamma, upstream):
    """``x * x.grad`` after the Gamma rule with gradient ``upstream`` at the output (so ``R_out = y * upstream``)."""
    leaf = x.clone().requires_grad_(True)
    y = layer_map(leaf, weight, bias)
    out = gamma_rule(leaf, y, weight, bias, gamma, layer_map)
    assert torch.equal(out, y)
    out.backward(upstream)
    return (leaf * leaf.grad).detach(), y.detach()


@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.25, 100.0])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_explicit_formula(gamma, with_bias):
    torch.manual_seed(0)
    x = torch.randn(5, 7, dtype=F64)
    weight = torch.randn(4, 7, dtype=F64)
    bias = torch.randn(4, dtype=F64) if with_bias else None
    upstream = torch.randn(5, 4, dtype=F64)
    r_in, y = fast_relevance(F.linear, x, weight, bias, gamma, upstream)
    expected = reference_gamma(x, weight, bias, y * upstream, gamma)
    torch.testing.assert_close(r_in, expected, rtol=1e-10, atol=1e-10)
    if not with_bias:
        # bias-free: every output passes on all of its relevance
        torch.testing.assert_close(r_in.sum(), (y * upstream).sum(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gamma", [0.0, 0.25, 100.0])
@pytest.mark.parametrize(("kernel", "stride", "padding"), [(4, 4, 0), (3, 1, 1)])
def test_conv_matches_explicit_formula(gamma, kernel, stride, padding):
    """Overlapping (3x3, stride 1, padded) and patch-like (stride = kernel) convolutions, via unfold."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding).to(F64)
    x = torch.randn(2, 2, 8, 8, dtype=F64)
    y_shape = conv(x).shape
    upstream = torch.randn(y_shape, dtype=F64)
    r_in, y = fast_relevance(conv._conv_forward, x, conv.weight.detach(), conv.bias.detach(), gamma, upstream)
    # explicit: each output location is a linear layer on its unfolded receptive field
    cols = F.unfold(x, kernel, padding=padding, stride=stride)  # [B, C*k*k, L]
    batch, _, locations = cols.shape
    r_out = (y * upstream).flatten(2).transpose(1, 2).reshape(batch * locations, -1)
    x_rows = cols.transpose(1, 2).reshape(batch * locations, -1)
    r_cols = reference_gamma(x_rows, conv.weight.detach().flatten(1), conv.bias.detach(), r_out, gamma)
    r_cols = r_cols.view(batch, locations, -1).transpose(1, 2)
    expected = F.fold(r_cols, x.shape[-2:], kernel, padding=padding, stride=stride)
    torch.testing.assert_close(r_in, expected, rtol=1e-10, atol=1e-10)


def test_gamma_zero_is_epsilon_rule_and_small_gamma_converges():
    torch.manual_seed(2)
    x = torch.randn(6, 5, dtype=F64)
    weight, bias = torch.randn(3, 5, dtype=F64), torch.randn(3, dtype=F64)
    upstream = torch.randn(6, 3, dtype=F64)
    plain = x.clone().requires_grad_(True)
    F.linear(plain, weight, bias).backward(upstream)
    epsilon = plain * plain.grad
    r0, _ = fast_relevance(F.linear, x, weight, bias, 0.0, upstream)
    torch.testing.assert_close(r0, epsilon.detach(), rtol=1e-12, atol=1e-12)
    r_small, _ = fast_relevance(F.linear, x, weight, bias, 1e-7, upstream)
    torch.testing.assert_close(r_small, epsilon.detach(), rtol=1e-5, atol=1e-5)
    r_big, _ = fast_relevance(F.linear, x, weight, bias, 1.0, upstream)
    assert (r_big - epsilon).abs().max() > 1e-2, "gamma = 1 must differ from the epsilon rule"


def test_gamma_favours_contributions_that_agree_with_the_output():
    """One positive output fed by a positive and a negative contribution: gamma shifts relevance to the first."""
    x = torch.tensor([[1.0, 1.0]], dtype=F64)
    weight = torch.tensor([[2.0, -1.0]], dtype=F64)  # contributions +2 and -1, output 1
    r_eps, _ = fast_relevance(F.linear, x, weight, None, 0.0, torch.ones(1, 1, dtype=F64))
    r_gamma, _ = fast_relevance(F.linear, x, weight, None, 1.0, torch.ones(1, 1, dtype=F64))
    torch.testing.assert_close(r_eps, torch.tensor([[2.0, -1.0]], dtype=F64))
    # (2 + 2) / (1 + 2) and -1 / (1 + 2): still sums to the output
    torch.testing.assert_close(r_gamma, torch.tensor([[4.0 / 3.0, -1.0 / 3.0]], dtype=F64))


@pytest.mark.parametrize("gamma", [0.0, 0.05, 100.0])
def test_forward_values_unchanged_and_hook_removed(gamma):
    torch.manual_seed(3)
    layers = [nn.Linear(6, 4), nn.Conv2d(3, 4, 2, stride=2)]
    inputs = [torch.randn(3, 6), torch.randn(2, 3, 4, 4)]
    for layer, x in zip(layers, inputs, strict=True):
        before = layer(x)
        handle = Handles()
        Gamma(gamma).attach(layer, handle)
        leaf = x.clone().requires_grad_(True)
        during = layer(leaf)
        assert torch.equal(during, before)
        during.sum().backward()
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
        handle.remove()
        assert not layer._forward_hooks
        assert torch.equal(layer(x), before)


def test_gamma_hook_on_gpt2_conv1d_matches_formula():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(4)
    layer = Conv1D(4, 6).to(F64)  # weight [in=6, out=4]
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    Gamma(0.5).attach(layer, Handles())
    x = torch.randn(2, 3, 6, dtype=F64, requires_grad=True)
    y = layer(x)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    expected = reference_gamma(
        x.detach().view(-1, 6),
        layer.weight.detach().T,
        layer.bias.detach(),
        (y * upstream).detach().view(-1, 4),
        0.5,
    )
    torch.testing.assert_close((x * x.grad).detach().view(-1, 6), expected, rtol=1e-10, atol=1e-10)


def test_gamma_hook_refuses_other_modules():
    with pytest.raises(TypeError, match="Linear, Conv1d/2d/3d"):
        Gamma(0.1).attach(nn.LayerNorm(4), Handles())


def test_config_gamma_fields_and_presets():
    assert LRPConfig().gamma_linear is None and LRPConfig().gamma_conv is None
    assert LRPConfig(gamma_linear=1).gamma_linear == 1.0
    for bad in (-0.1, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="gamma_linear"):
            LRPConfig(gamma_linear=bad)
    paper = preset("vit-paper")
    assert (paper.mode, paper.gamma_linear, paper.gamma_conv, paper.positional) == ("cp", 0.05, 100.0, True)
    assert resolve_config("vit-paper", None, None) == paper
    assert resolve_config(None, "vit-paper", None) == paper
    assert resolve_config(None, "vit-paper", False) == paper.with_(positional=False)
    # one precedence rule: an explicit config and a mode= that contradicts it is an error, not a silent choice
    with pytest.raises(ValueError, match="config= says mode 'cp' but mode='attnlrp'"):
        resolve_config(paper, "attnlrp", None)
    with pytest.raises(ValueError, match="config= says positional=True but positional=False"):
        resolve_config(paper, None, False)
    assert resolve_config(paper, "cp", True) == paper  # agreeing arguments are fine
    assert resolve_config(None, "cp", None) == LRPConfig(mode="cp") == PRESETS["cp"]
    with pytest.raises(ValueError, match="unknown mode or preset 'vit-papr'.*vit-paper"):
        resolve_config(None, "vit-papr", None)
    with pytest.raises(ValueError, match="unknown mode or preset"):
        resolve_config("nope", None, None)


@pytest.mark.parametrize("fields", [{"gamma_linear": 0.05}, {"gamma_conv": 100.0}])
def test_gamma_on_a_family_without_gamma_layers_is_refused(fields):
    model = tiny_llama_family("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(ids).logits
    message = f"{next(iter(fields))}.*llama adapter.*epsilon rule"
    with pytest.raises(UnsupportedModelError, match=message), lrp(model, config=LRPConfig(**fields)):
        pass
    with pytest.raises(UnsupportedModelError, match="vit-paper|gamma"):
        attribute(model, ids, config="vit-paper")
    # refused before anything was attached: the model is exactly as it was
    assert torch.equal(model(ids).logits, before)
    assert all(p.requires_grad for p in model.parameters())
