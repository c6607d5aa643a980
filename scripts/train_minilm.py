"""Fine-tune all-MiniLM-L6-v2 + a classification head on the movie-review sentences (binary sentiment).

Data: ``hf_pelrp.evaluation.data.sentiment_splits`` (|score| >= 1, fixed seed). Writes the checkpoint, its
tokenizer and ``metrics.json`` (test accuracy) to ``.cache/models/minilm-sentiment``.

Usage: ``nice -n 15 python scripts/train_minilm.py [--train-size 2000] [--epochs 1] [--seed 0]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from hf_pelrp.assets import minilm_dir
from hf_pelrp.evaluation.data import sentiment_splits
from hf_pelrp.evaluation.training import Timer, accuracy, save_metrics, set_determinism, train_classifier

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / ".cache" / "models" / "minilm-sentiment")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    gen = set_determinism(args.seed, args.threads)
    splits = sentiment_splits()
    train, test = splits["train"][: args.train_size], splits["test"]
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)

    def batcher(sentences):
        def make(idx):
            texts = [sentences[i].text for i in idx]
            enc = tokenizer(
                texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt"
            )
            return dict(enc)

        return make

    y_train = torch.tensor([s.label for s in train])
    y_test = torch.tensor([s.label for s in test])
    with Timer() as t:
        losses = train_classifier(
            model,
            batcher(train),
            y_train,
            args.epochs,
            args.batch_size,
            args.lr,
            gen,
            desc="fine-tune MiniLM",
        )
    acc = accuracy(model, batcher(test), y_test, desc="test accuracy")
    print(f"test accuracy {acc:.4f} on {len(test)} held-out sentences ({t.seconds:.0f} s training)")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    save_metrics(
        args.out,
        {
            "model": "all-MiniLM-L6-v2 + classification head",
            "test_accuracy": acc,
            "test_size": len(test),
            "train_size": len(train),
            "epochs": args.epochs,
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "seed": args.seed,
            "train_seconds": round(t.seconds, 1),
        },
    )


if __name__ == "__main__":
    main()
