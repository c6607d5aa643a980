"""Train a small ViT on Fashion-MNIST (28x28 grey images, 7x7 patches by default, learned absolute positions).

Pixels are fed in [0, 1] (not standardised) so the black background is exactly 0: the ``pixel > 0`` object
masks of the segmentation-style test and the zero replacement both mean "background". Writes the checkpoint
and ``metrics.json`` (test accuracy) to ``.cache/models/vit-fashion-mnist``.

Usage: ``nice -n 15 python scripts/train_vit.py [--epochs 3] [--patch 7] [--seed 0]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import ViTConfig, ViTForImageClassification

from hf_pelrp.evaluation.data import fashion_mnist, image_tensor
from hf_pelrp.evaluation.training import Timer, accuracy, save_metrics, set_determinism, train_classifier

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / ".cache" / "models" / "vit-fashion-mnist")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--patch", type=int, default=7, help="patch size (28 must be a multiple of it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    gen = set_determinism(args.seed, args.threads)
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    x_train, x_test = image_tensor(x_train), image_tensor(x_test)
    config = ViTConfig(
        image_size=28,
        patch_size=args.patch,
        num_channels=1,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        intermediate_size=2 * args.hidden,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = ViTForImageClassification(config)

    def batcher(images):
        return lambda idx: {"pixel_values": images[idx]}

    with Timer() as t:
        losses = train_classifier(
            model, batcher(x_train), y_train, args.epochs, args.batch_size, args.lr, gen, desc="train ViT"
        )
    acc = accuracy(model, batcher(x_test), y_test, batch_size=500, desc="test accuracy")
    print(f"test accuracy {acc:.4f} on {len(y_test)} test images ({t.seconds:.0f} s training)")
    model.save_pretrained(args.out)
    save_metrics(
        args.out,
        {
            "model": f"ViT ({args.layers} layers, hidden {args.hidden}, {args.patch}x{args.patch} patches) trained from scratch",
            "test_accuracy": acc,
            "test_size": len(y_test),
            "train_size": len(y_train),
            "epochs": args.epochs,
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "seed": args.seed,
            "train_seconds": round(t.seconds, 1),
        },
    )


if __name__ == "__main__":
    main()
