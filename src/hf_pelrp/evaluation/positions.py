"""Position flipping: remove the positional information of the slots a map ranks highest / lowest (method.md 4).

Token flipping replaces a token's content and leaves its position in place, so it cannot test a position map.
Here the content stays and the position goes:

- additive positions (learned, sinusoidal): the slot's position-embedding row is replaced by the mean row over
  the sequence's positions (``"mean"``), or by the row of its right-hand neighbour (the left-hand one for the
  last slot; ``"neighbour"``), through a forward hook on the position-embedding module;
- rotary positions: the slot gets the identity rotation ``(cos, sin) = (s, 0)`` -- the rotation of position 0 --
  in every layer (``"identity"``), or only in chosen layers (the per-layer variant, which tests
  ``position_by_layer``), through a pre-hook on each attention layer's ``position_embeddings``.

Also here: single-slot occlusion with the same removal (the expensive reference ranking) and the third
token-flip variant that deletes the token *and* its position (the rest is renumbered).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ._engine_gaps import ADDITIVE, ROTARY, PositionalSite, positional_site
from .metrics import area_under_curve, perturbation_order, removal_masks
from .samples import Sample, explained_logits

REMOVALS = {ROTARY: ("identity",), ADDITIVE: ("mean", "neighbour")}


def default_removal(site: PositionalSite) -> str:
    return REMOVALS[site.kind][0]


def check_removal(site: PositionalSite, how: str) -> None:
    if how not in REMOVALS[site.kind]:
        raise ValueError(f"{site.kind} positions are removed by one of {REMOVALS[site.kind]}, not {how!r}")


def neutral_additive(rows: torch.Tensor, how: str) -> torch.Tensor:
    """What replaces each position row ``[B, T, H]``: the mean row over the T positions, or the neighbour's row."""
    if how == "mean":
        return rows.mean(1, keepdim=True).expand_as(rows)
    t = rows.shape[1]
    idx = torch.arange(1, t + 1, device=rows.device)
    idx[-1] = max(t - 2, 0)
    return rows[:, idx]


def neutral_rotary(cos: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The identity rotation ``(s, 0)`` in the shape of ``cos``."""
    return torch.full_like(cos, scale), torch.zeros_like(cos)


@contextmanager
def removed_positions(
    model: nn.Module, masks: torch.Tensor, how: str, site: PositionalSite | None = None
) -> Iterator[None]:
    """Within the block, forward passes of ``B`` rows have the positional information of the marked slots removed.

    ``masks``: bool ``[B, T]`` (every layer) or, rotary only, ``[B, L, T]`` (per layer). Rows of the batch must
    be the perturbed copies of one sample (no padding).
    """
    site = site or positional_site(model)
    check_removal(site, how)
    handles = []
    if site.kind == ROTARY:
        per_layer = masks.dim() == 3
        if per_layer and masks.shape[1] != site.num_layers:
            raise ValueError(f"per-layer masks have {masks.shape[1]} layers, the model {site.num_layers}")

        def hook_for(layer: int):
            def hook(_module, args, kwargs):
                cos, sin = kwargs["position_embeddings"]
                m = (masks[:, layer] if per_layer else masks).to(cos.device)[..., None]
                cos = cos.expand(m.shape[0], *cos.shape[1:])
                sin = sin.expand(m.shape[0], *sin.shape[1:])
                ref_cos, ref_sin = neutral_rotary(cos, site.attention_scaling)
                pe = (torch.where(m, ref_cos, cos), torch.where(m, ref_sin, sin))
                return args, {**kwargs, "position_embeddings": pe}

            return hook

        handles = [
            a.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, a in enumerate(site.attention)
        ]
    else:
        if masks.dim() != 2:
            raise ValueError("per-layer position removal exists only for rotary positions")

        def hook(_module, _args, output):
            rows = output.expand(masks.shape[0], *output.shape[1:])
            m = masks.to(rows.device)[..., None]
            return torch.where(m, neutral_additive(rows, how), rows)

        handles = [site.module.register_forward_hook(hook)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _scores_with_removed(model, sample: Sample, target: int, masks: torch.Tensor, how: str, chunk: int):
    """Probability and logit of ``target`` for each removal mask (one forward per chunk of rows)."""
    probs, logits = [], []
    site = positional_site(model)
    for start in range(0, masks.shape[0], chunk):
        part = masks[start : start + chunk]
        batch = {k: v.expand(part.shape[0], *v.shape[1:]) for k, v in sample.inputs.items()}
        with removed_positions(model, part, how, site):
            out = explained_logits(model, sample, batch).float()
        probs.append(out.softmax(-1)[:, target].cpu())
        logits.append(out[:, target].cpu())
    return torch.cat(probs), torch.cat(logits)


def position_flip(
    model: nn.Module,
    sample: Sample,
    target: int,
    relevance: torch.Tensor,
    how: str,
    fracs: Sequence[float],
    prefix: str = "pos",
    chunk: int = 64,
) -> dict[str, object]:
    """The position-flip test of one sample: MoRF and LeRF curves of the explained probability and logit.

    ``relevance`` is a position map ``[T]`` (slots removed in every layer) or, for rotary models, a per-layer
    map ``[L, T]`` whose (layer, slot) cells are removed one by one. For each fraction f, ``round(f * n)`` of
    the ``n`` allowed units (slots, or cells) lose their positional information, most relevant first (MoRF,
    lower area is better) or least relevant first (LeRF, higher is better). Keys are prefixed with ``prefix``.
    """
    length = sample.length
    allowed = sample.allowed.bool()
    per_layer = relevance.dim() == 2
    if relevance.shape[-1] != length:
        raise ValueError(f"relevance has {relevance.shape[-1]} slots, the sample {length}")
    flat_allowed = allowed.expand_as(relevance).reshape(-1) if per_layer else allowed
    flat = relevance.reshape(-1)
    removed = {}
    for name, first in (("morf", True), ("lerf", False)):
        order = perturbation_order(flat, flat_allowed, most_relevant_first=first)
        removed[name] = removal_masks(order, flat.numel(), fracs)
    stacked = torch.cat(list(removed.values()))
    unique, inverse = torch.unique(stacked, dim=0, return_inverse=True)
    masks = unique.view(-1, *relevance.shape)
    probs, logits = _scores_with_removed(model, sample, target, masks, how, chunk)
    probs, logits = probs[inverse], logits[inverse]
    return _curves(prefix, list(fracs), probs, logits, list(removed))


def _curves(prefix: str, xs: list[float], probs, logits, names) -> dict[str, object]:
    result: dict[str, object] = {}
    for i, name in enumerate(names):
        rows = slice(i * len(xs), (i + 1) * len(xs))
        p, lg = probs[rows].tolist(), logits[rows].tolist()
        result[f"{prefix}_{name}_prob_curve"] = p
        result[f"{prefix}_{name}_logit_curve"] = lg
        result[f"{prefix}_{name}_prob_auc"] = area_under_curve(xs, p)
        result[f"{prefix}_{name}_logit_auc"] = area_under_curve(xs, lg)
    for unit in ("prob", "logit"):
        result[f"{prefix}_lerf_minus_morf_{unit}_auc"] = (
            result[f"{prefix}_lerf_{unit}_auc"] - result[f"{prefix}_morf_{unit}_auc"]
        )
    return result


@torch.no_grad()
def position_occlusion(
    model: nn.Module, sample: Sample, target: int, how: str, per_layer: bool = False, chunk: int = 64
) -> torch.Tensor:
    """Single-slot occlusion of positions: ``logit - logit(slot i's position removed)`` for every allowed slot
    (0 elsewhere); ``[T]``, or ``[L, T]`` per (layer, slot) cell with ``per_layer`` (rotary only).

    ``T`` (``L * T``) extra forward passes: the expensive reference ranking of the position-flip test, with the
    test's own removal (so it is the ranking that test favours at one removed unit).
    """
    site = positional_site(model)
    length = sample.length
    allowed = sample.allowed.bool()
    shape = (site.num_layers, length) if per_layer else (length,)
    cells = allowed.expand(shape).reshape(-1).nonzero().squeeze(1)
    numel = int(torch.tensor(shape).prod())
    masks = torch.zeros(cells.numel() + 1, numel, dtype=torch.bool)
    masks[torch.arange(1, cells.numel() + 1), cells] = True  # row 0: nothing removed
    _, logits = _scores_with_removed(model, sample, target, masks.view(-1, *shape), how, chunk)
    out = torch.zeros(numel)
    out[cells] = logits[0] - logits[1:]
    return out.view(shape)


# ---------------------------------------------------------------------------------- token and position together
def deletion_order_allowed(sample: Sample) -> torch.Tensor:
    """The units the delete-and-renumber test may delete: allowed tokens except the readout token (deleting
    the token a classifier or a next-token prediction reads out changes the question, not the evidence)."""
    allowed = sample.allowed.bool().clone()
    allowed[sample.readout] = False
    return allowed


@torch.no_grad()
def _logits_of_kept(model, sample: Sample, keep: torch.Tensor) -> torch.Tensor:
    """Explained logits [R, C] of each kept-token pattern (rows of ``keep`` with equal counts run as a batch)."""
    ids = sample.inputs["input_ids"]
    others = {k: v for k, v in sample.inputs.items() if k not in ("input_ids", "attention_mask")}
    if others:
        raise ValueError(f"delete-and-renumber does not know how to shorten inputs {sorted(others)}")
    out = [None] * keep.shape[0]
    for count in keep.sum(1).unique().tolist():
        rows = (keep.sum(1) == count).nonzero().squeeze(1)
        sel = ids[0].expand(rows.numel(), -1)[keep[rows].to(ids.device)].view(rows.numel(), count)
        batch = {"input_ids": sel, "attention_mask": torch.ones_like(sel)}
        shorter = Sample(sample.id, batch, torch.ones(count, dtype=torch.bool))
        if sample.position is not None:
            if sample.position != sample.length - 1:
                raise ValueError("delete-and-renumber explains the last position of a causal LM only")
            shorter.position = count - 1
        logits = explained_logits(model, shorter, batch).float().cpu()
        for r, lg in zip(rows.tolist(), logits, strict=True):
            out[r] = lg
    return torch.stack(out)


def token_position_flip(
    model: nn.Module, sample: Sample, target: int, relevance: torch.Tensor, fracs: Sequence[float]
) -> dict[str, object]:
    """The third token-flip variant: delete tokens (content and position), most / least relevant first, and
    renumber the rest (the model sees a shorter sequence). Keys ``tokpos_*``; ranked by ``relevance``
    (``token + position`` for PE-LRP maps). The readout token is never deleted."""
    allowed = deletion_order_allowed(sample)
    removed = {}
    for name, first in (("morf", True), ("lerf", False)):
        order = perturbation_order(relevance, allowed, most_relevant_first=first)
        removed[name] = removal_masks(order, sample.length, fracs)
    stacked = torch.cat(list(removed.values()))
    unique, inverse = torch.unique(stacked, dim=0, return_inverse=True)
    logits = _logits_of_kept(model, sample, ~unique)[inverse]
    return _curves("tokpos", list(fracs), logits.softmax(-1)[:, target], logits[:, target], list(removed))
