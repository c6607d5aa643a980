"""Offset flipping: is ``position_by_offset`` right? (method.md 2 "Relevance per offset", issue 21).

One frame for every method: gate the position part of every attention score per offset ``d = i - j``,

    s_ij = c_ij + alpha_d * p_ij         (rotary: p = s - c with c the identity-rotation score; ALiBi: p = bias)

in every layer at once. ``alpha = 1`` is the model; ``alpha_d = 0`` removes the positional signal of exactly the
pairs at offset ``d`` (identity rotation, or zero bias, for those pairs). Then

- offset flipping removes the offsets a map ranks first (MoRF, lower area better) or last (LeRF, higher area
  better), one offset at a time, and records the explained logit;
- occlusion of an offset is ``f(alpha = 1) - f(alpha_d = 0)``;
- Integrated Gradients on the same quantity integrates ``df / dalpha`` from ``alpha = 0`` (no positional signal
  at any offset) to ``alpha = 1`` (midpoint rule);
- gradient x input of the gates at ``alpha = 1`` (``offset_gxi``: the plain-gradient counterpart of the offset
  map, ``sum_{i - j = d} p_ij df/ds_ij``);
- random orders the offsets at random.

The offset map is ranked signed (``offset_map``: ``position_by_offset`` summed over layers and heads) and by its
absolute values per layer and head (``offset_map_abs``: ``sum_{l,h} |R_p|``, no cancellation between layers).

Offset 0 is never a unit: its rotation is the identity and its ALiBi bias 0, so ``p = 0`` there.

Gating needs the scores written out: rotary models run, inside :func:`gated_offsets`, an eager attention
(registered once with transformers under :data:`GATED`, a name of its own) that re-computes the content part with
:func:`hf_pelrp.offsets.unrotate`; BLOOM gets its ``alibi`` argument replaced by the gated pairwise bias.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

import hf_pelrp

from ..adapters import adapter_for
from ..offsets import unrotate
from ..positions import AttentionBias, Rotary
from .metrics import area_under_curve, mean_confidence_interval

#: the attention implementation name of the gated eager attention (registered on first use)
GATED = "hf_pelrp_offset_gate"
METHODS = ("offset_map", "offset_map_abs", "offset_gxi", "offset_ig", "offset_occlusion", "random")


@dataclass
class _Gate:
    alpha: torch.Tensor  # [N, D]: one gate per row and offset
    layout: str = "half"
    rotated: str = "first"
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


_GATES: dict[int, _Gate] = {}


def _offset_index(tq: int, tk: int, device) -> torch.Tensor:
    """``max(i - j, 0)`` for queries ``i`` (the last ``tq`` keys) and keys ``j``: [tq, tk]."""
    rows = torch.arange(tk - tq, tk, device=device)[:, None]
    return (rows - torch.arange(tk, device=device)[None, :]).clamp(min=0)


def _gated_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw
):
    """Eager attention with the position part of each score gated per offset (forward of :func:`gated_offsets`)."""
    gate = _GATES[id(module)]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = scaling * (query @ key.transpose(-1, -2))
    content = scaling * (
        unrotate(query, gate.cos, gate.sin, gate.layout, gate.rotated)
        @ unrotate(key, gate.cos, gate.sin, gate.layout, gate.rotated).transpose(-1, -2)
    )
    tq, tk = scores.shape[-2:]
    alpha = gate.alpha[:, _offset_index(tq, tk, scores.device)][:, None].to(scores.dtype)  # [N, 1, Tq, Tk]
    scores = content + alpha * (scores - content)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is None:
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).tril(tk - tq)
    else:
        allowed = attention_mask[..., :tk]
    if allowed.dtype == torch.bool:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    else:
        scores = scores + allowed
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return (probs @ value).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if GATED not in AttentionInterface._global_mapping:
        AttentionInterface.register(GATED, _gated_attention)
        AttentionMaskInterface.register(GATED, sdpa_mask)


def _swapped_configs(model: nn.Module) -> list[tuple[dict, PretrainedConfig]]:
    """Point every config of this instance at the gated attention (copies, so other models are untouched)."""
    copies: dict[int, PretrainedConfig] = {}
    undo = []
    for module in model.modules():
        cfg = module.__dict__.get("config")
        if isinstance(cfg, PretrainedConfig):
            if id(cfg) not in copies:
                copies[id(cfg)] = copy.copy(cfg)
                copies[id(cfg)]._attn_implementation_internal = GATED
            undo.append((module.__dict__, cfg))
            module.__dict__["config"] = copies[id(cfg)]
    return undo


def offset_kind(model: nn.Module) -> str:
    """``"rotary"`` or ``"alibi"`` (BLOOM); other models are refused with the reason."""
    adapter = adapter_for(model)
    if (
        isinstance(adapter.positions, Rotary)
        and adapter.positions.offsets_refusal(adapter.attention_interface) is None
    ):
        return "rotary"
    if isinstance(adapter.positions, AttentionBias) and model.config.model_type == "bloom":
        return "alibi"
    raise ValueError(
        f"offset flipping gates rotary attention or BLOOM's ALiBi; {model.config.model_type} is neither"
    )


@contextmanager
def gated_offsets(model: nn.Module, alpha: torch.Tensor) -> Iterator[None]:
    """Within the block, a forward pass of ``N`` rows gates the position part of every score at offset ``d`` by
    ``alpha[n, d]`` ([N, D], ``D >= T``; ``alpha`` may require grad). The model is restored on exit."""
    kind = offset_kind(model)
    adapter = adapter_for(model)
    attention = adapter.attention_modules(model)
    handles, undo = [], []
    try:
        if kind == "rotary":
            _register()
            positions = adapter.positions

            def capture(module, args, kwargs):
                cos, sin = kwargs[positions.keyword]
                if positions.names[0] != "cos":
                    cos, sin = sin, cos
                _GATES[id(module)] = _Gate(alpha, positions.layout, positions.rotated, cos, sin)

            for module in attention:
                handles.append(module.register_forward_pre_hook(capture, with_kwargs=True))
            undo = _swapped_configs(model)
        else:

            def gate_alibi(module, args, kwargs):
                alibi = kwargs["alibi"]  # [N * H, 1, T]: m_h pos_j
                heads, length = module.num_heads, alibi.shape[-1]
                rows = alibi.view(-1, heads, 1, length)
                pairwise = rows - rows.transpose(-1, -2)  # m_h (pos_j - pos_i): the canonical bias
                gates = alpha[:, _offset_index(length, length, alibi.device)][:, None].to(alibi.dtype)
                full = (gates * pairwise).reshape(-1, length, length)
                return args, {**kwargs, "alibi": full}

            for module in attention:
                handles.append(module.register_forward_pre_hook(gate_alibi, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for where, cfg in undo:
            where["config"] = cfg
        for module in attention:
            _GATES.pop(id(module), None)


@dataclass
class OffsetSample:
    """One explained logit: ``input_ids`` [1, T], the position whose logit is explained (causal LMs; ``None`` for
    a sequence classifier) and the target id."""

    input_ids: torch.Tensor
    position: int | None
    target: int


def gated_logits(
    model: nn.Module, sample: OffsetSample, alpha: torch.Tensor, chunk: int = 32
) -> torch.Tensor:
    """The explained logit for each row of gates ``alpha`` [N, D]: [N] (differentiable in ``alpha``)."""
    out = []
    for start in range(0, alpha.shape[0], chunk):
        part = alpha[start : start + chunk]
        ids = sample.input_ids.expand(part.shape[0], -1)
        with gated_offsets(model, part):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        if sample.position is not None:
            logits = logits[:, sample.position]
        out.append(logits[:, sample.target].float())
    return torch.cat(out)


def offset_map(
    model: nn.Module, sample: OffsetSample, mode: str = "attnlrp"
) -> tuple[torch.Tensor, torch.Tensor]:
    """PE-LRP's ``position_by_offset`` summed over layers and heads, and ``sum_{l,h} |R_p|``: [T] each."""
    attr = hf_pelrp.attribute(
        model,
        sample.input_ids,
        target=torch.tensor([sample.target]),
        position=None if sample.position is None else torch.tensor([sample.position]),
        config=hf_pelrp.LRPConfig(mode=mode, offsets=True),
    )
    by_head = attr.position_by_offset_by_head[0].float()
    return by_head.sum((0, 1)), by_head.abs().sum((0, 1))


def offset_gxi(model: nn.Module, sample: OffsetSample) -> torch.Tensor:
    """Gradient x input of the gates at ``alpha = 1``: [T]."""
    alpha = torch.ones(1, sample.input_ids.shape[-1], requires_grad=True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(gated_logits(model, sample, alpha).sum(), alpha)
    return grad[0]


def offset_ig(model: nn.Module, sample: OffsetSample, steps: int = 16) -> tuple[torch.Tensor, float]:
    """Integrated Gradients over the gates from ``alpha = 0`` to ``1`` (midpoint rule): [T], and the completeness
    error ``|sum IG - (f(1) - f(0))|``."""
    length = sample.input_ids.shape[-1]
    t = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    alpha = t[:, None].expand(steps, length).clone().requires_grad_(True)
    with torch.enable_grad():  # autograd.grad: the gradient of the gates only, never into the parameters
        (grad,) = torch.autograd.grad(gated_logits(model, sample, alpha).sum(), alpha)
    ig = grad.mean(0)
    with torch.no_grad():
        ends = gated_logits(model, sample, torch.stack([torch.zeros(length), torch.ones(length)]))
    return ig, float((ig.sum() - (ends[1] - ends[0])).abs())


@torch.no_grad()
def offset_occlusion(model: nn.Module, sample: OffsetSample) -> torch.Tensor:
    """``f(alpha = 1) - f(alpha_d = 0)`` for every offset ``d``: [T]."""
    length = sample.input_ids.shape[-1]
    alpha = torch.ones(length + 1, length)
    alpha[torch.arange(1, length + 1), torch.arange(length)] = 0.0
    logits = gated_logits(model, sample, alpha)
    return logits[0] - logits[1:]


@torch.no_grad()
def offset_flip(
    model: nn.Module, sample: OffsetSample, ranking: torch.Tensor
) -> dict[str, list[float] | float]:
    """MoRF and LeRF logit curves: offsets ``1 .. T - 1`` removed one at a time in the order of ``ranking`` [T]
    (highest first for MoRF, lowest first for LeRF); x = share of those offsets removed."""
    length = sample.input_ids.shape[-1]
    units = torch.arange(1, length)
    values = ranking[1:].double()
    rows, curves = [], {}
    for sign in (-1.0, 1.0):  # MoRF, then LeRF
        order = units[torch.sort(sign * values, stable=True).indices]
        alpha = torch.ones(length, length)  # row k: the first k offsets of the order removed
        for k in range(1, length):
            alpha[k:, order[k - 1]] = 0.0
        rows.append(alpha)
    logits = gated_logits(model, sample, torch.cat(rows))
    xs = [k / (length - 1) for k in range(length)]
    for i, name in enumerate(("morf", "lerf")):
        curve = logits[i * length : (i + 1) * length].tolist()
        curves[f"{name}_curve"] = curve
        curves[f"{name}_auc"] = area_under_curve(xs, curve)
    curves["lerf_minus_morf"] = curves["lerf_auc"] - curves["morf_auc"]
    return curves


def evaluate_sample(
    model: nn.Module,
    sample: OffsetSample,
    ig_steps: int = 16,
    seed: int = 0,
    random_orders: int = 4,
    methods: Sequence[str] = METHODS,
) -> dict[str, object]:
    """The rankings and flipping curves of ``methods`` for one sample (plus IG's completeness error)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown offset-flipping methods {unknown}; known: {METHODS}")
    length = sample.input_ids.shape[-1]
    rankings: dict[str, torch.Tensor] = {}
    result: dict[str, object] = {"length": length}
    if {"offset_map", "offset_map_abs"} & set(methods):
        signed, absolute = offset_map(model, sample)
        rankings.update({"offset_map": signed, "offset_map_abs": absolute})
    if "offset_gxi" in methods:
        rankings["offset_gxi"] = offset_gxi(model, sample)
    if "offset_ig" in methods:
        rankings["offset_ig"], result["ig_completeness_error"] = offset_ig(model, sample, ig_steps)
    if "offset_occlusion" in methods:
        rankings["offset_occlusion"] = offset_occlusion(model, sample)
    for name, ranking in rankings.items():
        if name in methods:
            result[name] = {"ranking": ranking.tolist(), **offset_flip(model, sample, ranking)}
    if "random" in methods:
        gen = random.Random(seed)
        draws = []
        for _ in range(random_orders):
            perm = list(range(length))
            gen.shuffle(perm)
            draws.append(offset_flip(model, sample, torch.tensor(perm, dtype=torch.float32)))
        result["random"] = {
            key: sum(d[key] for d in draws) / len(draws)
            for key in ("morf_auc", "lerf_auc", "lerf_minus_morf")
        }
    return result


def summarise(results: Sequence[dict[str, object]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and 95% Student-t half-width over samples: each method's MoRF / LeRF areas and LeRF - MoRF, and the
    paired differences of the offset map's LeRF - MoRF against every other method."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    present = [m for m in METHODS if all(m in r for r in results)]
    for method in present:
        out[method] = {
            key: mean_confidence_interval([r[method][key] for r in results])
            for key in ("morf_auc", "lerf_auc", "lerf_minus_morf")
        }
    for other in present[1:] if present and present[0] == "offset_map" else []:
        diffs = [r["offset_map"]["lerf_minus_morf"] - r[other]["lerf_minus_morf"] for r in results]
        out["offset_map"][f"minus_{other}"] = mean_confidence_interval(diffs)
    errors = [r["ig_completeness_error"] for r in results if "ig_completeness_error" in r]
    if errors:
        out["ig_completeness_error"] = {"max": (max(errors), math.nan)}
    return out


def run(
    model: nn.Module,
    samples: Sequence[OffsetSample],
    ig_steps: int = 16,
    random_orders: int = 2,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, object]]:
    """:func:`evaluate_sample` for every sample (seeded per sample)."""
    results = []
    for i, sample in enumerate(samples):
        results.append(evaluate_sample(model, sample, ig_steps, seed=i, random_orders=random_orders))
        if progress is not None:
            progress(i)
    return results
