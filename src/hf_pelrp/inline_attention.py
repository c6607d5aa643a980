"""The ``"lrp"`` attention's factors for attention written inline (no call of transformers' attention interface).

BLOOM, MPT, Falcon (ALiBi), DeBERTa and SwinV2 compute ``softmax(c q k^T + b + m) v`` inside their attention
modules, so the ``"lrp"`` attention implementation never runs for them. These hook rules give exactly the same
factors (method.md 1 and 2, "Positions inside attention"):

- :class:`QKVFactors`: per-channel gradient factors on a (fused) projection output: q and k ``1/4``, v ``1/2``
  (CP-LRP: 0, 0, 1), whatever the channel layout (:func:`qkv_roles`);
- :class:`BiasArgument`: a pre-hook replacing the module's bias argument by the same values backed by a per-layer,
  per-row leaf whose gradient gets the ``scores`` factor (1/2, CP-LRP 0), with the mask kept out of it;
- :class:`Recomputed`: where the bias cannot be given a batch axis through the module's arguments, the module's
  output re-computed explicitly with the factors (the forward value stays the module's own; the re-computation is
  checked to reproduce it);
- :class:`AttentionMaskCapture`: keeps the [B, T] attention mask of the forward pass (distance bins of the maps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .hooks import Handles, HookRule, LeafStore, check_reproduces
from .rules import scale_gradient, straight_through

Q, K, V = 0, 1, 2


def qkv_roles(layout: str, heads: int, head_dim: int, kv_heads: int | None = None) -> torch.Tensor:
    """The role (0 = q, 1 = k, 2 = v) of each output channel of a fused query-key-value projection.

    ``"interleaved"``: per head ``[q, k, v]`` (BLOOM, Falcon-RW: ``view(B, T, H, 3, D)``); ``"chunked"``:
    ``[q (H D), k (H D), v (H D)]`` (MPT: ``chunk(3)``); ``"multi_query"``: ``[q (H D), k (D), v (D)]``
    (Falcon ``multi_query``); ``"grouped"``: per key-value group ``[q (H / G heads), k, v]`` (Falcon's new
    decoder architecture: ``view(B, T, G, H / G + 2, D)``).
    """
    if layout == "interleaved":
        per_head = torch.tensor([Q, K, V]).repeat_interleave(head_dim)
        return per_head.repeat(heads)
    if layout == "chunked":
        return torch.tensor([Q, K, V]).repeat_interleave(heads * head_dim)
    if layout == "multi_query":
        return torch.cat(
            [torch.full((heads * head_dim,), Q), torch.full((head_dim,), K), torch.full((head_dim,), V)]
        )
    if layout == "grouped":
        groups = kv_heads or 1
        per_group = torch.cat(
            [
                torch.full((heads // groups * head_dim,), Q),
                torch.full((head_dim,), K),
                torch.full((head_dim,), V),
            ]
        )
        return per_group.repeat(groups)
    raise ValueError(f"unknown fused qkv layout {layout!r}")


@dataclass
class QKVFactors(HookRule):
    """Scale the output gradient of a (fused) q / k / v projection per channel: ``factors[roles[c]]``.

    AttnLRP: ``(1/4, 1/4, 1/2)`` (epsilon + uniform rule at ``Q K^T`` and ``A V``); CP-LRP: ``(0, 0, 1)``.
    ``roles`` (:func:`qkv_roles`) must have one entry per output channel; a projection of another width is
    refused (the declared layout does not describe it).
    """

    roles: torch.Tensor
    factors: tuple[float, float, float]

    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        table = torch.tensor(self.factors, dtype=torch.float64)

        def hook(_module, _args, output):
            if output.shape[-1] != self.roles.numel():
                from .errors import UnsupportedModelError

                raise UnsupportedModelError(
                    f"{type(_module).__name__} has {output.shape[-1]} output channels, but the declared q/k/v layout "
                    f"has {self.roles.numel()}: the adapter does not describe this attention."
                )
            if all(f == 1.0 for f in self.factors):
                return output
            factors = table[self.roles].to(device=output.device, dtype=output.dtype)
            return scale_gradient(output, factors)

        handles.append(module.register_forward_hook(hook))


@dataclass
class AttentionMaskCapture(HookRule):
    """Keep the [B, T] ``attention_mask`` the model is called with in ``store.aux["attention_mask"]`` (the
    distance bins of the bias maps count real tokens); a model called without one gets none (all tokens real)."""

    store: LeafStore

    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        def hook(_module, _args, kwargs):
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                self.store.aux["attention_mask"] = mask.detach()
            else:
                self.store.aux.pop("attention_mask", None)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))


@dataclass
class BiasArgument(HookRule):
    """Replace the attention module's bias argument ``argument`` by the same values backed by a leaf.

    ``replace(module, value, args, kwargs, store, layer)`` returns the new argument (e.g.
    :func:`hf_pelrp.positions.canonical_alibi` of the bias brought to [B, H, T, T], reshaped back to what the
    module expects). A module called without the argument is refused (the declaration does not describe it).
    """

    store: LeafStore
    layer: int
    argument: str
    replace: Callable[..., torch.Tensor]

    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        def hook(attention, args, kwargs):
            value = kwargs.get(self.argument)
            if not isinstance(value, torch.Tensor):
                from .errors import UnsupportedModelError

                raise UnsupportedModelError(
                    f"{type(attention).__name__} was called without a {self.argument}= tensor, which the adapter "
                    "makes the positional leaf: this model does not have the layout the adapter was written for."
                )
            kwargs = dict(kwargs)
            kwargs[self.argument] = self.replace(attention, value, args, kwargs, self.store, self.layer)
            return args, kwargs

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))


@dataclass
class Recomputed(HookRule):
    """The module's first output re-computed by ``compute(module, args, kwargs)`` with the LRP factors.

    The forward value stays the module's own (:func:`hf_pelrp.rules.straight_through`); the backward pass runs
    through the re-computation, which is checked to reproduce the output (a mismatch means the declaration does
    not describe the module and is refused). The attention is computed twice in the forward pass; only the
    re-computation is kept for the backward pass.
    """

    compute: Callable[[torch.nn.Module, tuple, dict[str, Any]], torch.Tensor]
    name: str = ""
    #: use the re-computation's own value as the output (for a re-computation that differs from the module only
    #: by a softmax-invariant shift chosen so that a padded row computes exactly what the row alone computes)
    own_value: bool = False

    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        def hook(mod, args, kwargs, output):
            first = output[0] if isinstance(output, tuple) else output
            with torch.enable_grad():
                surrogate = self.compute(mod, args, kwargs)
            check_reproduces(surrogate, first, self.name or type(mod).__name__, "explicit attention")
            surrogate = surrogate.to(first.dtype)
            value = surrogate if self.own_value else straight_through(first, surrogate)
            return (value, *output[1:]) if isinstance(output, tuple) else value

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
