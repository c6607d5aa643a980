"""hf_pelrp.bench (scripts/bench_attribution.py calls it): the small random LLaMA case runs in a worker with
either clock (no numbers are asserted: timings belong to the benchmark, not to the tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_pelrp.bench

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_attribution.py"


@pytest.fixture(scope="module")
def bench():
    return hf_pelrp.bench


def test_the_script_is_a_thin_caller_of_the_module():
    """``make bench`` runs scripts/bench_attribution.py: it only calls hf_pelrp.bench.main."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert "--lengths" in out.stdout
    assert len(SCRIPT.read_text().splitlines()) < 20


def test_the_small_llama_is_four_layers_256_wide(bench):
    model = bench._load("llama-4x256", torch.float32)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (4, 256)
    assert not model.training


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_a_time_worker_runs_both_methods(bench, clock):
    threads = torch.get_num_threads()
    spec = {
        "model": "llama-4x256",
        "task": "time",
        "device": "cpu",
        "dtype": "float32",
        "threads": threads,
        "mode": "attnlrp",
        "positional": True,
        "seed": 0,
        "repeats": 2,
        "clock": clock,
        "length": 8,
        "batch": 1,
    }
    times = bench._worker(spec)["times"]
    assert set(times) == set(bench.METHODS)
    assert all(len(v) == 2 and all(t >= 0 for t in v) for v in times.values())
