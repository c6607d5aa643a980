"""The smoke configuration end to end: every method and metric on tiny random models, resume, data-parallel
equivalence, and the written tables, JSON and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_pelrp.evaluation import available_methods, load_config, read_records, run
from hf_pelrp.evaluation.families import FAMILIES
from hf_pelrp.evaluation.methods import method_applies
from hf_pelrp.evaluation.runner import run_task, task_config
from hf_pelrp.evaluation.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    summaries = run(SMOKE, output_dir=out)
    return out, summaries


def test_every_task_method_and_metric_is_reported(smoke_run):
    out, summaries = smoke_run
    config = load_config(SMOKE)
    assert set(summaries) == {t["name"] for t in config["tasks"]}
    assert set(config["methods"]) == set(available_methods())
    for spec in config["tasks"]:
        name = spec["name"]
        summary = summaries[name]
        task_dir = out / name
        table = (task_dir / "table.md").read_text()
        applicable = [m for m in config["methods"] if method_applies(m, summary["kind"])]
        rotary = "llama" in name
        for method in applicable:
            if method == "pos_occlusion_layer" and not rotary:
                continue  # additive positions have no layers: nothing to rank
            assert f"`{method}`" in table, (name, method)
        assert not [m for m in config["methods"] if m not in applicable and f"`{m}`" in table]
        families = spec.get("metrics") or (["token_flip"] if summary["kind"] == "text" else ["perturbation"])
        assert list(summary["families"]) == families
        main_plot = next(f for f in families if FAMILIES[f].panels)
        for family in families:
            stats_by_method = summary["families"][family]["methods"]
            assert stats_by_method, (name, family)
            for method, stats in stats_by_method.items():
                assert stats["n"] == summary["num_samples"], (name, family, method)
                for key, _, _ in FAMILIES[family].columns:
                    if key in stats:
                        assert stats[key]["mean"] == stats[key]["mean"]  # not NaN
            if FAMILIES[family].panels and family != main_plot:
                assert (task_dir / f"curves_{family}.png").stat().st_size > 1000
        assert (task_dir / "curves.png").stat().st_size > 1000
        assert json.loads((task_dir / "summary.json").read_text())["task"] == name
        if families[0] == "token_flip":
            assert "attnlrp_pe - attnlrp" in summary["paired"]
    vision = summaries["tiny-vit"]["methods"]["attnlrp_pe"]
    assert {"miou", "average_precision", "mass_inside", "positive_acc_auc"} <= set(vision)
    assert 0.0 <= vision["miou"]["mean"] <= 1.0
    # the position families rank by the position maps: position-only methods are there, token-only ones not
    llama = summaries["tiny-llama-next-token"]["families"]
    assert {"pos_occlusion", "pos_ig", "attnlrp_pe_ref", "random"} <= set(llama["position_flip"]["methods"])
    assert "attnlrp" not in llama["position_flip"]["methods"]
    assert "pos_occlusion_layer" in llama["position_flip_layer"]["methods"]
    assert "pos_occlusion" not in llama["paper_flip"]["methods"] and "ig" in llama["paper_flip"]["methods"]
    assert "attnlrp_pe - random" in llama["position_flip"]["paired"]
    truth = summaries["tiny-distilbert-pair-equal"]["families"]["ground_truth"]["methods"]
    assert "gt_pos_hit" in truth["pos_occlusion"] and "gt_units_hit" not in truth["pos_occlusion"]
    assert "gt_units_hit" in truth["attnlrp"] and "gt_pos_hit" not in truth["attnlrp"]
    assert all(0 <= s["gt_units_hit"]["mean"] <= 1 for s in truth.values() if "gt_units_hit" in s)


def test_resume_recomputes_only_missing_lines(smoke_run):
    out, _ = smoke_run
    task_dir = out / "tiny-llama-next-token"
    files = sorted(task_dir.glob("samples.rank*.jsonl"))
    before = read_records(task_dir)
    lines = files[0].read_text().splitlines()
    # simulate an interruption: the last two records are lost, the one before is cut mid-line
    files[0].write_text("\n".join(lines[:-3] + [lines[-3][:20]]) + "\n")
    run(SMOKE, output_dir=out)
    after = read_records(task_dir)
    assert [(r["sample"], r["method"]) for r in after] == [(r["sample"], r["method"]) for r in before]
    assert [r["scores"] for r in after] == [r["scores"] for r in before]
    # a rerun with nothing missing adds nothing
    size = sum(f.stat().st_size for f in task_dir.glob("samples.rank*.jsonl"))
    run(SMOKE, output_dir=out)
    assert sum(f.stat().st_size for f in task_dir.glob("samples.rank*.jsonl")) == size


def test_two_processes_give_the_single_process_results(smoke_run, tmp_path):
    out, _ = smoke_run
    config = load_config(SMOKE)
    methods = ["attnlrp_pe", "ig", "random", "pos_occlusion"]
    for name in ("tiny-gpt2-classifier", "tiny-llama-next-token"):
        spec = next(t for t in config["tasks"] if t["name"] == name)
        task = build_task(spec, ROOT, seed=config["seed"])
        for rank in (0, 1):
            run_task(task, {**task_config(config, spec), "methods": methods}, tmp_path, rank=rank, world=2)

        def timeless(records):
            # the wall time of an explanation is the one field that differs between runs
            return [{k: v for k, v in r.items() if k != "seconds"} for r in records if r["method"] in methods]

        split = timeless(read_records(tmp_path / task.name))
        single = timeless(read_records(out / task.name))
        assert len(split) == len(single) == len(task.samples) * len(methods)
        assert json.dumps(split) == json.dumps(single)


def test_bad_configuration_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [attnlrp_pe, no_such_method]\ntasks: [{name: x, model: {}, data: {}}]\n")
    with pytest.raises(ValueError, match="no_such_method"):
        load_config(bad)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="model kind"):
        build_task({"name": "x", "model": {"kind": "nope"}, "data": {"kind": "random_tokens"}}, ROOT)


def test_model_is_unchanged_by_the_evaluation(smoke_run):
    config = load_config(SMOKE)
    # the methods and metric families that hook, patch or switch the attention implementation of the model
    methods = [
        "attnlrp_pe",
        "cp_pe_abs",
        "attnlrp_pe_paper",
        "attnlrp_pe_ref",
        "ixg_pe",
        "ixg_pe_ref",
        "pos_ig",
        "pos_occlusion",
        "ig",
        "rollout",
    ]
    for name in ("tiny-bert-classifier", "tiny-llama-next-token"):
        spec = next(t for t in config["tasks"] if t["name"] == name)
        task = build_task(spec, ROOT, seed=config["seed"])
        sample = task.samples[0]
        with torch.no_grad():
            before = task.model(**sample.inputs).logits
        task.samples = task.samples[:1]
        merged = {**config, "methods": methods + ["pos_occlusion_layer"], "metrics": spec.get("metrics")}
        run_task(task, merged, Path(smoke_run[0]) / "again", 0, 1)
        with torch.no_grad():
            assert torch.equal(task.model(**sample.inputs).logits, before)
        assert all(not p.requires_grad or p.grad is None for p in task.model.parameters())
        assert all(p.requires_grad for p in task.model.parameters())


def test_collect_results_writes_tables_and_plots_into_docs_and_readme(smoke_run, tmp_path):
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("collect_results", ROOT / "scripts" / "collect_results.py")
    collect_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect_results)

    out, summaries = smoke_run
    shutil.copytree(out, tmp_path / "runs" / "example")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text(
        "# R\n\nanalysis stays\n\n## Tables and curves\n\nold tables\n"
    )
    readme = "# P\n\nintro\n<!-- results:tables -->\nold\n<!-- /results:tables -->\nafter\n"
    (tmp_path / "README.md").write_text(readme)

    tasks = collect_results.collect(tmp_path)
    collect_results.write_docs(tasks, tmp_path)
    assert [t["name"] for t in tasks] == sorted(summaries)
    docs = (tmp_path / "docs" / "results.md").read_text()
    readme = (tmp_path / "README.md").read_text()
    assert "analysis stays" in docs and "old tables" not in docs
    assert readme.startswith("# P\n\nintro\n<!-- results:tables -->\n") and readme.endswith(
        "<!-- /results:tables -->\nafter\n"
    )
    assert "\nold\n" not in readme
    for name in summaries:
        assert (tmp_path / "docs" / "results" / f"{name}.png").stat().st_size > 0
        assert f"### Task: {name}" in docs and f"](results/{name}.png)" in docs
        assert f"**{name}**" in readme and f"](docs/results/{name}.png)" in readme
        # the README gets the main table only; docs/results.md also the paired differences
        main = collect_results.main_table((out / name / "table.md").read_text())
        assert main in readme and main in docs and main.count("\n") >= 3
    assert "Paired differences" in docs and "Paired differences" not in readme


def _diagnostics_script():
    """scripts/position_diagnostics.py (research diagnostics, not shipped in the package), loaded by path."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "position_diagnostics.py"
    spec = importlib.util.spec_from_file_location("position_diagnostics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_positional_diagnostics_on_every_smoke_task(capsys):
    diagnostics = _diagnostics_script()
    main, positional_diagnostics = diagnostics.main, diagnostics.positional_diagnostics

    results = positional_diagnostics(SMOKE, num_samples=2)
    assert set(results) == {t["name"] for t in load_config(SMOKE)["tasks"]}
    for name, stats in results.items():
        assert 0 < stats["position_share"][0] < 1, name
        assert -1 <= stats["spearman"][0] <= 1 and 0 <= stats["top20_overlap"][0] <= 1, name
        assert -1 <= stats["token_spearman"][0] <= 1, name
        if "llama" not in name:
            # additive positions: the token map does not depend on `positional`
            assert stats["token_spearman"] == (1.0, 0.0), name
    # CP rules give rotary positions nothing: ranking and token map are the positional=False ones
    cp = positional_diagnostics(SMOKE, num_samples=2, mode="cp")["tiny-llama-classifier"]
    assert cp["position_share"][0] == 0 and cp["spearman"][0] == 1 and cp["token_spearman"][0] == 1
    main([str(SMOKE), "1"])
    assert "token_spearman" in capsys.readouterr().out


@pytest.mark.parametrize("task_name", ["tiny-llama-next-token", "tiny-bert-classifier", "tiny-vit"])
def test_ig_method_matches_the_explicit_integrated_gradients(task_name):
    from hf_pelrp.evaluation.methods import MethodSettings, explain, integrated_gradients
    from hf_pelrp.evaluation.samples import explained_logits

    spec = next(t for t in load_config(SMOKE)["tasks"] if t["name"] == task_name)
    task = build_task(spec, ROOT, seed=0)
    model, sample = task.model, task.samples[0]
    steps = 6
    with torch.no_grad():
        target = int(explained_logits(model, sample, sample.inputs)[0].argmax())
    got = explain("ig", model, sample, target, MethodSettings(ig_steps=steps))

    def logit(**inputs):
        return explained_logits(model, sample, inputs)[:, target]

    if "pixel_values" in sample.inputs:
        x = sample.inputs["pixel_values"]
        pixels = integrated_gradients(lambda p: logit(pixel_values=p), x, torch.zeros_like(x), steps).sum(0)
        torch.testing.assert_close(got.pixels, pixels, rtol=1e-4, atol=1e-6)
        patch = model.config.patch_size
        per_patch = torch.nn.functional.avg_pool2d(pixels[None, None], patch).flatten() * patch**2
        torch.testing.assert_close(got.units, per_patch, rtol=1e-4, atol=1e-6)
    else:
        emb = model.get_input_embeddings()(sample.inputs["input_ids"]).detach()
        rest = {k: v.expand(steps, *v.shape[1:]) for k, v in sample.inputs.items() if k != "input_ids"}
        ig = integrated_gradients(lambda e: logit(inputs_embeds=e, **rest), emb, torch.zeros_like(emb), steps)
        torch.testing.assert_close(got.units, ig.sum(-1), rtol=1e-4, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())


def test_device_resolution(monkeypatch):
    from hf_pelrp.evaluation.runner import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == resolve_device(" CPU ") == torch.device("cpu")
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available here"):
            resolve_device(spec)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    # with CUDA, `auto` / `cuda` give each accelerate process the GPU of its local rank
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="cuda:2 does not exist"):
        resolve_device("auto", local_rank=2)
    with pytest.raises(ValueError, match="unknown device 'cuda:x'"):
        resolve_device("cuda:x")


def test_task_to_moves_model_and_inputs_only():
    spec = next(t for t in load_config(SMOKE)["tasks"] if t["name"] == "tiny-vit")
    task = build_task(spec, ROOT, seed=0)
    assert task.to("cpu") is task
    sample = task.samples[0]
    assert sample.inputs["pixel_values"].device.type == "cpu" and sample.mask.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smoke_run_on_cuda_matches_the_cpu_run(smoke_run, tmp_path):
    out, cpu = smoke_run
    config = load_config(SMOKE)
    config["device"] = "cuda"
    path = tmp_path / "smoke_cuda.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    gpu = run(path, output_dir=tmp_path / "runs")
    assert set(gpu) == set(cpu)
    for name in cpu:
        gpu_records = {(r["sample"], r["method"]): r for r in read_records(tmp_path / "runs" / name)}
        for rec in read_records(out / name):
            other = gpu_records[(rec["sample"], rec["method"])]
            assert other["target"] == rec["target"]
            if rec["method"] == "random":  # the same ranking: only the forward passes differ
                for key, value in rec["scores"].items():
                    assert other["scores"][key] == pytest.approx(value, abs=2e-3), (name, key)


def test_verify_results_recomputes_recorded_samples(smoke_run, tmp_path, monkeypatch, capsys):
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location("verify_results", ROOT / "scripts" / "verify_results.py")
    verify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verify)
    out, _ = smoke_run
    config = load_config(SMOKE)
    config["output_dir"] = str(out)
    config["tasks"] = [t for t in config["tasks"] if t["name"] == "tiny-gpt2-classifier"]
    path = tmp_path / "verify.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr("sys.argv", ["verify_results.py", str(path), "1"])
    assert verify.main() == 0
    report = capsys.readouterr().out
    assert "tiny-gpt2-classifier" in report and "differs" not in report
    # a tampered record is caught
    records = out / "tiny-gpt2-classifier" / "samples.rank0.jsonl"
    lines = records.read_text().splitlines()
    first = json.loads(lines[0])
    first["scores"] = {k: v + 0.5 for k, v in first["scores"].items()}
    tampered = tmp_path / "tampered"
    (tampered / "tiny-gpt2-classifier").mkdir(parents=True)
    (tampered / "tiny-gpt2-classifier" / "samples.rank0.jsonl").write_text(
        "\n".join([json.dumps(first), *lines[1:]]) + "\n"
    )
    config["output_dir"] = str(tampered)
    path.write_text(yaml.safe_dump(config))
    assert verify.main() == 1
    assert "differs" in capsys.readouterr().out


def test_collect_positions_writes_the_overview_and_full_tables(smoke_run, tmp_path):
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location(
        "collect_positions", ROOT / "scripts" / "collect_positions.py"
    )
    collect_positions = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect_positions)
    out, _ = smoke_run
    for name in ("tiny-llama-next-token", "tiny-distilbert-pair-equal"):
        shutil.copytree(out / name, tmp_path / "runs" / "positional_tasks" / name)
    (tmp_path / "docs").mkdir()
    results = tmp_path / "docs" / "results.md"
    results.write_text("# R\n\nbefore\n<!-- positions:begin -->\nold\n<!-- positions:end -->\nafter\n")
    collect_positions.write(collect_positions.collect(tmp_path), tmp_path)
    text = results.read_text()
    assert text.startswith("# R\n\nbefore\n<!-- positions:begin -->") and text.endswith(
        "<!-- positions:end -->\nafter\n"
    )
    assert "\nold\n" not in text
    assert (
        "Position flipping, LeRF − MoRF area of the probability" in text and "`tiny-llama-next-token`" in text
    )
    assert "Ground truth: hit rate of the position map" in text and "`tiny-distilbert-pair-equal`" in text
    assert "#### Task: tiny-llama-next-token" in text
    assert (tmp_path / "docs" / "results" / "positions" / "tiny-llama-next-token.md").exists()


def test_rotary_anatomy_and_position_mass_on_the_smoke_models():
    diagnostics = _diagnostics_script()
    position_mass, rotary_anatomy = diagnostics.position_mass, diagnostics.rotary_anatomy

    anatomy = rotary_anatomy(SMOKE, num_samples=1)
    assert set(anatomy) == {"tiny-llama-next-token", "tiny-llama-classifier"}  # the rotary tasks only
    for stats in anatomy.values():
        assert 0 < stats["side_agreement"][0] <= 1 + 1e-6 and 0 < stats["layer_agreement"][0] <= 1 + 1e-6
        assert 0 <= stats["first_slot_share"][0] <= 1
        assert all(-1 <= stats[f"spearman_{m}"][0] <= 1 for m in ("attnlrp_pe", "attnlrp_pe_ref", "pos_ig"))
    mass = position_mass(SMOKE, num_samples=1, methods=("attnlrp_pe", "cp_pe", "pos_occlusion"))
    assert "tiny-vit" not in mass and "tiny-gpt2-classifier" in mass
    assert mass["tiny-llama-next-token"]["cp_pe"][0] == 0  # CP gives rotary positions nothing
    assert all(stats["removal_effect"][0] >= 0 for stats in mass.values())


def test_the_evaluation_does_nothing_global():
    """Importing the suite and building its models leaves torch's global state alone."""
    import importlib
    import sys

    for name in [m for m in sys.modules if m.startswith("hf_pelrp.evaluation")]:
        del sys.modules[name]
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.get_num_threads(),
        torch.random.get_rng_state(),
    )
    evaluation = importlib.import_module("hf_pelrp.evaluation")
    from hf_pelrp.evaluation.tasks import tiny_model

    tiny_model("llama", "causal_lm", seed=3)
    after = (
        torch.are_deterministic_algorithms_enabled(),
        torch.get_num_threads(),
        torch.random.get_rng_state(),
    )
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])
    assert callable(evaluation.run)
