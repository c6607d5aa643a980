"""Copy each evaluated task's table and curve plot from runs/ into docs/results/ (for docs/results.md and the
README). Usage: ``python scripts/collect_results.py`` after ``hf-pelrp evaluate configs/<task>.yaml``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out = ROOT / "docs" / "results"
    out.mkdir(parents=True, exist_ok=True)
    for summary_path in sorted((ROOT / "runs").glob("*/*/summary.json")):
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


if __name__ == "__main__":
    main()
