"""Measure the conservation remedies of issue 21 (docs/results.md, "Where the unexplained logit goes: remedies").

For each rule configuration in ``REMEDIES`` and each of ``--n`` next-token windows of held-out movie-review
sentences (the review windows of configs/smollm2_positions.yaml: 16 tokens, the predicted next token explained)
this records, on SmolLM2-135M-Instruct (CPU, float32):

- the unexplained share of the logit, ``conservation_gap / target_value`` (hf_pelrp.conservation_ledger, which
  also says where it goes: ``attention`` / ``mlp`` / ``rest`` / ``head`` / ``embeddings``);
- the rotary position relevance: the share ``sum|position| / (sum|token| + sum|position|)``;
- token-flip faithfulness: LeRF - MoRF area of the explained logit and probability (the evaluation suite's
  ``token_flip``, 11 fractions, ``<unk>`` replacement, the signed token map);
- position-flip faithfulness: LeRF - MoRF area of the logit with the slots' rotations made the identity, per
  slot (``position``) and per (layer, slot) cell (``position_by_layer``), the suite's ``position_flip``;
- a seeded random ranking as the faithfulness floor.

Prints a markdown table (means with 95% t-intervals over windows; paired differences to the default rules) and
writes every per-window record to ``--out`` (JSON). Usage::

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/remedies.py --n 32 --out runs/remedies.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import hf_pelrp
from hf_pelrp import LRPConfig
from hf_pelrp.evaluation.metrics import fractions, mean_confidence_interval
from hf_pelrp.evaluation.perturbation import token_flip
from hf_pelrp.evaluation.positions import position_flip
from hf_pelrp.evaluation.samples import explained_logits
from hf_pelrp.evaluation.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]

#: the configurations measured; "attnlrp" is LRPConfig() (the default rules), the others change one thing
REMEDIES: dict[str, LRPConfig] = {
    "attnlrp (default)": LRPConfig(),
    "softmax identity": LRPConfig(softmax="identity"),
    "softmax split": LRPConfig(softmax="split"),
    "softmax identity, eps 0.1": LRPConfig(softmax="identity", softmax_eps=0.1),
    "softmax identity, eps 1": LRPConfig(softmax="identity", softmax_eps=1.0),
    "residual gamma 0.25": LRPConfig(residual_gamma=0.25),
    "residual gamma 1": LRPConfig(residual_gamma=1.0),
    "softmax identity + residual gamma 0.25": LRPConfig(softmax="identity", residual_gamma=0.25),
    "cp": LRPConfig(mode="cp"),
    "cp + residual gamma 0.25": LRPConfig(mode="cp", residual_gamma=0.25),
}
BASELINE = "attnlrp (default)"
RANDOM = "random"
METRICS = (
    ("share", "unexplained share of the logit"),
    ("pos_share", "rotary share sum|pos| / sum|tok + pos|"),
    ("tok_logit", "token flip LeRF-MoRF logit"),
    ("tok_prob", "token flip LeRF-MoRF prob"),
    ("pos_logit", "position flip (slot) LeRF-MoRF logit"),
    ("poslayer_logit", "position flip (layer, slot) LeRF-MoRF logit"),
)


def measure(n: int, names: list[str]) -> dict[str, list[dict[str, float]]]:
    spec = {
        "name": "remedies",
        "model": {"kind": "smollm2"},
        "data": {"kind": "review_windows", "num_samples": n, "window": 16},
        "replacement": "unk",
    }
    task = build_task(spec, ROOT, seed=0)
    model = task.model
    fracs = fractions(11)
    records: dict[str, list[dict[str, float]]] = {name: [] for name in [*names, RANDOM]}
    for sample in task.samples:
        with torch.no_grad():
            target = int(explained_logits(model, sample, sample.inputs)[0].argmax())
        for name in names:
            cfg = REMEDIES[name]
            start = time.perf_counter()
            ledger = hf_pelrp.conservation_ledger(model, target=target, config=cfg, **sample.inputs)
            seconds = time.perf_counter() - start
            attr = ledger.attribution
            value = float(attr.target_value[0])
            token, position = attr.relevance[0].float(), attr.position[0].float()
            rec = {
                "sample": sample.id,
                "target": target,
                "logit": value,
                "gap": float(attr.conservation_gap[0]),
                "share": float(attr.conservation_gap[0]) / value,
                "pos_share": float(position.abs().sum() / (token.abs().sum() + position.abs().sum())),
                "seconds": seconds,
                **{f"lost_{k}": float(v[0]) for k, v in ledger.by_kind().items()},
            }
            flip = token_flip(model, sample, target, token, task.replacement_id, fracs)
            rec["tok_logit"] = flip["lerf_minus_morf_logit_auc"]
            rec["tok_prob"] = flip["lerf_minus_morf_prob_auc"]
            if bool(position.abs().sum() > 0):
                rec.update(_position_flips(model, sample, target, position, attr.position_by_layer[0], fracs))
            records[name].append(rec)
        rec = _random(model, sample, target, task.replacement_id, fracs)
        records[RANDOM].append(rec)
        print(f"window {sample.id}: done", flush=True)
    return records


def _position_flips(model, sample, target, position, by_layer, fracs) -> dict[str, float]:
    slot = position_flip(model, sample, target, position, "identity", fracs)
    cell = position_flip(model, sample, target, by_layer.float(), "identity", fracs, prefix="poslayer")
    return {
        "pos_logit": slot["pos_lerf_logit_auc"] - slot["pos_morf_logit_auc"],
        "poslayer_logit": cell["poslayer_lerf_logit_auc"] - cell["poslayer_morf_logit_auc"],
    }


def _random(model, sample, target, replacement_id, fracs) -> dict[str, float]:
    generator = torch.Generator().manual_seed(1000 + sample.id)
    length = sample.length
    layers = model.config.num_hidden_layers
    flip = token_flip(model, sample, target, torch.rand(length, generator=generator), replacement_id, fracs)
    rec = {
        "sample": sample.id,
        "tok_logit": flip["lerf_minus_morf_logit_auc"],
        "tok_prob": flip["lerf_minus_morf_prob_auc"],
    }
    by_layer = torch.rand(layers, length, generator=generator)
    rec.update(_position_flips(model, sample, target, by_layer.sum(0), by_layer, fracs))
    return rec


def _interval(values: list[float]) -> str:
    if not values:
        return "—"
    mean, half = mean_confidence_interval(values)
    return f"{mean:+.3f} ± {half:.3f}" if math.isfinite(half) else f"{mean:+.3f}"


def table(records: dict[str, list[dict[str, float]]]) -> str:
    """Means ± 95% t-half-widths over windows; a second table of paired differences to the default rules."""
    heads = [label for _, label in METRICS]
    lines = [f"| rules | {' | '.join(heads)} |", "|---|" + "---:|" * len(heads)]
    for name, recs in records.items():
        cells = [_interval([r[k] for r in recs if k in r]) for k, _ in METRICS]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    base = {r["sample"]: r for r in records.get(BASELINE, [])}
    lines += ["", f"Paired differences to {BASELINE!r} (same windows):", ""]
    lines += [f"| rules | {' | '.join(heads)} |", "|---|" + "---:|" * len(heads)]
    for name, recs in records.items():
        if name == BASELINE or not base:
            continue
        cells = []
        for key, _ in METRICS:
            diffs = [r[key] - base[r["sample"]][key] for r in recs if key in r and key in base[r["sample"]]]
            cells.append(_interval(diffs))
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="number of review windows (default 32)")
    parser.add_argument("--only", nargs="+", choices=list(REMEDIES), help="measure only these configurations")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "remedies.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.only or list(REMEDIES)
    if BASELINE not in names:
        names = [BASELINE, *names]
    records = measure(args.n, names)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1))
    print(f"\nSmolLM2-135M-Instruct, n = {args.n} review windows (16 tokens), float32, CPU\n")
    print(table(records))


if __name__ == "__main__":
    main()
