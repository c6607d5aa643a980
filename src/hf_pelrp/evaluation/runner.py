"""Run a configuration: every task, every method, every sample; data-parallel, resumable.

Each process (``accelerate launch`` starts several; a plain ``python`` run is one) explains the samples whose
index is congruent to its rank and appends one JSON line per (sample, method) to its own file, flushed at once.
A rerun reads every process's file first and skips what is done, so an interrupted run resumes where it
stopped, whatever the number of processes. Each sample is explained alone (batch of 1) and the random baseline
is seeded by the sample id, so the results do not depend on how the samples were split between processes.
The main process then merges the files and writes the report.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from .families import FAMILIES, curve_fractions, task_families
from .methods import MethodSettings, available_methods, explain, method_applies
from .report import write_report
from .samples import explained_logits
from .tasks import Task, build_task

RESULTS_GLOB = "samples.rank*.jsonl"


def load_config(config_path: str | Path) -> dict[str, Any]:
    """Read and check a YAML configuration."""
    path = Path(config_path)
    if not path.exists():
        raise FileNotFoundError(f"configuration {path} does not exist")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or not config.get("tasks"):
        raise ValueError(f"{path}: a configuration needs a `tasks` list")
    methods = config.get("methods", "all")
    names = available_methods() if methods == "all" else list(methods)
    unknown = [m for m in names if m not in available_methods()]
    if unknown:
        raise ValueError(f"{path}: unknown methods {unknown}; registered: {available_methods()}")
    config["methods"] = names
    return config


def read_records(task_dir: Path) -> list[dict[str, Any]]:
    """Every per-sample record of a task, from all process files, one per (sample, method), sorted."""
    records: dict[tuple[int, str], dict] = {}
    for path in sorted(task_dir.glob(RESULTS_GLOB)):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interruption: recomputed on resume
            records[(rec["sample"], rec["method"])] = rec
    return [records[k] for k in sorted(records)]


#: task-entry keys that override the configuration's top-level value for that task
TASK_KEYS = ("metrics", "pairs", "position_removal", "steps", "ig_steps")


def task_config(config: dict, spec: dict) -> dict:
    """The configuration one task runs with: top level, then the task entry's own keys and ``overrides``."""
    return {**config, **{k: spec[k] for k in TASK_KEYS if k in spec}, **spec.get("overrides", {})}


def method_settings(config: dict) -> MethodSettings:
    """The methods' knobs from a (task-merged) configuration."""
    return MethodSettings(
        ig_steps=int(config.get("ig_steps", 32)),
        seed=int(config.get("seed", 0)),
        extra={"position_removal": config.get("position_removal")},
    )


def evaluate_sample(
    task: Task, sample, method: str, settings: MethodSettings, config: dict
) -> dict[str, Any]:
    """All metrics of one method on one sample: every metric family of the task whose map the method has.

    ``seconds`` is the wall time of the explanation alone (the method's cost per sample).
    """
    model = task.model
    with torch.no_grad():
        logits = explained_logits(model, sample, sample.inputs)
    target = int(logits[0].argmax())
    start = time.perf_counter()
    exp = explain(method, model, sample, target, settings)
    seconds = time.perf_counter() - start
    rec: dict[str, Any] = {"sample": sample.id, "method": method, "target": target, "label": sample.label}
    result: dict[str, Any] = {}
    for family in task_families(task.kind, config):
        out = FAMILIES[family].run(task, sample, target, exp, config)
        if out is not None:
            result.update(out)
    rec["scores"] = {k: v for k, v in result.items() if not k.endswith("_curve")}
    rec["curves"] = {k: v for k, v in result.items() if k.endswith("_curve")}
    rec["fractions"] = curve_fractions(task.kind, config)
    rec["seconds"] = seconds
    return rec


def run_task(task: Task, config: dict, out_dir: Path, rank: int = 0, world: int = 1) -> Path:
    """Explain this process's share of ``task.samples`` with every configured method; returns the task folder."""
    task_dir = out_dir / task.name
    task_dir.mkdir(parents=True, exist_ok=True)
    done = {(r["sample"], r["method"]) for r in read_records(task_dir)}
    settings = method_settings(config)
    methods = [m for m in config["methods"] if method_applies(m, task.kind)]
    mine = [s for s in task.samples if s.id % world == rank]
    todo = [(s, m) for s in mine for m in methods if (s.id, m) not in done]
    path = task_dir / f"samples.rank{rank}.jsonl"
    with (
        path.open("a") as f,
        tqdm(
            total=len(todo),
            desc=f"{task.name} [{rank}/{world}]",
            position=rank,
            disable=config.get("quiet", False),
        ) as bar,
    ):
        for sample, method in todo:
            rec = evaluate_sample(task, sample, method, settings, config)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            bar.update(1)
    return task_dir


def _state():
    """(rank, world, barrier): from the launcher's environment (``accelerate launch``, ``torchrun``), else a
    single process. The barrier is a gloo process group, so CPU-only processes can wait for each other."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size(), dist.barrier
    return 0, 1, lambda: None


def resolve_device(spec: str | None = "auto", local_rank: int | None = None) -> torch.device:
    """The device one evaluation process runs its models on.

    ``"auto"`` (the default): ``cuda:<local rank>`` when CUDA is available (``accelerate launch`` gives each
    process its own GPU), else the CPU. ``"cpu"``, ``"cuda"`` (= ``cuda:<local rank>``) or ``"cuda:N"`` pick
    one explicitly; asking for CUDA on a machine without it is an error, not a silent CPU run.
    """
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    spec = "auto" if spec is None else str(spec).strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"the configuration asks for device {spec!r}, but CUDA is not available here: use "
                "device: cpu (or auto)"
            )
        suffix = spec.split(":", 1)[1] if ":" in spec else str(local_rank)
        if not suffix.isdigit():
            raise ValueError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")
        index = int(suffix)
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device cuda:{index} does not exist ({torch.cuda.device_count()} CUDA devices); start at most "
                "that many processes, or name the devices explicitly"
            )
        return torch.device("cuda", index)
    raise ValueError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")


def run(
    config_path: str | Path, output_dir: str | Path | None = None, report_only: bool = False
) -> dict[str, Any]:
    """Run every task of a configuration and write per-sample JSON lines, Markdown tables, JSON and plots.

    Parameters
    ----------
    config_path
        A YAML configuration (see ``configs/``).
    output_dir
        Where results go (default: the configuration's ``output_dir``, else ``runs/<config name>``).
    report_only
        Compute nothing; rewrite the tables, JSON and plots from the per-sample records written so far
        (e.g. of an interrupted run; each method's ``n`` column says how many samples it covers).

    Returns
    -------
    dict
        The summary of each task (on the main process; an empty dict on the others).
    """
    config_path = Path(config_path)
    config = load_config(config_path)
    root = Path(config.get("root", Path.cwd()))
    out_dir = Path(output_dir or config.get("output_dir") or Path("runs") / config_path.stem)
    if not out_dir.is_absolute():
        out_dir = root / out_dir
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    rank, world, barrier = _state()
    device = resolve_device(config.get("device", "auto"))
    summaries = {}
    for spec in config["tasks"]:
        task = build_task(spec, root, seed=int(config.get("seed", 0))).to(device)
        if not report_only and len(task.samples) < int(spec.get("min_samples", 1)):
            raise ValueError(
                f"task {task.name}: only {len(task.samples)} samples, the configuration asks for at least "
                f"{spec['min_samples']}"
            )
        task_dir = out_dir / task.name
        task_dir.mkdir(parents=True, exist_ok=True)
        if not report_only:
            run_task(task, task_config(config, spec), out_dir, rank, world)
        barrier()
        if rank == 0:
            merged = task_config(config, spec)
            methods = [m for m in config["methods"] if method_applies(m, task.kind)]
            summaries[task.name] = write_report(task, read_records(task_dir), task_dir, methods, merged)
        barrier()
    return summaries
