"""Dataset-scale attribution: batches, Parquet shards, resumption, data-parallel runs identical to one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch

import hf_pelrp
import hf_pelrp.dataset as hf_dataset
from conftest import tiny_llama_family
from hf_pelrp.dataset import ShardPlan, to_attribution

pytestmark = pytest.mark.usefixtures("single_thread")

TESTS = Path(__file__).parent


def _rows(n: int = 11, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 13, (n,), generator=g)
    return [torch.randint(1, 101, (int(k),), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="module")
def model():
    return tiny_llama_family("llama", num_layers=2)


@pytest.fixture(scope="module")
def dataset():
    rows = _rows()
    return datasets.Dataset.from_dict({"input_ids": rows, "label": [(7 * i) % 101 for i in range(len(rows))]})


def _columns(ds) -> dict:
    return {name: ds[name] for name in ds.column_names}


def test_each_row_matches_attribute_on_that_row_alone(model, dataset, tmp_path):
    result = hf_pelrp.attribute_dataset(
        model, dataset, tmp_path, batch_size=3, shard_size=4, target_column="label", progress=False
    )
    assert len(result) == len(dataset)
    assert result["row"] == list(range(len(dataset)))
    assert sorted(os.listdir(tmp_path)) == [
        "index.json",
        "run.json",
        "shard-00000-of-00003.parquet",
        "shard-00001-of-00003.parquet",
        "shard-00002-of-00003.parquet",
    ]
    for i in (0, 5, 10):
        ids = torch.tensor([dataset[i]["input_ids"]])
        alone = hf_pelrp.attribute(model, ids, target=dataset[i]["label"])
        record = result[i]
        assert record["input_ids"] == dataset[i]["input_ids"]
        assert record["target"] == dataset[i]["label"]
        assert record["position_index"] == ids.shape[1] - 1
        # rows were batched with longer and shorter rows (padding): batch invariance, up to float rounding
        torch.testing.assert_close(torch.tensor([record["relevance"]]), alone.relevance, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            torch.tensor([record["position_by_layer"]]), alone.position_by_layer, rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(to_attribution(record).relevance, torch.tensor([record["relevance"]]))
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["num_rows"] == len(dataset) and len(index["shards"]) == 3
    assert "segment" not in index["columns"]


def _word_tokenizer():
    """A word-level tokenizer without a pad token (as LLaMA tokenizers): ids 1..100."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>"] + [f"w{i}" for i in range(1, 100)]
    core = Tokenizer(models.WordLevel({w: i + 1 for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")


def test_text_column_is_tokenized_and_truncated(model, tmp_path):
    tokenizer = _word_tokenizer()
    texts = ["w5 w7 w9 w11", "w2 w3", "w40 w41 w42 w43 w44 w45 w46 w47"]
    ds = datasets.Dataset.from_dict({"sentence": texts})
    result = hf_pelrp.attribute_dataset(
        model,
        ds,
        tmp_path,
        tokenizer=tokenizer,
        text_column="sentence",
        batch_size=2,
        max_length=6,
        progress=False,
    )
    assert result[0]["input_ids"] == tokenizer(texts[0])["input_ids"]
    assert len(result[2]["input_ids"]) == 6
    alone = hf_pelrp.attribute(model, torch.tensor([result[2]["input_ids"]]))
    torch.testing.assert_close(torch.tensor([result[2]["relevance"]]), alone.relevance, rtol=1e-4, atol=1e-5)


class _Crash(RuntimeError):
    pass


def test_resume_after_interruption_skips_finished_shards(model, dataset, tmp_path, monkeypatch):
    complete = hf_pelrp.attribute_dataset(
        model, dataset, tmp_path / "complete", batch_size=2, shard_size=4, progress=False
    )
    calls = []
    real = hf_dataset.explain

    def crash_in_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # shard 0 (4 rows) took two batches; the first batch of shard 1 crashes
            raise _Crash("simulated crash")
        return real(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(hf_dataset, "explain", crash_in_second_shard)
    with pytest.raises(_Crash):
        hf_pelrp.attribute_dataset(model, dataset, out, batch_size=2, shard_size=4, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "shard-00000-of-00003.parquet"]
    with pytest.raises(hf_pelrp.AttributionInputError, match="not complete"):
        hf_pelrp.load_dataset_attributions(out)

    calls.clear()
    monkeypatch.setattr(hf_dataset, "explain", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = hf_pelrp.attribute_dataset(model, dataset, out, batch_size=2, shard_size=4, progress=False)
    assert len(calls) == 4  # shards 1 and 2 only: 2 + 2 batches
    assert _columns(resumed) == _columns(complete)


def test_resume_with_other_settings_is_refused(model, dataset, tmp_path):
    hf_pelrp.attribute_dataset(model, dataset.select(range(3)), tmp_path, batch_size=2, progress=False)
    with pytest.raises(hf_pelrp.AttributionInputError, match="mode"):
        hf_pelrp.attribute_dataset(
            model, dataset.select(range(3)), tmp_path, batch_size=2, mode="cp", progress=False
        )


def test_explicit_process_split_equals_single_process(model, dataset, tmp_path):
    single = hf_pelrp.attribute_dataset(
        model, dataset, tmp_path / "one", batch_size=3, shard_size=3, progress=False
    )
    first = hf_pelrp.attribute_dataset(
        model,
        dataset,
        tmp_path / "two",
        batch_size=3,
        shard_size=3,
        process_index=0,
        num_processes=2,
        progress=False,
    )
    assert first is None  # process 1's shards are still missing
    second = hf_pelrp.attribute_dataset(
        model,
        dataset,
        tmp_path / "two",
        batch_size=3,
        shard_size=3,
        process_index=1,
        num_processes=2,
        progress=False,
    )
    assert _columns(second) == _columns(single)


def test_shard_plan():
    plan = ShardPlan(num_rows=10, shard_size=4, process_index=1, num_processes=2)
    assert plan.num_shards == 3
    assert [list(plan.rows(k)) for k in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert plan.mine() == [1]
    with pytest.raises(hf_pelrp.AttributionInputError, match="process_index"):
        ShardPlan(num_rows=10, shard_size=4, process_index=2, num_processes=2)


def test_progress_bar(model, dataset, tmp_path, capfd):
    hf_pelrp.attribute_dataset(model, dataset.select(range(4)), tmp_path, batch_size=2, progress=True)
    assert "attribute_dataset" in capfd.readouterr().err


def test_bad_arguments(model, dataset, tmp_path):
    with pytest.raises(hf_pelrp.AttributionInputError, match="target column 'nope'"):
        hf_pelrp.attribute_dataset(model, dataset, tmp_path, target_column="nope")
    text = datasets.Dataset.from_dict({"text": ["a b"]})
    with pytest.raises(hf_pelrp.AttributionInputError, match="tokenizer"):
        hf_pelrp.attribute_dataset(model, text, tmp_path / "t")
    with pytest.raises(hf_pelrp.AttributionInputError, match="empty"):
        hf_pelrp.attribute_dataset(model, dataset.select([]), tmp_path / "e")


LAUNCHED = textwrap.dedent(
    """
    import sys
    import datasets, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_llama_family
    from test_dataset import _rows
    import hf_pelrp

    torch.set_num_threads(1)
    model = tiny_llama_family("llama", num_layers=2)
    ds = datasets.Dataset.from_dict({{"input_ids": _rows()}})
    hf_pelrp.attribute_dataset(model, ds, sys.argv[1], batch_size=3, shard_size=3, progress=False)
    from accelerate import PartialState
    state = PartialState()
    open(f"{{sys.argv[2]}}/process-{{state.process_index}}-of-{{state.num_processes}}", "w").close()
    """
)


def test_accelerate_launch_two_processes_equals_one(model, tmp_path):
    script = tmp_path / "explain.py"
    script.write_text(LAUNCHED.format(tests=str(TESTS)))
    # on a machine without GPUs `--multi_gpu` starts torchrun's CPU processes; `--cpu` would start just one
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch += ["--main_process_port", str(29500 + os.getpid() % 1000)]
    done = subprocess.run(
        [*launch, str(script), str(tmp_path / "two"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("process-*")) == ["process-0-of-2", "process-1-of-2"]
    ds = datasets.Dataset.from_dict({"input_ids": _rows()})
    single = hf_pelrp.attribute_dataset(
        model, ds, tmp_path / "one", batch_size=3, shard_size=3, progress=False
    )
    assert _columns(hf_pelrp.load_dataset_attributions(tmp_path / "two")) == _columns(single)
