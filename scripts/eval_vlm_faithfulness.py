"""Issue 19 section 4, "Is it right?": faithfulness of image-patch explanations of a vision-language model.

The model is the tiny LLaVA of :mod:`hf_pelrp.evaluation.vlm_canvas` (``scripts/train_vlm_canvas.py``), asked
"what is in the top left?" about 2-4 Fashion-MNIST garments in the quadrants of a 64x64 canvas. For the answer
logit of held-out canvases the model answers correctly, each method gives one relevance per image patch (64):

- ``attnlrp``: PE-LRP with the AttnLRP rules, ``Attribution.image`` (each patch's content);
- ``attnlrp_pos``: the same plus ``Attribution.image_position`` (the tower's learned position leaves per patch);
- ``cp``: CP-LRP (``config="cp"``), ``Attribution.image``;
- ``attnlrp_positive``, ``cp_positive``: those image maps clamped at 0 (the positive read-out issue 20 found best
  for ViTs, here per patch: only the order of the non-positive patches changes, which LeRF removes first);
- ``ig``: Integrated Gradients over the pixels (black baseline, the canvas's own background), summed per patch;
- ``rollout``: attention rollout (Abnar & Zuidema 2020: head-mean attention with the residual, 0.5 A + 0.5 I,
  row-normalised, multiplied through the layers) through the text model from the answer position to the image
  placeholder tokens (LLaVA's default strategy: placeholder i is the projection of tower output token i + 1, the
  projector acts per token), then through the vision tower from those output tokens to its input patch tokens
  (the flow into the CLS input is left out: it carries no patch);
- ``random``: uniform random relevance, seeded by the canvas.

Scores per canvas: patch perturbation (the 64 patches replaced by the background, black, most relevant first,
MoRF, and least relevant first, LeRF, at 0, 10%, ..., 100%; areas under the curves of the answer's logit and of
its probability, and LeRF - MoRF), and localisation against the exact mask of the asked garment: the share of
positive relevance inside it (each patch's relevance spread evenly over its pixels), the pointing game (does the
top patch show a pixel of the asked garment?) and the share of the positive relevance on garments that lies on
the asked one rather than the other garments. Means with 95% percentile-bootstrap intervals over the canvases,
and paired bootstrap intervals of each method minus IG.

Writes ``--out`` (default ``docs/results/vlm_faithfulness.{json,md}``: summary and table) and the per-canvas
records to ``.cache/vlm_faithfulness/<out name>.jsonl``. Usage:
``nice -n 15 python scripts/eval_vlm_faithfulness.py [--samples 200]``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

import hf_pelrp
from hf_pelrp.evaluation.data import fashion_mnist
from hf_pelrp.evaluation.methods import _patch_sum, integrated_gradients
from hf_pelrp.evaluation.metrics import (
    bootstrap_mean,
    fractions,
    paired_bootstrap,
    patch_mass_inside,
    pointing_game,
)
from hf_pelrp.evaluation.perturbation import patch_perturbation
from hf_pelrp.evaluation.samples import Sample
from hf_pelrp.evaluation.vlm_canvas import QuadrantBatch, QuadrantTask, answer_logits, quadrant_batch

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / ".cache" / "models" / "llava-fashion-quadrants"
METHODS = ("attnlrp", "attnlrp_positive", "attnlrp_pos", "cp", "cp_positive", "ig", "rollout", "random")
#: the scores summarised, with the direction that is better
SCORES = {
    "lerf_minus_morf_logit": "↑",
    "morf_logit_auc": "↓",
    "lerf_logit_auc": "↑",
    "lerf_minus_morf_prob": "↑",
    "mass_inside": "↑",
    "pointing": "↑",
    "asked_share": "↑",
}
REFERENCE = "ig"


# ------------------------------------------------------------------------------------------------------ methods
def _row(inputs: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    return {k: v.expand(rows, *v.shape[1:]) for k, v in inputs.items()}


def _lrp(config: str, with_position: bool, positive: bool = False) -> Callable:
    def run(model, inputs, target, task, sample_id, ig_steps):
        attr = hf_pelrp.attribute(model, target=torch.tensor([target]), config=config, **inputs)
        if tuple(attr.image_grid[0].tolist()) != task.grid:
            raise RuntimeError(f"image_grid {attr.image_grid[0].tolist()} is not the task's {task.grid}")
        image = attr.image[0].double()
        if with_position:
            image = image + attr.image_position[0].double()
        # the positive read-out (the PE-LRP paper's for ViTs, issue 20's `vit-positive`), here per patch: the VLM
        # path has no pixel map to clamp, and refuses `image_readout`
        return image.clamp(min=0) if positive else image

    return run


def _ig(model, inputs, target, task, sample_id, ig_steps):
    pixels = inputs["pixel_values"]

    def f(p: torch.Tensor) -> torch.Tensor:
        return answer_logits(model, {**_row(inputs, p.shape[0]), "pixel_values": p})[:, target]

    ig = integrated_gradients(f, pixels, torch.zeros_like(pixels), ig_steps)
    return _patch_sum(ig.sum(0).double(), task.patch)


def _rollout_product(attentions) -> torch.Tensor:
    rollout = None
    for att in attentions:
        a = att[0].double().mean(0)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype)
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


@torch.no_grad()
def _rollout(model, inputs, target, task, sample_id, ig_steps):
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        text = model(**inputs, output_attentions=True).attentions
        tower = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    finally:
        model.set_attn_implementation(original)
    layer = model.config.vision_feature_layer
    if layer != -1 or model.config.vision_feature_select_strategy != "default":
        raise ValueError("this rollout assumes vision_feature_layer=-1 and the 'default' (CLS-free) strategy")
    to_placeholders = _rollout_product(text)[-1][inputs["input_ids"][0] == model.config.image_token_id]
    through_tower = _rollout_product(tower)[1:, 1:]  # patch output tokens -> patch input tokens
    return to_placeholders @ through_tower


def _random(model, inputs, target, task, sample_id, ig_steps):
    gen = torch.Generator().manual_seed(1_000_003 + sample_id)
    return torch.rand(task.num_patches, generator=gen, dtype=torch.float64)


EXPLAIN = {
    "attnlrp": _lrp("attnlrp", False),
    "attnlrp_positive": _lrp("attnlrp", False, positive=True),
    "attnlrp_pos": _lrp("attnlrp", True),
    "cp": _lrp("cp", False),
    "cp_positive": _lrp("cp", False, positive=True),
    "ig": _ig,
    "rollout": _rollout,
    "random": _random,
}


# ------------------------------------------------------------------------------------------------------- scores
class _AnswerHead(torch.nn.Module):
    """The LLaVA with its question fixed, as an image model: pixel_values [B, ...] -> answer logits [B, V]
    (what :func:`~hf_pelrp.evaluation.perturbation.patch_perturbation` perturbs)."""

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor) -> None:
        super().__init__()
        self.model, self.input_ids = model, input_ids

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        inputs = _row(
            {"input_ids": self.input_ids, "attention_mask": torch.ones_like(self.input_ids)},
            len(pixel_values),
        )
        return SimpleNamespace(logits=answer_logits(self.model, {**inputs, "pixel_values": pixel_values}))


def score(
    model,
    batch: QuadrantBatch,
    row: int,
    relevance: torch.Tensor,
    task: QuadrantTask,
    replacement: str = "zero",
) -> dict[str, float]:
    """Perturbation and localisation scores of one canvas's patch relevance (the answer = ``batch.answer[row]``;
    removed patches become ``replacement``: ``"zero"`` is the black background, ``"blur"`` a blurred copy)."""
    target = int(batch.answer[row])
    sample = Sample(
        row,
        {"pixel_values": batch.pixel_values[row : row + 1]},
        torch.ones(task.num_patches, dtype=torch.bool),
        label=target,
        mask=batch.mask[row],
    )
    head = _AnswerHead(model, batch.input_ids[row : row + 1])
    curves = patch_perturbation(
        head, sample, target, relevance.float(), task.patch, replacement, fractions(11)
    )
    scores = {k: v for k, v in curves.items() if not k.endswith("_curve")}
    # patch_perturbation's "positive" is MoRF (most relevant removed first), "negative" LeRF
    out = {f"morf_{k[9:]}" if k.startswith("positive_") else f"lerf_{k[9:]}": v for k, v in scores.items()}
    for unit in ("logit", "prob"):
        out[f"lerf_minus_morf_{unit}"] = out[f"lerf_{unit}_auc"] - out[f"morf_{unit}_auc"]
    mask, others = batch.mask[row], batch.others[row]
    out["mass_inside"] = patch_mass_inside(relevance, mask, task.patch)
    out["pointing"] = pointing_game(relevance, mask, task.patch)
    on_garments = patch_mass_inside(relevance, mask | others, task.patch)
    out["asked_share"] = out["mass_inside"] / on_garments if on_garments > 0 else 0.0
    return out


def correct_canvases(model, task: QuadrantTask, count: int, limit: int) -> tuple[QuadrantBatch, list[int]]:
    """The first ``count`` test canvases (of the first ``limit``) the model answers correctly, and their
    indices (which seed the random baseline)."""
    images, labels = fashion_mnist("test")
    batch = quadrant_batch(images, labels, range(limit), task)
    with torch.no_grad():
        right = answer_logits(model, batch.model_inputs()).argmax(-1) == batch.answer
    keep = torch.nonzero(right).flatten()[:count]
    if len(keep) < count:
        raise RuntimeError(
            f"only {len(keep)} of the first {limit} test canvases are answered correctly: ask for fewer --samples "
            "or train the model longer (scripts/train_vlm_canvas.py --steps)"
        )
    picked = QuadrantBatch(*(getattr(batch, f)[keep] for f in QuadrantBatch.__dataclass_fields__))
    return picked, keep.tolist()


def evaluate(
    model,
    batch: QuadrantBatch,
    task: QuadrantTask,
    methods: list[str],
    ig_steps: int,
    ids: list[int],
    replacement: str = "zero",
) -> list[dict]:
    """One record per (canvas, method): the scores and the explanation's wall time."""
    records = []
    inputs = batch.model_inputs()
    for row, sample_id in enumerate(ids):
        one = {k: v[row : row + 1] for k, v in inputs.items()}
        for method in methods:
            start = time.perf_counter()
            relevance = EXPLAIN[method](model, one, int(batch.answer[row]), task, sample_id, ig_steps)
            seconds = time.perf_counter() - start
            if relevance.shape != (task.num_patches,):
                raise RuntimeError(f"{method} gave shape {tuple(relevance.shape)}, not ({task.num_patches},)")
            scores = score(model, batch, row, relevance.detach(), task, replacement)
            records.append({"sample": sample_id, "method": method, "seconds": seconds, "scores": scores})
    return records


def summarise(records: list[dict], methods: list[str], reps: int) -> dict:
    """Per method: n, and per score the mean with its 95% bootstrap interval; paired differences against IG."""
    by_method = {m: [r for r in records if r["method"] == m] for m in methods}
    table = {}
    for m, recs in by_method.items():
        row = {"n": len(recs), "seconds": bootstrap_mean([r["seconds"] for r in recs], reps)}
        for key in SCORES:
            row[key] = bootstrap_mean([r["scores"][key] for r in recs], reps)
        table[m] = row
    paired = {}
    if REFERENCE in by_method:
        base = {r["sample"]: r["scores"] for r in by_method[REFERENCE]}
        for m, recs in by_method.items():
            if m == REFERENCE:
                continue
            for key in SCORES:
                a = [r["scores"][key] for r in recs]
                b = [base[r["sample"]][key] for r in recs]
                paired[f"{m} - {REFERENCE}: {key}"] = paired_bootstrap(a, b, reps=reps)
    return {"methods": table, "paired": paired}


def _fmt(stat) -> str:
    mean, low, high = stat
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def markdown(summary: dict, info: dict) -> str:
    methods = summary["methods"]
    n = max(row["n"] for row in methods.values())
    lines = [
        "# Vision-language model (issue 19): patch faithfulness of a tiny LLaVA",
        "",
        "Generated by `scripts/eval_vlm_faithfulness.py` (`make vlm-faithfulness`); see docs/results.md.",
        "",
        f"Model: {info.get('model', '?')}; test accuracy {info.get('test_accuracy', float('nan')):.3f} on "
        f"{info.get('test_size')} test canvases (chance 0.1). Explained: the answer logit of the first n = {n} "
        f"test canvases answered correctly (of {info.get('canvases_seen')} looked at). Removed patches: "
        f"{info.get('replacement', 'zero')}. Mean [95% bootstrap interval].",
        "",
        "| method | LeRF − MoRF logit ↑ | MoRF logit AUC ↓ | LeRF logit AUC ↑ | LeRF − MoRF prob ↑ | "
        "mass in mask ↑ | pointing game ↑ | asked / all garments ↑ | ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, row in methods.items():
        cells = [_fmt(row[k]) for k in SCORES]
        lines.append(f"| `{m}` | " + " | ".join(cells) + f" | {row['seconds'][0] * 1000:.0f} |")
    if summary["paired"]:
        lines += ["", f"Paired bootstrap of method minus `{REFERENCE}` (mean [2.5%, 97.5%]):", ""]
        lines.append("| method | " + " | ".join(f"Δ {k}" for k in SCORES) + " |")
        lines.append("|---" * (len(SCORES) + 1) + "|")
        for m in methods:
            if m == REFERENCE:
                continue
            cells = [_fmt(summary["paired"][f"{m} - {REFERENCE}: {k}"]) for k in SCORES]
            lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(
    model,
    task: QuadrantTask,
    samples: int,
    methods: list[str],
    ig_steps: int = 32,
    reps: int = 2000,
    limit: int | None = None,
    replacement: str = "zero",
) -> tuple[dict, list[dict], int]:
    """Pick the canvases, explain and score them, summarise: ``(summary, records, canvases looked at)``."""
    batch, ids = correct_canvases(model, task, samples, limit or 4 * samples)
    seen = ids[-1] + 1
    records = evaluate(model, batch, task, methods, ig_steps, ids, replacement)
    return summarise(records, methods, reps), records, seen


def figure(
    model, task: QuadrantTask, methods: list[str], path: Path, count: int = 4, ig_steps: int = 32
) -> None:
    """Example maps of the first ``count`` correctly answered test canvases: the canvas with its question, the
    asked garment's mask, and each method's patch map (red: for the answer, blue: against)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_pelrp.evaluation.vlm_canvas import CLASSES, QUADRANT_WORDS

    batch, ids = correct_canvases(model, task, count, 50 * count)
    inputs = batch.model_inputs()
    columns = ["canvas", "asked garment"] + methods
    fig, axes = plt.subplots(count, len(columns), figsize=(1.6 * len(columns), 1.8 * count), squeeze=False)
    for row in range(count):
        one = {k: v[row : row + 1] for k, v in inputs.items()}
        maps = [batch.pixel_values[row, 0], batch.mask[row].float()]
        for m in methods:
            rel = EXPLAIN[m](model, one, int(batch.answer[row]), task, ids[row], ig_steps).detach()
            maps.append(rel.reshape(task.grid).float())
        for col, image in enumerate(maps):
            ax = axes[row][col]
            if col < 2:
                ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            else:
                peak = float(image.abs().max()) or 1.0
                ax.imshow(image, cmap="bwr", vmin=-peak, vmax=peak)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=7)
        words = " ".join(QUADRANT_WORDS[int(batch.asked[row])])
        axes[row][0].set_ylabel(f"{words}?\n{CLASSES[int(batch.label[row])]}", fontsize=7)
    fig.suptitle("tiny LLaVA: 'what is in the <quadrant>?' - patch maps of the answer logit", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL_DIR)
    p.add_argument("--samples", type=int, default=200, help="correctly answered test canvases to explain")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--ig-steps", type=int, default=32)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "vlm_faithfulness")
    p.add_argument(
        "--records", type=Path, default=None, help="per-canvas records (default: .cache/vlm_faithfulness/)"
    )
    p.add_argument(
        "--replacement",
        choices=("zero", "blur", "mean"),
        default="zero",
        help="what removed patches become: zero (the black background, default), a blurred copy, the mean",
    )
    p.add_argument("--figure", action="store_true", help="write example maps to <out>.png (and nothing else)")
    args = p.parse_args()
    args.records = args.records or ROOT / ".cache" / "vlm_faithfulness" / f"{args.out.name}.jsonl"
    torch.manual_seed(0)
    torch.set_num_threads(1)
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
    info = json.loads((args.model / "metrics.json").read_text())
    task = QuadrantTask(**info["task"])
    if args.figure:
        figure(model, task, args.methods, args.out.with_suffix(".png"), ig_steps=args.ig_steps)
        print(f"wrote {args.out.with_suffix('.png')}")
        return
    summary, records, seen = run(
        model, task, args.samples, args.methods, args.ig_steps, args.bootstrap, replacement=args.replacement
    )
    info["canvases_seen"], info["replacement"] = seen, args.replacement
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"summary": summary, "training": info}, indent=1))
    # the per-canvas records (scores of every method) stay out of the repository
    args.records.parent.mkdir(parents=True, exist_ok=True)
    args.records.write_text("".join(json.dumps(r) + "\n" for r in records))
    args.out.with_suffix(".md").write_text(markdown(summary, info))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
