"""Autograd primitives that turn Gradient x Input into the LRP rules of method.md section 1.

Every primitive leaves the forward value bit-for-bit unchanged and only modifies the backward pass, so that
``leaf * leaf.grad`` after one backward pass is the LRP relevance of the leaf (AttnLRP, Achtibat et al. 2024).
Only torch is imported here: these functions know nothing about models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        factor = ctx.factor
        if isinstance(factor, torch.Tensor):
            factor = factor.to(device=grad.device, dtype=grad.dtype)
        return grad * factor, None


def scale_gradient(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """Identity forward, gradient multiplied by ``factor`` in the backward pass.

    The uniform rule (AttnLRP Prop. 3.2) for a product ``y = a * b`` of two relevance-carrying factors gives
    each factor ``R_a = R_b = R_y / 2``; in Gradient x Input form that is ``factor = 1/2`` on both factors.
    The epsilon + uniform rule for ``Q K^T`` and ``A V`` (Prop. 3.3) is the same factor on q, k, A and v.
    ``factor = 0`` is a stop-gradient (see :func:`stop_gradient`), ``factor = 1`` the identity. A tensor
    ``factor`` broadcasts over the trailing axes (one factor per channel, e.g. only the rotated channels of a
    partially rotary head get the rotary 1/2).
    """
    if isinstance(factor, torch.Tensor):
        return _ScaleGradient.apply(x, factor.detach()) if x.requires_grad else x
    if factor == 1.0:
        return x
    if factor == 0.0:
        return stop_gradient(x)
    if not x.requires_grad:
        return x
    return _ScaleGradient.apply(x, float(factor))


def stop_gradient(x: torch.Tensor) -> torch.Tensor:
    """Treat ``x`` as a constant of the relevance computation: ``R_x = 0`` and nothing flows through it.

    CP-LRP (Ali et al. 2022) uses it for the attention probabilities (q and k receive no relevance) and for
    the gate of a gated MLP.
    """
    return x.detach()


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    # half precision is upcast for the rules' ratios and statistics; float64 must not be cut down to float32
    return torch.promote_types(dtype, torch.float32)


class _IdentityRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.save_for_backward(x, y)
        ctx.factor = factor
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y = ctx.saved_tensors
        dtype = _at_least_float32(x.dtype)
        # one temporary and in-place steps: this backward runs at every activation and norm of the model. Where
        # x == 0 the quotient is 0/0 or c/0, so zeroing NaN and inf gives the rule's 0 there; it is 4-5x cheaper
        # than a boolean mask (x == 0) and masked_fill_ on CPU. Only an overflow of f(x)/x (|x| below float32's
        # smallest normal with f(0) != 0) is zeroed too, where the mask would have kept inf and the map NaN
        ratio = y.to(dtype) / x.to(dtype)
        ratio.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        if ctx.factor != 1.0:
            ratio.mul_(ctx.factor)
        return ratio.mul_(grad).to(grad.dtype), None, None


def identity_rule(x: torch.Tensor, y: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """Identity rule for an element-wise map ``y = f(x)`` (AttnLRP Prop. 3.4): ``R_x = R_y``.

    In Gradient x Input form the local derivative ``f'(x)`` is replaced by ``f(x) / x`` (0 where ``x == 0``,
    where ``f(x)`` carries no relevance either). The ratio is formed in (at least) float32 so that half-precision
    activations do not overflow. ``y`` must be the already computed ``f(x)``; the returned tensor equals it.

    ``factor``: a gradient factor for the product ``y`` feeds, applied in the same node
    (``scale_gradient(identity_rule(x, y), factor)`` without a second one): 1/2 for the activated gate of a
    gated MLP (the uniform rule, Prop. 3.2). ``0`` makes ``y`` a constant (CP-LRP's gate).
    """
    if factor == 0.0:
        return stop_gradient(y)
    if not x.requires_grad:
        return y
    # y enters detached: its own graph (f's backward) is never needed, and the output shares its memory
    return _IdentityRule.apply(x, y.detach(), float(factor))


class _StraightThrough(torch.autograd.Function):
    # ``value`` arrives inside a list, not as an input: an output that is an input is a view, which the model's
    # own in-place steps after the norm (XLM: ``tensor *= mask``) may not modify; a detached tensor passed
    # through is an ordinary output, modifiable in place with correct gradients
    @staticmethod
    def forward(ctx, surrogate: torch.Tensor, holder: list[torch.Tensor]) -> torch.Tensor:
        return holder[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Forward ``value`` exactly, backward through ``surrogate`` (which must equal ``value`` up to rounding).

    Used where a rule is a differently differentiated re-computation of the same function (the norm rules): the
    output is ``value`` itself (bit-identical outputs) and its gradient goes unchanged to ``surrogate``, the
    value of ``value.detach() + (surrogate - surrogate.detach())`` without its two temporaries (this runs at
    every norm of the model).
    """
    if not surrogate.requires_grad:
        return value.detach()
    if surrogate.shape != value.shape:
        raise ValueError(
            f"straight_through: surrogate shape {tuple(surrogate.shape)} != {tuple(value.shape)}"
        )
    return _StraightThrough.apply(surrogate, [value.detach()])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(-x2, x1)`` for ``x = (x1, x2)`` split in halves on the last axis (the LLaMA rotary layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _RotationInverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, head_dim: int, scale: float):
        ctx.save_for_backward(cos, sin)
        ctx.head_dim, ctx.scale = head_dim, scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        b, t, width = grad.shape
        g = grad.reshape(b, t, width // ctx.head_dim, ctx.head_dim)
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        rotated = (g * c + rotate_half(g) * s) / ctx.scale**2
        return rotated.reshape(b, t, width), None, None, None, None


def rotation_inverse_gradient(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, scale: float = 1.0
) -> torch.Tensor:
    """Identity forward; the backward applies the rotation ``R`` to the incoming gradient, divided by ``s^2``.

    ``x`` [B, T, heads * head_dim] is a projection (q or k) before its rotary rotation
    ``x_rot = x * cos + rotate_half(x) * sin`` (``cos``, ``sin`` [B, T, head_dim], of norm ``s`` =
    ``scale``), whose backward gives ``R^T g``. Placed on ``x``, this turns it into ``g``: the gradient ``x``
    would get if the rotation were the identity (``R R^T = s^2 I``). It is the content side of the
    identity-reference split of a rotary product (docs/positions.md: ``R_x = x . g``, the rest to the angle).
    """
    return _RotationInverseGradient.apply(x, cos, sin, head_dim, scale)


def rms_norm_identity(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without its weight, identity rule (AttnLRP Prop. 3.4): ``x * rsqrt(mean(x^2) + eps)``.

    The normalising scale is a constant of the backward pass, so the map is linear in ``x`` and
    ``R_x = R_y`` element-wise. Computed in float32 (float64 for float64 inputs), as transformers'
    LLaMA-family RMSNorm computes its statistics at least in float32.
    """
    x32 = x.to(_at_least_float32(x.dtype))
    with torch.no_grad():  # a constant of the backward pass: no graph for the statistics
        scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x32 * scale


def layer_norm_identity(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm with the identity rule (AttnLRP Prop. 3.4): ``(x - mean(x)) / std(x).detach() * w + b``.

    The division by the standard deviation is a constant of the backward pass; the mean subtraction stays
    part of it (it is linear). The bias absorbs its share of relevance, as for any epsilon-rule layer.
    """
    dtype = _at_least_float32(x.dtype)
    x32 = x.to(dtype)
    centred = x32 - x32.mean(-1, keepdim=True)
    with torch.no_grad():  # a constant of the backward pass: no graph for the statistics
        inv_std = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    y = centred * inv_std
    if weight is not None:
        y = y * weight.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


def relevance_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype relevance is reported in: float32, or float64 for float64 models (never half precision)."""
    return _at_least_float32(dtype)


def relevance_of(leaf: torch.Tensor, dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """Relevance of a leaf after the backward pass: ``sum over dims of leaf * leaf.grad``.

    With the backward seeded with gradient 1 at the explained logit, this is in logit units (method.md 1.2).
    A leaf that received no gradient has zero relevance. Computed and returned in the leaf's precision, at
    least float32 (float64 leaves give float64 relevance).
    """
    dtype = _at_least_float32(leaf.dtype)
    if leaf.grad is None:
        return torch.zeros(leaf.shape[: len(leaf.shape) - len(dims)], dtype=dtype, device=leaf.device)
    return (leaf.detach().to(dtype) * leaf.grad.to(dtype)).sum(dim=dims)


def gamma_rule(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: float,
    layer_map: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    """Generalised LRP-Gamma rule (Montavon et al. 2019, Andeol et al. 2021; Zennit's ``Gamma``), straight-through.

    With ``z_ij = x_i w_ij`` the contribution of input ``i`` to output ``j``, ``z_j = sum_i z_ij + b_j`` the
    output, ``s = sign(z_j)``, ``(a)^+ = max(a, 0)`` and ``(a)^- = min(a, 0)``:

    ``R_i = sum_j (z_ij + gamma (z_ij)^s) / (z_j + gamma (sum_k (z_kj)^s + (b_j)^s)) R_j``

    Contributions that agree in sign with their output (positive ones for a positive output, negative ones for
    a negative output) are amplified by ``1 + gamma``; an output ``z_j = 0`` passes on nothing; the bias
    absorbs its (amplified) share. This is Zennit's four-term form: weights ``W + gamma W+`` on positive and
    ``W + gamma W-`` on negative inputs for positive outputs, the reverse for negative outputs. The
    denominator has the sign of ``z_j`` and ``|denominator| >= |z_j|``, so no stabiliser is needed;
    ``gamma = 0`` is the epsilon rule with eps -> 0.

    Gradient x Input form (``R_j = z_j g_j``): with ``P = L(x+, W+, b+) + L(x-, W-)`` and
    ``N = L(x+, W-, b-) + L(x-, W+)`` (``L`` the layer, ``x+ = x [x > 0]``, ``x- = x [x < 0]``) and the
    detached per-output factors ``c+ = [z > 0] z / (z + gamma P)``, ``c- = [z < 0] z / (z + gamma N)``, the
    backward is that of ``(c+ + c-) (P + N) + gamma (c+ P + c- N)``, which gives ``x * x.grad = R_x``. The
    returned tensor is ``y`` itself (:func:`straight_through`): forward values are unchanged.

    Parameters
    ----------
    x
        The layer's input.
    y
        The layer's output ``layer_map(x, weight, bias)`` as the module computed it.
    weight, bias
        The layer's parameters, used detached (the rule defines no relevance for parameters).
    gamma
        Non-negative amplification of the contributions that agree in sign with their output.
    layer_map
        ``layer_map(x, w, b)``: the layer as a function of its parameters (``F.linear``, the layer's own
        convolution with its stride and padding, ...); ``b`` may be ``None``.
    """
    if not x.requires_grad:
        return y
    w = weight.detach()
    w_pos, w_neg = w.clamp(min=0), w.clamp(max=0)
    b_pos = b_neg = None
    if bias is not None:
        b_pos, b_neg = bias.detach().clamp(min=0), bias.detach().clamp(max=0)
    # masks rather than clamp: an input of exactly 0 carries no relevance and passes on no gradient
    x_pos = x * (x > 0)
    x_neg = x * (x < 0)
    agree_pos = layer_map(x_pos, w_pos, b_pos) + layer_map(x_neg, w_neg, None)
    agree_neg = layer_map(x_pos, w_neg, b_neg) + layer_map(x_neg, w_pos, None)
    with torch.no_grad():
        z = y.detach()
        c_pos = torch.where(z > 0, z / torch.where(z > 0, z + gamma * agree_pos, 1.0), 0.0)
        c_neg = torch.where(z < 0, z / torch.where(z < 0, z + gamma * agree_neg, 1.0), 0.0)
    # the biases inside agree_* are constants: they change the surrogate's value, never its gradient
    surrogate = (c_pos + c_neg) * (agree_pos + agree_neg) + gamma * (c_pos * agree_pos + c_neg * agree_neg)
    return straight_through(y, surrogate)


#: the softmax rules of :func:`softmax_rule` (``"gxi"``: AttnLRP's, the default, needs no written-out scores)
SOFTMAX_RULES = ("gxi", "identity", "split")


class _SoftmaxRelevance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, probs: torch.Tensor, split: bool, eps: float) -> torch.Tensor:
        ctx.save_for_backward(scores, probs)
        ctx.split, ctx.eps = split, eps
        return probs.view_as(probs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scores, probs = ctx.saved_tensors
        dtype = _at_least_float32(probs.dtype)
        z, a = scores.to(dtype), probs.to(dtype)
        relevance = a * grad.to(dtype)  # R_A, one value per (query, key)
        if ctx.split:
            relevance = 0.5 * relevance + 0.5 * a * relevance.sum(-1, keepdim=True)
        # epsilon-stabilised ratio R_z / z; a score of exactly 0 (or a masked one: R_A = 0) passes on nothing
        denominator = z + ctx.eps * torch.where(z >= 0, 1.0, -1.0)
        grad_z = torch.where(z == 0, 0.0, relevance / torch.where(denominator == 0, 1.0, denominator))
        return grad_z.to(scores.dtype), None, None, None


def softmax_rule(scores: torch.Tensor, probs: torch.Tensor, rule: str, eps: float = 0.0) -> torch.Tensor:
    """A conservative relevance rule for the attention softmax ``A = softmax(z)`` (row-wise), straight-through.

    AttnLRP's rule (``"gxi"``, Achtibat et al. 2024, Prop. 3.1) is Gradient x Input through the softmax:
    ``R_z_i = z_i A_i (g_i - sum_j A_j g_j)``, with ``g = dR/dA``. It is not conservative: the linearisation's
    bias term ``A_j - sum_i z_i dA_j/dz_i`` absorbs relevance, and no per-row reference point changes that
    (``sum_i dA_j/dz_i = 0``, so ``sum_i (z_i - c) dA_j/dz_i`` is the same for every ``c``; method.md, "The
    softmax rule and the conservation gap"). The two rules here treat the normaliser explicitly, with
    ``A_j = exp(z_j) / Z`` and ``R_A_j = A_j g_j``:

    - ``"identity"``: ``Z`` is a constant of the backward pass (as the norms' scale, AttnLRP Prop. 3.4), so
      ``A_j`` is an element-wise function of ``z_j`` and gets the identity rule: ``R_z_j = R_A_j``.
    - ``"split"``: the product ``exp(z_j) * (1/Z)`` gets the uniform rule (Prop. 3.2): half of ``R_A_j`` to
      ``exp(z_j)``, half to ``1/Z``; ``1/Z`` passes its relevance (identity rule) to ``Z = sum_k exp(z_k)``, which
      shares it in proportion to its terms (epsilon rule): ``R_z_k = R_A_k / 2 + A_k sum_j R_A_j / 2``.

    Both conserve each row exactly: ``sum_k R_z_k = sum_j R_A_j``. In Gradient x Input form the gradient at
    ``z`` becomes ``R_z / (z + eps sign(z))``, which reproduces ``R_z`` at ``eps = 0`` (0 where ``z = 0``) and
    lets the stabiliser absorb the share ``eps / (|z| + eps)`` otherwise. Needs the written-out scores ``z``
    (mask and positional bias included), i.e. the eager attention path.

    Parameters
    ----------
    scores
        The softmax's input ``z`` [..., K] (masked entries at a large negative value: their ``A`` is 0 and so is
        their relevance).
    probs
        ``softmax(z)`` as computed (the returned tensor equals it).
    rule
        ``"identity"`` or ``"split"``; ``"gxi"`` returns ``probs`` unchanged (plain autograd).
    eps
        Non-negative stabiliser of the ratio.
    """
    if rule not in SOFTMAX_RULES:
        raise ValueError(f"softmax rule must be one of {SOFTMAX_RULES}, got {rule!r}")
    if rule == "gxi" or not scores.requires_grad:
        return probs
    # probs enters detached: its own graph (the softmax Jacobian) is replaced, not added to
    return _SoftmaxRelevance.apply(scores, probs.detach(), rule == "split", float(eps))


def residual_rule(terms: tuple[torch.Tensor, ...], y: torch.Tensor, gamma: float) -> torch.Tensor:
    """ResLRP's conservative residual rule (Berend, Achtibat et al. 2026) for ``y = sum_i z_i``, straight-through.

    At a residual addition the relevance of each output element goes to the addends in proportion to
    ``(1 + gamma [sign(z_i) == sign(y)]) z_i``:

    ``R_i = (1 + gamma [z_i y > 0]) z_i / sum_k (1 + gamma [z_k y > 0]) z_k * R_y``

    which is exactly conservative (``sum_i R_i = R_y``) element by element; ``gamma = 0`` is the epsilon rule
    (eps -> 0) of a plain sum, i.e. plain autograd. The denominator has the sign of ``y`` and
    ``|denominator| >= |y|``; an output ``y = 0`` passes on nothing. Gradient x Input form: each addend gets
    the detached factor ``f_i = (1 + gamma [z_i y > 0]) y / denominator`` on the gradient of ``y`` (the
    backward of ``sum_i f_i z_i``), so ``z_i * grad_i = R_i``. The returned tensor is ``y`` itself
    (:func:`straight_through`); the addends' own graphs carry the gradient, the sum's graph is not used.

    Parameters
    ----------
    terms
        The addends ``z_i``, each of ``y``'s shape.
    y
        Their sum as the model computed it.
    gamma
        Non-negative amplification of the addends that agree in sign with the sum.
    """
    if gamma < 0:
        raise ValueError(f"the residual rule's gamma must be >= 0, got {gamma}")
    with torch.no_grad():
        dtype = _at_least_float32(y.dtype)
        out = y.detach().to(dtype)
        weights = [1.0 + gamma * ((t.detach().to(dtype) * out) > 0).to(dtype) for t in terms]
        denominator = sum(w * t.detach().to(dtype) for w, t in zip(weights, terms, strict=True))
        scale = torch.where(denominator == 0, 0.0, out / torch.where(denominator == 0, 1.0, denominator))
        factors = [(w * scale).to(t.dtype) for w, t in zip(weights, terms, strict=True)]
    surrogate = sum(f * t for f, t in zip(factors, terms, strict=True))
    return straight_through(y, surrogate)


# ------------------------------------------------------------------------------------ input-layer rules (issue 20)
# The rules below are explicit redistributions, not Gradient x Input surrogates: w^2, flat and z^B give relevance
# to inputs that are exactly 0 (a black pixel), which no ``x * x.grad`` can express. They take the relevance of
# the layer's outputs (already computed by the backward pass) and return the relevance of its inputs.

LayerMap = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _backproject(
    layer_map: LayerMap, shape: torch.Size, weight: torch.Tensor, cotangent: torch.Tensor
) -> torch.Tensor:
    """``G_i = sum_j c_j V_ij``: the transpose of the linear map ``v -> layer_map(v, V, None)`` applied to ``c``."""
    probe = torch.zeros(shape, dtype=cotangent.dtype, device=cotangent.device, requires_grad=True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(layer_map(probe, weight.to(cotangent.dtype), None), probe, cotangent)
    return grad


def _ratio(relevance: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    # an output with denominator 0 has no input to pass its relevance to: it is dropped (and reported as such)
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return torch.where(denominator == 0, torch.zeros_like(relevance), relevance / safe)


def zplus_relevance(
    x: torch.Tensor, relevance: torch.Tensor, weight: torch.Tensor, layer_map: LayerMap
) -> torch.Tensor:
    """LRP z+ rule (Montavon et al. 2017, "Explaining nonlinear classification decisions with deep Taylor
    decomposition", Eq. 9; alpha=1, beta=0 of Bach et al. 2015), for inputs of either sign:

    ``R_i = sum_j (x_i w_ij)^+ / sum_k (x_k w_kj)^+ R_j``.

    Only contributions that raise an output receive relevance, so the map is non-negative where the output
    relevance is; the bias takes no share (an output with no positive contribution drops its relevance).
    ``layer_map(x, w, b)`` is the layer as a function of its parameters (``F.linear``, a convolution).
    """
    dtype = _at_least_float32(x.dtype)
    x, relevance, w = x.detach().to(dtype), relevance.detach().to(dtype), weight.detach().to(dtype)
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    w_pos, w_neg = w.clamp(min=0), w.clamp(max=0)
    positive = layer_map(x_pos, w_pos, None) + layer_map(x_neg, w_neg, None)
    c = _ratio(relevance, positive)
    return x_pos * _backproject(layer_map, x.shape, w_pos, c) + x_neg * _backproject(
        layer_map, x.shape, w_neg, c
    )


def wsquare_relevance(
    x: torch.Tensor, relevance: torch.Tensor, weight: torch.Tensor, layer_map: LayerMap
) -> torch.Tensor:
    """LRP w^2 rule (Montavon et al. 2017, deep Taylor decomposition, Eq. 12; for input layers of unbounded or
    unknown domain): ``R_i = sum_j w_ij^2 / sum_k w_kj^2 R_j``.

    Independent of the input's values: every input in an output's receptive field gets a share fixed by the
    weights, black pixels included. Conservative (``sum_k w_kj^2 > 0`` unless a filter is all zero).
    """
    dtype = _at_least_float32(x.dtype)
    relevance, w2 = relevance.detach().to(dtype), weight.detach().to(dtype).pow(2)
    ones = torch.ones(x.shape, dtype=dtype, device=x.device)
    c = _ratio(relevance, layer_map(ones, w2, None))
    return _backproject(layer_map, x.shape, w2, c)


def flat_relevance(
    x: torch.Tensor, relevance: torch.Tensor, weight: torch.Tensor, layer_map: LayerMap
) -> torch.Tensor:
    """LRP flat rule (Lapuschkin et al. 2019, "Unmasking Clever Hans predictors", Methods): the w^2 rule with all
    weights 1, ``R_i = sum_{j: i in RF(j)} R_j / |RF(j)|``: each output's relevance spread evenly over its
    receptive field (for a ViT patch convolution: each patch-channel's relevance over the patch's pixels)."""
    return wsquare_relevance(x, relevance, torch.ones_like(weight), layer_map)


def zbox_relevance(
    x: torch.Tensor,
    relevance: torch.Tensor,
    weight: torch.Tensor,
    layer_map: LayerMap,
    low: float = 0.0,
    high: float = 1.0,
) -> torch.Tensor:
    """LRP z^B (box) rule for inputs bounded to ``[low, high]`` (Montavon et al. 2017, deep Taylor decomposition,
    Eq. 13; Zennit's ``ZBox``, the usual pixel-layer rule):

    ``R_i = sum_j (x_i w_ij - l w_ij^+ - h w_ij^-) / sum_k (x_k w_kj - l w_kj^+ - h w_kj^-) R_j``.

    Each numerator is ``>= 0`` on the box, so pixels at the bound that would most lower an output (for
    ``[0, 1]``: a black pixel under a negative weight) can receive relevance too.
    """
    dtype = _at_least_float32(x.dtype)
    x, relevance, w = x.detach().to(dtype), relevance.detach().to(dtype), weight.detach().to(dtype)
    w_pos, w_neg = w.clamp(min=0), w.clamp(max=0)
    lo, hi = torch.full_like(x, low), torch.full_like(x, high)
    z = layer_map(x, w, None) - layer_map(lo, w_pos, None) - layer_map(hi, w_neg, None)
    c = _ratio(relevance, z)
    return (
        x * _backproject(layer_map, x.shape, w, c)
        - lo * _backproject(layer_map, x.shape, w_pos, c)
        - hi * _backproject(layer_map, x.shape, w_neg, c)
    )


#: the input-layer rules by the name ``LRPConfig.patch_rule`` uses
INPUT_RULES: dict[str, Callable[..., torch.Tensor]] = {
    "zplus": zplus_relevance,
    "wsquare": wsquare_relevance,
    "flat": flat_relevance,
    "zbox": zbox_relevance,
}


# ------------------------------------------------------------------------------------------- output contrast
class _Contrast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weights,) = ctx.saved_tensors
        # d/dy of y_t - sum_c w_c y_c for every seeded row t: g - w * sum_t g_t
        return grad - weights.to(grad.dtype) * grad.sum(-1, keepdim=True), None


def contrast_logits(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Explain each logit against the others: forward ``logits`` exactly, backward as if it were
    ``y_t - sum_c w_c y_c`` (``w`` detached, rows summing to 1).

    - ``kind="softmax"``: ``w = softmax(y)``, so the backward of ``y_t`` is the gradient of ``log p_t``
      (``e_t - p``): the relevance explains the linearised log-probability, as softmax-gradient LRP does
      (SGLRP, Iwana et al. 2019, "Explaining convolutional neural networks using softmax gradient layer-wise
      relevance propagation"); evidence shared by all classes cancels.
    - ``kind="mean"``: ``w = 1/C``, the logit against the mean logit (the contrastive LRP of Gu et al. 2018,
      "Understanding individual decisions of CNNs via contrastive backpropagation", with all classes as the
      dual).

    In a conservative configuration the relevance then sums to ``y_t - sum_c w_c y_c`` instead of ``y_t``.
    Seeding the backward with gradient 1 at ``y_t`` (the engine's seed) is all it takes: the rule sits at the
    head's output and needs no target.
    """
    if kind not in ("softmax", "mean"):
        raise ValueError(f"contrast kind must be 'softmax' or 'mean', got {kind!r}")
    if not logits.requires_grad:
        return logits
    with torch.no_grad():
        if kind == "softmax":
            weights = logits.to(_at_least_float32(logits.dtype)).softmax(-1)
        else:
            weights = torch.full_like(logits, 1.0 / logits.shape[-1], dtype=_at_least_float32(logits.dtype))
    return _Contrast.apply(logits, weights)


# --------------------------------------------------------------------------------------- reference split
def reference_split(position: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an additive position embedding ``p`` at a reference ``r``: ``p = r + (p - r)``.

    With ``e = t + p`` and ``g`` the (modified) gradient at ``e``, the epsilon rule at the three-way sum
    ``e = t + r + (p - r)`` gives ``R_r = r . g`` and ``R_(p-r) = (p - r) . g``: conservative, the same
    backward pass. With ``r`` the mean row of the table over the patches, ``R_r`` is what every patch's position
    has in common, which cannot say *where* anything is: it is a sink of the positional part that the vision
    adapter credits to the content (the token map) and only ``(p - r) . g`` is position relevance (the
    identity-reference split of docs/positions.md, for additive positions). Returns ``(r, p - r)``.
    """
    reference = reference.expand_as(position)
    return reference, position - reference
