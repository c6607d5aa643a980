"""Dataset-scale attribution: explain a ``datasets.Dataset`` in batches, shard by shard, resumably, in parallel.

The dataset is cut into contiguous shards of ``shard_size`` rows. Each shard is explained in batches and
written as one Parquet file when it is complete (written to a temporary name, then renamed: a file that exists
is whole). A run that is interrupted and started again skips the shards already on disk. Under
``accelerate launch`` (or with explicit ``process_index`` / ``num_processes``) process ``p`` takes the shards
``k`` with ``k % num_processes == p``; the batches inside a shard do not depend on the number of processes, so
the results are identical to a single-process run. ``index.json`` lists the shards once all exist.

Layout of ``output_dir``::

    run.json                              the settings of the run (a resume with other settings is refused)
    shard-00000-of-00004.parquet          rows 0 .. shard_size-1, one row per dataset row
    ...
    index.json                            shards, row counts and columns, written when every shard exists
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .engine import explain
from .errors import AttributionInputError
from .request import single_request, split_options
from .result import Attribution

RUN_FILE = "run.json"
INDEX_FILE = "index.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardPlan:
    """Which rows form shard ``k`` and which process explains it."""

    num_rows: int
    shard_size: int
    process_index: int = 0
    num_processes: int = 1

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise AttributionInputError(f"shard_size must be at least 1, got {self.shard_size}")
        if not 0 <= self.process_index < self.num_processes:
            raise AttributionInputError(
                f"process_index must be in 0..{self.num_processes - 1} for num_processes={self.num_processes}, "
                f"got {self.process_index}"
            )

    @property
    def num_shards(self) -> int:
        return max(1, math.ceil(self.num_rows / self.shard_size))

    def rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_rows))

    def mine(self) -> list[int]:
        """The shards this process explains."""
        return [k for k in range(self.num_shards) if k % self.num_processes == self.process_index]

    def file_name(self, shard: int) -> str:
        return f"shard-{shard:05d}-of-{self.num_shards:05d}.parquet"


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename: readers (and a resumed run) never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json(path: Path, payload: dict) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True)))


def _model_fingerprint(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    text = config.to_json_string(use_diff=False) if config is not None else type(model).__name__
    dtype = str(next(model.parameters()).dtype)
    return hashlib.sha256(f"{type(model).__name__}|{dtype}|{text}".encode()).hexdigest()[:16]


def _run_settings(model, dataset, settings: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "model": getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
        "model_fingerprint": _model_fingerprint(model),
        "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
        "num_rows": len(dataset),
        **settings,
    }


def _check_or_write_run(output_dir: Path, run: dict) -> None:
    path = output_dir / RUN_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in set(previous) | set(run) if previous.get(k) != run.get(k))
        if changed:
            raise AttributionInputError(
                f"{output_dir} holds results of a run with other settings ({', '.join(changed)} differ): "
                "resume with the same model, dataset and settings, or choose a new output_dir."
            )
        return
    _write_json(path, run)


def _token_rows(batch: dict, dataset, tokenizer, text_column: str, max_length: int | None) -> list[list[int]]:
    """The token ids of some dataset rows: the ``input_ids`` column if present, else the tokenized text."""
    if "input_ids" in batch:
        ids = [list(map(int, r)) for r in batch["input_ids"]]
        return [r[:max_length] for r in ids] if max_length is not None else ids
    if text_column not in batch:
        raise AttributionInputError(
            f"the dataset has no column {text_column!r} (columns: {', '.join(dataset.column_names)}): pass "
            "text_column=... or a dataset with an input_ids column"
        )
    if tokenizer is None:
        raise AttributionInputError(
            f"tokenizer=... is needed to explain the text column {text_column!r} (or give the dataset an "
            "input_ids column)"
        )
    encoded = tokenizer(
        list(batch[text_column]),
        truncation=max_length is not None,
        max_length=max_length,
        padding=False,
    )
    return [list(r) for r in encoded["input_ids"]]


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            raise AttributionInputError("a dataset row has no tokens: nothing to explain (filter empty rows)")
        span = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _records(result: Attribution, rows: Sequence[int], token_rows: list[list[int]]) -> list[dict]:
    """One record per dataset row, padding removed."""
    records = []
    for row, ids, one in zip(rows, token_rows, result.rows(), strict=True):
        one = one.unpad()

        def take(m):
            return m[0].cpu().tolist() if m is not None else None

        records.append(
            {
                "row": int(row),
                "input_ids": ids,
                "token": take(one.token),
                "position": take(one.position),
                "relevance": take(one.relevance),
                "position_by_layer": take(one.position_by_layer),
                "segment": take(one.segment),
                "target": int(one.target[0]),
                "target_value": float(one.target_value[0]),
                "conservation_gap": float(one.conservation_gap[0]),
                "position_index": None if one.position_index is None else int(one.position_index[0]),
            }
        )
    return records


def _write_shard(path: Path, records: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    maps = pa.list_(pa.float32())
    types = {
        "row": pa.int64(),
        "input_ids": pa.list_(pa.int64()),
        "token": maps,
        "position": maps,
        "relevance": maps,
        "position_by_layer": pa.list_(maps),
        "segment": maps,
        "target": pa.int64(),
        "target_value": pa.float32(),
        "conservation_gap": pa.float32(),
        "position_index": pa.int64(),
    }
    records = sorted(records, key=lambda r: r["row"])
    columns = {}
    for key, kind in types.items():
        values = [r[key] for r in records]
        # maps the family does not have (segment for LLaMA, per-layer positions for additive ones) are left out
        if key in ("position_by_layer", "segment") and all(v is None for v in values):
            continue
        columns[key] = pa.array(values, type=kind)
    table = pa.table(columns)
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _distributed(process_index: int | None, num_processes: int | None, device: torch.device):
    """``(process_index, num_processes, state)``: explicit values, else accelerate's (1 process outside a launch)."""
    if process_index is not None or num_processes is not None:
        if process_index is None or num_processes is None:
            raise AttributionInputError("give both process_index and num_processes, or neither")
        return process_index, num_processes, None
    from accelerate import PartialState

    # cpu=True lets processes started by torchrun / `accelerate launch --multi_gpu` on a machine without GPUs
    # join one gloo group (accelerate's own `--cpu` launcher starts a single process)
    state = PartialState(cpu=device.type == "cpu")
    return state.process_index, state.num_processes, state


def attribute_dataset(
    model: torch.nn.Module,
    dataset,
    output_dir: str | os.PathLike,
    *,
    tokenizer=None,
    text_column: str = "text",
    target_column: str | None = None,
    batch_size: int = 8,
    shard_size: int | None = None,
    max_length: int | None = None,
    mode: str | None = None,
    positional: bool | None = None,
    gradient_checkpointing: bool | None = None,
    padding_side: str | None = None,
    process_index: int | None = None,
    num_processes: int | None = None,
    progress: bool = True,
    **attribute_kwargs: Any,
):
    """Explain every row of ``dataset`` and write the maps to ``output_dir`` as Parquet shards.

    Parameters
    ----------
    model
        A supported model (see :func:`hf_pelrp.attribute`), already on its device (or dispatched with
        ``device_map``). Under ``accelerate launch`` put each process's copy on ``PartialState().device``.
    dataset : datasets.Dataset
        Rows with a text column (and a ``tokenizer``) or an ``input_ids`` column.
    output_dir
        Where the shards, ``run.json`` and ``index.json`` go. Running again with the same settings resumes:
        finished shards are not recomputed.
    tokenizer
        Tokenizes ``text_column`` (no padding is asked of it: rows are padded here, so tokenizers without a
        pad token work).
    text_column, target_column
        The column to explain; an optional column of class / token ids to explain (default: the arg-max).
    batch_size
        Rows per forward / backward pass. Rows of a shard are batched in order of length (less padding).
    shard_size
        Rows per output file and unit of resumption / parallelism (default ``16 * batch_size``).
    max_length
        Truncate longer rows to this many tokens (default: no truncation; rows longer than the model's
        maximum are refused by :func:`hf_pelrp.attribute`).
    mode, positional, gradient_checkpointing, **attribute_kwargs
        Passed to :func:`hf_pelrp.attribute`.
    padding_side
        ``"left"`` or ``"right"`` (default: the tokenizer's, else ``"right"``); relevance does not depend on it.
    process_index, num_processes
        This process's share of the shards. Default: from accelerate, 1 process outside a launch. GPUs:
        ``accelerate launch --num_processes N script.py``; CPU processes: ``accelerate launch --multi_gpu
        --num_processes N script.py`` or ``torchrun --nproc_per_node N script.py`` (accelerate's ``--cpu``
        launcher starts one process only).
    progress
        Show a tqdm progress bar (main process only).

    Returns
    -------
    datasets.Dataset
        All explained rows in dataset order (columns ``row``, ``input_ids``, ``token``, ``position``,
        ``relevance``, ``position_by_layer`` for rotary models, ``segment`` for models with token types,
        ``target``, ``target_value``, ``conservation_gap``, ``position_index``) once every shard exists; in a
        run split over processes without accelerate, ``None`` from a process that finishes before the others.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise AttributionInputError(f"batch_size must be at least 1, got {batch_size}")
    if len(dataset) == 0:
        raise AttributionInputError("the dataset is empty: nothing to explain")
    if target_column is not None and target_column not in dataset.column_names:
        raise AttributionInputError(
            f"the dataset has no target column {target_column!r} (columns: {', '.join(dataset.column_names)})"
        )
    side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
    if side not in ("left", "right"):
        raise AttributionInputError(f"padding_side must be 'left' or 'right', got {side!r}")
    shard_size = shard_size or 16 * batch_size
    device = model.get_input_embeddings().weight.device
    if device.type == "meta":  # embedding offloaded by accelerate: its hook moves the ids
        device = torch.device("cpu")
    index, count, state = _distributed(process_index, num_processes, device)
    plan = ShardPlan(len(dataset), shard_size, index, count)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "text_column": text_column,
        "target_column": target_column,
        "batch_size": batch_size,
        "shard_size": shard_size,
        "max_length": max_length,
        "mode": mode,
        "positional": positional,
        "attribute_kwargs": sorted(attribute_kwargs),
    }
    _check_or_write_run(out, _run_settings(model, dataset, settings))

    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else 0  # padded positions are masked: any id will do

    # one request for the whole run: the rules, the adapter and the options are resolved once, each batch only
    # brings its inputs and targets
    options, model_inputs = split_options(attribute_kwargs)
    request = single_request(
        model, {}, mode=mode, positional=positional, gradient_checkpointing=gradient_checkpointing, **options
    )
    todo = [k for k in plan.mine() if not (out / plan.file_name(k)).exists()]
    total = sum(len(plan.rows(k)) for k in plan.mine())
    done = total - sum(len(plan.rows(k)) for k in todo)
    bar = tqdm(
        total=total,
        initial=done,
        unit="row",
        desc="attribute_dataset",
        disable=not progress or index != 0,
    )
    try:
        for shard in todo:
            rows = list(plan.rows(shard))
            batch = dataset[rows]
            token_rows = _token_rows(batch, dataset, tokenizer, text_column, max_length)
            targets = batch[target_column] if target_column is not None else None
            order = sorted(range(len(rows)), key=lambda i: (len(token_rows[i]), i))
            records = []
            for start in range(0, len(order), batch_size):
                pick = order[start : start + batch_size]
                batch_rows = [rows[i] for i in pick]
                batch_tokens = [token_rows[i] for i in pick]
                ids, mask = _pad(batch_tokens, pad_id, side)
                target = None
                if targets is not None:
                    target = torch.tensor([int(targets[i]) for i in pick], device=device)
                inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), **model_inputs}
                result = explain(request.with_inputs(inputs, target=target))
                records.extend(_records(result, batch_rows, batch_tokens))
                bar.update(len(pick))
            _write_shard(out / plan.file_name(shard), records)
    finally:
        bar.close()

    if state is not None:
        state.wait_for_everyone()
    if all((out / plan.file_name(k)).exists() for k in range(plan.num_shards)):
        if state is None or state.is_main_process:
            _write_index(out, plan)
        if state is not None:
            state.wait_for_everyone()
        return load_dataset_attributions(out)
    return None


def _write_index(out: Path, plan: ShardPlan) -> None:
    import pyarrow.parquet as pq

    shards = []
    for k in range(plan.num_shards):
        meta = pq.read_metadata(out / plan.file_name(k))
        shards.append({"file": plan.file_name(k), "rows": [plan.rows(k).start, plan.rows(k).stop]})
        columns = meta.schema.names
    _write_json(
        out / INDEX_FILE,
        {"format_version": FORMAT_VERSION, "num_rows": plan.num_rows, "columns": columns, "shards": shards},
    )


def load_dataset_attributions(output_dir: str | os.PathLike):
    """The results of :func:`attribute_dataset` in ``output_dir`` as a ``datasets.Dataset`` in row order.

    Raises
    ------
    AttributionInputError
        The run is not complete (no ``index.json``): run :func:`attribute_dataset` again to finish it.
    """
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(output_dir)
    index_path = out / INDEX_FILE
    if not index_path.exists():
        raise AttributionInputError(
            f"{out} has no {INDEX_FILE}: the run is not complete; call attribute_dataset again with the same "
            "arguments to finish the missing shards."
        )
    index = json.loads(index_path.read_text())
    tables = [pq.read_table(out / shard["file"], memory_map=True) for shard in index["shards"]]
    return datasets.Dataset(pa.concat_tables(tables))


def to_attribution(record: dict, model_type: str = "", mode: str = "attnlrp", positional: bool = True):
    """One row of :func:`load_dataset_attributions` as an :class:`~hf_pelrp.Attribution` (batch of 1), e.g.
    for :func:`hf_pelrp.viz.to_html`."""

    def tensor(key, dtype=torch.float32):
        value = record.get(key)
        return torch.tensor([value], dtype=dtype) if value is not None else None

    position_index = record.get("position_index")
    return Attribution(
        token=tensor("token"),
        position=tensor("position"),
        position_by_layer=tensor("position_by_layer"),
        segment=tensor("segment"),
        target=torch.tensor([record["target"]]),
        target_value=torch.tensor([record["target_value"]], dtype=torch.float32),
        position_index=torch.tensor([position_index]) if position_index is not None else None,
        input_ids=tensor("input_ids", torch.long),
        attention_mask=torch.ones(1, len(record["input_ids"]), dtype=torch.long),
        mode=mode,
        positional=positional,
        model_type=model_type,
    )
