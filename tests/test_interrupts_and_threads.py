"""A model comes out of attribution exactly as it went in — also when interrupted at any line, or when two
threads race for it.

The interrupt test injects ``KeyboardInterrupt`` (through ``sys.settrace``) at the k-th executed line of the
modules that change the model (the engine, the hooks, the attention implementation, checkpointing, the hub-kernel
swap), for every k until a run completes, and checks after each run that the model is exactly as before and not marked busy.
"""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

import hf_pelrp
from helpers.builders import tiny_llama_family
from helpers.kernels import kernelize_on_cpu
from hf_pelrp import AttributionStateError
from hf_pelrp.attention import attention_rule
from hf_pelrp.check import _differences, _snapshot
from hf_pelrp.engine import is_busy
from hf_pelrp.hub_kernels import kernel_forwards

pytestmark = pytest.mark.usefixtures("single_thread")

SRC = os.path.dirname(hf_pelrp.__file__)
#: the modules whose lines change the model during set-up and tear-down
CHANGING = {
    os.path.join(SRC, name)
    for name in ("context.py", "engine.py", "hooks.py", "attention.py", "checkpointing.py", "hub_kernels.py")
}


class _Interrupt:
    """A tracer raising KeyboardInterrupt at the k-th line executed in one of ``files`` outside a backward pass.

    Lines run by the autograd engine (gradient-checkpointing recomputation inside ``backward()``) are not
    interrupt points: the issue is the set-up and the tear-down, and an exception thrown into torch's engine
    from a recomputation is torch's business.
    """

    def __init__(self, k: int, files: set[str]):
        self.k, self.files, self.seen, self.fired = k, files, 0, False

    def __call__(self, frame, event, arg):
        if frame.f_code.co_filename not in self.files:
            return None
        return self.local(frame, event, arg)

    def local(self, frame, event, arg):
        if event == "line" and not self.fired and torch._C._current_graph_task_id() == -1:
            self.seen += 1
            if self.seen == self.k:
                self.fired = True
                self.where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
                raise KeyboardInterrupt(f"line {self.k}")
        return self.local


def _restored(model, before) -> list[str]:
    problems = _differences(before, _snapshot(model))
    if is_busy(model):
        problems.append("still marked busy")
    if any(attention_rule(m) is not None for m in model.modules()):
        problems.append("attention rules left")
    return problems


@pytest.mark.slow
def test_interrupt_at_every_line_leaves_the_model_as_it_was():
    # with gradient checkpointing: the set-up then also replaces the blocks' forward methods
    checkpointing = True
    # with hub kernels bound (norms, activation, rotary): the set-up also swaps them for the torch forwards
    pytest.importorskip("kernels")
    model = kernelize_on_cpu(tiny_llama_family("llama", num_layers=1))
    assert kernel_forwards(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    reference = hf_pelrp.attribute(model, ids, gradient_checkpointing=checkpointing)
    before = _snapshot(model)
    k, interrupted = 0, 0
    while True:
        k += 1
        tracer = _Interrupt(k, CHANGING)
        sys.settrace(tracer)
        try:
            result = hf_pelrp.attribute(model, ids, gradient_checkpointing=checkpointing)
        except KeyboardInterrupt:
            interrupted += 1
            result = None
        finally:
            sys.settrace(None)
        problems = _restored(model, before)
        assert not problems, f"interrupted at line {k}: {problems}"
        if result is not None:
            assert not tracer.fired
            torch.testing.assert_close(result.relevance, reference.relevance, rtol=0, atol=0)
            break
    # every executed line of the changing modules was an interrupt point once
    assert interrupted == k - 1 and interrupted > 300, interrupted
    print(f"interrupted at each of {interrupted} executed lines")


def test_interrupt_inside_the_with_block_restores_the_model():
    model = tiny_llama_family("llama", num_layers=1)
    before = _snapshot(model)
    with pytest.raises(KeyboardInterrupt), hf_pelrp.lrp(model):
        model(torch.tensor([[5, 6, 7]]))
        raise KeyboardInterrupt
    assert not _restored(model, before)


def test_two_threads_never_share_a_model():
    """Fast-switching threads attribute one model: each call gives the right maps or is refused, never both
    running at once; the model is restored after every trial."""
    model = tiny_llama_family("llama", num_layers=1)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    reference = hf_pelrp.attribute(model, ids).relevance
    before = _snapshot(model)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    trials, refused, wrong = 75, 0, 0
    try:
        for _ in range(trials):
            barrier = threading.Barrier(2)
            outcomes: list[object] = []

            def run(barrier=barrier, outcomes=outcomes):
                barrier.wait()
                try:
                    outcomes.append(hf_pelrp.attribute(model, ids).relevance)
                except AttributionStateError as err:
                    outcomes.append(err)

            threads = [threading.Thread(target=run) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for outcome in outcomes:
                if isinstance(outcome, AttributionStateError):
                    refused += 1
                elif not torch.equal(outcome, reference):
                    wrong += 1
            assert not _restored(model, before)
    finally:
        sys.setswitchinterval(old_interval)
    assert wrong == 0
    assert refused <= trials  # at most one of each pair can be refused
