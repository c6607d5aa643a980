"""The attribution methods compared by the evaluation, found by name through a small registry.

A method maps one sample (batch of 1) and the explained class to an :class:`Explanation`: relevance per
perturbable unit (a token, or an image patch) and, for images, optionally per pixel. Adding a method is one
function decorated with :func:`register_method`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..engine import attribute
from .samples import Sample, explained_logits


@dataclass
class Explanation:
    """Relevance of one sample.

    Attributes
    ----------
    units : FloatTensor [N]
        Relevance per perturbable unit: per token (text) or per patch in row-major order (vision).
    pixels : FloatTensor [H, W] or None
        Relevance per pixel (vision methods that reach the pixels), else None.
    """

    units: torch.Tensor
    pixels: torch.Tensor | None = None


@dataclass(frozen=True)
class MethodSettings:
    """Knobs shared by the methods: Integrated-Gradients steps and the seed of the random baseline."""

    ig_steps: int = 32
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


MethodFn = Callable[[torch.nn.Module, Sample, int, MethodSettings], Explanation]
_METHODS: dict[str, tuple[MethodFn, str]] = {}


def register_method(name: str, description: str) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn(model, sample, target, settings) -> Explanation`` under ``name``."""

    def decorate(fn: MethodFn) -> MethodFn:
        _METHODS[name] = (fn, description)
        return fn

    return decorate


def available_methods() -> list[str]:
    """The registered method names, in registration order."""
    return list(_METHODS)


def method_description(name: str) -> str:
    return _get(name)[1]


def explain(
    name: str, model: torch.nn.Module, sample: Sample, target: int, settings: MethodSettings
) -> Explanation:
    """Run method ``name`` on one sample; the result is detached float32 on the CPU."""
    fn = _get(name)[0]
    exp = fn(model, sample, target, settings)
    units = exp.units.detach().float().cpu().reshape(-1)
    pixels = exp.pixels.detach().float().cpu() if exp.pixels is not None else None
    if not torch.isfinite(units).all():
        raise FloatingPointError(f"method {name!r} returned non-finite relevance for sample {sample.id}")
    return Explanation(units, pixels)


def _get(name: str) -> tuple[MethodFn, str]:
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


def _positional_parts(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules whose outputs are the additive parts of the input embedding, or the rotary (cos, sin)."""
    base = model.base_model
    parts = {"token": model.get_input_embeddings()}
    if hasattr(base, "rotary_emb"):
        parts["rotary"] = base.rotary_emb
    elif hasattr(base, "wpe"):
        parts["position"] = base.wpe
    else:
        emb = getattr(base, "embeddings", None)
        if emb is not None and hasattr(emb, "position_embeddings"):
            parts["position"] = emb.position_embeddings
        if emb is not None and hasattr(emb, "token_type_embeddings"):
            parts["segment"] = emb.token_type_embeddings
    return parts


def _vision_grid(model: torch.nn.Module, sample: Sample) -> tuple[int, tuple[int, int]]:
    patch = int(model.config.patch_size)
    h, w = sample.inputs["pixel_values"].shape[-2:]
    return patch, (h // patch, w // patch)


# ---------------------------------------------------------------------------------------------- hf_pelrp LRP
def _lrp_units(model, sample, target, mode: str, positional: bool) -> Explanation:
    if _is_vision(sample):
        attr = attribute(
            model, pixel_values=sample.inputs["pixel_values"], target=target, mode=mode, positional=positional
        )
        return Explanation(attr.patch_map[0].reshape(-1), attr.pixel_map[0])
    attr = attribute(
        model, **sample.inputs, target=target, mode=mode, positional=positional, position=sample.position
    )
    return Explanation(attr.relevance[0])


def _lrp_paper(model, sample, target, mode: str) -> Explanation:
    """The paper's aggregation: token map plus the absolute position relevance of every layer (rotary) or of
    every additive positional part; for ViT, the position relevance spread over the patch pixels, clamped at 0."""
    if _is_vision(sample):
        attr = attribute(
            model, pixel_values=sample.inputs["pixel_values"], target=target, mode=mode, positional=True
        )
        patch, _ = _vision_grid(model, sample)
        # the adapter's pixel_map already holds the position relevance spread over each patch's pixels
        pixels = attr.pixel_map[0].clamp(min=0)
        return Explanation(_patch_sum(pixels, patch), pixels)
    attr = attribute(
        model, **sample.inputs, target=target, mode=mode, positional=True, position=sample.position
    )
    total = attr.token[0] + attr.extras["position_abs"][0]
    if attr.segment is not None:
        total = total + attr.segment[0].abs()
    return Explanation(total)


for _mode, _label in (("attnlrp", "AttnLRP"), ("cp", "CP-LRP")):
    register_method(f"{_mode}_pe", f"PE-LRP, {_label} rules, positions are leaves (signed sum)")(
        lambda m, s, t, st, _mode=_mode: _lrp_units(m, s, t, _mode, True)
    )
    register_method(f"{_mode}", f"{_label} without positional relevance (positional=False)")(
        lambda m, s, t, st, _mode=_mode: _lrp_units(m, s, t, _mode, False)
    )
    register_method(f"{_mode}_pe_abs", f"PE-LRP, {_label} rules, the paper's aggregation of positions")(
        lambda m, s, t, st, _mode=_mode: _lrp_paper(m, s, t, _mode)
    )


# --------------------------------------------------------------------------------------- gradient baselines
def _input_x_gradient(model, sample, target, with_position: bool) -> Explanation:
    if _is_vision(sample):
        return _input_x_gradient_vision(model, sample, target, with_position)
    parts = _positional_parts(model)
    leaves: dict[str, list[torch.Tensor]] = {}

    def capture(name):
        def hook(_module, _args, output):
            # the embedding outputs depend on ids and (frozen) weights only: detaching them loses nothing
            if isinstance(output, tuple):
                out = tuple(o.detach().requires_grad_(True) for o in output)
                leaves.setdefault(name, []).extend(out)
                return out
            out = output.detach().requires_grad_(True)
            leaves.setdefault(name, []).append(out)
            return out

        return hook

    handles = [module.register_forward_hook(capture(name)) for name, module in parts.items()]
    try:
        with _frozen(model):
            logit = _select_logit(model, sample, target, **sample.inputs)
            flat = [t for ts in leaves.values() for t in ts]
            grads = torch.autograd.grad(logit.sum(), flat, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    grad_of = {id(t): g for t, g in zip(flat, grads, strict=True)}

    def share(name):
        total = 0
        for t in leaves.get(name, []):
            g = grad_of[id(t)]
            if g is not None:
                total = total + (t * g).sum(-1)[0].expand(sample.length)
        return total

    units = share("token") + share("segment")
    if with_position:
        units = units + share("position") + share("rotary")
    return Explanation(torch.as_tensor(units).float())


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
register_method("ixg_pe", "Input x Gradient plus the position-embedding share")(
    lambda m, s, t, st: _input_x_gradient(m, s, t, True)
)


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
    # seeded by the sample id: the same map whichever process explains the sample
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + sample.id)
    if _is_vision(sample):
        patch, grid = _vision_grid(model, sample)
        units = torch.rand(grid[0] * grid[1], generator=gen)
        return Explanation(units, _spread(units, patch, grid))
    return Explanation(torch.rand(sample.length, generator=gen))


register_method("random", "uniform random relevance (seeded by sample id)")(_random)
