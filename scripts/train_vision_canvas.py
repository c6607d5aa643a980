"""Train the two models of the vision-rules evaluation (issue 20) on Fashion-MNIST garments placed on a canvas.

- ``--arch vit`` (default): a ViT on 56x56 black canvases, 7x7 patches (the task of issue 20);
- ``--arch deit``: a DeiT with its distillation token (``DeiTForImageClassificationWithTeacher``) on 40x40
  canvases of uniform noise, 8x8 patches. No teacher exists offline: both heads (CLS and distillation token)
  are trained on the true labels, so the distillation token is a second learned readout, as in DeiT without
  its teacher; the model's logits are the mean of the two heads, as DeiT computes them.

Placements come from :mod:`hf_pelrp.evaluation.canvas` (seeded per image, the training split with seed
``--seed + 1``, so the test canvases of the evaluation are never seen). Pixels are in [0, 1]. Writes the
checkpoint and ``metrics.json`` to ``.cache/models/vit-fashion-canvas`` / ``deit-fashion-noise``. On one CPU
thread of a shared 2-core machine: about 30 minutes (ViT) and 10 minutes (DeiT):
``nice -n 15 python scripts/train_vision_canvas.py --arch vit``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
)

from hf_pelrp.evaluation import training
from hf_pelrp.evaluation.canvas import CanvasLayout, place_on_canvas
from hf_pelrp.evaluation.data import fashion_mnist

ROOT = Path(__file__).resolve().parents[1]

#: per architecture: layout, patch size, default output folder, and the schedule the checkpoints were trained
#: with (training images, epochs, batch size, learning rate; DeiT at 2e-3 stalled at chance on the noisy canvas)
ARCHS = {
    "vit": (CanvasLayout(canvas=56, background="black"), 7, "vit-fashion-canvas", (60000, 3.0, 64, 2e-3)),
    "deit": (
        CanvasLayout(canvas=40, background="noise", noise=0.3),
        8,
        "deit-fashion-noise",
        (60000, 2.0, 64, 1e-3),
    ),
}


def build_model(arch: str, hidden: int, layers: int) -> torch.nn.Module:
    layout, patch = ARCHS[arch][:2]
    kwargs = dict(
        image_size=layout.canvas,
        patch_size=patch,
        num_channels=1,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if arch == "vit":
        return ViTForImageClassification(ViTConfig(**kwargs))
    return DeiTForImageClassificationWithTeacher(DeiTConfig(**kwargs))


class _TwoHeads(torch.nn.Module):
    """Training view of DeiT without a teacher: the loss of both heads (mean of their cross-entropies) by
    returning their logits stacked along the batch axis (labels: :class:`_Twice`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        out = self.model(pixel_values=pixel_values)
        both = torch.cat([out.cls_logits, out.distillation_logits], 0)
        return type("Out", (), {"logits": both})()


class _Twice:
    """Labels indexed twice over (``[y[idx], y[idx]]``), matching :class:`_TwoHeads`' stacked logits."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx) -> torch.Tensor:
        return torch.cat([self.labels[idx], self.labels[idx]])


def main() -> None:
    p = training.training_parser(__doc__, ROOT / ".cache" / "models", epochs=0.0, batch_size=0, lr=0.0)
    p.add_argument("--arch", choices=sorted(ARCHS), default="vit")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--train-size", type=int, default=0, help="training images (of 60,000)")
    args = p.parse_args()
    layout, patch, folder, schedule = ARCHS[args.arch]
    # 0 = the architecture's own schedule (ARCHS)
    for name, default in zip(("train_size", "epochs", "batch_size", "lr"), schedule, strict=True):
        if not getattr(args, name):
            setattr(args, name, default)
    out = args.out / folder if args.out == ROOT / ".cache" / "models" else args.out

    gen = training.set_determinism(args.seed, args.threads)
    images, labels = fashion_mnist("train")
    images, labels = images[: args.train_size], labels[: args.train_size]
    test_images, test_labels = fashion_mnist("test")
    train_layout = CanvasLayout(layout.canvas, layout.background, layout.noise, seed=args.seed + 1)
    x_train, _, _ = place_on_canvas(images, range(len(labels)), train_layout)
    x_test, _, _ = place_on_canvas(test_images, range(len(test_labels)), layout)
    model = build_model(args.arch, args.hidden, args.layers)

    def batcher(x):
        return lambda idx: {"pixel_values": x[idx]}

    trained, train_labels = model, labels
    if args.arch == "deit":
        # both heads see the true label: cross-entropy over the stacked [2B, C] logits
        trained, train_labels = _TwoHeads(model), _Twice(labels)
    with training.Timer() as t:
        losses = training.train_classifier(
            trained,
            batcher(x_train),
            train_labels,
            args.epochs,
            args.batch_size,
            args.lr,
            gen,
            desc=f"train {args.arch}",
        )
    model.eval()
    acc = training.accuracy(model, batcher(x_test), test_labels, batch_size=500, desc="test accuracy")
    print(f"test accuracy {acc:.4f} on {len(test_labels)} test canvases ({t.seconds:.0f} s training)")
    model.save_pretrained(out)
    name = (
        f"{'ViT' if args.arch == 'vit' else 'DeiT (distillation token)'} ({args.layers} layers, hidden "
        f"{args.hidden}, {patch}x{patch} patches) trained from scratch on {layout.canvas}x{layout.canvas} "
        f"{layout.background} canvases"
    )
    metrics = training.run_metrics(name, acc, len(test_labels), len(labels), args, losses, t.seconds)
    metrics["layout"] = {"canvas": layout.canvas, "background": layout.background, "noise": layout.noise}
    training.save_metrics(out, metrics)


if __name__ == "__main__":
    main()
