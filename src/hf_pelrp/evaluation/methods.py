"""The attribution methods compared by the evaluation, found by name through a small registry.

A method maps one sample (batch of 1) and the explained class to an :class:`Explanation`: relevance per
perturbable unit (a token, or an image patch) and, where the method has them, a position map (per slot, and
per layer for rotary models) and a pixel map. Adding a method is one function decorated with
:func:`register_method`; ``kinds`` says which tasks it applies to (``"text"``, ``"vision"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..engine import explain as engine_explain
from ..engine import lrp
from ..request import single_request
from ..result import Attribution
from ._engine_gaps import (
    ROTARY,
    additive_position_gradient,
    positional_leaves,
    positional_site,
    rotary_split,
    segment_module,
)
from .positions import default_removal, neutral_additive, neutral_rotary, position_occlusion
from .samples import Sample, explained_logits

TEXT_ONLY = ("text",)
ALL_KINDS = ("text", "vision")


@dataclass
class Explanation:
    """Relevance of one sample.

    Attributes
    ----------
    units : FloatTensor [N] or None
        Relevance per perturbable unit: per token (text) or per patch in row-major order (vision); for PE-LRP
        the ranking ``token + position`` (or the method's own aggregation). ``None`` for position-only methods.
    pixels : FloatTensor [H, W] or None
        Relevance per pixel (vision methods that reach the pixels), else None.
    position : FloatTensor [N] or None
        Position relevance per slot (text), for methods that have a position map.
    position_by_layer : FloatTensor [L, N] or None
        Per-layer position relevance (rotary models).
    """

    units: torch.Tensor | None
    pixels: torch.Tensor | None = None
    position: torch.Tensor | None = None
    position_by_layer: torch.Tensor | None = None


@dataclass(frozen=True)
class MethodSettings:
    """Knobs shared by the methods: Integrated-Gradients steps, the seed of the random baseline, and ``extra``
    (``position_removal``: how positions are removed for occlusion, see :mod:`.positions`)."""

    ig_steps: int = 32
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


MethodFn = Callable[[torch.nn.Module, Sample, int, MethodSettings], Explanation]
_METHODS: dict[str, tuple[MethodFn, str, tuple[str, ...]]] = {}


def register_method(
    name: str, description: str, kinds: tuple[str, ...] = ALL_KINDS
) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn(model, sample, target, settings) -> Explanation`` under ``name`` for tasks of ``kinds``."""

    def decorate(fn: MethodFn) -> MethodFn:
        _METHODS[name] = (fn, description, tuple(kinds))
        return fn

    return decorate


def available_methods() -> list[str]:
    """The registered method names, in registration order."""
    return list(_METHODS)


def method_description(name: str) -> str:
    return _get(name)[1]


def method_applies(name: str, kind: str) -> bool:
    """Whether method ``name`` applies to tasks of ``kind`` (``"text"`` / ``"vision"``)."""
    return kind in _get(name)[2]


def explain(
    name: str, model: torch.nn.Module, sample: Sample, target: int, settings: MethodSettings
) -> Explanation:
    """Run method ``name`` on one sample; the result is detached float32 on the CPU."""
    fn = _get(name)[0]
    exp = fn(model, sample, target, settings)

    def clean(t, shape=None):
        if t is None:
            return None
        t = t.detach().float().cpu()
        t = t.reshape(-1) if shape is None else t.reshape(shape)
        if not torch.isfinite(t).all():
            raise FloatingPointError(f"method {name!r} returned non-finite relevance for sample {sample.id}")
        return t

    by_layer = exp.position_by_layer
    return Explanation(
        clean(exp.units),
        clean(exp.pixels, exp.pixels.shape) if exp.pixels is not None else None,
        clean(exp.position),
        clean(by_layer, by_layer.shape[-2:]) if by_layer is not None else None,
    )


def _get(name: str) -> tuple[MethodFn, str, tuple[str, ...]]:
    if name not in _METHODS:
        raise KeyError(f"unknown attribution method {name!r}; registered: {', '.join(_METHODS)}")
    return _METHODS[name]


# ----------------------------------------------------------------------------------------------------- helpers
@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def _forward_hook(module: torch.nn.Module, hook: Callable) -> Iterator[None]:
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _is_vision(sample: Sample) -> bool:
    return "pixel_values" in sample.inputs


def _select_logit(model: torch.nn.Module, sample: Sample, target: int, **inputs: Any) -> torch.Tensor:
    """The explained logit of each row of a forward pass (rows may repeat the sample, e.g. IG steps)."""
    return explained_logits(model, sample, inputs)[:, target]


def _patch_sum(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """Sum a [H, W] pixel map over non-overlapping ``patch`` x ``patch`` squares -> [(H/p) * (W/p)]."""
    return F.avg_pool2d(pixels[None, None], patch).flatten() * patch * patch


def _spread(units: torch.Tensor, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    """Spread each patch's relevance evenly over its pixels -> [H, W] (the paper's ViT recipe)."""
    per_pixel = units.reshape(1, 1, *grid) / (patch * patch)
    return F.interpolate(per_pixel, scale_factor=patch, mode="nearest")[0, 0]


def _vision_grid(model: torch.nn.Module, sample: Sample) -> tuple[int, tuple[int, int]]:
    patch = int(model.config.patch_size)
    h, w = sample.inputs["pixel_values"].shape[-2:]
    return patch, (h // patch, w // patch)


def _max_normalised(x: torch.Tensor) -> torch.Tensor:
    """``x / max |x|`` (``x`` itself when it is all zero): the paper's per-map normalisation."""
    peak = x.abs().max()
    return x / peak if peak > 0 else x


def _removal(model: torch.nn.Module, settings: MethodSettings) -> str:
    return settings.extra.get("position_removal") or default_removal(positional_site(model))


# ---------------------------------------------------------------------------------------------- hf_pelrp LRP
def lrp_attribution(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    target: Any,
    mode: str | None,
    positional: bool | None,
    position: Any = None,
) -> Attribution:
    """One explanation request of the engine (rules resolved once, by the request), as every method uses it."""
    request = single_request(
        model, inputs, mode=mode, positional=positional, target=target, position=position
    )
    return engine_explain(request)


def _lrp_units(model, sample, target, mode: str, positional: bool) -> Explanation:
    if _is_vision(sample):
        attr = lrp_attribution(
            model, {"pixel_values": sample.inputs["pixel_values"]}, target, mode, positional
        )
        return Explanation(attr.patch_map[0].reshape(-1), attr.pixel_map[0])
    attr = lrp_attribution(model, sample.inputs, target, mode, positional, position=sample.position)
    if not positional:
        return Explanation(attr.relevance[0])
    by_layer = attr.position_by_layer[0] if attr.position_by_layer is not None else None
    return Explanation(attr.relevance[0], position=attr.position[0], position_by_layer=by_layer)


def _backward(ctx, model, sample, target) -> dict[str, torch.Tensor]:
    """Inside an ``lrp()`` block: one forward and one backward pass of the explained logit; the maps.

    The backward reaches every leaf, the engine's and those of hooks entered inside the block (the parameters
    are frozen, so nothing else accumulates a gradient)."""
    logit = _select_logit(model, sample, target, **sample.inputs)
    logit.sum().backward()
    return ctx.maps()


def _additive_leaves(maps: dict) -> dict[str, torch.Tensor]:
    """Per-slot relevance of each non-token additive leaf (position, segment) of a PE-LRP pass."""
    out = {"position": maps["position"][0]}
    if maps.get("segment") is not None:
        out["segment"] = maps["segment"][0]
    return out


def _lrp_abs(model, sample, target, mode: str, paper: bool) -> Explanation:
    """PE-LRP with the paper's absolute-value aggregation of the positional leaves.

    ``paper=False`` (``*_pe_abs``): ``token + sum over leaves |R_leaf|`` (per layer, cos and sin separately for
    rotary positions; position and segment for additive ones). ``paper=True`` (``*_pe_paper``, the paper's
    public code exactly): every map is first divided by its maximum absolute value -- the token map, each
    leaf of each layer -- then ``token / max + normalise(sum |leaf / max|)``.
    """
    if _is_vision(sample):
        if paper:
            raise ValueError("the paper recipe for ViT is the *_pe_abs pixel map: use that method")
        attr = lrp_attribution(model, {"pixel_values": sample.inputs["pixel_values"]}, target, mode, True)
        patch, _ = _vision_grid(model, sample)
        # the adapter's pixel_map already holds the position relevance spread over each patch's pixels
        pixels = attr.pixel_map[0].clamp(min=0)
        return Explanation(_patch_sum(pixels, patch), pixels)
    site = positional_site(model)
    norm = _max_normalised if paper else (lambda x: x)
    with _frozen(model), lrp(model, mode=mode, positional=True) as ctx:
        if site.kind == ROTARY:
            maps = _backward(ctx, model, sample, target)
            leaves = maps["position_by_leaf"][0].float()  # [L, 2, T]: cos and sin of every layer
            by_layer = torch.stack(
                [norm(leaves[layer, i]).abs() for layer in range(len(leaves)) for i in (0, 1)]
            )
            by_layer = by_layer.view(len(leaves), 2, -1).sum(1)
            position = by_layer.sum(0)
        else:
            maps = _backward(ctx, model, sample, target)
            parts = _additive_leaves(maps)
            by_layer = None
            position = norm(parts["position"]).abs()
            position_all = sum(norm(v).abs() for v in parts.values())
    token = maps["token"][0]
    aggregate = position if site.kind == ROTARY else position_all
    if paper:
        return Explanation(norm(token) + norm(aggregate), position=norm(position), position_by_layer=by_layer)
    return Explanation(token + aggregate, position=position, position_by_layer=by_layer)


def _lrp_reference(model, sample, target, mode: str) -> Explanation:
    """PE-LRP with the identity-reference split of the positional part (docs/positions.md, a rule variant).

    Rotary: ``q_rot = q + (R_theta - I) q``; the content term keeps ``q . g``, the position gets
    ``((R_theta - I) q) . g`` (prototype :func:`._engine_gaps.rotary_split`). Additive: the position gets
    ``(p_i - mean_j p_j) . g`` and the token ``t . g + mean_j p_j . g`` (the same backward pass as PE-LRP, the
    part of ``p`` that every slot shares is credited to the content). Both conservative.
    """
    site = positional_site(model)
    with _frozen(model):
        if site.kind == ROTARY:
            with lrp(model, mode=mode, positional=False) as ctx, rotary_split(model, "reference") as read:
                maps = _backward(ctx, model, sample, target)
                by_layer = read()[0]
            token, position = maps["token"][0], by_layer.sum(0)
            segment = 0
        else:
            with lrp(model, mode=mode, positional=True) as ctx, additive_position_gradient(model) as read:
                maps = _backward(ctx, model, sample, target)
                p, g = read()
            p, g = p.expand_as(g)[0], g[0]
            shared = (p.mean(0, keepdim=True) * g).sum(-1)
            by_layer = None
            position = maps["position"][0] - shared
            token = maps["token"][0] + shared
            segment = maps["segment"][0] if maps.get("segment") is not None else 0
    return Explanation(token + position + segment, position=position, position_by_layer=by_layer)


for _mode, _label in (("attnlrp", "AttnLRP"), ("cp", "CP-LRP")):
    register_method(f"{_mode}_pe", f"PE-LRP, {_label} rules, positions are leaves (signed sum)")(
        lambda m, s, t, st, _mode=_mode: _lrp_units(m, s, t, _mode, True)
    )
    register_method(f"{_mode}", f"{_label} without positional relevance (positional=False)")(
        lambda m, s, t, st, _mode=_mode: _lrp_units(m, s, t, _mode, False)
    )
    register_method(
        f"{_mode}_pe_abs", f"PE-LRP, {_label} rules, token + absolute position relevance per leaf"
    )(lambda m, s, t, st, _mode=_mode: _lrp_abs(m, s, t, _mode, paper=False))
register_method(
    "attnlrp_pe_paper",
    "PE-LRP, AttnLRP rules, the paper's code: every map / leaf max-normalised, positions as absolute values",
    TEXT_ONLY,
)(lambda m, s, t, st: _lrp_abs(m, s, t, "attnlrp", paper=True))
for _mode, _label in (("attnlrp", "AttnLRP"), ("cp", "CP-LRP")):
    register_method(
        f"{_mode}_pe_ref",
        f"PE-LRP, {_label} rules, identity-reference split of the positions (rule variant, docs/positions.md)",
        TEXT_ONLY,
    )(lambda m, s, t, st, _mode=_mode: _lrp_reference(m, s, t, _mode))


def lrp_config_method(config) -> MethodFn:
    """A method explaining with the rules of ``config`` (an :class:`hf_pelrp.LRPConfig` or preset name): for
    images ``patch_map`` as the units, ``pixel_map`` and the patches' position map; for text ``token + position``
    (or the token map without positions). Register it with :func:`register_method` (issue 20's candidates)."""

    from ..config import resolve_config

    positional = resolve_config(config, None, None).positional

    def method(model, sample, target, settings) -> Explanation:
        if _is_vision(sample):
            request = single_request(
                model, {"pixel_values": sample.inputs["pixel_values"]}, config=config, target=target
            )
            attr = engine_explain(request)
            n = attr.patch_map[0].numel()
            position = attr.position[0, -n:] if positional else None
            return Explanation(attr.patch_map[0].reshape(-1), attr.pixel_map[0], position=position)
        request = single_request(model, sample.inputs, config=config, target=target, position=sample.position)
        attr = engine_explain(request)
        position = attr.position[0] if positional else None
        units = attr.relevance[0]
        return Explanation(units, position=position)

    return method


# --------------------------------------------------------------------------------------- gradient baselines
def _token_and_positional_gradients(model, sample, target, make=None, rows: int = 1):
    """Plain gradients (no LRP) at the token embedding, the segment embedding and the positional tensors.

    Returns ``{name: [(value, grad), ...]}`` with names ``token``, ``segment`` and ``positional`` (per layer
    for rotary models, in layer order). ``make`` builds the positional tensors (see
    :func:`._engine_gaps.positional_leaves`); ``rows`` repeats the sample (Integrated-Gradients steps).
    """
    captured: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(_module, _args, output):
            # the embedding outputs depend on ids and (frozen) weights only: detaching them loses nothing
            out = output.detach().requires_grad_(True)
            captured[name] = out
            return out

        return hook

    handles = [model.get_input_embeddings().register_forward_hook(capture("token"))]
    segment = segment_module(model)
    if segment is not None:
        handles.append(segment.register_forward_hook(capture("segment")))
    inputs = {k: v.expand(rows, *v.shape[1:]) for k, v in sample.inputs.items()}
    try:
        with _frozen(model), positional_leaves(model, make) as made:
            logit = _select_logit(model, sample, target, **inputs)
            positional = [t for layer in sorted(made) for t in made[layer]]
            flat = list(captured.values()) + positional
            grads = torch.autograd.grad(logit.sum(), flat, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    pairs = [
        (t.detach(), g if g is not None else torch.zeros_like(t)) for t, g in zip(flat, grads, strict=True)
    ]
    out = {name: [pairs[i]] for i, name in enumerate(captured)}
    out["positional"] = pairs[len(captured) :]
    return out


def _positional_map(site, pairs, length: int, reference: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradient x input at the positional tensors (``reference``: x minus the neutral reference), per slot and,
    for rotary models, per layer."""

    def share(value, grad, name):
        if reference:
            if site.kind == ROTARY:
                ref = neutral_rotary(value, site.attention_scaling)[0 if name == "cos" else 1]
            else:
                ref = neutral_additive(value, "mean")
            value = value - ref
        return (value * grad).sum(-1)[0].expand(length)

    if site.kind == ROTARY:
        by_layer = torch.stack(
            [share(*pairs[2 * i], "cos") + share(*pairs[2 * i + 1], "sin") for i in range(len(pairs) // 2)]
        )
        return by_layer.sum(0), by_layer
    return share(*pairs[0], "position"), None


def _input_x_gradient(model, sample, target, with_position: bool, reference: bool = False) -> Explanation:
    """Input x Gradient (plain gradients). ``with_position``: plus the positional tensors' share, whose map is
    ``x * grad`` or, with ``reference``, ``(x - neutral reference) * grad``; the ranking of the units is the same
    for both (``token + x * grad``: the reference's share counts for the token, as in ``*_pe_ref``)."""
    if _is_vision(sample):
        return _input_x_gradient_vision(model, sample, target, with_position)
    grads = _token_and_positional_gradients(model, sample, target)
    units = sum(
        (v * g).sum(-1)[0].expand(sample.length)
        for name in ("token", "segment")
        for v, g in grads.get(name, [])
    )
    if not with_position:
        return Explanation(torch.as_tensor(units).float())
    site = positional_site(model)
    share, _ = _positional_map(site, grads["positional"], sample.length, reference=False)
    position, by_layer = _positional_map(site, grads["positional"], sample.length, reference)
    return Explanation(units + share, position=position, position_by_layer=by_layer)


def _input_x_gradient_vision(model, sample, target, with_position: bool) -> Explanation:
    pixels_in = sample.inputs["pixel_values"].detach().clone().requires_grad_(True)
    embeddings = model.base_model.embeddings
    zero = {}

    def tap(_module, _args, output):
        # adding a zero leaf exposes the gradient at the summed embedding (token + position)
        zero["z"] = torch.zeros_like(output, requires_grad=True)
        return output + zero["z"]

    with _frozen(model), _forward_hook(embeddings, tap):
        logit = _select_logit(model, sample, target, pixel_values=pixels_in)
        g_pix, g_emb = torch.autograd.grad(logit.sum(), [pixels_in, zero["z"]])
    pixels = (pixels_in * g_pix)[0].sum(0)
    patch, grid = _vision_grid(model, sample)
    if with_position:
        pos = embeddings.position_embeddings
        share = (pos * g_emb).sum(-1)[0, -grid[0] * grid[1] :]
        pixels = pixels + _spread(share, patch, grid)
    return Explanation(_patch_sum(pixels, patch), pixels)


register_method("ixg", "Input x Gradient at the token embedding / pixels (no position share)")(
    lambda m, s, t, st: _input_x_gradient(m, s, t, False)
)
register_method("ixg_pe", "Input x Gradient plus the share of the positional tensors (cos / sin, or p)")(
    lambda m, s, t, st: _input_x_gradient(m, s, t, True)
)
register_method(
    "ixg_pe_ref",
    "Input x Gradient; positions as (x - neutral reference) x gradient (identity rotation / mean row)",
    TEXT_ONLY,
)(lambda m, s, t, st: _input_x_gradient(m, s, t, True, reference=True))


def _positional_ig(model, sample, target, settings: MethodSettings) -> Explanation:
    """Integrated Gradients on the positional tensors, from the neutral reference (identity rotation in every
    layer / the mean position row) to the actual ones, all layers along one straight path; midpoint rule with
    ``settings.ig_steps`` nodes, run as one batch. Sums to ``f(x) - f(reference)`` up to the quadrature error."""
    site = positional_site(model)
    steps = settings.ig_steps
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    deltas: list[tuple[torch.Tensor, str]] = []

    def make(layer, value, name):
        value = value[:1].detach()
        if site.kind == ROTARY:
            ref = neutral_rotary(value, site.attention_scaling)[0 if name == "cos" else 1]
        else:
            ref = neutral_additive(value, "mean")
        delta = value - ref
        deltas.append((delta, name))
        a = alphas.to(value.device, value.dtype).view(-1, *([1] * (value.dim() - 1)))
        return (ref + a * delta).requires_grad_(True)

    grads = _token_and_positional_gradients(model, sample, target, make=make, rows=steps)["positional"]
    shares = [(d * g.mean(0, keepdim=True)).sum(-1)[0] for (d, _), (_, g) in zip(deltas, grads, strict=True)]
    if site.kind == ROTARY:
        by_layer = torch.stack([shares[2 * i] + shares[2 * i + 1] for i in range(len(shares) // 2)])
        return Explanation(None, position=by_layer.sum(0), position_by_layer=by_layer)
    return Explanation(None, position=shares[0])


register_method(
    "pos_ig",
    "Integrated Gradients on the positional tensors from the neutral reference (positions only)",
    TEXT_ONLY,
)(_positional_ig)
register_method(
    "pos_occlusion",
    "single-slot occlusion of positions with the test's removal (T extra forwards; positions only)",
    TEXT_ONLY,
)(lambda m, s, t, st: Explanation(None, position=position_occlusion(m, s, t, _removal(m, st))))


def _layer_occlusion(model, sample, target, settings) -> Explanation:
    if positional_site(model).kind != ROTARY:
        return Explanation(None)  # additive positions have no layers: this method has nothing to rank
    by_layer = position_occlusion(model, sample, target, _removal(model, settings), per_layer=True)
    return Explanation(None, position_by_layer=by_layer)


register_method(
    "pos_occlusion_layer",
    "occlusion of single (layer, slot) rotary cells (L x T extra forwards; per-layer position map only)",
    TEXT_ONLY,
)(_layer_occlusion)


def integrated_gradients(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, baseline: torch.Tensor, steps: int
) -> torch.Tensor:
    """Integrated Gradients (Sundararajan et al. 2017) of the scalar-per-row function ``f`` at ``x``.

    ``IG = (x - x0) * mean_k grad f(x0 + a_k (x - x0))`` with midpoint nodes ``a_k = (k + 1/2) / steps``; the
    attributions sum to ``f(x) - f(x0)`` up to the quadrature error. ``f`` maps [S, ...] to [S]; all steps run
    as one batch.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    shape = (steps,) + (1,) * (x.dim() - 1)
    path = (baseline + alphas.view(shape) * (x - baseline)).detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(f(path).sum(), [path])
    return (x - baseline)[0] * grad.mean(0)


def captum_integrated_gradients(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, baseline: torch.Tensor, steps: int
) -> torch.Tensor:
    """Captum's ``IntegratedGradients`` with the same midpoint rule as :func:`integrated_gradients` (its
    ``riemann_middle``: nodes ``(k + 1/2) / steps``, weights ``1 / steps``); ``x`` is one row [1, ...], the
    result drops that axis. ``f`` maps [S, ...] to [S]."""
    try:
        from captum.attr import IntegratedGradients
    except ImportError as err:  # pragma: no cover - captum is a dependency of the eval / test extras
        raise ImportError(
            "the 'ig' method uses Captum's IntegratedGradients: pip install 'hf_pelrp[eval]' (or captum)"
        ) from err
    if steps < 2:
        raise ValueError(f"Captum's Riemann rules need steps >= 2, got {steps}")
    with torch.enable_grad():
        attr = IntegratedGradients(f).attribute(
            x, baselines=baseline, n_steps=steps, method="riemann_middle", internal_batch_size=steps
        )
    return attr.detach()[0]


def _integrated_gradients(model, sample, target, settings: MethodSettings) -> Explanation:
    steps = settings.ig_steps
    with _frozen(model):
        if _is_vision(sample):
            x = sample.inputs["pixel_values"]
            ig = captum_integrated_gradients(
                lambda p: _select_logit(model, sample, target, pixel_values=p), x, torch.zeros_like(x), steps
            )
            pixels = ig.sum(0)
            patch, _ = _vision_grid(model, sample)
            return Explanation(_patch_sum(pixels, patch), pixels)
        emb = model.get_input_embeddings()(sample.inputs["input_ids"]).detach()
        rest = {k: v for k, v in sample.inputs.items() if k != "input_ids"}

        def f(e: torch.Tensor) -> torch.Tensor:
            expanded = {k: v.expand(e.shape[0], *v.shape[1:]) for k, v in rest.items()}
            return _select_logit(model, sample, target, inputs_embeds=e, **expanded)

        ig = captum_integrated_gradients(f, emb, torch.zeros_like(emb), steps)
    return Explanation(ig.sum(-1))


register_method("ig", "Integrated Gradients (Captum) on the token embeddings / pixels, zero baseline")(
    _integrated_gradients
)


# ------------------------------------------------------------------------------------------- attention rollout
def _attention_rollout(model, sample, target, settings) -> Explanation:
    """Abnar & Zuidema (2020): head-averaged attention with the residual (0.5 A + 0.5 I), row-normalised,
    multiplied through the layers; the row of the token the head reads out (CLS, or the explained / last
    token of causal models)."""
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**sample.inputs, output_attentions=True)
    finally:
        model.set_attn_implementation(original)
    rollout = None
    for att in out.attentions:
        a = att[0].float().mean(0)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    if _is_vision(sample):
        _, grid = _vision_grid(model, sample)
        units = rollout[0, -grid[0] * grid[1] :]
        patch, _ = _vision_grid(model, sample)
        return Explanation(units, _spread(units, patch, grid))
    row = sample.readout
    return Explanation(rollout[row])


register_method("rollout", "attention rollout (Abnar & Zuidema 2020)")(_attention_rollout)


# ------------------------------------------------------------------------------------------------------ random
def _random(model, sample, target, settings) -> Explanation:
    # seeded by the sample id: the same maps whichever process explains the sample
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + sample.id)
    if _is_vision(sample):
        patch, grid = _vision_grid(model, sample)
        units = torch.rand(grid[0] * grid[1], generator=gen)
        return Explanation(units, _spread(units, patch, grid))
    units = torch.rand(sample.length, generator=gen)
    # the position maps come from their own stream, so adding them left the token ranking unchanged
    gen_pos = torch.Generator().manual_seed(settings.seed * 1_000_003 + sample.id + 7_919)
    position = torch.rand(sample.length, generator=gen_pos)
    by_layer = None
    site = positional_site(model)
    if site.kind == ROTARY:
        by_layer = torch.rand(site.num_layers, sample.length, generator=gen_pos)
    return Explanation(units, position=position, position_by_layer=by_layer)


register_method("random", "uniform random relevance (seeded by sample id)")(_random)
