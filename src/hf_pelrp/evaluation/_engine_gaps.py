"""What the position-faithfulness evaluation needs from the engine that its public API does not offer yet.

Everything here uses only public surfaces (``hf_pelrp.lrp`` and its ``ctx.maps()``, plus ordinary torch hooks on
the model's own modules); nothing reads the engine's internal leaf store or adapter. Each function's docstring
names the engine API that should replace it; the lead moves them into the engine, after which this module
shrinks to re-exports.

- :func:`positional_site` (and :func:`segment_module`) -- where a model's positional tensors enter: read off
  the adapter declaration (:func:`hf_pelrp.adapters.positional_site`), in the shape the position tests use.
- :func:`additive_position_gradient` -- the (modified) gradient at an additive position embedding, per hidden
  unit, for the reference-centred position map. Replace by ``LRPConfig(position_reference="mean")``.
- :func:`positional_leaves` -- plain-gradient leaves at the positional tensors (no LRP rule anywhere), for
  gradient x input and Integrated Gradients on positions. Replace by ``lrp(model, mode="gradient")``.
- :func:`rotary_split` -- prototype of the rotary rule variants (``"uniform"``: the paper's 1/2 split, which must
  reproduce the engine; ``"reference"``: the identity-reference split proposed in docs/positions.md). Replace
  by ``LRPConfig(rotary_split="uniform" | "reference")``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import adapter_for
from ..adapters import positional_site as engine_positional_site
from ..errors import UnsupportedModelError
from ..modules import find_module
from ..rules import rotation_inverse_gradient, scale_gradient

ROTARY = "rotary"
ADDITIVE = "additive"
ROTARY_SPLITS = ("uniform", "reference")


@dataclass(frozen=True)
class PositionalSite:
    """Where the positional information of a model enters (read off its adapter declaration).

    Attributes
    ----------
    kind
        ``"rotary"`` or ``"additive"``.
    module
        Additive: the position-embedding module, whose output ``[1 or B, T, H]`` is added to the token embedding.
    attention
        Rotary: the attention module of each layer, called with ``position_embeddings=(cos, sin)`` ``[B, T, d]``.
    projections
        Rotary, LLaMA layout (``q_proj`` / ``k_proj`` feeding the rotation directly): per layer, the
        ``(q_proj, k_proj)`` modules whose outputs are rotated (the rule prototype and
        scripts/position_diagnostics.py need them; empty for other layouts).
    head_dim
        Rotary: the size of one head (the rotated unit).
    attention_scaling
        Rotary: the factor of cos and sin (1 for the default RoPE); the identity rotation is ``(s, 0)``.
    """

    kind: str
    module: nn.Module | None = None
    attention: tuple[nn.Module, ...] = field(default_factory=tuple)
    projections: tuple[tuple[nn.Module, nn.Module], ...] = field(default_factory=tuple)
    head_dim: int = 0
    attention_scaling: float = 1.0

    @property
    def num_layers(self) -> int:
        return len(self.attention)


def positional_site(model: nn.Module) -> PositionalSite:
    """The positional tensors of a supported model, from its adapter's declaration
    (:func:`hf_pelrp.adapters.positional_site`); the position tests handle rotary (``cos, sin`` pairs) and
    additive positions and refuse the other kinds."""
    site = engine_positional_site(model)
    if site.kind == ROTARY and site.keyword == "position_embeddings" and tuple(site.names) == ("cos", "sin"):
        attention = site.attention
        plain = all(hasattr(a, "q_proj") and hasattr(a, "k_proj") for a in attention) and not any(
            hasattr(a, "q_norm") for a in attention
        )
        return PositionalSite(
            ROTARY,
            attention=attention,
            projections=tuple((a.q_proj, a.k_proj) for a in attention) if plain else (),
            head_dim=int(getattr(attention[0], "head_dim", 0)),
            attention_scaling=site.attention_scaling,
        )
    if site.kind == ADDITIVE and len(site.modules) == 1:
        return PositionalSite(ADDITIVE, module=site.modules[0])
    raise UnsupportedModelError(
        f"the position tests intervene on rotary (cos, sin) and additive position embeddings; model type "
        f"{model.config.model_type!r} has {site.kind!r} positions"
    )


def segment_module(model: nn.Module) -> nn.Module | None:
    """The token-type (segment) embedding module whose output is an addend of the input embedding, as the
    adapter declares it; ``None`` for models without one."""
    adapter = adapter_for(model)
    for path, names in adapter.embeddings.items():
        if tuple(names) == ("segment",):
            return find_module(adapter.base(model), path)
    return None


def _batched(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 and batch > 1 else t


def _hidden_batch(args: tuple, kwargs: dict) -> int:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    return hidden.shape[0]


@contextmanager
def additive_position_gradient(model: nn.Module) -> Iterator[Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    """Inside an ``hf_pelrp.lrp(model, positional=True)`` block of an additive model: yields ``read()``, which after
    the backward pass returns ``(p, g)``, the position embedding ``[B, T, H]`` and the (LRP-modified) gradient at
    it. ``(p * g).sum(-1)`` is the engine's position map; ``((p - p_mean) * g).sum(-1)`` the reference-centred one.

    Engine API that replaces it: ``LRPConfig(position_reference="mean")`` (see docs/positions.md).
    """
    site = positional_site(model)
    if site.kind != ADDITIVE:
        raise ValueError("additive_position_gradient needs an additive-position model")
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        seen["p"] = output  # the engine's leaf (its hook ran first)

    handle = site.module.register_forward_hook(hook)

    def read() -> tuple[torch.Tensor, torch.Tensor]:
        p = seen["p"]
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        return p.detach(), g

    try:
        yield read
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------- plain-gradient leaves
@contextmanager
def positional_leaves(
    model: nn.Module, make: Callable[[int, torch.Tensor, str], torch.Tensor] | None = None
) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Replace the positional tensors of every forward pass by tensors of one's own (plain autograd, no LRP).

    ``make(layer, value, name)`` returns the tensor to use instead of ``value`` (``name``: ``"cos"``, ``"sin"``
    or ``"position"``; ``layer``: the attention layer, 0 for an additive embedding); default: a fresh leaf
    with the same value. Yields ``{layer: [tensors]}`` of the latest forward pass. Used for gradient x input
    and Integrated Gradients at the positional tensors.

    Engine API that replaces it: ``lrp(model, mode="gradient")`` (every rule off, positions as leaves).
    """
    site = positional_site(model)
    made: dict[int, list[torch.Tensor]] = {}

    def default(_layer, value, _name):
        return value.detach().clone().requires_grad_(True)

    make = make or default
    handles = []
    if site.kind == ROTARY:

        def hook_for(layer: int):
            def hook(_module, args, kwargs):
                pe = kwargs.get("position_embeddings")
                if pe is None:
                    return None
                batch = _hidden_batch(args, kwargs)
                cos, sin = (
                    make(layer, _batched(t, batch), n) for t, n in zip(pe, ("cos", "sin"), strict=True)
                )
                made[layer] = [cos, sin]
                return args, {**kwargs, "position_embeddings": (cos, sin)}

            return hook

        handles = [
            a.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, a in enumerate(site.attention)
        ]
    else:

        def hook(_module, _args, output):
            made[0] = [make(0, output, "position")]
            return made[0][0]

        handles = [site.module.register_forward_hook(hook)]
    try:
        yield made
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------- rotary rule prototype
@contextmanager
def rotary_split(model: nn.Module, split: str) -> Iterator[Callable[[], torch.Tensor]]:
    """Prototype of the rotary rule variants; use inside ``hf_pelrp.lrp(model, mode, positional=False)``.

    With ``positional=False`` the engine applies the attention factors to the rotated q and k and treats cos and
    sin as constants; this context gives every layer its own rotary leaves and sets the rule at the rotation
    ``q_rot = q * cos + rotate_half(q) * sin`` (likewise k) by hooks on ``q_proj`` / ``k_proj`` and the attention's
    ``position_embeddings`` keyword. Yields ``read()``: after the backward pass, the position relevance per layer
    ``[B, L, T]`` (q and k sides, cos and sin, all heads).

    ``"uniform"`` (the paper, the engine's ``positional=True``): each product gives 1/2 to q and 1/2 to cos / sin,
    so ``R_q = R_pos = R_{q_rot} / 2`` element-wise.

    ``"reference"`` (identity-reference split): ``q_rot = q + (R_theta - I) q`` is split by the epsilon rule over
    its two addends, the content term (the rotation of the identity, i.e. position 0) and the positional term;
    the positional term's relevance goes to the angle: ``R_q = q . g``, ``R_pos = ((R_theta - I) q) . g`` with
    ``g`` the (modified) gradient at ``q_rot``; leaves ``cos - s`` and ``sin``. Conservative
    (``R_q + R_pos = q_rot . g``); a slot whose rotation is the identity (position 0, or removed) gets exactly 0.

    Engine API that replaces it: ``LRPConfig(rotary_split="uniform" | "reference")``.
    """
    if split not in ROTARY_SPLITS:
        raise ValueError(f"unknown rotary split {split!r}; choose one of {ROTARY_SPLITS}")
    site = positional_site(model)
    if site.kind != ROTARY or not site.projections:
        raise ValueError(
            "rotary_split (a prototype) needs a rotary model of the LLaMA layout (q_proj / k_proj rotated)"
        )
    scale = site.attention_scaling
    current: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    leaves: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    content_factor = 0.5 if split == "uniform" else 1.0
    leaf_factor = 0.5 if split == "uniform" else 1.0

    def attention_hook(layer: int):
        def hook(_module, args, kwargs):
            pe = kwargs.get("position_embeddings")
            if pe is None:
                return None
            batch = _hidden_batch(args, kwargs)
            cos, sin = (_batched(t, batch).detach() for t in pe)
            reference = torch.full_like(cos, scale) if split == "reference" else torch.zeros_like(cos)
            u = (cos - reference).clone().requires_grad_(True)  # the angle's deviation from the reference
            v = sin.clone().requires_grad_(True)
            leaves[layer] = (u, v)
            current[layer] = (cos, sin)
            # value exactly (cos, sin); gradient to the leaves, scaled by the rule's share
            cos_in = cos + (scale_gradient(u, leaf_factor) - u.detach())
            sin_in = sin + (scale_gradient(v, leaf_factor) - v.detach())
            return args, {**kwargs, "position_embeddings": (cos_in, sin_in)}

        return hook

    def projection_hook(layer: int):
        def hook(_module, _args, output):
            cos, sin = current[layer]
            if split == "reference":
                # the content path sees the identity rotation: q gets g instead of R^T g
                return rotation_inverse_gradient(output, cos, sin, site.head_dim, scale)
            return scale_gradient(output, content_factor)

        return hook

    handles = []
    for i, attention in enumerate(site.attention):
        handles.append(attention.register_forward_pre_hook(attention_hook(i), with_kwargs=True))
        for proj in site.projections[i]:
            handles.append(proj.register_forward_hook(projection_hook(i)))

    def read() -> torch.Tensor:
        rows = []
        for layer in range(site.num_layers):
            total = 0
            for leaf in leaves[layer]:
                if leaf.grad is not None:
                    total = total + (leaf.detach() * leaf.grad).sum(-1)
            if not torch.is_tensor(total):
                total = leaves[layer][0].new_zeros(leaves[layer][0].shape[:-1])
            rows.append(total.float())
        return torch.stack(rows, 1)

    try:
        yield read
    finally:
        for h in handles:
            h.remove()
