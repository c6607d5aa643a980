"""Collect the position-faithfulness runs into docs/results/positions/ and the generated region of
docs/results.md (between ``<!-- positions:begin -->`` and ``<!-- positions:end -->``).

Usage: ``python scripts/collect_positions.py`` after the runs of configs/smollm2_positions.yaml,
smollm2_paper_protocol.yaml, gpt2_positions.yaml and positional_tasks.yaml (any subset). It writes two overview
tables built from the runs' ``summary.json`` (position flipping across models; the ground-truth hit rates of
the nine task models), then every task's full tables and curves. The hand-written analysis outside the region
stays as it is. Curve plots are copied for the real-model runs (the ground-truth tasks' stay in runs/).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("smollm2_positions", "gpt2_positions", "positional_tasks", "smollm2_paper_protocol")
BEGIN, END = "<!-- positions:begin -->", "<!-- positions:end -->"
FLIP_METHODS = (
    "attnlrp_pe",
    "attnlrp_pe_abs",
    "attnlrp_pe_paper",
    "attnlrp_pe_ref",
    "cp_pe",
    "cp_pe_ref",
    "ixg_pe",
    "ixg_pe_ref",
    "pos_ig",
    "pos_occlusion",
    "pos_occlusion_layer",
    "random",
)


def _cell(stats: dict | None, key: str) -> str:
    if not stats or key not in stats:
        return "—"
    s = stats[key]
    return f"{s['mean']:+.3f} ± {s['ci95']:.3f}"


def _load(root: Path) -> list[dict]:
    tasks = []
    for run in RUNS:
        for summary_path in sorted((root / "runs" / run).glob("*/summary.json")):
            summary = json.loads(summary_path.read_text())
            summary["dir"] = summary_path.parent
            summary["run"] = run
            tasks.append(summary)
    return tasks


def flip_overview(tasks: list[dict], family: str, key: str) -> str:
    """Methods x tasks: ``key`` (e.g. LeRF - MoRF area) of ``family`` for every task that ran it."""
    cols = [t for t in tasks if family in t.get("families", {})]
    if not cols:
        return ""
    methods = [m for m in FLIP_METHODS if any(m in t["families"][family]["methods"] for t in cols)]
    lines = ["| Method | " + " | ".join(f"`{t['task']}`" for t in cols) + " |", "|---|" + "---|" * len(cols)]
    for m in methods:
        cells = [_cell(t["families"][family]["methods"].get(m), key) for t in cols]
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    n = ", ".join(
        f"{t['task']}: n = {max(s['n'] for s in t['families'][family]['methods'].values())}" for t in cols
    )
    return "\n".join(lines) + f"\n\n({n})\n"


def truth_overview(tasks: list[dict], key: str) -> str:
    """Methods x the nine ground-truth tasks: ``key`` of the ground-truth family."""
    cols = [t for t in tasks if "ground_truth" in t.get("families", {})]
    if not cols:
        return ""
    order = []
    for t in cols:
        for m in t["families"]["ground_truth"]["methods"]:
            if m not in order and key in t["families"]["ground_truth"]["methods"][m]:
                order.append(m)
    head = [f"`{t['task'].removeprefix('gt-')}`" for t in cols]
    lines = ["| Method | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
    for m in order:
        stats = [t["families"]["ground_truth"]["methods"].get(m) for t in cols]
        cells = [f"{s[key]['mean']:.2f}" if s and key in s else "—" for s in stats]
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    acc = []
    for t in cols:
        a = t.get("info", {}).get("training", {}).get("test_accuracy")
        acc.append(f"{t['task'].removeprefix('gt-')}: {a:.3f}" if a is not None else t["task"])
    return "\n".join(lines) + "\n\n(model test accuracy: " + ", ".join(acc) + ")\n"


def collect(root: Path = ROOT) -> str:
    out = root / "docs" / "results" / "positions"
    out.mkdir(parents=True, exist_ok=True)
    tasks = _load(root)
    parts = []
    overview = [
        (
            "position_flip",
            "pos_lerf_minus_morf_prob_auc",
            "Position flipping, LeRF − MoRF area of the probability ↑",
        ),
        (
            "position_flip",
            "pos_lerf_minus_morf_logit_auc",
            "Position flipping, LeRF − MoRF area of the logit ↑",
        ),
        (
            "position_flip_layer",
            "poslayer_lerf_minus_morf_prob_auc",
            "Per-layer position flipping, LeRF − MoRF prob ↑",
        ),
    ]
    for family, key, title in overview:
        table = flip_overview(tasks, family, key)
        if table:
            parts += [f"#### {title}", "", table]
    for key, title in (
        ("gt_pos_hit", "Ground truth: hit rate of the position map's top-|GT| slots ↑"),
        ("gt_units_hit", "Ground truth: hit rate of the token (+ position) ranking's top-|GT| tokens ↑"),
        ("gt_pos_mass", "Ground truth: share of the position map's positive relevance on the GT slots ↑"),
    ):
        table = truth_overview(tasks, key)
        if table:
            parts += [f"#### {title}", "", table]
    parts += ["### Full tables", ""]
    for t in tasks:
        name = t["task"]
        shutil.copyfile(t["dir"] / "table.md", out / f"{name}.md")
        body = (t["dir"] / "table.md").read_text().strip()
        body = re.sub(
            r"^### .*$", f"#### Task: {name} (`configs/{t['run']}.yaml`)", body, count=1, flags=re.M
        )
        body = re.sub(r"^#### (?!Task)", "##### ", body, flags=re.M)
        parts += [body, ""]
        # curves of the real-model runs; the ground-truth tasks are read from their tables (keeps git light)
        pngs = [] if t["run"] == "positional_tasks" else sorted(t["dir"].glob("curves*.png"))
        for png in pngs:
            target = f"{name}-{png.stem}.png"
            shutil.copyfile(png, out / target)
            parts.append(f"![{name} {png.stem}](results/positions/{target})\n")
    return "\n".join(parts)


def write(body: str, root: Path = ROOT) -> None:
    path = root / "docs" / "results.md"
    text = path.read_text()
    if BEGIN not in text:
        raise SystemExit(f"{path}: marker {BEGIN!r} not found")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1] if END in rest else ""
    path.write_text(f"{head}{BEGIN}\n\n{body.rstrip()}\n\n{END}{tail}")


def main() -> None:
    body = collect()
    write(body)
    print("wrote the position-faithfulness tables into docs/results.md and docs/results/positions/")


if __name__ == "__main__":
    main()
