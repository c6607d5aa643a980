"""Small, deterministic training loops for the evaluation's models (used by ``scripts/train_*.py``).

Determinism: a fixed seed for the initialisation and for the shuffling generator, one thread by default,
no dropout randomness outside the seeded generator. Progress is shown with tqdm.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm


def set_determinism(seed: int, threads: int = 1) -> torch.Generator:
    """Seed torch, fix the thread count, and return the generator that shuffles the data."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


def _batches(n: int, batch_size: int, gen: torch.Generator | None) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return list(order.split(batch_size))


def train_classifier(
    model: torch.nn.Module,
    make_batch: Callable[[Sequence[int]], dict[str, torch.Tensor]],
    labels: torch.Tensor,
    epochs: float,
    batch_size: int,
    lr: float,
    gen: torch.Generator,
    weight_decay: float = 0.01,
    warmup: float = 0.06,
    desc: str = "train",
) -> list[float]:
    """AdamW with linear warm-up and decay, cross-entropy on ``labels``; returns the loss per step.

    ``epochs`` may be fractional (the last epoch is cut short).
    """
    n = len(labels)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, int(epochs * steps_per_epoch))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, int(warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    model.train()
    losses = []
    bar = tqdm(total=total, desc=desc)
    step = 0
    while step < total:
        for idx in _batches(n, batch_size, gen):
            if step >= total:
                break
            batch = make_batch(idx.tolist())
            logits = model(**batch).logits
            loss = torch.nn.functional.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    return losses


@torch.no_grad()
def accuracy(
    model: torch.nn.Module,
    make_batch: Callable[[Sequence[int]], dict[str, torch.Tensor]],
    labels: torch.Tensor,
    batch_size: int = 64,
    desc: str = "evaluate",
) -> float:
    """Share of ``labels`` predicted correctly (eval mode)."""
    model.eval()
    correct = 0
    for idx in tqdm(_batches(len(labels), batch_size, None), desc=desc):
        pred = model(**make_batch(idx.tolist())).logits.argmax(-1)
        correct += int((pred == labels[idx]).sum())
    return correct / len(labels)


def training_parser(
    doc: str, out: Path, *, epochs: float, batch_size: int, lr: float
) -> argparse.ArgumentParser:
    """The options every training script shares (output folder, schedule, seed, threads), with its defaults."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--epochs", type=float, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p


def run_metrics(
    model: str,
    accuracy: float,
    test_size: int,
    train_size: int,
    args,
    losses: Sequence[float],
    seconds: float,
) -> dict:
    """The ``metrics.json`` fields every training script writes (extend the dict for more)."""
    tail = list(losses[-50:])
    return {
        "model": model,
        "test_accuracy": accuracy,
        "test_size": test_size,
        "train_size": train_size,
        "epochs": args.epochs,
        "final_loss": sum(tail) / len(tail),
        "seed": args.seed,
        "train_seconds": round(seconds, 1),
    }


def text_batches(tokenizer, sentences: Sequence, max_length: int) -> Callable[[torch.Tensor], dict]:
    """Batch maker for :func:`train_classifier` / :func:`accuracy`: indices -> tokenized, padded
    ``sentences[i].text`` (truncated to ``max_length``)."""

    def make(idx: torch.Tensor) -> dict:
        texts = [sentences[i].text for i in idx]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return dict(enc)

    return make


def save_metrics(folder: Path, metrics: dict) -> None:
    """Write ``metrics.json`` (accuracy, data sizes, seed, wall time) next to the checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))


class Timer:
    def __enter__(self):
        self.start = time.time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.time() - self.start
