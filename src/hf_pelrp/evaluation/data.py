"""The evaluation data sets, read from the git-ignored cache that ``scripts/prepare_data.py`` fills.

Splits are made here, once, with a fixed seed, so the training scripts and the evaluation see the same
held-out sentences / images.
"""

from __future__ import annotations

import gzip
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
DATA_DIR = ROOT / ".cache" / "data"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_PREPARE = "run `python scripts/prepare_data.py` first"


@dataclass(frozen=True)
class Sentence:
    """One rated movie-review sentence; ``label`` is 1 for positive, 0 for negative."""

    id: int
    score: float
    text: str

    @property
    def label(self) -> int:
        return int(self.score > 0)


def movie_reviews(path: Path | None = None) -> list[Sentence]:
    """All 10,605 Rotten-Tomatoes sentences with their mean human rating (-4..4)."""
    path = path or DATA_DIR / "movie_reviews.tsv"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {_PREPARE}")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        idx, score, text = line.split("\t", 2)
        out.append(Sentence(int(idx), float(score), text))
    return out


def sentiment_splits(
    min_abs_score: float = 1.0, seed: int = 0, test_size: int = 1000, val_size: int = 500
) -> dict[str, list[Sentence]]:
    """Binary sentiment splits: sentences with ``|score| >= min_abs_score``, shuffled with ``seed``, cut into
    ``test`` (first ``test_size``), ``val`` (next ``val_size``) and ``train`` (the rest)."""
    kept = [s for s in movie_reviews() if abs(s.score) >= min_abs_score]
    random.Random(seed).shuffle(kept)
    return {
        "test": kept[:test_size],
        "val": kept[test_size : test_size + val_size],
        "train": kept[test_size + val_size :],
    }


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    _zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if dtype != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8)
    return data.reshape(dims)


def fashion_mnist(split: str, folder: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images [N, 28, 28] uint8 and labels [N] (split ``"train"`` or ``"test"``)."""
    folder = folder or FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    files = {}
    for kind in ("images", "labels"):
        kind_tag = "images-idx3" if kind == "images" else "labels-idx1"
        found = sorted(folder.glob(f"{prefix}-{kind_tag}-ubyte*")) if folder.exists() else []
        if not found:
            raise FileNotFoundError(f"Fashion-MNIST {split} {kind} not found in {folder}: {_PREPARE}")
        files[kind] = found[0]
    return _read_idx(files["images"]), _read_idx(files["labels"]).long()


def image_tensor(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28] in [0, 1]. Not standardised on purpose: the background stays
    exactly 0, so ``zero`` replacement and the zero baseline of Integrated Gradients mean "black"."""
    return images.float().div(255.0)[:, None]
