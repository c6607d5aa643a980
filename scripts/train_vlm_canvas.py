"""Train the tiny LLaVA of the VLM faithfulness check (issue 19): "what is in the top left?" about 2-4
Fashion-MNIST garments in the quadrants of a 64x64 canvas (:mod:`hf_pelrp.evaluation.vlm_canvas`).

Every step draws fresh training canvases (garments of Fashion-MNIST's training split, canvas seed ``--seed + 1``);
the test accuracy is measured on canvases of the test split (seed ``--seed``, the ones the evaluation explains).
AdamW with linear warm-up and decay, one thread, deterministic. Writes the checkpoint and ``metrics.json`` to
``.cache/models/llava-fashion-quadrants`` (skipped by ``make vlm-faithfulness`` when it exists). 3,000 steps of
64 canvases took 15 minutes on one thread of the loaded shared 2-core machine (73.8% test accuracy; the loss
sits near 2.0 for ~1,300 steps, then falls to ~0.65): ``nice -n 15 python scripts/train_vlm_canvas.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_pelrp.evaluation import training
from hf_pelrp.evaluation.data import fashion_mnist
from hf_pelrp.evaluation.vlm_canvas import (
    QuadrantTask,
    answer_accuracy,
    quadrant_batch,
    tiny_llava,
    train_step,
)

ROOT = Path(__file__).resolve().parents[1]
FOLDER = "llava-fashion-quadrants"


def main() -> None:
    p = training.training_parser(
        __doc__, ROOT / ".cache" / "models" / FOLDER, epochs=0.0, batch_size=64, lr=2e-3
    )
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps (each on fresh canvases)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--test-size", type=int, default=2000, help="test canvases for the accuracy")
    args = p.parse_args()

    training.set_determinism(args.seed, args.threads)
    task = QuadrantTask(seed=args.seed)
    train_task = QuadrantTask(task.quadrant, task.patch, seed=args.seed + 1)
    images, labels = fashion_mnist("train")
    test_images, test_labels = fashion_mnist("test")
    model = tiny_llava(task, args.hidden, args.vision_layers, args.text_layers, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warm = max(1, args.steps // 16)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (args.steps - s) / max(1, args.steps - warm)))
    )
    losses = []
    with training.Timer() as t:
        bar = tqdm(range(args.steps), desc="train llava", mininterval=5)
        for step in bar:
            batch = quadrant_batch(
                images, labels, range(step * args.batch_size, (step + 1) * args.batch_size), train_task
            )
            losses.append(train_step(model, batch, opt))
            sched.step()
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}", refresh=False)
    model.eval()
    test = quadrant_batch(test_images, test_labels, range(args.test_size), task)
    acc = answer_accuracy(model, test)
    print(
        f"test accuracy {acc:.4f} on {args.test_size} test canvases ({t.seconds:.0f} s training; chance 0.1)"
    )
    model.save_pretrained(args.out)
    args.epochs = args.steps * args.batch_size / len(labels)  # garments seen / training split, for the record
    metrics = training.run_metrics(
        f"LLaVA (CLIP tower {args.vision_layers} layers, LLaMA {args.text_layers} layers, hidden {args.hidden}, "
        f"{task.patch}x{task.patch} patches) trained from scratch on {task.canvas}x{task.canvas} quadrant canvases",
        acc,
        args.test_size,
        args.steps * args.batch_size,
        args,
        losses,
        t.seconds,
    )
    metrics.update(steps=args.steps, batch_size=args.batch_size, lr=args.lr, task=vars(task))
    training.save_metrics(args.out, metrics)


if __name__ == "__main__":
    main()
