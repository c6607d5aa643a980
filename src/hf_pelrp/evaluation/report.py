"""Summaries of per-sample results: Markdown tables (mean and 95% CI), JSON, and plots of the curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .methods import method_description
from .metrics import mean_confidence_interval
from .tasks import TEXT, Task

UP, DOWN = "↑", "↓"

#: (key, column title, direction): the direction in which a metric is better
TEXT_METRICS = [
    ("morf_prob_auc", "MoRF AUC prob", DOWN),
    ("lerf_prob_auc", "LeRF AUC prob", UP),
    ("lerf_minus_morf_prob_auc", "LeRF−MoRF prob", UP),
    ("morf_logit_auc", "MoRF AUC logit", DOWN),
    ("lerf_logit_auc", "LeRF AUC logit", UP),
    ("lerf_minus_morf_logit_auc", "LeRF−MoRF logit", UP),
    ("insertion_prob_auc", "Insertion AUC prob", UP),
    ("insertion_logit_auc", "Insertion AUC logit", UP),
]
VISION_METRICS = [
    ("positive_prob_auc", "Pos. AUC prob", DOWN),
    ("negative_prob_auc", "Neg. AUC prob", UP),
    ("positive_acc_auc", "Pos. AUC acc", DOWN),
    ("negative_acc_auc", "Neg. AUC acc", UP),
    ("pixel_accuracy", "Pixel acc.", UP),
    ("miou", "mIoU", UP),
    ("average_precision", "mAP", UP),
    ("mass_inside", "Mass in mask", UP),
]
#: (method, baseline): positional relevance against the same rules without it
PAIRS = [
    ("attnlrp_pe", "attnlrp"),
    ("attnlrp_pe_abs", "attnlrp"),
    ("cp_pe", "cp"),
    ("cp_pe_abs", "cp"),
    ("ixg_pe", "ixg"),
]


def metric_specs(kind: str) -> list[tuple[str, str, str]]:
    return TEXT_METRICS if kind == TEXT else VISION_METRICS


def summarise(records: list[dict[str, Any]], methods: list[str], kind: str) -> dict[str, Any]:
    """Mean and 95% CI of every metric per method, and paired differences (method - baseline) per sample."""
    specs = metric_specs(kind)
    by_method: dict[str, dict[int, dict]] = {m: {} for m in methods}
    for rec in records:
        if rec["method"] in by_method:
            by_method[rec["method"]][rec["sample"]] = rec
    table = {}
    for m in methods:
        recs = list(by_method[m].values())
        if not recs:
            continue
        table[m] = {"n": len(recs)}
        for key, _, _ in specs:
            mean, ci = mean_confidence_interval([r["scores"][key] for r in recs])
            table[m][key] = {"mean": mean, "ci95": ci}
    paired = {}
    for a, b in PAIRS:
        common = sorted(set(by_method.get(a, {})) & set(by_method.get(b, {})))
        if not common:
            continue
        paired[f"{a} - {b}"] = {"n": len(common)}
        for key, _, direction in specs:
            diffs = [by_method[a][s]["scores"][key] - by_method[b][s]["scores"][key] for s in common]
            mean, ci = mean_confidence_interval(diffs)
            better = mean > 0 if direction == UP else mean < 0
            significant = abs(mean) > ci if ci == ci else False
            paired[f"{a} - {b}"][key] = {
                "mean": mean,
                "ci95": ci,
                "better": better,
                "significant": significant,
            }
    return {"methods": table, "paired": paired}


def _cell(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.3f} ± {stat['ci95']:.3f}"


def markdown_table(summary: dict[str, Any], kind: str) -> str:
    """Rows methods, columns metrics with their better-direction arrow, cells ``mean ± 95% CI``; the best mean
    per column in bold."""
    specs = metric_specs(kind)
    methods = summary["methods"]
    header = "| Method | n | " + " | ".join(f"{title} {d}" for _, title, d in specs) + " |"
    lines = [header, "|" + "---|" * (len(specs) + 2)]
    best = {}
    for key, _, d in specs:
        values = [methods[m][key]["mean"] for m in methods]
        if values:
            best[key] = max(values) if d == UP else min(values)
    for m, stats in methods.items():
        cells = []
        for key, _, _ in specs:
            c = _cell(stats[key])
            cells.append(f"**{c}**" if stats[key]["mean"] == best.get(key) else c)
        lines.append(f"| `{m}` | {stats['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(summary: dict[str, Any], kind: str) -> str:
    """Per-sample paired differences (with positions - without); ✓ marks a difference in the better direction
    whose 95% CI excludes 0, ✗ one in the worse direction whose CI excludes 0."""
    specs = metric_specs(kind)
    if not summary["paired"]:
        return ""
    header = "| Difference | n | " + " | ".join(f"Δ {title} {d}" for _, title, d in specs) + " |"
    lines = [header, "|" + "---|" * (len(specs) + 2)]
    for name, stats in summary["paired"].items():
        cells = []
        for key, _, _ in specs:
            s = stats[key]
            mark = (" ✓" if s["better"] else " ✗") if s["significant"] else ""
            cells.append(f"{s['mean']:+.3f} ± {s['ci95']:.3f}{mark}")
        lines.append(f"| `{name}` | {stats['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(records: list[dict[str, Any]], methods: list[str], kind: str, path: Path) -> None:
    """Mean perturbation curves per method (one panel per curve type) as a PNG: text tasks get a row of
    probability and a row of logit curves, vision tasks one row of probability and accuracy curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = (
        [
            ["morf_prob_curve", "lerf_prob_curve", "insertion_prob_curve"],
            ["morf_logit_curve", "lerf_logit_curve", "insertion_logit_curve"],
        ]
        if kind == TEXT
        else [["positive_prob_curve", "negative_prob_curve", "positive_acc_curve", "negative_acc_curve"]]
    )
    rows, cols = len(grid), len(grid[0])
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    # one colour per method (the default cycle repeats after ten)
    colours = plt.get_cmap("tab20")
    for ax, panel in zip(axes.flat, [p for row in grid for p in row], strict=True):
        for i, m in enumerate(methods):
            curves = [r["curves"][panel] for r in records if r["method"] == m]
            if not curves:
                continue
            xs = next(r["fractions"] for r in records if r["method"] == m)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(xs))]
            style = "--" if not m.endswith(("_pe", "_pe_abs")) else "-"
            ax.plot(xs, mean, style, label=m, linewidth=1.4, color=colours(i % 20))
        ax.set_title(panel.replace("_curve", "").replace("_", " "))
        ax.set_xlabel("fraction perturbed")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("mean over samples")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    task: Task, records: list[dict[str, Any]], task_dir: Path, methods: list[str]
) -> dict[str, Any]:
    """Write ``summary.json``, ``table.md`` and ``curves.png`` for one task; returns the summary."""
    summary = summarise(records, methods, task.kind)
    summary.update(task=task.name, kind=task.kind, num_samples=len(task.samples), info=task.info)
    (task_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    parts = [f"### {task.name}", "", markdown_table(summary, task.kind), ""]
    paired = paired_table(summary, task.kind)
    if paired:
        parts += ["Paired differences per sample (with positions − without):", "", paired, ""]
    parts += ["Methods:", ""] + [f"- `{m}`: {method_description(m)}" for m in methods] + [""]
    (task_dir / "table.md").write_text("\n".join(parts))
    plot_curves(records, methods, task.kind, task_dir / "curves.png")
    return summary
