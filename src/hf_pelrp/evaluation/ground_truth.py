"""Tasks whose label depends on known positions, and the metrics that check a map against those positions.

Every sequence is ``[CLS] x_1 ... x_n [END]`` over a small vocabulary (``PAD = 0``, ``CLS = 1``, ``END = 2``,
content symbols from 3): encoders read the label at ``CLS``, decoders at ``END``, the same sequences for every
position kind. The ground truth is the set of sequence indices the label depends on:

- ``token_at_k``: the label is the symbol at content slot ``k`` (``num_symbols`` classes); ground truth {k}.
- ``pair_equal``: the label is whether the symbols at content slots ``i`` and ``j`` are equal (half of the
  sequences are made equal); ground truth {i, j}.
- ``order_ab``: the content holds one ``A`` and one ``B`` at random slots among filler symbols; the label is
  whether ``A`` comes first; ground truth {pos(A), pos(B)}. Here the *positions* carry the answer: the symbols
  are the same in every sequence.

Metrics for one map over the allowed (content) units: hit rate of the top-|GT| units, the mean normalised rank
of the ground-truth units (0 = ranked first, 1 = last), and the share of the positive relevance on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, CLS, END = 0, 1, 2
FIRST_SYMBOL = 3
TASKS = ("token_at_k", "pair_equal", "order_ab")


@dataclass(frozen=True)
class PositionalTask:
    """A synthetic task: ``kind`` (one of :data:`TASKS`), ``length`` content slots, ``num_symbols`` symbols,
    and the slots it reads (``k`` for ``token_at_k``, ``(i, j)`` for ``pair_equal``; content indices from 0)."""

    kind: str
    length: int = 10
    num_symbols: int = 8
    k: int = 3
    pair: tuple[int, int] = (2, 6)

    def __post_init__(self) -> None:
        if self.kind not in TASKS:
            raise ValueError(f"unknown positional task {self.kind!r}; choose one of {TASKS}")

    @property
    def vocab_size(self) -> int:
        return FIRST_SYMBOL + self.num_symbols

    @property
    def num_labels(self) -> int:
        return self.num_symbols if self.kind == "token_at_k" else 2

    @property
    def sequence_length(self) -> int:
        return self.length + 2

    def generate(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        """``n`` sequences ``[n, length + 2]``, labels ``[n]`` and the ground-truth sequence indices of each."""
        gen = torch.Generator().manual_seed(seed)
        content = torch.randint(0, self.num_symbols, (n, self.length), generator=gen)
        truth: list[list[int]] = []
        if self.kind == "token_at_k":
            labels = content[:, self.k].clone()
            truth = [[self.k + 1]] * n
        elif self.kind == "pair_equal":
            i, j = self.pair
            equal = torch.rand(n, generator=gen) < 0.5
            content[equal, j] = content[equal, i]
            labels = (content[:, i] == content[:, j]).long()
            truth = [[i + 1, j + 1]] * n
        else:
            a, b = 0, 1  # symbols A and B; fillers are the others
            content = torch.randint(2, self.num_symbols, (n, self.length), generator=gen)
            labels = torch.zeros(n, dtype=torch.long)
            for r in range(n):
                pa, pb = torch.randperm(self.length, generator=gen)[:2].tolist()
                content[r, pa], content[r, pb] = a, b
                labels[r] = int(pa < pb)
                truth.append(sorted([pa + 1, pb + 1]))
        ids = torch.cat(
            [torch.full((n, 1), CLS), content + FIRST_SYMBOL, torch.full((n, 1), END)], dim=1
        ).long()
        return ids, labels, truth


def ground_truth_scores(relevance: torch.Tensor, truth: list[int], allowed: torch.Tensor) -> dict[str, float]:
    """``hit`` (share of the top-|GT| allowed units that are ground truth), ``rank`` (mean normalised rank of the
    ground-truth units among the allowed ones, 0 = first), ``mass`` (share of the positive relevance of the
    allowed units that lies on the ground truth; 0 for a map without positive relevance)."""
    allowed = allowed.bool()
    idx = allowed.nonzero().squeeze(1)
    values = relevance.double()[idx]
    order = torch.sort(-values, stable=True).indices
    ranked = idx[order].tolist()
    truth = list(truth)
    k = len(truth)
    if k == 0 or not set(truth) <= set(idx.tolist()):
        raise ValueError(f"ground truth {truth} must be non-empty allowed units")
    hit = len(set(ranked[:k]) & set(truth)) / k
    n = len(ranked)
    rank = sum(ranked.index(t) for t in truth) / k / max(n - 1, 1)
    positive = values.clamp(min=0)
    total = float(positive.sum())
    where = {unit: n for n, unit in enumerate(idx.tolist())}
    on_truth = float(sum(positive[where[t]] for t in truth))
    return {"hit": hit, "rank": rank, "mass": on_truth / total if total > 0 else 0.0}
