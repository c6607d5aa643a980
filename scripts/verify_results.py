"""Recompute the first N recorded samples of an evaluation with the current code and compare their scores
with the stored per-sample records (a check that a change to the library did not move the published numbers).

Usage: ``python scripts/verify_results.py configs/<task>.yaml [N] [--device auto]``; prints the largest
absolute score difference per method and exits 1 if any exceeds ``--tolerance`` (default 1e-6).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hf_pelrp.evaluation.methods import method_applies
from hf_pelrp.evaluation.runner import (
    evaluate_sample,
    load_config,
    method_settings,
    read_records,
    resolve_device,
    task_config,
)
from hf_pelrp.evaluation.tasks import build_task


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path)
    p.add_argument("num_samples", type=int, nargs="?", default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--tolerance", type=float, default=1e-6)
    args = p.parse_args()

    config = load_config(args.config)
    torch.set_num_threads(int(config.get("threads") or 1))
    root = Path(config.get("root", Path.cwd()))
    out_dir = root / config.get("output_dir", Path("runs") / args.config.stem)
    failed = False
    for spec in config["tasks"]:
        task = build_task(spec, root, seed=int(config.get("seed", 0))).to(resolve_device(args.device))
        records = {(r["sample"], r["method"]): r for r in read_records(out_dir / task.name)}
        if not records:
            raise SystemExit(f"{out_dir / task.name}: no records; run hf-pelrp evaluate {args.config} first")
        merged = task_config(config, spec)
        settings = method_settings(merged)
        worst: dict[str, float] = {}
        for sample in task.samples[: args.num_samples]:
            for method in config["methods"]:
                old = records.get((sample.id, method))
                if old is None or not method_applies(method, task.kind):
                    continue
                new = evaluate_sample(task, sample, method, settings, merged)
                # the scores the current configuration computes (a record may hold more: families since dropped)
                common = old["scores"].keys() & new["scores"].keys()
                diff = max((abs(old["scores"][k] - new["scores"][k]) for k in common), default=0.0)
                worst[method] = max(worst.get(method, 0.0), diff)
        print(f"{task.name}: largest |score difference| over the first {args.num_samples} samples")
        for method, diff in worst.items():
            flag = "" if diff <= args.tolerance else "  <-- differs"
            failed |= diff > args.tolerance
            print(f"  {method:15s} {diff:.2e}{flag}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
