"""OLMo: the identity rule on clipped q / k / v projections (``clip_qkv``) against an explicit float64 reference,
and the non-parametric LayerNorm's surrogate (its epsilon is written into the forward)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hf_pelrp
from hf_pelrp.adapters import adapter_for_type, register_adapter
from hf_pelrp.adapters.base import _REGISTRY
from hf_pelrp.adapters.norms import layer_norm
from hf_pelrp.hooks import ClippedOutput, Handles

pytestmark = pytest.mark.usefixtures("single_thread")


def _safe_div(a, b):
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def test_clipped_output_is_the_identity_rule():
    """``z = W2 clamp_(W1 x, -c, c)`` with the clamp in place, as OLMo applies it: the relevance of the clamp's
    input equals that of its output (identity rule), then the epsilon rule at W1. Plain autograd gives the
    clipped entries nothing."""
    gen = torch.Generator().manual_seed(0)
    lin1 = torch.nn.Linear(6, 10, bias=False).double()
    lin2 = torch.nn.Linear(10, 4, bias=False).double()
    with torch.no_grad():
        lin1.weight.copy_(torch.randn(10, 6, generator=gen, dtype=torch.float64))
        lin2.weight.copy_(torch.randn(4, 10, generator=gen, dtype=torch.float64))
    x0 = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    c = 0.8
    target = 2

    def run(with_rule: bool):
        handles = Handles()
        if with_rule:
            ClippedOutput(c).attach(lin1, handles)
        try:
            x = x0.clone().requires_grad_(True)
            y = lin1(x)
            y.clamp_(min=-c, max=c)
            z = lin2(y)
            z[:, target].sum().backward()
        finally:
            handles.remove()
        return z.detach(), x * x.grad

    z, fast = run(with_rule=True)
    # ---- explicit float64 reference
    w1, w2 = lin1.weight.detach(), lin2.weight.detach()
    y_lin = x0 @ w1.T
    y = y_lin.clamp(-c, c)
    assert 0.2 < float((y_lin.abs() > c).double().mean()) < 0.8  # the clip is active on part of the entries
    r_z = torch.zeros_like(z)
    r_z[:, target] = z[:, target]
    r_y = y * (_safe_div(r_z, y @ w2.T) @ w2)  # epsilon rule at W2
    r_y_lin = r_y  # identity rule at the clip
    r_x = x0 * (_safe_div(r_y_lin, y_lin) @ w1)  # epsilon rule at W1
    torch.testing.assert_close(z, y @ w2.T, rtol=1e-14, atol=0)  # the rule leaves the forward unchanged
    torch.testing.assert_close(fast, r_x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fast.sum(-1), z[:, target], rtol=1e-12, atol=0)  # bias-free: conservative
    _, plain = run(with_rule=False)
    assert (plain.sum(-1) - z[:, target]).abs().max() > 1e-3  # plain autograd loses the clipped entries


@pytest.fixture
def scratch_registry():
    saved = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def test_olmo_layer_norm_with_the_generic_epsilon_is_refused(scratch_registry):
    """OlmoLayerNorm has no eps attribute; the generic LayerNorm surrogate would use 1e-6 instead of its 1e-5.
    The norm rule's check catches that instead of propagating through the wrong function."""
    olmo = adapter_for_type("olmo")
    register_adapter(dataclasses.replace(olmo, norms={"OlmoLayerNorm": layer_norm}))
    with pytest.raises(hf_pelrp.AdapterCheckError, match="OlmoLayerNorm.*does not reproduce"):
        hf_pelrp.check_adapter("olmo")
