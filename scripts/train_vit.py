"""Train a small ViT on Fashion-MNIST (28x28 grey images, 7x7 patches by default, learned absolute positions).

Pixels are fed in [0, 1] (not standardised) so the black background is exactly 0: the ``pixel > 0`` object
masks of the segmentation-style test and the zero replacement both mean "background". Writes the checkpoint
and ``metrics.json`` (test accuracy) to ``.cache/models/vit-fashion-mnist``.

Usage: ``nice -n 15 python scripts/train_vit.py [--epochs 3] [--patch 7] [--seed 0]``
"""

from __future__ import annotations

from pathlib import Path

from transformers import ViTConfig, ViTForImageClassification

from hf_pelrp.evaluation import training
from hf_pelrp.evaluation.data import fashion_mnist, image_tensor

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out = ROOT / ".cache" / "models" / "vit-fashion-mnist"
    p = training.training_parser(__doc__, out, epochs=3.0, batch_size=128, lr=2e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--patch", type=int, default=7, help="patch size (28 must be a multiple of it)")
    args = p.parse_args()

    gen = training.set_determinism(args.seed, args.threads)
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

    with training.Timer() as t:
        losses = training.train_classifier(
            model, batcher(x_train), y_train, args.epochs, args.batch_size, args.lr, gen, desc="train ViT"
        )
    acc = training.accuracy(model, batcher(x_test), y_test, batch_size=500, desc="test accuracy")
    print(f"test accuracy {acc:.4f} on {len(y_test)} test images ({t.seconds:.0f} s training)")
    model.save_pretrained(args.out)
    model_name = f"ViT ({args.layers} layers, hidden {args.hidden}, {args.patch}x{args.patch} patches) trained from scratch"
    metrics = training.run_metrics(model_name, acc, len(y_test), len(y_train), args, losses, t.seconds)
    training.save_metrics(args.out, metrics)


if __name__ == "__main__":
    main()
