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
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y = ctx.saved_tensors
        dtype = _at_least_float32(x.dtype)
        # one temporary and in-place steps: this backward runs at every activation and norm of the model
        ratio = y.to(dtype) / x.to(dtype)
        ratio.masked_fill_(x == 0, 0.0)
        return ratio.mul_(grad).to(grad.dtype), None


def identity_rule(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Identity rule for an element-wise map ``y = f(x)`` (AttnLRP Prop. 3.4): ``R_x = R_y``.

    In Gradient x Input form the local derivative ``f'(x)`` is replaced by ``f(x) / x`` (0 where ``x == 0``,
    where ``f(x)`` carries no relevance either). The ratio is formed in (at least) float32 so that half-precision
    activations do not overflow. ``y`` must be the already computed ``f(x)``; the returned tensor equals it.
    """
    if not x.requires_grad:
        return y
    # y enters detached: its own graph (f's backward) is never needed, and the output shares its memory
    return _IdentityRule.apply(x, y.detach())


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Forward ``value`` exactly, backward through ``surrogate`` (which must equal ``value`` up to rounding).

    Used where a rule is a differently differentiated re-computation of the same function (the norm rules):
    ``value.detach() + (surrogate - surrogate.detach())`` adds an exact zero, so outputs stay bit-identical.
    """
    return value.detach() + (surrogate - surrogate.detach())


def rms_norm_identity(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without its weight, identity rule (AttnLRP Prop. 3.4): ``x * rsqrt(mean(x^2) + eps)``.

    The normalising scale is a constant of the backward pass, so the map is linear in ``x`` and
    ``R_x = R_y`` element-wise. Computed in float32 (float64 for float64 inputs), as transformers'
    LLaMA-family RMSNorm computes its statistics at least in float32.
    """
    x32 = x.to(_at_least_float32(x.dtype))
    scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps).detach()
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
    inv_std = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps).detach()
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
