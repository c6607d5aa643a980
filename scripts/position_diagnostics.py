"""Why does (or doesn't) positional relevance change a faithfulness score? Per-task diagnostics.

For each sample: how large the position map is against the token map, and how much adding it changes the
order the perturbation tests use. ``python scripts/position_diagnostics.py configs/TASK.yaml [N]``
prints the means over the first N samples; ``--rotary CONFIG [N]`` prints :func:`rotary_anatomy`,
``--mass CONFIG [N]`` :func:`position_mass` instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from hf_pelrp.engine import lrp
from hf_pelrp.errors import UnsupportedModelError
from hf_pelrp.evaluation._engine_gaps import positional_site
from hf_pelrp.evaluation.methods import MethodSettings, explain, lrp_attribution
from hf_pelrp.evaluation.metrics import mean_confidence_interval
from hf_pelrp.evaluation.runner import load_config
from hf_pelrp.evaluation.samples import explained_logits
from hf_pelrp.evaluation.tasks import build_task


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
            # maps on the CPU, where the sample's `allowed` units are
            pe = lrp_attribution(task.model, sample.inputs, target, mode, True, sample.position).to("cpu")
            nope = lrp_attribution(task.model, sample.inputs, target, mode, False, sample.position).to("cpu")
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


ANATOMY_METHODS = ("attnlrp_pe", "attnlrp_pe_abs", "attnlrp_pe_ref", "ixg_pe", "ixg_pe_ref", "pos_ig")


def _side_relevance(model, sample, target) -> tuple[torch.Tensor, torch.Tensor]:
    """PE-LRP (AttnLRP) relevance of the q and k content of every layer and slot, ``[L, T]`` each, read at the
    outputs of ``q_proj`` / ``k_proj`` (``h * h.grad``, the public way to read hidden relevance)."""
    site = positional_site(model)
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    with lrp(model, mode="attnlrp", positional=True), torch.enable_grad():
        handles = []
        for layer, pair in enumerate(site.projections):
            for side, proj in enumerate(pair):

                def keep(_m, _a, out, key=(layer, side)):
                    out.retain_grad()
                    outputs[key] = out

                handles.append(proj.register_forward_hook(keep))
        try:
            explained_logits(model, sample, sample.inputs)[0, target].backward()
        finally:
            for h in handles:
                h.remove()
        rel = {k: (v * v.grad).sum(-1)[0].detach().float().cpu() for k, v in outputs.items()}
    q = torch.stack([rel[(layer, 0)] for layer in range(site.num_layers)])
    k = torch.stack([rel[(layer, 1)] for layer in range(site.num_layers)])
    return q, k


def rotary_anatomy(config_path: str | Path, num_samples: int = 30, removal: str = "identity") -> dict:
    """What the rotary position map is made of, per task (means with 95% CI over samples).

    Under the paper's uniform rule the per-layer position relevance of a slot equals the relevance of its q and
    k content (tests/test_position_rules.py), so: ``side_agreement`` = sum |q + k| / sum (|q| + |k|) (1: the
    query and key sides of a slot never cancel), ``layer_agreement`` = sum_i |sum_l P| / sum |P| (1: layers
    never cancel), ``first_slot_share`` = the share of sum |P| on the first slot, whose rotation is the
    identity (removing its position changes nothing); and for each method of :data:`ANATOMY_METHODS` the rank
    correlation of its position map with single-slot occlusion (``spearman_<method>``).
    """
    config = load_config(config_path)
    root = Path(config.get("root", Path.cwd()))
    settings = MethodSettings(ig_steps=int(config.get("ig_steps", 16)), extra={"position_removal": removal})
    results = {}
    for spec in config["tasks"]:
        task = build_task(spec, root, seed=int(config.get("seed", 0)))
        try:
            if not positional_site(task.model).projections:
                continue
        except UnsupportedModelError:
            continue
        stats: dict[str, list[float]] = {}
        for sample in task.samples[:num_samples]:
            with torch.no_grad():
                target = int(explained_logits(task.model, sample, sample.inputs)[0].argmax())
            q, k = _side_relevance(task.model, sample, target)
            p = q + k
            total = p.abs().sum()
            rows = {
                "side_agreement": float(total / (q.abs() + k.abs()).sum()),
                "layer_agreement": float(p.sum(0).abs().sum() / total),
                "first_slot_share": float(p[:, 0].abs().sum() / total),
            }
            occlusion = explain("pos_occlusion", task.model, sample, target, settings).position
            allowed = sample.allowed
            for name in ANATOMY_METHODS:
                position = explain(name, task.model, sample, target, settings).position
                rows[f"spearman_{name}"] = _spearman(position[allowed], occlusion[allowed])
            for key, value in rows.items():
                stats.setdefault(key, []).append(value)
        results[task.name] = {key: mean_confidence_interval(v) for key, v in stats.items()}
    return results


MASS_METHODS = ("attnlrp_pe", "attnlrp_pe_ref", "cp_pe", "ixg_pe_ref", "pos_ig", "pos_occlusion")


def position_mass(
    config_path: str | Path, num_samples: int = 40, methods: tuple[str, ...] = MASS_METHODS
) -> dict:
    """How much position relevance each method reports, in units of the explained logit: the mean over
    samples of ``sum over allowed slots |position| / |logit|`` (with 95% CI), per task, and ``removal_effect``,
    ``|logit - logit with every allowed slot's position removed| / |logit|``.

    A faithful position map should be small where removing every position changes nothing (a causal model
    on ``order_ab`` reads the order from the causal mask, not from the positional encoding) and large where
    the prediction depends on positions."""
    from hf_pelrp.evaluation.families import removal_of
    from hf_pelrp.evaluation.positions import _scores_with_removed
    from hf_pelrp.evaluation.tasks import TEXT

    config = load_config(config_path)
    root = Path(config.get("root", Path.cwd()))
    results = {}
    for spec in config["tasks"]:
        task = build_task(spec, root, seed=int(config.get("seed", 0)))
        if task.kind != TEXT:
            continue
        how = removal_of(
            task, {"position_removal": spec.get("position_removal") or config.get("position_removal")}
        )
        settings = MethodSettings(ig_steps=int(config.get("ig_steps", 16)), extra={"position_removal": how})
        stats: dict[str, list[float]] = {}
        for sample in task.samples[:num_samples]:
            with torch.no_grad():
                logits = explained_logits(task.model, sample, sample.inputs)[0]
            target = int(logits.argmax())
            scale = abs(float(logits[target]))
            everything = sample.allowed.bool()[None]
            _, removed = _scores_with_removed(task.model, sample, target, everything, how, chunk=1)
            stats.setdefault("removal_effect", []).append(
                abs(float(logits[target]) - float(removed[0])) / scale
            )
            for name in methods:
                position = explain(name, task.model, sample, target, settings).position
                stats.setdefault(name, []).append(float(position[sample.allowed].abs().sum()) / scale)
        results[task.name] = {key: mean_confidence_interval(v) for key, v in stats.items()}
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit(
            "usage: python scripts/position_diagnostics.py CONFIG [NUM_SAMPLES] [MODE]  "
            "(or --rotary CONFIG [N], --mass CONFIG [N])"
        )
    if argv[0] == "--mass":
        torch.set_num_threads(1)
        n = int(argv[2]) if len(argv) > 2 else 40
        for task, stats in position_mass(argv[1], n).items():
            print(f"{task} (position relevance per unit of logit, first {n} samples)")
            for key, (mean, ci) in stats.items():
                print(f"  {key:16s} {mean:.4f} ± {ci:.4f}")
        return
    if argv[0] == "--rotary":
        torch.set_num_threads(1)
        n = int(argv[2]) if len(argv) > 2 else 30
        for task, stats in rotary_anatomy(argv[1], n).items():
            print(f"{task} (rotary anatomy, first {n} samples)")
            for key, (mean, ci) in stats.items():
                print(f"  {key:28s} {mean:+.4f} ± {ci:.4f}")
        return
    n = int(argv[1]) if len(argv) > 1 else 50
    mode = argv[2] if len(argv) > 2 else "attnlrp"
    torch.set_num_threads(1)
    for task, stats in positional_diagnostics(argv[0], n, mode).items():
        print(f"{task} ({mode}, first {n} samples)")
        for key, (mean, ci) in stats.items():
            print(f"  {key:15s} {mean:+.4f} ± {ci:.4f}")


if __name__ == "__main__":
    main()
