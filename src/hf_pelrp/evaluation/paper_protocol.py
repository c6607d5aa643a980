"""The PE-LRP paper's NLP perturbation protocol for causal LMs (its public code, ``flip_wiki`` / ``run_LRP``).

The explained token is the model's arg-max next token ``y`` at the last position, ``y0`` its original logit.
Tokens are replaced by the tokenizer's unknown token (``#`` where it has none) at the 11 fractions
``0, 0.1, ..., 1``; ``ceil(f * N)`` tokens move at fraction ``f`` (N perturbable tokens). Orders use the
*signed* relevance (the LLaMA next-token protocol; the paper's IMDB variant sorts one curve by ``|R|``).

- ``generate``: start from every token replaced and insert the most relevant first. Curves: probability of
  ``y`` (area: **generate AU-AC**, higher better), ``(y0 - y_logit)^2`` (area: **generate AU-MSE**, lower
  better), logit of ``y`` (area: **MERF**, "most relevant first", higher better).
- the same, inserting the *least* relevant first: logit of ``y`` (area: **LERF**, lower better).
- ``pruning``: start from the original and replace the least relevant first. Curves: probability of ``y``
  (area: **pruning AU-AC**, higher better) and ``(y0 - y_logit)^2`` (**pruning AU-MSE**, lower better).

The paper reports the area under the *mean* curve over samples (``sklearn.metrics.auc``); by linearity that is
the mean over samples of the per-sample areas reported here. Its code normalises each map by its maximum,
which changes no order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .metrics import area_under_curve, perturbation_order
from .samples import Sample, explained_logits

PAPER_FRACTIONS = [round(i / 10, 10) for i in range(11)]


def ceil_count(frac: float, n: int) -> int:
    """``ceil(frac * n)``, guarded against float artefacts (``0.3 * 10 = 3.0000000000000004`` must give 3)."""
    return int(math.ceil(frac * n - 1e-9))


def paper_replacement_id(tokenizer) -> int:
    """The paper's replacement token: the tokenizer's unknown token, else the single token ``#``."""
    if getattr(tokenizer, "unk_token_id", None) is not None:
        return int(tokenizer.unk_token_id)
    ids = tokenizer("#", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError("the tokenizer has no unknown token and '#' is not a single token")
    return ids[0]


def _first_k_masks(order: torch.Tensor, length: int, fracs: Sequence[float]) -> torch.Tensor:
    masks = torch.zeros(len(fracs), length, dtype=torch.bool)
    for i, f in enumerate(fracs):
        masks[i, order[: ceil_count(f, order.numel())]] = True
    return masks


@torch.no_grad()
def paper_flip(
    model: torch.nn.Module,
    sample: Sample,
    target: int,
    relevance: torch.Tensor,
    replacement_id: int,
    fracs: Sequence[float] = PAPER_FRACTIONS,
    chunk: int = 64,
) -> dict[str, object]:
    """The paper's generate / pruning curves of one sample and their areas (keys ``paper_*``)."""
    ids = sample.inputs["input_ids"]
    length = ids.shape[-1]
    allowed = sample.allowed.bool()
    most = perturbation_order(relevance, allowed, most_relevant_first=True)
    least = perturbation_order(relevance, allowed, most_relevant_first=False)
    kept = {
        # True = the original token is present
        "generate": _first_k_masks(most, length, fracs) | ~allowed,
        "generate_least": _first_k_masks(least, length, fracs) | ~allowed,
        "pruning": ~_first_k_masks(least, length, fracs),
    }
    stacked = torch.cat(list(kept.values()))
    unique, inverse = torch.unique(stacked, dim=0, return_inverse=True)
    batch_ids = torch.where(unique.to(ids.device), ids.expand(unique.shape[0], -1), replacement_id)
    rest = {k: v.expand(unique.shape[0], *v.shape[1:]) for k, v in sample.inputs.items() if k != "input_ids"}
    logits = []
    for start in range(0, unique.shape[0], chunk):
        part = {k: v[start : start + chunk] for k, v in {**rest, "input_ids": batch_ids}.items()}
        logits.append(explained_logits(model, sample, part).float().cpu())
    out = torch.cat(logits)[inverse]
    y0 = explained_logits(model, sample, sample.inputs).float().cpu()[0, target]
    xs = list(fracs)
    result: dict[str, object] = {}
    for i, name in enumerate(kept):
        rows = out[i * len(xs) : (i + 1) * len(xs)]
        prob = rows.softmax(-1)[:, target].tolist()
        logit = rows[:, target].tolist()
        mse = ((y0 - rows[:, target]) ** 2).tolist()
        result[f"paper_{name}_prob_curve"] = prob
        result[f"paper_{name}_logit_curve"] = logit
        result[f"paper_{name}_mse_curve"] = mse
    area = lambda key: area_under_curve(xs, result[key])  # noqa: E731
    result.update(
        paper_generate_au_ac=area("paper_generate_prob_curve"),
        paper_generate_au_mse=area("paper_generate_mse_curve"),
        paper_pruning_au_ac=area("paper_pruning_prob_curve"),
        paper_pruning_au_mse=area("paper_pruning_mse_curve"),
        paper_merf=area("paper_generate_logit_curve"),
        paper_lerf=area("paper_generate_least_logit_curve"),
    )
    return result
