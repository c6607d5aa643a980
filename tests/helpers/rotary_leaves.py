"""An independent, hook-based read of each rotary leaf's relevance (cos vs sin, per layer), to check the
engine's own ``position_by_leaf`` map [B, L, 2, T] (tests/test_position_rules.py). Moved here from
``hf_pelrp.evaluation._engine_gaps``: it is a check of the engine, not something evaluation users run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from hf_pelrp.evaluation._engine_gaps import ROTARY, positional_site


@contextmanager
def rotary_leaf_relevance(model: nn.Module) -> Iterator[Callable[[], torch.Tensor]]:
    """Inside an ``hf_pelrp.lrp(model, positional=True)`` block: yields ``read()``, which after the backward pass
    returns the relevance of every rotary leaf, ``[B, L, 2, T]`` (index 0: cos, 1: sin), float32.

    A pre-hook on each attention layer, registered after the engine's own, sees the ``(cos, sin)`` leaves the
    engine made for that layer; ``leaf * leaf.grad`` summed over the head dimension is their relevance.
    Engine API that replaces it: ``Attribution.position_by_leaf`` (or ``ctx.maps(per_leaf=True)``).
    """
    site = positional_site(model)
    if site.kind != ROTARY:
        raise ValueError("rotary_leaf_relevance needs a rotary model")
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(layer: int):
        def hook(_module, _args, kwargs):
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                seen[layer] = pe

        return hook

    handles = [
        a.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, a in enumerate(site.attention)
    ]

    def read() -> torch.Tensor:
        if len(seen) != site.num_layers:
            raise RuntimeError("no forward pass ran inside rotary_leaf_relevance()")
        out = []
        for layer in range(site.num_layers):
            pair = []
            for leaf in seen[layer]:
                r = (
                    (leaf.detach() * leaf.grad).sum(-1)
                    if leaf.grad is not None
                    else leaf.new_zeros(leaf.shape[:-1])
                )
                pair.append(r.float())
            out.append(torch.stack(pair, 1))
        return torch.stack(out, 1)

    try:
        yield read
    finally:
        for h in handles:
            h.remove()
