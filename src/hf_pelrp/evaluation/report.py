"""Summaries of per-sample results: Markdown tables (mean and 95% t-interval), JSON, and plots of the curves.

One table per metric family of the task (:mod:`.families`), then the paired differences the configuration asks
for (``pairs: {family: [[method, baseline], ...]}``; token flipping defaults to "with positions - without").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .families import DOWN, FAMILIES, UP, task_families
from .methods import method_description
from .metrics import mean_confidence_interval
from .paper_protocol import PAPER_FRACTIONS
from .tasks import Task

__all__ = ["DOWN", "PAIRS", "UP", "markdown_table", "paired_table", "summarise", "write_report"]

#: (method, baseline): positional relevance against the same rules without it (token flipping's default)
PAIRS = [
    ("attnlrp_pe", "attnlrp"),
    ("attnlrp_pe_abs", "attnlrp"),
    ("cp_pe", "cp"),
    ("cp_pe_abs", "cp"),
    ("ixg_pe", "ixg"),
]
DEFAULT_PAIRS = {"token_flip": PAIRS}
TEXT_METRICS = FAMILIES["token_flip"].columns
VISION_METRICS = FAMILIES["perturbation"].columns


def metric_specs(kind: str) -> list[tuple[str, str, str]]:
    return TEXT_METRICS if kind == "text" else VISION_METRICS


def summarise(
    records: list[dict[str, Any]],
    methods: list[str],
    specs: str | list[tuple[str, str, str]],
    pairs: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Mean and 95% CI of every metric per method, the mean seconds per explanation, and paired differences
    (method - baseline) per sample. ``specs``: the columns, or a task kind (``"text"`` / ``"vision"``) for the
    default family's. Methods without any of the columns' scores are left out."""
    if isinstance(specs, str):
        specs = metric_specs(specs)
    pairs = PAIRS if pairs is None else pairs
    by_method: dict[str, dict[int, dict]] = {m: {} for m in methods}
    for rec in records:
        if rec["method"] in by_method:
            by_method[rec["method"]][rec["sample"]] = rec
    table = {}
    for m in methods:
        recs = [r for r in by_method[m].values() if any(k in r["scores"] for k, _, _ in specs)]
        if not recs:
            continue
        table[m] = {"n": len(recs)}
        seconds = [r["seconds"] for r in recs if "seconds" in r]
        if seconds:
            table[m]["seconds"] = mean_confidence_interval(seconds)[0]
        for key, _, _ in specs:
            values = [r["scores"][key] for r in recs if key in r["scores"]]
            if values:
                mean, ci = mean_confidence_interval(values)
                table[m][key] = {"mean": mean, "ci95": ci}
    paired = {}
    for a, b in pairs:
        common = sorted(set(by_method.get(a, {})) & set(by_method.get(b, {})))
        stats: dict[str, Any] = {}
        for key, _, direction in specs:
            both = [
                s for s in common if key in by_method[a][s]["scores"] and key in by_method[b][s]["scores"]
            ]
            if not both:
                continue
            diffs = [by_method[a][s]["scores"][key] - by_method[b][s]["scores"][key] for s in both]
            mean, ci = mean_confidence_interval(diffs)
            better = mean > 0 if direction == UP else mean < 0
            significant = abs(mean) > ci if ci == ci else False
            stats["n"] = len(both)
            stats[key] = {"mean": mean, "ci95": ci, "better": better, "significant": significant}
        if stats:
            paired[f"{a} - {b}"] = stats
    return {"methods": table, "paired": paired}


def _cell(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.3f} ± {stat['ci95']:.3f}"


def markdown_table(summary: dict[str, Any], specs: str | list[tuple[str, str, str]]) -> str:
    """Rows methods, columns metrics with their better-direction arrow, cells ``mean ± 95% CI``; the best mean
    per column in bold; the last column the mean seconds per explanation (where recorded)."""
    if isinstance(specs, str):
        specs = metric_specs(specs)
    methods = summary["methods"]
    timed = any("seconds" in s for s in methods.values())
    header = "| Method | n | " + " | ".join(f"{title} {d}" for _, title, d in specs) + " |"
    header += " s / sample |" if timed else ""
    lines = [header, "|" + "---|" * (len(specs) + 2 + timed)]
    best = {}
    for key, _, d in specs:
        values = [methods[m][key]["mean"] for m in methods if key in methods[m]]
        if values:
            best[key] = max(values) if d == UP else min(values)
    for m, stats in methods.items():
        cells = []
        for key, _, _ in specs:
            if key not in stats:
                cells.append("—")
                continue
            c = _cell(stats[key])
            cells.append(f"**{c}**" if stats[key]["mean"] == best.get(key) else c)
        if timed:
            cells.append(f"{stats['seconds']:.3f}" if "seconds" in stats else "—")
        lines.append(f"| `{m}` | {stats['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(summary: dict[str, Any], specs: str | list[tuple[str, str, str]]) -> str:
    """Per-sample paired differences; ✓ marks a difference in the better direction whose 95% CI excludes 0,
    ✗ one in the worse direction whose CI excludes 0."""
    if isinstance(specs, str):
        specs = metric_specs(specs)
    if not summary["paired"]:
        return ""
    header = "| Difference | n | " + " | ".join(f"Δ {title} {d}" for _, title, d in specs) + " |"
    lines = [header, "|" + "---|" * (len(specs) + 2)]
    for name, stats in summary["paired"].items():
        cells = []
        for key, _, _ in specs:
            s = stats.get(key)
            if s is None:
                cells.append("—")
                continue
            mark = (" ✓" if s["better"] else " ✗") if s["significant"] else ""
            cells.append(f"{s['mean']:+.3f} ± {s['ci95']:.3f}{mark}")
        lines.append(f"| `{name}` | {stats['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(
    records: list[dict[str, Any]], methods: list[str], panels: list[list[str]], path: Path
) -> None:
    """Mean curves per method, one panel per curve key (a row per list of ``panels``), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colours = plt.get_cmap("tab20")
    for r, row in enumerate(panels):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            panel = row[c]
            for i, m in enumerate(methods):
                curves = [rec for rec in records if rec["method"] == m and panel in rec["curves"]]
                if not curves:
                    continue
                xs = PAPER_FRACTIONS if panel.startswith("paper_") else curves[0]["fractions"]
                mean = [sum(rec["curves"][panel][j] for rec in curves) / len(curves) for j in range(len(xs))]
                style = "-" if "_pe" in m or m.startswith("pos_") else "--"
                ax.plot(xs, mean, style, label=m, linewidth=1.4, color=colours(i % 20))
            ax.set_title(panel.replace("_curve", "").replace("_", " "))
            ax.set_xlabel("fraction perturbed")
            ax.grid(alpha=0.3)
        axes[r][0].set_ylabel("mean over samples")
    handles, labels = [], []
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        if len(lab) > len(labels):
            handles, labels = h, lab
    axes[0][0].legend(handles, labels, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    task: Task,
    records: list[dict[str, Any]],
    task_dir: Path,
    methods: list[str],
    config: dict | None = None,
) -> dict[str, Any]:
    """Write ``summary.json``, ``table.md`` (one table per metric family), ``curves.png`` (the curves of the first
    family that has curves) and ``curves_<family>.png`` for the others; returns the summary.

    The summary's ``methods`` / ``paired`` are the first family's; ``families`` holds every family's.
    """
    config = config or {}
    families = task_families(task.kind, config)
    pairs_config = config.get("pairs") or {}
    summary: dict[str, Any] = {"families": {}}
    parts = [f"### {task.name}", ""]
    main_plot = next((name for name in families if FAMILIES[name].panels), None)
    for i, name in enumerate(families):
        family = FAMILIES[name]
        pairs = [tuple(p) for p in pairs_config.get(name, DEFAULT_PAIRS.get(name, []))]
        fam = summarise(records, methods, family.columns, pairs)
        summary["families"][name] = fam
        if i == 0:
            summary.update(methods=fam["methods"], paired=fam["paired"])
        if i > 0 or len(families) > 1:
            parts += [f"#### {family.title}", ""]
        parts += [markdown_table(fam, family.columns), ""]
        paired = paired_table(fam, family.columns)
        if paired:
            what = "with positions − without" if name == "token_flip" else "method − baseline"
            parts += [f"Paired differences per sample ({what}):", "", paired, ""]
        if family.panels:
            png = task_dir / ("curves.png" if name == main_plot else f"curves_{name}.png")
            plot_curves(records, [m for m in methods if m in fam["methods"]], family.panels, png)
    summary.update(task=task.name, kind=task.kind, num_samples=len(task.samples), info=task.info)
    (task_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    parts += ["Methods:", ""] + [f"- `{m}`: {method_description(m)}" for m in methods] + [""]
    (task_dir / "table.md").write_text("\n".join(parts))
    return summary
