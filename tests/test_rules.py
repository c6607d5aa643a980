"""Unit tests of the autograd primitives in :mod:`hf_pelrp.rules`, each against a slow, explicit formula."""

from __future__ import annotations

import pytest
import torch

from hf_pelrp.rules import (
    identity_rule,
    layer_norm_identity,
    relevance_of,
    rms_norm_identity,
    scale_gradient,
    stop_gradient,
    straight_through,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _randn(*shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _jacobian_by_columns(fn, x: torch.Tensor) -> torch.Tensor:
    """Jacobian of ``fn`` at a 1-d ``x`` by one backward pass per output entry (the plain, obvious way)."""
    rows = []
    for i in range(x.numel()):
        xi = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(xi)[i], xi)
        rows.append(grad)
    return torch.stack(rows)


# ---------------------------------------------------------------- scale_gradient / stop_gradient


@pytest.mark.parametrize("factor", [0.5, 0.25, 2.0, -1.5])
def test_scale_gradient_multiplies_the_incoming_gradient(factor):
    x = _randn(3, 5).requires_grad_(True)
    upstream = _randn(3, 5, seed=1)
    y = scale_gradient(x, factor)
    assert torch.equal(y, x)
    y.backward(upstream)
    # reference: d(scaled)/dx = factor * upstream, element-wise
    torch.testing.assert_close(x.grad, factor * upstream, rtol=0, atol=0)


def test_scale_gradient_one_and_zero():
    x = _randn(4).requires_grad_(True)
    assert scale_gradient(x, 1.0) is x
    stopped = scale_gradient(x, 0.0)
    assert torch.equal(stopped, x) and not stopped.requires_grad
    constant = _randn(4)
    assert scale_gradient(constant, 0.5) is constant


def test_stop_gradient_makes_a_constant():
    x = _randn(6).requires_grad_(True)
    # y = x * stop(x): the product rule would give 2x; with one factor constant the gradient is x
    (x * stop_gradient(x)).sum().backward()
    torch.testing.assert_close(x.grad, x.detach(), rtol=0, atol=0)


# ---------------------------------------------------------------- identity rule


@pytest.mark.parametrize("act", [torch.nn.functional.silu, torch.nn.functional.gelu, torch.tanh])
def test_identity_rule_passes_relevance_element_wise(act):
    x = _randn(4, 7) * 3
    x[0, :3] = 0.0  # exact zeros: f(x) / x is 0 there, not NaN
    x.requires_grad_(True)
    y = act(x)
    out = identity_rule(x, y)
    assert torch.equal(out, y)
    upstream = _randn(4, 7, seed=2)
    out.backward(upstream)
    # reference: the local derivative is f(x) / x (0 at x == 0)
    xd, yd = x.detach(), y.detach()
    expected = torch.where(xd == 0, torch.zeros_like(xd), upstream * yd / xd)
    torch.testing.assert_close(x.grad, expected, rtol=1e-14, atol=0)
    # relevance in = relevance out element-wise (R_y = y * upstream, R_x = x * x.grad)
    torch.testing.assert_close(xd * x.grad, yd * upstream, rtol=1e-14, atol=1e-300)
    assert torch.equal(x.grad[0, :3], torch.zeros(3, dtype=x.dtype))


def test_identity_rule_half_precision_ratio_does_not_overflow():
    # y / x = 1e5 exceeds float16's range (65504), the gradient it produces (1e5 * 1e-3 = 100) does not
    x = torch.tensor([1e-4, -2e-4, 0.0, 1.0], dtype=torch.float16, requires_grad=True)
    y = torch.tensor([10.0, 20.0, 0.5, 0.5], dtype=torch.float16)
    out = identity_rule(x, y)
    assert out.dtype == torch.float16 and torch.equal(out, y)
    upstream = torch.full((4,), 1e-3, dtype=torch.float16)
    out.backward(upstream)
    assert x.grad.dtype == torch.float16 and torch.isfinite(x.grad).all()
    x64, y64, g64 = x.detach().double(), y.double(), upstream.double()
    expected = torch.where(x64 == 0, torch.zeros_like(x64), g64 * y64 / x64)
    torch.testing.assert_close(x.grad.double(), expected, rtol=2e-3, atol=0)


def test_identity_rule_keeps_float64_precision():
    # a ratio formed in float32 would be off by ~1e-8 relative
    x = (_randn(50) * 2).requires_grad_(True)
    y = torch.nn.functional.silu(x)
    identity_rule(x, y).sum().backward()
    torch.testing.assert_close(x.grad, y.detach() / x.detach(), rtol=1e-15, atol=0)


def test_identity_rule_without_grad_is_a_no_op():
    x = _randn(3)
    y = torch.tanh(x)
    assert identity_rule(x, y) is y


# ---------------------------------------------------------------- straight-through


def test_straight_through_forward_is_bit_identical_backward_is_the_surrogates():
    x = (_randn(200, dtype=torch.float32) * 1e3).requires_grad_(True)
    value = (x / 7.0 * 3.0).detach()
    surrogate = x * (3.0 / 7.0)  # the same function, rounded differently
    assert not torch.equal(value, surrogate.detach()), "the test needs a surrogate that differs by rounding"
    out = straight_through(value, surrogate)
    assert torch.equal(out, value)
    upstream = _randn(200, dtype=torch.float32, seed=3)
    out.backward(upstream)
    torch.testing.assert_close(x.grad, (3.0 / 7.0) * upstream, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- norm rules


def test_rms_norm_identity_is_the_frozen_scale_linear_map():
    x = _randn(2, 9) * 4
    eps = 1e-6
    y = rms_norm_identity(x, eps)
    scale = 1.0 / torch.sqrt((x**2).mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(y, x * scale, rtol=1e-14, atol=0)
    for row in range(2):
        jac = _jacobian_by_columns(lambda v: rms_norm_identity(v, eps), x[row])
        # reference: with the scale a constant, d y_i / d x_j = scale * delta_ij
        torch.testing.assert_close(jac, torch.diag(scale[row].expand(9)), rtol=1e-14, atol=0)
        # and it is not the true Jacobian of RMSNorm (that one has off-diagonal terms)
        h = 1e-6
        cols = []
        for j in range(9):
            e = torch.zeros(9, dtype=x.dtype)
            e[j] = h
            hi = (x[row] + e) / torch.sqrt(((x[row] + e) ** 2).mean() + eps)
            lo = (x[row] - e) / torch.sqrt(((x[row] - e) ** 2).mean() + eps)
            cols.append((hi - lo) / (2 * h))
        true_jac = torch.stack(cols, 1)
        assert (true_jac - jac).abs().max() > 1e-3
    # identity rule: relevance in = relevance out, element-wise
    xg = x.clone().requires_grad_(True)
    upstream = _randn(2, 9, seed=4)
    out = rms_norm_identity(xg, eps)
    out.backward(upstream)
    torch.testing.assert_close(xg.detach() * xg.grad, out.detach() * upstream, rtol=1e-13, atol=1e-15)


def test_rms_norm_identity_finite_differences_with_frozen_scale():
    x = _randn(11, dtype=torch.float64, seed=5)
    eps = 1e-5
    frozen = 1.0 / torch.sqrt((x**2).mean() + eps)
    xg = x.clone().requires_grad_(True)
    jac = _jacobian_by_columns(lambda v: rms_norm_identity(v, eps), xg)
    h = 1e-6
    for j in range(11):
        e = torch.zeros(11, dtype=x.dtype)
        e[j] = h
        fd = ((x + e) * frozen - (x - e) * frozen) / (2 * h)
        torch.testing.assert_close(jac[:, j], fd, rtol=1e-8, atol=1e-10)


def test_rms_norm_identity_half_precision_statistics_in_float32():
    x = torch.tensor([[300.0, -250.0, 400.0, 10.0]], dtype=torch.float16)  # x^2 overflows float16
    y = rms_norm_identity(x, 1e-6)
    assert torch.isfinite(y).all()
    x64 = x.double()
    torch.testing.assert_close(
        y.double(), x64 / torch.sqrt((x64**2).mean(-1, keepdim=True)), rtol=1e-3, atol=0
    )


def test_layer_norm_identity_forward_and_jacobian():
    n = 8
    x = _randn(3, n) * 2 + 1
    w = _randn(n, seed=6)
    b = _randn(n, seed=7)
    eps = 1e-5
    y = layer_norm_identity(x, w, b, eps)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (n,), w, b, eps), rtol=1e-12, atol=1e-12)
    for row in range(3):
        xr = x[row]
        inv_std = 1.0 / torch.sqrt(((xr - xr.mean()) ** 2).mean() + eps)
        # reference: y = diag(w) * inv_std * (I - 11^T / n) x + b with inv_std a constant
        centring = torch.eye(n, dtype=x.dtype) - torch.full((n, n), 1.0 / n, dtype=x.dtype)
        expected = torch.diag(w) @ (inv_std * centring)
        jac = _jacobian_by_columns(lambda v: layer_norm_identity(v, w, b, eps), xr)
        torch.testing.assert_close(jac, expected, rtol=1e-13, atol=1e-14)
    # epsilon rule of the linear map: R_x_j = sum_i x_j J_ij R_i / y_i, the bias absorbing its share
    xg = x.clone().requires_grad_(True)
    out = layer_norm_identity(xg, w, b, eps)
    relevance_out = _randn(3, n, seed=8)
    out.backward(relevance_out / out.detach())
    for row in range(3):
        xr = x[row]
        inv_std = 1.0 / torch.sqrt(((xr - xr.mean()) ** 2).mean() + eps)
        jac = torch.diag(w) @ (inv_std * (torch.eye(n, dtype=x.dtype) - 1.0 / n))
        r_x = torch.stack(
            [sum(xr[j] * jac[i, j] * relevance_out[row, i] / y[row, i] for i in range(n)) for j in range(n)]
        )
        torch.testing.assert_close(xg.detach()[row] * xg.grad[row], r_x, rtol=1e-11, atol=1e-13)


def test_layer_norm_identity_no_affine_and_half_precision():
    x = (torch.randn(2, 16, generator=torch.Generator().manual_seed(9)) * 50).to(torch.bfloat16)
    y = layer_norm_identity(x, None, None, 1e-5)
    assert y.dtype == torch.bfloat16
    reference = torch.nn.functional.layer_norm(x.double(), (16,), eps=1e-5)
    torch.testing.assert_close(y.double(), reference, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- relevance_of


def test_relevance_of_is_the_summed_product():
    leaf = _randn(2, 3, 5, dtype=torch.float32).requires_grad_(True)
    leaf.grad = _randn(2, 3, 5, dtype=torch.float32, seed=1)
    rel = relevance_of(leaf)
    assert rel.dtype == torch.float32 and rel.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            expected = sum(float(leaf.detach()[b, t, d]) * float(leaf.grad[b, t, d]) for d in range(5))
            assert abs(rel[b, t].item() - expected) < 1e-5
    both = relevance_of(leaf, dims=(-1, -2))
    torch.testing.assert_close(both, rel.sum(-1), rtol=1e-6, atol=1e-6)


def test_relevance_of_leaf_without_gradient_is_zero():
    leaf = _randn(2, 4, 3).requires_grad_(True)
    rel = relevance_of(leaf)
    assert rel.dtype == torch.float64 and torch.equal(rel, torch.zeros(2, 4, dtype=torch.float64))


def test_relevance_of_sums_float64_leaves_in_float64():
    # (1e8 + 1) - 1e8 = 1; a float32 product would round 1e8 + 1 to 1e8 and give 0
    leaf = torch.tensor([[1e8 + 1.0, -1e8]], dtype=torch.float64, requires_grad=True)
    leaf.grad = torch.ones_like(leaf)
    assert relevance_of(leaf).item() == 1.0


# ---------------------------------------------------------------- known non-invariance (method.md 3.8)


def _uniform_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b`` with the uniform rule: each factor's gradient halved (AttnLRP Prop. 3.2)."""
    return scale_gradient(a, 0.5) * scale_gradient(b, 0.5)


def test_uniform_rule_depends_on_how_a_triple_product_is_associated():
    x1, x2, x3 = 2.0, -3.0, 5.0
    y = x1 * x2 * x3

    def split(associate_left: bool) -> torch.Tensor:
        xs = torch.tensor([x1, x2, x3], dtype=torch.float64, requires_grad=True)
        if associate_left:
            out = _uniform_product(_uniform_product(xs[0], xs[1]), xs[2])
        else:
            out = _uniform_product(xs[0], _uniform_product(xs[1], xs[2]))
        assert out.item() == y
        out.backward()  # seed 1: the relevance at the output is y itself
        return (xs * xs.grad).detach()

    left, right = split(True), split(False)
    # by hand: (x1 x2) x3 gives y/2 to x3 and y/2 to (x1 x2), which splits it y/4, y/4; mirrored for x1 (x2 x3)
    assert left.tolist() == [y / 4, y / 4, y / 2]  # [-7.5, -7.5, -15.0]
    assert right.tolist() == [y / 2, y / 4, y / 4]  # [-15.0, -7.5, -7.5]
    assert left.sum().item() == right.sum().item() == y  # both conserve, they disagree on the split
    assert not torch.equal(left, right)


@pytest.mark.parametrize("scale", [1.0, 1.25])
def test_rotation_inverse_gradient_undoes_the_rotation_in_the_backward_pass(scale):
    """Identity forward; backward ``R g / s^2`` per head (explicit float64 formula), so that behind the rotation
    ``x_rot = x cos + rotate_half(x) sin`` the input gets exactly the gradient at the rotated output."""
    from hf_pelrp.rules import rotate_half, rotation_inverse_gradient

    gen = torch.Generator().manual_seed(0)
    b, t, heads, d = 2, 3, 2, 4
    angle = torch.rand(b, t, d // 2, generator=gen, dtype=torch.float64) * 6
    angle = torch.cat([angle, angle], -1)
    cos, sin = scale * angle.cos(), scale * angle.sin()
    x = torch.randn(b, t, heads * d, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(b, t, heads * d, generator=gen, dtype=torch.float64)

    y = rotation_inverse_gradient(x, cos, sin, d, scale)
    assert torch.equal(y, x)
    y.backward(g)
    gh = g.reshape(b, t, heads, d)
    c, s = cos[:, :, None], sin[:, :, None]
    expected = torch.empty_like(gh)
    for j in range(d):  # written out per channel: (R g)_j = g_j c_j + (rotate_half g)_j s_j
        partner = gh[..., j + d // 2] if j < d // 2 else gh[..., j - d // 2]
        sign = -1.0 if j < d // 2 else 1.0
        expected[..., j] = (gh[..., j] * c[..., j] + sign * partner * s[..., j]) / scale**2
    torch.testing.assert_close(x.grad, expected.reshape(b, t, heads * d), rtol=1e-12, atol=1e-12)

    x.grad = None
    h = rotation_inverse_gradient(x, cos, sin, d, scale).reshape(b, t, heads, d)
    rotated = h * c + rotate_half(h) * s
    rotated.reshape(b, t, heads * d).backward(g)
    torch.testing.assert_close(x.grad, g, rtol=1e-12, atol=1e-12)


def test_straight_through_output_may_be_modified_in_place_with_correct_gradients():
    """XLM multiplies its norm output by the padding mask in place: the rule's output must allow it."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    value = torch.nn.functional.layer_norm(x, (3,))
    surrogate = 2.0 * x
    out = straight_through(value, surrogate)
    out *= torch.tensor([[1.0], [0.0], [1.0], [1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        out, value.detach() * torch.tensor([[1.0], [0.0], [1.0], [1.0]], dtype=torch.float64)
    )
    out.sum().backward()
    expected = torch.full((4, 3), 2.0, dtype=torch.float64)
    expected[1] = 0.0
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_identity_rule_factor_scales_the_gradient_in_one_node(factor):
    # the gated product's 1/2 fused into the identity rule: the same gradient as the two-node composition
    x = _randn(3, 5) * 2
    x[1, 2] = 0.0
    fused_x = x.clone().requires_grad_(True)
    composed_x = x.clone().requires_grad_(True)
    upstream = _randn(3, 5, seed=4)
    fused = identity_rule(fused_x, torch.nn.functional.silu(fused_x), factor)
    assert fused.grad_fn is not None and "Scale" not in type(fused.grad_fn).__name__
    fused.backward(upstream)
    composed = scale_gradient(identity_rule(composed_x, torch.nn.functional.silu(composed_x)), factor)
    composed.backward(upstream)
    torch.testing.assert_close(fused_x.grad, composed_x.grad, rtol=1e-14, atol=0)
    xd = x
    expected = torch.where(xd == 0, 0.0, factor * upstream * torch.nn.functional.silu(xd) / xd)
    torch.testing.assert_close(fused_x.grad, expected, rtol=1e-14, atol=0)


def test_identity_rule_factor_zero_is_a_constant():
    x = _randn(2, 3).requires_grad_(True)
    y = identity_rule(x, torch.tanh(x), 0.0)
    assert not y.requires_grad and torch.equal(y, torch.tanh(x.detach()))


def test_identity_rule_zero_input_with_nonzero_output_gets_zero_gradient():
    # f(0) != 0 (softplus): the quotient is c / 0 = inf there, and the rule's value is 0, not inf or NaN
    x = torch.tensor([0.0, -0.0, 1.5, -2.0], dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.softplus(x.detach())
    identity_rule(x, y).backward(torch.ones(4, dtype=torch.float64))
    assert torch.equal(x.grad[:2], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(x.grad[2:], y[2:] / x.detach()[2:], rtol=1e-15, atol=0)
