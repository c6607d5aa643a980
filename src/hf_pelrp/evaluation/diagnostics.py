"""Why does (or doesn't) positional relevance change a faithfulness score? Per-task diagnostics.

For each sample: how large the position map is against the token map, and how much adding it changes the
order the perturbation tests use. ``python -m hf_pelrp.evaluation.diagnostics configs/TASK.yaml [N]``
prints the means over the first N samples.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..engine import attribute
from .metrics import mean_confidence_interval
from .runner import load_config
from .samples import explained_logits
from .tasks import build_task


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra * rb).sum() / denom) if denom > 0 else 1.0


def positional_diagnostics(config_path: str | Path, num_samples: int = 50, mode: str = "attnlrp") -> dict:
    """Means (with 95% CI) over samples of: the position map's share of the total absolute relevance, the
    rank correlation of the ranking with and without positions, the rank correlation of the token maps alone
    with and without positions, the overlap of the rankings' top-20% sets, and the conservation gap with and
    without positions (in units of the explained logit)."""
    config = load_config(config_path)
    root = Path(config.get("root", Path.cwd()))
    results = {}
    for spec in config["tasks"]:
        task = build_task(spec, root, seed=int(config.get("seed", 0)))
        stats: dict[str, list[float]] = {
            k: []
            for k in ("position_share", "spearman", "token_spearman", "top20_overlap", "gap_pe", "gap_nope")
        }
        for sample in task.samples[:num_samples]:
            with torch.no_grad():
                target = int(explained_logits(task.model, sample, sample.inputs)[0].argmax())
            kwargs = dict(sample.inputs, target=target, mode=mode)
            if sample.position is not None:
                kwargs["position"] = sample.position
            # maps on the CPU, where the sample's `allowed` units are
            pe = attribute(task.model, positional=True, **kwargs).to("cpu")
            nope = attribute(task.model, positional=False, **kwargs).to("cpu")
            if "pixel_values" in sample.inputs:
                with_pos, without = pe.patch_map[0].flatten(), nope.patch_map[0].flatten()
                n_special = pe.position.shape[-1] - with_pos.numel()
                position = pe.position[0, n_special:]
                token = with_pos - position
                token_nope = without
            else:
                with_pos, without = pe.relevance[0], nope.relevance[0]
                position, token = pe.position[0], pe.token[0]
                token_nope = nope.token[0]
            allowed = sample.allowed
            share = position[allowed].abs().sum() / (
                position[allowed].abs().sum() + token[allowed].abs().sum()
            )
            stats["position_share"].append(float(share))
            stats["spearman"].append(_spearman(with_pos[allowed], without[allowed]))
            # 1 for additive positions (the token map does not depend on `positional`); < 1 for RoPE, where
            # PE-LRP moves part of the q / k relevance from the tokens to the positions
            stats["token_spearman"].append(_spearman(token[allowed], token_nope[allowed]))
            k = max(1, int(0.2 * int(allowed.sum()) + 0.5))
            top_a = set(with_pos[allowed].topk(k).indices.tolist())
            top_b = set(without[allowed].topk(k).indices.tolist())
            stats["top20_overlap"].append(len(top_a & top_b) / k)
            scale = pe.target_value[0].abs().clamp(min=1e-6)
            stats["gap_pe"].append(float(pe.conservation_gap[0] / scale))
            stats["gap_nope"].append(float(nope.conservation_gap[0] / scale))
        results[task.name] = {k: mean_confidence_interval(v) for k, v in stats.items()}
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m hf_pelrp.evaluation.diagnostics CONFIG [NUM_SAMPLES] [MODE]")
    n = int(argv[1]) if len(argv) > 1 else 50
    mode = argv[2] if len(argv) > 2 else "attnlrp"
    torch.set_num_threads(1)
    for task, stats in positional_diagnostics(argv[0], n, mode).items():
        print(f"{task} ({mode}, first {n} samples)")
        for key, (mean, ci) in stats.items():
            print(f"  {key:15s} {mean:+.4f} ± {ci:.4f}")


if __name__ == "__main__":
    main()
