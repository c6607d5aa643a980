"""Rule sites checked one by one against explicit float64 references (part of :func:`hf_pelrp.check_adapter`).

A declaration can give exactly conserved, non-zero, padding-invariant maps and still apply a rule at the wrong
place: with the 1/2 of a gated product put on the gate projection instead of the up projection, the CP checks
cannot see it (the gate is a constant there) and nothing else is exact under AttnLRP. So each rule site is
checked locally, in every mode: inside :func:`hf_pelrp.lrp`, probes record the tensors around the site in one
forward pass of the whole model and their gradients in one backward pass from a random combination of the
logits; the fast path's relevance at the site's inputs (``x * x.grad``) must then equal what the rule's formula
(method.md 1, written out here with no autograd) makes of the relevance at its outputs (``y * y.grad``).

- Gated product ``p = act(g) * u`` (uniform rule, AttnLRP Prop. 3.2; identity rule on ``act``, Prop. 3.4):
  ``R_g = R_u = R_p / 2`` under AttnLRP, ``R_g = 0`` and ``R_u = R_p`` under CP-LRP (the gate is a constant),
  ``R_g`` read at the raw output of the projection that made ``g`` (so a factor on that projection counts),
  ``R_u`` at the raw output of the declared up projection. The probe also proves the declaration's structure:
  some module inside the MLP must consume exactly ``act(g) * u``, with ``u`` the declared up projection (or its
  declared channels).
- Norms (identity rule, Prop. 3.4: the normalising scale ``s`` is a constant, the layer a linear map): RMSNorm
  ``y = w s x``: ``R_x = x w s R_y / y``; LayerNorm ``y = w s (x - mean x) + b`` (epsilon rule of that linear
  map, the bias absorbing its share): ``R_x[i] = x[i] s (w[i] r[i] - mean_j w[j] r[j])`` with ``r = R_y / y``.

Attention has no per-site reference here: q, k and v are not outputs of modules that hooks can see in every
family (they are reshaped, rotated and repeated inside the attention module). The exact CP conservation and, for
rotary families, the one-layer rotary split of :mod:`hf_pelrp.check` cover part of it; the ``"lrp"`` attention
has its own float64 references in the test suite. Gated products that families apply with their own rules
(``extra_rules``: T5's gated feed-forward, DINOv2's SwiGLU; ``experts``: the mixture-of-experts experts) are not
declared as ``gated`` and are covered by their family's reference tests, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters.base import Adapter
from .adapters.more_decoders import weightless_rms_norm
from .adapters.norms import _eps, layer_norm, rms_norm, rms_norm_one_plus
from .adapters.olmo import OLMO_LAYER_NORM_EPS, olmo_layer_norm
from .hooks import Handles
from .modules import find_optional

F64 = torch.float64

#: the shares of a gated product's relevance that go to the gate and to the up projection (method.md 1)
GATE_SHARE = {"attnlrp": 0.5, "cp": 0.0}
UP_SHARE = {"attnlrp": 0.5, "cp": 1.0}


@dataclass
class SiteResult:
    """One rule site in one mode: its name, whether the fast path matched the reference, and why not."""

    kind: str
    site: str
    passed: bool
    detail: str = ""


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` with ``0 / 0 := 0`` (epsilon rule with eps -> 0: a zero output passes on no relevance)."""
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def _relevance(t: torch.Tensor) -> torch.Tensor:
    """``t * t.grad`` in float64 (0 where nothing flowed back)."""
    grad = t.grad if t.grad is not None else torch.zeros_like(t)
    return t.detach().to(F64) * grad.to(F64)


def _mismatch(fast: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, tol: float) -> str:
    """``""`` if ``fast`` equals ``ref`` to ``tol`` relative to ``scale``, else a description of the gap."""
    size = float(scale.abs().max()) if scale.numel() else 0.0
    if size == 0.0:
        size = 1.0
    gap = float((fast - ref).abs().max()) / size if fast.numel() else 0.0
    return "" if gap <= tol else f"relative gap {gap:.2e}"


# ---- norms ------------------------------------------------------------------------------------------------


def _rms_reference(one_plus: bool, weightless: bool = False):
    def reference(module: nn.Module, x: torch.Tensor, y: torch.Tensor, r_y: torch.Tensor) -> torch.Tensor:
        w = 1.0 if weightless else module.weight.detach().to(F64)
        w = 1.0 + w if one_plus else w
        scale = w * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _eps(module))
        return x * scale * safe_div(r_y, y)

    return reference


def _layer_norm_reference(eps: float | None = None):
    def reference(module: nn.Module, x: torch.Tensor, y: torch.Tensor, r_y: torch.Tensor) -> torch.Tensor:
        weight = getattr(module, "weight", None)
        w = torch.ones(x.shape[-1], dtype=F64) if weight is None else weight.detach().to(F64)
        centred = x - x.mean(-1, keepdim=True)
        s = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + (eps if eps is not None else _eps(module)))
        wr = w * safe_div(r_y, y)
        return x * s * (wr - wr.mean(-1, keepdim=True))

    return reference


#: the explicit reference of each surrogate in :mod:`hf_pelrp.adapters.norms` (and OLMo's)
NORM_REFERENCES = {
    rms_norm: _rms_reference(one_plus=False),
    rms_norm_one_plus: _rms_reference(one_plus=True),
    layer_norm: _layer_norm_reference(),
    olmo_layer_norm: _layer_norm_reference(OLMO_LAYER_NORM_EPS),
    weightless_rms_norm: _rms_reference(one_plus=False, weightless=True),
}


# ---- probes -----------------------------------------------------------------------------------------------


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in the graph that keeps its gradient: what flows through it flows through one site only."""
    copy = t.clone()
    copy.retain_grad()
    return copy


@dataclass
class _GatedSite:
    name: str
    act: nn.Module
    up: nn.Module
    channels: slice | None
    calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _NormSite:
    name: str
    module: nn.Module
    surrogate: Any
    calls: list[dict[str, torch.Tensor]] = field(default_factory=list)


def _gated_sites(model: nn.Module, adapter: Adapter, handles: Handles) -> list[_GatedSite]:
    paths = {m: p for p, m in model.named_modules()}
    sites = []
    for block in adapter.blocks(model):
        for product in adapter.gated:
            act, up = find_optional(block, product.act), find_optional(block, product.up)
            if act is None or up is None:
                continue  # an optional product absent from this block (check_model refuses the rest)
            parent_path = _common_prefix(product.act, product.up)
            parent = find_optional(block, parent_path) or block
            channels = None
            if product.up_channels is not None:
                channels = slice(getattr(up, "out_features", 0) // 2, None)
            site = _GatedSite(f"{paths[act]} * {paths[up]}", act, up, channels)
            _probe_gated(site, parent, handles)
            sites.append(site)
    return sites


def _common_prefix(a: str, b: str) -> str:
    parts = []
    for x, y in zip(a.split(".")[:-1], b.split(".")[:-1], strict=False):
        if x != y:
            break
        parts.append(x)
    return ".".join(parts)


def _probe_gated(site: _GatedSite, parent: nn.Module, handles: Handles) -> None:
    """Probes around ``act(g) * u`` inside ``parent``. The probes' copies are made before the rules' own hooks
    run (pre-hooks, prepended forward hooks), so the rules act on the copies and a copy's gradient includes
    every factor a rule puts after it."""

    def start(_m, _args):
        site.calls.append({})

    def gate_in(_m, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad and site.calls:
            g = _alias(args[0])
            site.calls[-1]["g"] = g
            return (g, *args[1:])
        return None

    def act_out(_m, _args, output):
        if site.calls:
            site.calls[-1]["a"] = output.detach().clone()

    def up_out(_m, _args, output):
        if site.calls and output.requires_grad:
            u = _alias(output)
            site.calls[-1]["u"] = u
            return u
        return None

    def consumer_in(_m, args):
        call = site.calls[-1] if site.calls else {}
        if "p" in call or "a" not in call or "u" not in call or not args:
            return None
        x = args[0]
        if not isinstance(x, torch.Tensor) or not x.requires_grad:
            return None
        u = call["u"].detach()
        u = u[..., site.channels] if site.channels is not None else u
        expected = call["a"] * u
        if x.shape != expected.shape or not torch.allclose(x.detach(), expected, rtol=1e-12, atol=0.0):
            return None
        p = _alias(x)
        call["p"] = p
        return (p, *args[1:])

    def raw_out(_m, _args, output):
        # before any rule on the module: the gate side is measured where the gate projection made it
        if site.calls and isinstance(output, torch.Tensor) and output.requires_grad:
            alias = _alias(output)
            site.calls[-1].setdefault("outs", []).append(alias)
            return alias
        return None

    handles.append(parent.register_forward_pre_hook(start, prepend=True))
    handles.append(site.act.register_forward_pre_hook(gate_in))
    handles.append(site.act.register_forward_hook(act_out, prepend=True))
    handles.append(site.up.register_forward_hook(up_out, prepend=True))
    for module in parent.modules():
        if module is not parent and module is not site.act and module is not site.up:
            handles.append(module.register_forward_pre_hook(consumer_in))
            handles.append(module.register_forward_hook(raw_out, prepend=True))


def _norm_sites(model: nn.Module, adapter: Adapter, handles: Handles) -> list[_NormSite]:
    sites = []
    for path, module in model.named_modules():
        surrogate = adapter.norms.get(type(module).__name__)
        if surrogate is None:
            continue
        site = _NormSite(f"{path} ({type(module).__name__})", module, surrogate)

        def norm_in(_m, args, site=site):
            if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
                x = _alias(args[0])
                site.calls.append({"x": x})
                return (x, *args[1:])
            return None

        def norm_out(_m, _args, output, site=site):
            # registered after the Norm rule's own hook: ``output`` is the tensor that flows on
            if site.calls and "y" not in site.calls[-1] and isinstance(output, torch.Tensor):
                if output.requires_grad:
                    output.retain_grad()
                site.calls[-1]["y"] = output

        handles.append(module.register_forward_pre_hook(norm_in))
        handles.append(module.register_forward_hook(norm_out))
        sites.append(site)
    return sites


# ---- the check ----------------------------------------------------------------------------------------------


def check_sites(
    model: nn.Module, adapter: Adapter, inputs: dict[str, Any], mode: str, tol: float, seed: int
) -> list[SiteResult]:
    """Every gated product and norm of ``model`` in ``mode``, against its explicit reference (see module doc).

    ``inputs`` are model inputs without padding; the backward pass starts from a random combination of the
    logits (the local rules hold for any relevance arriving at a site, so a random one tests them hardest).
    """
    from .context import lrp

    handles = Handles()
    with lrp(model, mode=mode), torch.enable_grad():
        try:
            gated = _gated_sites(model, adapter, handles)
            norms = _norm_sites(model, adapter, handles)
            logits = model(**inputs).logits
            gen = torch.Generator().manual_seed(seed + 2)
            weights = torch.randn(logits.shape, generator=gen, dtype=F64).to(logits.dtype)
            (logits * weights.to(logits.device)).sum().backward()
        finally:
            handles.remove()
    results = [_check_gated(site, mode, tol) for site in gated]
    results += [_check_norm(site, tol) for site in norms]
    return results


def _check_gated(site: _GatedSite, mode: str, tol: float) -> SiteResult:
    kind = "gated product"
    if not site.calls:
        return SiteResult(kind, site.name, False, "the declared gate activation never ran")
    problems = []
    for k, call in enumerate(site.calls):
        if "p" not in call:
            problems.append(
                f"call {k}: no module consumes act(gate) * up with the declared up projection "
                "(the declaration names the wrong factor or the wrong channels)"
            )
            continue
        r_p = _relevance(call["p"])
        r_g = _gate_relevance(call, site.channels)
        r_u = _relevance(call["u"])
        if site.channels is not None:
            r_u = r_u[..., site.channels]
        for part, fast, share in (("gate", r_g, GATE_SHARE[mode]), ("up", r_u, UP_SHARE[mode])):
            gap = _mismatch(fast, share * r_p, r_p, tol)
            if gap:
                measured = float((fast * r_p).sum() / (r_p * r_p).sum().clamp(min=1e-300))
                problems.append(
                    f"call {k}: R_{part} = {measured:.3g} R_product, the rule says {share:g} ({gap})"
                )
    return SiteResult(kind, site.name, not problems, "; ".join(problems))


def _gate_relevance(call: dict[str, Any], channels: slice | None) -> torch.Tensor:
    """Relevance of the gate where it was made: the raw output of the module inside the MLP that computed the
    activation's input (the first half of a fused projection), else at the activation's input."""
    g = call["g"].detach()
    for out in call.get("outs", []):
        if out.shape == g.shape and torch.equal(out.detach(), g):
            return _relevance(out)
    u = call["u"]
    if channels is not None:
        first = u[..., : channels.start]
        if first.shape == g.shape and torch.equal(first.detach(), g):
            return _relevance(u)[..., : channels.start]
    return _relevance(call["g"])


def _check_norm(site: _NormSite, tol: float) -> SiteResult:
    kind = "norm"
    reference = NORM_REFERENCES.get(site.surrogate)
    if reference is None:
        name = getattr(site.surrogate, "__name__", repr(site.surrogate))
        return SiteResult(kind, site.name, True, f"skipped: no explicit reference for surrogate {name}")
    problems = []
    for k, call in enumerate(site.calls):
        if "y" not in call:
            continue
        x, y = call["x"], call["y"]
        r_y = _relevance(y)
        r_x = _relevance(x)
        ref = reference(site.module, x.detach().to(F64), y.detach().to(F64), r_y)
        gap = _mismatch(r_x, ref, torch.cat([ref.flatten(), r_y.flatten()]), tol)
        if gap:
            problems.append(f"call {k}: R_x differs from the identity rule's ({gap})")
    return SiteResult(kind, site.name, not problems, "; ".join(problems))
