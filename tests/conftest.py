"""Shared fixtures; the tiny-model builders live in ``helpers.builders`` (re-exported here for old imports)."""

from __future__ import annotations

import pytest
import torch

from helpers.builders import tiny_llama_family, tiny_word_tokenizer  # noqa: F401  (re-exported)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests on one intra-op thread (use: ``pytestmark = pytest.mark.usefixtures("single_thread")``).

    Tiny models gain nothing from a second thread, and on a loaded 2-core machine the OpenMP threads wait on
    each other: a 2-layer forward pass took 0.2 s with 2 threads and 0.02 s with 1.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_llama():
    return tiny_llama_family("llama")


@pytest.fixture
def input_ids():
    torch.manual_seed(1)
    return torch.randint(1, 101, (2, 9))
