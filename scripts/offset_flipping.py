"""Offset flipping (issue 21): is ``position_by_offset`` right? PE-LRP's offset map against Integrated Gradients over
the offset gates, single-offset occlusion and random orders, on SmolLM2, the trained ALiBi BLOOM and the rotary
ground-truth models (hf_pelrp.evaluation.offsets explains the frame).

Models (each skipped with a note when its checkpoint is missing):

- ``smollm2``: SmolLM2-135M-Instruct, next token after 16-token windows of held-out movie-review sentences (the
  windows of configs/smollm2_positions.yaml);
- ``bloom-alibi``: the 2-layer BLOOM of scripts/train_alibi.py, next token after 12-token prefixes of test
  sentences;
- ``gt-llama-<task>``: the rotary ground-truth classifiers of scripts/train_positional.py (``order_ab``,
  ``token_at_k``, ``pair_equal``), their held-out sequences.

Writes ``runs/offsets/<model>.json`` (per sample), ``docs/offset_flipping.json`` (summaries), the recency plot
``docs/offset_recency.png`` and prints the Markdown table of docs/results.md.

Usage: ``nice -n 15 python scripts/offset_flipping.py [--samples 32] [--ig-steps 16] [--models ...]`` (SmolLM2:
about 25 s of CPU per window; the others well under a second per sequence). ``make offsets`` runs what
docs/results.md reports (SmolLM2 with one random order per window).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hf_pelrp.evaluation import offsets as ev

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / ".cache" / "models"
GT_TEST_SEED = 1_000_001  # the held-out sequences of scripts/train_positional.py
ALL = ("smollm2", "bloom-alibi", "gt-llama-order_ab", "gt-llama-token_at_k", "gt-llama-pair_equal")


def _argmax_next(model, ids: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(input_ids=ids).logits[0, -1].argmax())


def smollm2(n: int):
    from hf_pelrp.assets import load_smollm2
    from hf_pelrp.evaluation.data import sentiment_splits

    model, tokenizer = load_smollm2()
    model.eval()
    samples = []
    for s in sentiment_splits(min_abs_score=0.0, seed=0)["test"]:
        ids = tokenizer(s.text, add_special_tokens=False)["input_ids"]
        if len(ids) <= 16:
            continue
        x = torch.tensor([ids[:16]])
        samples.append(ev.OffsetSample(x, 15, _argmax_next(model, x)))
        if len(samples) == n:
            break
    return model, samples


def bloom_alibi(n: int):
    from transformers import BloomForCausalLM, GPT2TokenizerFast

    from hf_pelrp.assets import gpt2_tokenizer_files
    from hf_pelrp.evaluation.data import sentiment_splits

    folder = MODELS / "bloom-alibi-lm"
    if not (folder / "config.json").exists():
        return None, "no checkpoint: run `python scripts/train_alibi.py`"
    model = BloomForCausalLM.from_pretrained(folder).eval()
    to_gpt2 = json.loads((folder / "vocabulary.json").read_text())["gpt2_ids"]
    from_gpt2 = {g: c for c, g in enumerate(to_gpt2)}
    files = gpt2_tokenizer_files()
    tokenizer = GPT2TokenizerFast(str(files.vocab), str(files.merges))
    samples = []
    for s in sentiment_splits()["test"]:
        ids = [from_gpt2[i] for i in tokenizer(s.text)["input_ids"] if i in from_gpt2]
        if len(ids) <= 12:
            continue
        x = torch.tensor([ids[:12]])
        samples.append(ev.OffsetSample(x, 11, _argmax_next(model, x)))
        if len(samples) == n:
            break
    return model, samples


def ground_truth(task: str, n: int):
    from transformers import AutoModelForSequenceClassification

    from hf_pelrp.evaluation.ground_truth import PositionalTask

    folder = MODELS / "positional" / f"llama-{task}"
    if not (folder / "config.json").exists():
        return None, f"no checkpoint: run `python scripts/train_positional.py --kinds llama --tasks {task}`"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids, _, _ = PositionalTask(task).generate(n, seed=GT_TEST_SEED)
    samples = []
    for row in ids:
        x = row[None]
        with torch.no_grad():
            target = int(model(input_ids=x).logits[0].argmax())
        samples.append(ev.OffsetSample(x, None, target))
    return model, samples


def load(name: str, n: int):
    if name == "smollm2":
        return smollm2(n)
    if name == "bloom-alibi":
        return bloom_alibi(n)
    return ground_truth(name.removeprefix("gt-llama-"), n)


def fmt(cell) -> str:
    mean, half = cell
    return f"{mean:+.3f} ± {half:.3f}"


def table(summaries: dict) -> str:
    lines = [
        "| model (samples, length) | method | MoRF logit AUC (lower better) | LeRF logit AUC (higher better) "
        "| LeRF − MoRF | offset map − method (paired) |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in summaries.items():
        s = entry["summary"]
        if s is None:
            continue
        for method in [m for m in ev.METHODS if m in s]:
            diff = "" if method == "offset_map" else fmt(s["offset_map"][f"minus_{method}"])
            lines.append(
                f"| {name} ({entry['samples']}, {entry['length']}) | {method} | {fmt(s[method]['morf_auc'])} "
                f"| {fmt(s[method]['lerf_auc'])} | {fmt(s[method]['lerf_minus_morf'])} | {diff} |"
            )
    return "\n".join(lines)


def plot(profiles: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(profiles), figsize=(3.2 * len(profiles), 3.0), dpi=120, squeeze=False)
    for ax, (name, profile) in zip(axes[0], profiles.items(), strict=True):
        offsets = list(range(1, len(profile)))
        ax.bar(offsets, profile[1:], color="tab:blue")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("offset i - j (tokens back)", fontsize=8)
    axes[0][0].set_ylabel("position_by_offset, mean (logit units)", fontsize=8)
    fig.suptitle("Relevance per query-key offset (PE-LRP, AttnLRP), summed over layers and heads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(ALL), choices=ALL)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--ig-steps", type=int, default=16)
    p.add_argument("--random-orders", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "offsets")
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    p.add_argument("--report", action="store_true", help="only redraw the plot and print the table")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(ev.METHODS),
        choices=ev.METHODS,
        help="evaluate only these methods",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="add the methods to the samples of runs/offsets/<model>.json (same samples)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue runs/offsets/<model>.json with the next samples"
    )
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.docs.mkdir(parents=True, exist_ok=True)
    summary_path = args.docs / "offset_flipping.json"
    summaries = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name in [] if args.report else args.models:
        model, samples = load(name, args.samples)
        if model is None:
            print(f"{name}: skipped ({samples})")
            continue
        start = time.time()
        path = args.out / f"{name}.json"
        previous = json.loads(path.read_text()) if (args.merge or args.resume) and path.exists() else []
        results: list[dict] = list(previous) if args.resume else []
        before = summaries.get(name, {})
        for i, sample in enumerate(samples):  # saved after every sample: an interrupted run keeps what it did
            if args.merge and i >= len(previous):
                break
            if args.resume and i < len(previous):
                continue
            found = ev.evaluate_sample(model, sample, args.ig_steps, i, args.random_orders, args.methods)
            results.append({**previous[i], **found} if args.merge else found)
            print(f"{name}: {i + 1}/{len(samples)}", flush=True)
            everything = results + (previous[len(results) :] if args.merge else [])
            path.write_text(json.dumps(everything))
            profile = torch.tensor([r["offset_map"]["ranking"] for r in everything]).mean(0)
            keep = args.merge or args.resume  # the settings of the run this one extends
            summaries[name] = {
                "samples": len(everything),
                "length": everything[0]["length"],
                "ig_steps": before.get("ig_steps") if keep else args.ig_steps,
                "random_orders": before.get("random_orders") if keep else args.random_orders,
                "seconds": round(time.time() - start) + (before.get("seconds", 0) if keep else 0),
                "summary": ev.summarise(everything) if len(everything) > 1 else None,
                "mean_offset_map": profile.tolist(),
            }
            summary_path.write_text(json.dumps(summaries, indent=1))
    plot({k: v["mean_offset_map"] for k, v in summaries.items()}, args.docs / "offset_recency.png")
    print(table(summaries))


if __name__ == "__main__":
    main()
