"""Train a small GPT-2 (learned absolute positions) with the real GPT-2 tokenizer on the movie-review
sentiment data, from scratch (no GPT-2 weights exist offline).

Writes the checkpoint, tokenizer and ``metrics.json`` (test accuracy) to ``.cache/models/gpt2-sentiment``.

Usage: ``nice -n 15 python scripts/train_gpt2.py [--epochs 4] [--seed 0]``
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2TokenizerFast

from hf_pelrp.assets import gpt2_tokenizer_files
from hf_pelrp.evaluation import training
from hf_pelrp.evaluation.data import sentiment_splits

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out = ROOT / ".cache" / "models" / "gpt2-sentiment"
    p = training.training_parser(__doc__, out, epochs=4.0, batch_size=32, lr=1e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    args = p.parse_args()

    gen = training.set_determinism(args.seed, args.threads)
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
        return training.text_batches(tokenizer, sentences, args.max_length)

    train, test = splits["train"], splits["test"]
    y_train = torch.tensor([s.label for s in train])
    with training.Timer() as t:
        losses = training.train_classifier(
            model, batcher(train), y_train, args.epochs, args.batch_size, args.lr, gen, desc="train GPT-2"
        )
    acc = training.accuracy(model, batcher(test), torch.tensor([s.label for s in test]), desc="test accuracy")
    val_acc = training.accuracy(
        model, batcher(splits["val"]), torch.tensor([s.label for s in splits["val"]]), desc="val"
    )
    print(f"test accuracy {acc:.4f} on {len(test)} held-out sentences, val {val_acc:.4f} ({t.seconds:.0f} s)")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    model_name = f"GPT-2 ({args.layers} layers, hidden {args.hidden}) trained from scratch, GPT-2 tokenizer"
    metrics = training.run_metrics(model_name, acc, len(test), len(train), args, losses, t.seconds)
    training.save_metrics(args.out, {**metrics, "val_accuracy": val_acc})


if __name__ == "__main__":
    main()
