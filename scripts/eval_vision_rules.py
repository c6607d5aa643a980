"""Issue 20: every candidate LRP rule set for vision against rollout, Integrated Gradients, Input x Gradient and
random, on the tasks of a configuration (``configs/vision_rules.yaml``: a ViT on black 56x56 canvases and a DeiT
on noisy 40x40 canvases, Fashion-MNIST garments at random positions).

Per sample and method: positive / negative patch perturbation (probability of the explained class; the
evaluation package's :func:`~hf_pelrp.evaluation.perturbation.patch_perturbation`), the segmentation-style
scores of the pixel map against the garment mask (:func:`~hf_pelrp.evaluation.segmentation.segmentation_scores`),
the same scores for the 2-D position map where the method has one (does the per-patch position relevance point
at the garment?) and the wall time of the explanation. Then per method mean and 95% t interval, and paired
bootstrap intervals of each method minus IG and minus rollout (:func:`~hf_pelrp.evaluation.metrics.paired_bootstrap`).

Records go to ``<cache>/<task>.jsonl`` one line per (sample, method) and are reused on a rerun (resumable).
Writes the summary JSON and a Markdown report (``--out``, default ``docs/results/vision_rules.{json,md}``).

Usage: ``nice -n 15 python scripts/eval_vision_rules.py [--config configs/vision_rules.yaml] [--samples 100]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from hf_pelrp import LRPConfig
from hf_pelrp.evaluation.families import curve_fractions
from hf_pelrp.evaluation.methods import (
    Explanation,
    MethodSettings,
    _patch_sum,
    _spread,
    explain,
    lrp_config_method,
    method_description,
    register_method,
)
from hf_pelrp.evaluation.metrics import mean_confidence_interval, paired_bootstrap
from hf_pelrp.evaluation.perturbation import patch_perturbation
from hf_pelrp.evaluation.samples import explained_logits
from hf_pelrp.evaluation.segmentation import segmentation_scores
from hf_pelrp.evaluation.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]
#: the scores summarised, with the direction that is better
SCORES = {
    "neg_minus_pos": "↑",
    "positive_prob_auc": "↓",
    "negative_prob_auc": "↑",
    "miou": "↑",
    "mass_inside": "↑",
    "pos_miou": "↑",
    "pos_mass_inside": "↑",
}
#: the paired comparisons (method minus reference) reported per task
REFERENCES = ("ig", "rollout")


def clamped(method):
    """The PE-LRP paper's ViT read-out for any rule set: the pixel map clamped at 0, the patch ranking its patch
    sums (as the registered ``*_pe_abs`` methods do for the plain modes)."""

    def run(model, sample, target, settings):
        exp = method(model, sample, target, settings)
        pixels = exp.pixels.clamp(min=0)
        patch = int(model.config.patch_size)
        return Explanation(_patch_sum(pixels, patch), pixels, position=exp.position)

    return run


def register_candidates(candidates: dict[str, dict]) -> dict[str, LRPConfig]:
    """Register one evaluation method per candidate rule set (``name: LRPConfig fields``; ``clamp: true`` reads
    the maps out the paper's way, see :func:`clamped`)."""
    configs = {}
    for name, fields in candidates.items():
        fields = dict(fields)
        clamp = bool(fields.pop("clamp", False))
        config = LRPConfig(**fields)
        configs[name] = config
        method = lrp_config_method(config)
        register_method(name, f"LRP candidate {fields}", ("vision",))(clamped(method) if clamp else method)
    return configs


def score_sample(task, sample, method: str, settings: MethodSettings) -> dict:
    model = task.model
    with torch.no_grad():
        target = int(explained_logits(model, sample, sample.inputs)[0].argmax())
    start = time.perf_counter()
    exp = explain(method, model, sample, target, settings)
    seconds = time.perf_counter() - start
    patch = int(model.config.patch_size)
    h, w = sample.mask.shape
    grid = (h // patch, w // patch)
    fracs = curve_fractions("vision", {})
    out = patch_perturbation(model, sample, target, exp.units, patch, task.image_replacement, fracs)
    scores = {k: v for k, v in out.items() if not k.endswith("_curve")}
    scores["neg_minus_pos"] = scores["negative_prob_auc"] - scores["positive_prob_auc"]
    pixels = exp.pixels if exp.pixels is not None else _spread(exp.units, patch, grid)
    scores.update(segmentation_scores(pixels, sample.mask))
    if exp.position is not None:
        seg = segmentation_scores(_spread(exp.position, patch, grid), sample.mask)
        scores["pos_miou"], scores["pos_mass_inside"] = seg["miou"], seg["mass_inside"]
    return {
        "sample": sample.id,
        "method": method,
        "target": target,
        "label": sample.label,
        "seconds": seconds,
        "scores": scores,
    }


def run_task(
    spec: dict, methods: list[str], settings: MethodSettings, cache: Path, samples: int
) -> list[dict]:
    spec = {**spec, "data": {**spec["data"], "num_samples": samples}}
    task = build_task(spec, ROOT, seed=settings.seed)
    path = cache / f"{task.name}.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[(rec["sample"], rec["method"])] = rec
    todo = [(s, m) for s in task.samples for m in methods if (s.id, m) not in done]
    print(f"{task.name}: {len(task.samples)} samples x {len(methods)} methods, {len(todo)} to compute")
    with path.open("a") as f:
        for i, (sample, method) in enumerate(todo):
            rec = score_sample(task, sample, method, settings)
            done[(sample.id, method)] = rec
            f.write(json.dumps(rec) + "\n")
            f.flush()
            if (i + 1) % 200 == 0:
                print(f"  {i + 1}/{len(todo)}", flush=True)
    ids = [s.id for s in task.samples]
    info = task.info.get("training", {})
    return [done[(i, m)] for i in ids for m in methods], info


def summarise(records: list[dict], methods: list[str], reps: int) -> dict:
    by_method = {m: [r for r in records if r["method"] == m] for m in methods}
    table = {}
    for m, recs in by_method.items():
        row = {"n": len(recs), "seconds": mean_confidence_interval([r["seconds"] for r in recs])}
        for key in SCORES:
            values = [r["scores"][key] for r in recs if key in r["scores"]]
            if values:
                row[key] = mean_confidence_interval(values)
        table[m] = row
    paired = {}
    for ref in REFERENCES:
        if ref not in by_method:
            continue
        base = {r["sample"]: r["scores"] for r in by_method[ref]}
        for m, recs in by_method.items():
            if m == ref:
                continue
            for key in ("neg_minus_pos", "miou"):
                a = [r["scores"][key] for r in recs]
                b = [base[r["sample"]][key] for r in recs]
                paired[f"{m} - {ref}: {key}"] = paired_bootstrap(a, b, reps=reps)
    return {"methods": table, "paired": paired}


def _fmt(stat) -> str:
    mean, half = stat
    return f"{mean:.3f} ± {half:.3f}"


def markdown(summaries: dict, descriptions: dict[str, str]) -> str:
    lines = ["# Vision rules (issue 20): every candidate on both tasks", ""]
    lines.append("Generated by `scripts/eval_vision_rules.py` (`make vision-rules`); see docs/results.md.")
    lines.append("")
    for task, (summary, info) in summaries.items():
        methods = summary["methods"]
        n = max(row["n"] for row in methods.values())
        acc = info.get("test_accuracy")
        lines += [f"## {task}", ""]
        if info:
            lines.append(
                f"Model: {info.get('model', '?')}; test accuracy {acc:.3f} on {info.get('test_size')}."
            )
        lines += [f"n = {n} test canvases per method; mean ± 95% t interval.", ""]
        lines.append(
            "| method | rules | neg − pos AU prob ↑ | pos AU ↓ | neg AU ↑ | mIoU ↑ | mass in mask ↑ | "
            "position-map mIoU ↑ | position mass in mask ↑ | ms / explanation |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for m, row in methods.items():
            cells = [_fmt(row[k]) if k in row else "–" for k in SCORES]
            ms = row["seconds"][0] * 1000
            lines.append(f"| `{m}` | {descriptions.get(m, '')} | " + " | ".join(cells) + f" | {ms:.0f} |")
        lines += ["", "Paired bootstrap (2.5%–97.5% of 2,000 resampled means) of method minus reference:", ""]
        lines.append(
            "| method | Δ neg − pos vs IG | Δ mIoU vs IG | Δ neg − pos vs rollout | Δ mIoU vs rollout |"
        )
        lines.append("|---|---|---|---|---|")
        for m in methods:
            cells = []
            for ref in REFERENCES:
                for key in ("neg_minus_pos", "miou"):
                    stat = summary["paired"].get(f"{m} - {ref}: {key}")
                    cells.append("–" if stat is None else f"{stat[0]:+.3f} [{stat[1]:+.3f}, {stat[2]:+.3f}]")
            lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def figure(spec: dict, methods: list[str], settings: MethodSettings, path: Path, count: int = 4) -> None:
    """Example maps of the first ``count`` samples of a task: the image, the mask, each method's pixel map and,
    for a method with one, its position map spread over the patches (the 2-D position map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = {**spec, "data": {**spec["data"], "num_samples": count}}
    task = build_task(spec, ROOT, seed=settings.seed)
    patch = int(task.model.config.patch_size)
    columns = ["image", "mask"] + methods + ["position map (attnlrp_pe)"]
    fig, axes = plt.subplots(count, len(columns), figsize=(1.6 * len(columns), 1.7 * count), squeeze=False)
    for row, sample in enumerate(task.samples):
        with torch.no_grad():
            target = int(explained_logits(task.model, sample, sample.inputs)[0].argmax())
        h, w = sample.mask.shape
        maps = [sample.inputs["pixel_values"][0, 0], sample.mask.float()]
        for m in methods:
            maps.append(explain(m, task.model, sample, target, settings).pixels)
        exp = explain("attnlrp_pe", task.model, sample, target, settings)
        maps.append(_spread(exp.position, patch, (h // patch, w // patch)))
        for col, (name, image) in enumerate(zip(columns, maps, strict=True)):
            ax = axes[row][col]
            image = image.float()
            if col < 2:
                ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            else:
                peak = float(image.abs().max()) or 1.0
                ax.imshow(image, cmap="bwr", vmin=-peak, vmax=peak)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=7)
    fig.suptitle(f"{task.name}: red supports the predicted class, blue speaks against it", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "vision_rules.yaml")
    p.add_argument("--samples", type=int, default=None, help="test canvases per task (default: the config's)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "vision_rules")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "vision_rules")
    p.add_argument("--report-only", action="store_true", help="summarise the cached records only")
    p.add_argument("--tasks", nargs="*", default=None, help="only these tasks of the configuration")
    p.add_argument(
        "--figure",
        nargs="*",
        default=None,
        help="write example maps of these methods per task to <out>_<task>.png (and compute nothing else)",
    )
    args = p.parse_args()
    config = yaml.safe_load(args.config.read_text())
    torch.manual_seed(int(config.get("seed", 0)))
    torch.set_num_threads(int(config.get("threads", 1)))
    configs = register_candidates(config["candidates"])
    methods = list(config["baselines"]) + list(configs)
    settings = MethodSettings(ig_steps=int(config.get("ig_steps", 32)), seed=int(config.get("seed", 0)))
    samples = args.samples or int(config.get("num_samples", 100))
    if args.figure:
        for spec in config["tasks"]:
            if not args.tasks or spec["name"] in args.tasks:
                out = args.out.parent / f"{args.out.name}_{spec['name']}.png"
                figure(spec, args.figure, settings, out)
                print(f"wrote {out}")
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for spec in config["tasks"]:
        if args.tasks and spec["name"] not in args.tasks:
            continue
        records, info = run_task(spec, [] if args.report_only else methods, settings, args.cache, samples)
        if args.report_only:
            path = args.cache / f"{spec['name']}.jsonl"
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        summaries[spec["name"]] = (summarise(records, methods, int(config.get("bootstrap", 2000))), info)
    descriptions = {m: method_description(m) for m in config["baselines"]}
    for name, fields in config["candidates"].items():
        descriptions[name] = ", ".join(f"{k}={v}" for k, v in fields.items())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({t: {"summary": s, "training": i} for t, (s, i) in summaries.items()}, indent=1)
    )
    args.out.with_suffix(".md").write_text(markdown(summaries, descriptions))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
