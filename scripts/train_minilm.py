"""Fine-tune all-MiniLM-L6-v2 + a classification head on the movie-review sentences (binary sentiment).

Data: ``hf_pelrp.evaluation.data.sentiment_splits`` (|score| >= 1, fixed seed). Writes the checkpoint, its
tokenizer and ``metrics.json`` (test accuracy) to ``.cache/models/minilm-sentiment``.

Usage: ``nice -n 15 python scripts/train_minilm.py [--train-size 2000] [--epochs 1] [--seed 0]``
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from hf_pelrp.assets import minilm_dir
from hf_pelrp.evaluation import training
from hf_pelrp.evaluation.data import sentiment_splits

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out = ROOT / ".cache" / "models" / "minilm-sentiment"
    p = training.training_parser(__doc__, out, epochs=1.0, batch_size=16, lr=5e-5)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=64)
    args = p.parse_args()

    gen = training.set_determinism(args.seed, args.threads)
    splits = sentiment_splits()
    train, test = splits["train"][: args.train_size], splits["test"]
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)

    def batcher(sentences):
        return training.text_batches(tokenizer, sentences, args.max_length)

    y_train = torch.tensor([s.label for s in train])
    y_test = torch.tensor([s.label for s in test])
    with training.Timer() as t:
        losses = training.train_classifier(
            model,
            batcher(train),
            y_train,
            args.epochs,
            args.batch_size,
            args.lr,
            gen,
            desc="fine-tune MiniLM",
        )
    acc = training.accuracy(model, batcher(test), y_test, desc="test accuracy")
    print(f"test accuracy {acc:.4f} on {len(test)} held-out sentences ({t.seconds:.0f} s training)")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    model_name = "all-MiniLM-L6-v2 + classification head"
    training.save_metrics(
        args.out, training.run_metrics(model_name, acc, len(test), len(train), args, losses, t.seconds)
    )


if __name__ == "__main__":
    main()
