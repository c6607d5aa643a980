"""Train a small GPT-2 (learned absolute positions) with the real GPT-2 tokenizer on the movie-review
sentiment data, from scratch (no GPT-2 weights exist offline).

Writes the checkpoint, tokenizer and ``metrics.json`` (test accuracy) to ``.cache/models/gpt2-sentiment``.

Usage: ``nice -n 15 python scripts/train_gpt2.py [--epochs 4] [--seed 0]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2TokenizerFast

from hf_pelrp.assets import gpt2_tokenizer_files
from hf_pelrp.evaluation.data import sentiment_splits
from hf_pelrp.evaluation.training import Timer, accuracy, save_metrics, set_determinism, train_classifier

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / ".cache" / "models" / "gpt2-sentiment")
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    gen = set_determinism(args.seed, args.threads)
    splits = sentiment_splits()
    files = gpt2_tokenizer_files()
    tokenizer = GPT2TokenizerFast(str(files.vocab), str(files.merges))
    tokenizer.pad_token = tokenizer.eos_token
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=args.max_length,
        n_embd=args.hidden,
        n_layer=args.layers,
        n_head=4,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    )
    model = GPT2ForSequenceClassification(config)

    def batcher(sentences):
        def make(idx):
            texts = [sentences[i].text for i in idx]
            enc = tokenizer(
                texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt"
            )
            return dict(enc)

        return make

    train, test = splits["train"], splits["test"]
    y_train = torch.tensor([s.label for s in train])
    with Timer() as t:
        losses = train_classifier(
            model, batcher(train), y_train, args.epochs, args.batch_size, args.lr, gen, desc="train GPT-2"
        )
    acc = accuracy(model, batcher(test), torch.tensor([s.label for s in test]), desc="test accuracy")
    val_acc = accuracy(
        model, batcher(splits["val"]), torch.tensor([s.label for s in splits["val"]]), desc="val"
    )
    print(f"test accuracy {acc:.4f} on {len(test)} held-out sentences, val {val_acc:.4f} ({t.seconds:.0f} s)")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    save_metrics(
        args.out,
        {
            "model": f"GPT-2 ({args.layers} layers, hidden {args.hidden}) trained from scratch, GPT-2 tokenizer",
            "test_accuracy": acc,
            "val_accuracy": val_acc,
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
