"""Relevance per query-key offset (method.md 2, "Relevance per offset").

Inside attention a positional encoding acts on pairs: the score of query ``i`` and key ``j`` is

- rotary: ``s_ij = q_i . R(j - i) k_j * scale = c_ij + p_ij`` with the content part ``c_ij = q~_i . k~_j * scale``
  (the same q and k under the identity rotation ``(cos, sin) = (attention_scaling, 0)``) and the position part
  ``p_ij = s_ij - c_ij``;
- a positional bias (ALiBi): ``s_ij = c_ij + b_ij`` with ``p_ij = b_ij``.

The attention rule gives each score the relevance ``R_s = f * s * g_s`` (``g_s`` the gradient at the score,
``f`` the ``scores`` factor: 1/2 AttnLRP, 0 CP-LRP). The epsilon rule at the sum ``s = c + p`` splits it
exactly: ``R_p = f * p * g_s``, ``R_c = f * c * g_s``, ``R_p + R_c = R_s``; no stabiliser is needed because
the split is written in Gradient x Input form (``R_s * p / s`` without the division). Summed over the pairs of
each offset ``d = i - j`` (per layer and head) this is ``position_by_offset``.

Rotary scores are never materialised by the ``"lrp"`` attention (SDPA), so :class:`OffsetRecorder` re-computes
them in the backward pass from the saved q, k, v and the gradient at the attention output, one block of
``chunk`` queries at a time (memory ``O(B H chunk T)`` per block, nothing ``T x T`` kept between the forward and
the backward pass). A bias leaf already holds ``R_p`` per pair (:func:`bias_offsets`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import UnsupportedModelError

#: ``store.aux`` key: the query-block size of the offset maps when they were asked for (``0``: one block)
REQUESTED = "offsets_requested"


def offset_sums(pairs: torch.Tensor, first_query: int = 0) -> torch.Tensor:
    """Sum ``pairs`` [N, Tq, Tk] over the pairs of each signed offset ``d = i - j``: [N, 2 Tk - 1], bin
    ``d + Tk - 1``. ``first_query`` is the key index of the first query row (a block of queries, a cache)."""
    n, tq, tk = pairs.shape
    rows = torch.arange(first_query, first_query + tq, device=pairs.device)
    index = rows[:, None] - torch.arange(tk, device=pairs.device)[None, :] + (tk - 1)
    out = torch.zeros(n, 2 * tk - 1, dtype=pairs.dtype, device=pairs.device)
    return out.index_add_(1, index.reshape(-1), pairs.reshape(n, -1))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def _rotation_parts(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, rotated: str):
    """(rotated channels of ``x``, the rest, where the rotated ones are, cos, sin broadcast to them, the rotate
    function) for ``x`` [B, H, T, D] and per-layer leaves ``cos, sin`` [B or 1, T, w]."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    if layout == "interleaved":
        cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
        rotate = _rotate_every_two
    elif layout == "half":
        rotate = _rotate_half
    else:
        raise UnsupportedModelError(f"relevance per offset does not know the rotary layout {layout!r}")
    width, dim = cos.shape[-1], x.shape[-1]
    if width > dim:
        raise UnsupportedModelError(
            f"the rotary (cos, sin) pair has {width} channels but a head has {dim}: relevance per offset cannot "
            "undo this rotation"
        )
    if rotated == "first":
        return x[..., :width], x[..., width:], "first", cos, sin, rotate
    return x[..., dim - width :], x[..., : dim - width], "last", cos, sin, rotate


def unrotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, rotated: str
) -> torch.Tensor:
    """The content part of rotated ``x`` [B, H, T, D]: ``x`` under the identity rotation ``(a, 0)``.

    ``x_rot = x * cos + rotate(x) * sin`` with ``cos = a cos(theta)``, ``sin = a sin(theta)`` is ``a R(theta) x``
    per channel pair; ``(x_rot * cos - rotate(x_rot) * sin) / a = a x`` undoes it (``a^2 = cos^2 + sin^2``).
    Pass-through channels (partial rotary) are returned as they are. (``rotate(unrotate(x)) = a x`` holds for any
    layout, so it cannot check one: the layout is the adapter's declaration, proven by ``check_adapter``.)
    """
    part, rest, where, c, s, rotate = _rotation_parts(x, cos, sin, layout, rotated)
    content = (part * c - rotate(part) * s) / torch.sqrt(c * c + s * s)
    return torch.cat((content, rest), -1) if where == "first" else torch.cat((rest, content), -1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, rotated: str) -> torch.Tensor:
    """``x`` [B, H, T, D] rotated as the model rotates it (``x * cos + rotate(x) * sin`` on the rotated channels)."""
    part, rest, where, c, s, turn = _rotation_parts(x, cos, sin, layout, rotated)
    out = part * c + turn(part) * s
    return torch.cat((out, rest), -1) if where == "first" else torch.cat((rest, out), -1)


@dataclass
class Rotation:
    """The rotation of one layer's q and k: its ``(cos, sin)`` leaves and the declared layout."""

    cos: torch.Tensor
    sin: torch.Tensor
    layout: str
    rotated: str
    scaling: float = 1.0
    #: per dtype, the leaves' gradient coefficients (see :meth:`leaf_coefficients`), made once for q and k
    _coefficients: dict = field(default_factory=dict, repr=False, compare=False)

    def leaf_coefficients(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``(c / a, s / a, sign c / a, sign s / a)``, each [B, T, w] on the rotated channels (``a = c^2 + s^2``,
        ``sign`` -1 on the channel of each pair that ``rotate`` negates): the leaves' gradients are
        ``d cos = G_x c / a - G_swap sign s / a`` and ``d sin = G_swap sign c / a + G_x s / a`` (see
        :class:`_RotaryLeafGradient`)."""
        coefficients = self._coefficients.get(dtype)
        if coefficients is None:
            c, s = self.cos.detach().to(dtype), self.sin.detach().to(dtype)
            if self.layout == "interleaved":  # channel k of the leaf turns channels 2k and 2k + 1
                c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
            a = c * c + s * s
            c, s = c / a, s / a
            width = c.shape[-1]
            sign = torch.ones(width, dtype=dtype, device=c.device)
            if self.layout == "interleaved":
                sign[0::2] = -1.0
            else:
                sign[: width // 2] = -1.0
            coefficients = (c, s, sign * c, sign * s)
            self._coefficients[dtype] = coefficients
        return coefficients

    def swap(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the channels of each rotated pair exchanged (``rotate(x) = sign * swap(x)``)."""
        if self.layout == "interleaved":
            return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return x.roll(x.shape[-1] // 2, -1)


class _RotaryLeafGradient(torch.autograd.Function):
    """Identity forward on a rotated q or k; the backward scales the incoming gradient by ``factor`` (the
    attention rule's factor of q or k, applied after the rotation: one node instead of two), adds the rotary
    leaves' gradient from it (see :func:`rotary_leaf_gradient`) and passes it on."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rotation: Rotation, factor: float | torch.Tensor) -> torch.Tensor:
        ctx.rotation = rotation
        ctx.factor = factor
        ctx.save_for_backward(x)  # the attention keeps the same storage: no extra memory
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        rot, factor = ctx.rotation, ctx.factor
        if isinstance(factor, torch.Tensor):
            grad = grad * factor.to(device=grad.device, dtype=grad.dtype)
        elif factor != 1.0:
            grad = grad * factor
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        # closed form of d(x_rot)/d(cos, sin) at q = R^{-1} x_rot, with R^{-1} the rotation by (c, -s) / a and
        # a = c^2 + s^2 (each channel pair shares its angle): q = (x c - r(x) s) / a, r(q) = (r(x) c + x s) / a,
        # so dcos = sum_h g q = (G_x c - G_r s) / a and dsin = sum_h g r(q) = (G_r c + G_x s) / a, with the
        # head sums G_x = sum_h g x and G_r = sum_h g r(x) = sign * sum_h g swap(x) taken first (two products of
        # the q / k size), the sign folded into per-layer coefficients made once for q and k
        if rot.layout not in ("half", "interleaved") or rot.cos.shape[-1] > x.shape[-1]:
            _rotation_parts(x, rot.cos, rot.sin, rot.layout, rot.rotated)  # raises, naming what does not fit
        c, s, sign_c, sign_s = rot.leaf_coefficients(dtype)
        width = c.shape[-1]
        ends = slice(None, width) if rot.rotated == "first" else slice(x.shape[-1] - width, None)
        part, g = x.detach()[..., ends].to(dtype), grad[..., ends].to(dtype)
        g_x, g_swap = (g * part).sum(1), (g * rot.swap(part)).sum(1)
        leaf_grads = (
            torch.addcmul(g_x * c, g_swap, sign_s, value=-1.0),
            torch.addcmul(g_x * s, g_swap, sign_c),
        )
        for leaf, g_leaf in zip((rot.cos, rot.sin), leaf_grads, strict=True):
            if rot.layout == "interleaved":  # the leaf's channel k was repeated onto channels 2k and 2k + 1
                g_leaf = g_leaf.unflatten(-1, (-1, 2)).sum(-1)
            g_leaf = g_leaf.sum_to_size(leaf.shape).to(leaf.dtype)
            leaf.grad = g_leaf if leaf.grad is None else leaf.grad + g_leaf
        return grad, None, None


def rotary_leaf_gradient(
    x: torch.Tensor, rotation: Rotation, factor: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """``x`` (a q or k the model has rotated with detached ``(cos, sin)``), whose backward pass gives the rotary
    leaves of ``rotation`` the gradient they would get in the graph: ``x_rot = x * cos + rotate(x) * sin`` with
    ``g`` the gradient reaching ``x_rot`` gives ``cos.grad += x * g``, ``sin.grad += rotate(x) * g`` (summed
    over heads, and over the repeated channels of a half-width interleaved pair).

    In the graph, autograd would keep ``x`` and ``rotate(x)`` of q and k for these gradients (four
    [B, H, T, D] tensors per layer); here only ``x_rot`` is kept (the attention keeps it anyway), and ``x`` is
    recovered in the backward pass by the inverse rotation. The gradient is accumulated into ``leaf.grad``, so
    several backward passes, ``zero_grad`` and the map readers work as with in-graph leaves.

    ``factor``: a gradient factor applied after the rotation, ``scale_gradient(rotary_leaf_gradient(x), factor)``
    in one node (the leaves get their gradient from the scaled one, as with the two nodes).
    """
    if not x.requires_grad:
        return x
    if isinstance(factor, torch.Tensor):
        factor = factor.detach()
    elif (
        factor == 0.0
    ):  # a constant (CP-LRP's q and k): nothing flows, as with scale_gradient's stop-gradient
        return x.detach()
    return _RotaryLeafGradient.apply(x, rotation, factor)


@dataclass
class LayerOffsets:
    """Per-layer sums per signed offset (bin ``d + T - 1``, ``d = i - j``): ``position`` [B, H, 2T - 1] (``R_p``)
    and ``score`` [B, H, 2T - 1] (``R_s``; ``None`` where only ``R_p`` is known); ``causal``: the layer attends to
    keys ``j <= i`` only."""

    position: torch.Tensor
    score: torch.Tensor | None
    causal: bool


@dataclass
class OffsetRecorder:
    """Set on a layer's :class:`~hf_pelrp.attention.AttentionRule` at each forward pass when the offset maps are
    asked for: where to write (``store.aux[("offsets", layer)]``), the query-block size and the layer's rotation
    (``None``: no rotary positions in this layer, ``p = 0``)."""

    aux: dict = field(repr=False)
    layer: int
    chunk: int = 0
    rotation: Rotation | None = None

    def watch(
        self,
        module: torch.nn.Module,
        output: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        factor: float,
        kwargs: dict,
    ) -> torch.Tensor:
        """Register the backward hook on the attention ``output`` [B, T, H, D] (as the attention interface
        returns it) that computes this layer's offset sums from the gradient reaching it."""
        if not output.requires_grad:
            return output
        if kwargs.get("position_bias") is not None or (
            isinstance(attention_mask, torch.Tensor) and attention_mask.requires_grad
        ):
            raise UnsupportedModelError(
                "relevance per offset of rotary attention with an additional positional bias is not supported"
            )
        groups = query.shape[1] // key.shape[1]
        q, k, v = (t.detach() for t in (query, key, value))
        if groups > 1:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        rot = self.rotation
        if rot is None:
            qc, kc = q, k
        else:
            # in float32 at least: a half-precision round trip would blur the position part
            dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            cos, sin = rot.cos.detach().to(dtype), rot.sin.detach().to(dtype)
            if rot.layout == "half":
                # the half layout rotates channel d with d + w/2 by one angle: cos is cat(f, f)
                half = cos.shape[-1] // 2
                if not torch.allclose(cos[..., :half], cos[..., half:]):
                    raise UnsupportedModelError(
                        f"{type(module).__name__}: the rotary cos is not two equal halves, so the declared 'half' "
                        "layout does not describe this rotation and the content part of the scores is unknown"
                    )
            qc = unrotate(q.to(dtype), cos, sin, rot.layout, rot.rotated)
            kc = unrotate(k.to(dtype), cos, sin, rot.layout, rot.rotated)
        scaling = kwargs.get("scaling")
        scaling = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
        softcap = kwargs.get("softcap")
        is_causal = kwargs.get("is_causal")
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        mask = None if attention_mask is None else attention_mask.detach()
        aux, layer, chunk = self.aux, self.layer, self.chunk

        def hook(grad: torch.Tensor) -> None:
            aux[("offsets", layer)] = score_offsets(
                q, k, v, qc, kc, grad.transpose(1, 2), mask, causal, scaling, softcap, factor, chunk
            )

        output.register_hook(hook)
        return output


def _allowed(
    mask: torch.Tensor | None, causal: bool, rows: slice, tq: int, tk: int, device
) -> torch.Tensor | None:
    """Boolean [.., rows, Tk] mask (True = attend) or an additive float mask for the query rows ``rows``."""
    if mask is None:
        if not (causal and tq > 1):
            return None
        first = tk - tq  # queries are the last tq keys (no cache: tk == tq)
        i = torch.arange(rows.start, rows.stop, device=device)[:, None] + first
        return torch.arange(tk, device=device)[None, :] <= i
    return mask[..., rows, :tk]


def score_offsets(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qc: torch.Tensor,
    kc: torch.Tensor,
    grad_out: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scaling: float,
    softcap: float | None,
    factor: float,
    chunk: int = 0,
) -> LayerOffsets:
    """Offset sums of one attention layer from the gradient ``grad_out`` [B, H, Tq, D] at its output.

    Per block of queries: ``s = scale q k^T`` (rotated), ``A = softmax(cap(s) + mask)``, the gradient at the
    scores ``g_s = A (g_A - sum_j A g_A)`` with ``g_A = g_out v^T`` (soft-capping has the identity rule: the
    gradient passes it unchanged), ``c = scale q~ k~^T`` and ``R_p = f (s - c) g_s``, ``R_s = f s g_s``.
    ``chunk`` queries per block (``0``: all at once); the result does not depend on it.
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, tq, _ = q.shape
    tk = k.shape[2]
    first = tk - tq
    step = tq if chunk <= 0 else chunk
    kt, kct, vt = k.to(dtype).transpose(-1, -2), kc.to(dtype).transpose(-1, -2), v.to(dtype).transpose(-1, -2)
    position = torch.zeros(batch * heads, 2 * tk - 1, dtype=dtype, device=q.device)
    score = torch.zeros_like(position)
    for start in range(0, tq, step):
        rows = slice(start, min(start + step, tq))
        s = scaling * (q[:, :, rows].to(dtype) @ kt)
        logits = s if softcap is None else softcap * torch.tanh(s / softcap)
        allowed = _allowed(mask, causal, rows, tq, tk, q.device)
        if allowed is not None and allowed.dtype == torch.bool:
            logits = logits.masked_fill(~allowed, torch.finfo(dtype).min)
        elif allowed is not None:
            logits = logits + allowed.to(dtype)
        probs = torch.softmax(logits, dim=-1)
        g_probs = grad_out[:, :, rows].to(dtype) @ vt
        g_s = probs * (g_probs - (probs * g_probs).sum(-1, keepdim=True))
        content = scaling * (qc[:, :, rows].to(dtype) @ kct)
        r_s = factor * s * g_s
        r_p = factor * (s - content) * g_s
        n = rows.stop - rows.start
        position += offset_sums(r_p.reshape(batch * heads, n, tk), first + start)
        score += offset_sums(r_s.reshape(batch * heads, n, tk), first + start)
    return LayerOffsets(position.view(batch, heads, -1), score.view(batch, heads, -1), causal)


def bias_offsets(leaf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``R_p`` of a per-pair bias leaf [B, H, T, T] (``leaf * leaf.grad``) summed per signed offset: [B, H, 2T - 1]."""
    batch, heads, tq, tk = leaf.shape
    if leaf.grad is None:  # CP-LRP: nothing reaches the scores
        return torch.zeros(batch, heads, 2 * tk - 1, dtype=dtype, device=leaf.device)
    pairs = (leaf.detach().to(dtype) * leaf.grad.to(dtype)).reshape(batch * heads, tq, tk)
    return offset_sums(pairs, tk - tq).view(batch, heads, -1)


def offset_maps(
    layers: dict[int, LayerOffsets], like: torch.Tensor, num_layers: int
) -> dict[str, torch.Tensor]:
    """The maps of the recorded layers: ``position_by_offset`` [B, L, D], ``position_by_offset_by_head``
    [B, L, H, D], ``content_by_offset`` [B, L, D] (where the score relevance is known), ``offset_labels``
    [B, D] (the offset ``d = i - j`` of each bin: ``0 .. T - 1`` when every layer is causal, else
    ``-(T - 1) .. T - 1``)."""
    if not layers:
        return {}
    first = next(iter(layers.values()))
    batch, heads, bins = first.position.shape
    seq = (bins + 1) // 2
    count = max(num_layers, max(layers) + 1)
    by_head = torch.zeros(batch, count, heads, bins, dtype=like.dtype, device=like.device)
    score = torch.zeros_like(by_head)
    known = all(entry.score is not None for entry in layers.values())
    for layer, entry in layers.items():
        by_head[:, layer] = entry.position.to(by_head)
        if entry.score is not None:
            score[:, layer] = entry.score.to(by_head)
    causal = all(entry.causal for entry in layers.values())
    # a causal layer has no relevance at d < 0 (masked pairs have probability 0); keep the signed range otherwise
    if causal and float(by_head[..., : seq - 1].abs().sum() + score[..., : seq - 1].abs().sum()) == 0.0:
        keep = slice(seq - 1, bins)
        labels = torch.arange(0, seq, device=like.device)
    else:
        keep = slice(0, bins)
        labels = torch.arange(-(seq - 1), seq, device=like.device)
    by_head, score = by_head[..., keep], score[..., keep]
    maps = {
        "position_by_offset": by_head.sum(2),
        "position_by_offset_by_head": by_head,
        "offset_labels": labels.expand(batch, -1),
    }
    if known:
        maps["content_by_offset"] = (score - by_head).sum(2)
    return maps
