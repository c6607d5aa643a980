"""Collect each evaluated task's table and curve plot from runs/ into docs/results/, docs/results.md and the
README.

Usage: ``python scripts/collect_results.py`` after ``hf-pelrp evaluate configs/<task>.yaml``. It copies
``table.md`` and ``curves.png`` of every finished task to ``docs/results/<task>.{md,png}``, rewrites the
"Tables and curves" section of ``docs/results.md`` (everything after its heading) with the full tables, and the
README region between ``<!-- results:tables -->`` and ``<!-- /results:tables -->`` with each task's main table
and plot. Nothing else in either file is touched: the analysis stays hand-written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the task order; tasks not listed come after, by name
TASK_ORDER = ("smollm2-next-token", "minilm-sentiment", "gpt2-sentiment", "vit-fashion-mnist")
RESULTS_HEADING = "## Tables and curves"
README_BEGIN, README_END = "<!-- results:tables -->", "<!-- /results:tables -->"


def main_table(table_md: str) -> str:
    """The first Markdown table of a task's ``table.md`` (methods x metrics), without the paired differences."""
    lines = table_md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Method"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def replace_region(text: str, begin: str, end: str | None, body: str) -> str:
    """``text`` with what lies between the ``begin`` line and the ``end`` line (or the end) replaced."""
    if begin not in text:
        raise SystemExit(f"marker {begin!r} not found")
    head, rest = text.split(begin, 1)
    if end is None:
        return f"{head}{begin}\n\n{body.rstrip()}\n"
    if end not in rest:
        raise SystemExit(f"marker {end!r} not found after {begin!r}")
    return f"{head}{begin}\n{body.rstrip()}\n{end}{rest.split(end, 1)[1]}"


def collect(root: Path = ROOT) -> list[dict]:
    """Copy tables and plots into docs/results/; returns one entry per task, in the issue's order."""
    out = root / "docs" / "results"
    out.mkdir(parents=True, exist_ok=True)
    tasks = []
    for summary_path in sorted((root / "runs").glob("*/*/summary.json")):
        task_dir = summary_path.parent
        if task_dir.parent.name == "smoke":
            continue
        summary = json.loads(summary_path.read_text())
        name = summary["task"]
        shutil.copyfile(task_dir / "table.md", out / f"{name}.md")
        shutil.copyfile(task_dir / "curves.png", out / f"{name}.png")
        n = max((m["n"] for m in summary["methods"].values()), default=0)
        acc = summary.get("info", {}).get("training", {}).get("test_accuracy")
        print(
            f"{name}: {n} samples explained" + (f", model test accuracy {acc:.4f}" if acc is not None else "")
        )
        tasks.append({"name": name, "table": (task_dir / "table.md").read_text(), "n": n})
    rank = {name: i for i, name in enumerate(TASK_ORDER)}
    return sorted(tasks, key=lambda t: (rank.get(t["name"], len(rank)), t["name"]))


def write_docs(tasks: list[dict], root: Path = ROOT) -> None:
    sections = []
    for task in tasks:
        body = re.sub(r"^### .*$", f"### Task: {task['name']}", task["table"].strip(), count=1, flags=re.M)
        sections.append(f"{body}\n\n![{task['name']} perturbation curves](results/{task['name']}.png)\n")
    path = root / "docs" / "results.md"
    path.write_text(replace_region(path.read_text(), RESULTS_HEADING, None, "\n".join(sections)))

    blocks = []
    for task in tasks:
        blocks.append(
            f"**{task['name']}** (n = {task['n']}; paired differences and method notes in docs/results.md):\n\n"
            f"{main_table(task['table'])}\n\n"
            f"![{task['name']} perturbation curves](docs/results/{task['name']}.png)\n"
        )
    readme = root / "README.md"
    readme.write_text(replace_region(readme.read_text(), README_BEGIN, README_END, "\n".join(blocks)))


def main() -> None:
    tasks = collect()
    if tasks:
        write_docs(tasks)
        print(f"wrote {len(tasks)} tasks into docs/results.md and README.md")


if __name__ == "__main__":
    main()
