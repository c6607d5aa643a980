"""The norm-surrogate check runs once per module and state, and stays an error whenever it would fail.

The surrogate below ignores the weight: it reproduces an RMSNorm exactly while the weight is all ones and
nowhere else, so it shows that every change the check depends on (weights edited in place, replaced, cast)
checks again, and that a failed check is never remembered.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hf_pelrp import UnsupportedModelError, hooks
from hf_pelrp.hooks import Handles, Norm
from hf_pelrp.rules import rms_norm_identity

F64 = torch.float64


def weightless(module, x):
    return rms_norm_identity(x, module.variance_epsilon).to(x.dtype)


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = hooks.check_reproduces

    def spy(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(hooks, "check_reproduces", spy)
    return calls


def _run(norm, dtype=F64):
    handles = Handles()
    try:
        Norm(weightless, name="norm").attach(norm, handles)
        x = torch.randn(2, 3, 8, dtype=dtype, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        norm(x).sum().backward()
        return x.grad
    finally:
        handles.remove()


def test_checked_once_per_module_then_again_after_each_change(counted):
    norm = LlamaRMSNorm(8).to(F64)  # weight all ones: the weightless surrogate reproduces it
    first = _run(norm)
    _run(norm)
    _run(norm)
    assert len(counted) == 1
    assert torch.equal(_run(norm), first)  # the rule itself still runs every time
    other = LlamaRMSNorm(8).to(F64)  # another instance of the same class is checked on its own
    _run(other)
    assert len(counted) == 2

    with torch.no_grad():
        norm.weight.mul_(2.0)  # in place: the version counter moves
    with pytest.raises(UnsupportedModelError, match="does not reproduce"):
        _run(norm)
    with pytest.raises(UnsupportedModelError, match="does not reproduce"):
        _run(norm)  # a failure is not remembered as a success
    assert len(counted) == 4

    with torch.no_grad():
        norm.weight.fill_(1.0)
    _run(norm)
    _run(norm)
    assert len(counted) == 5

    norm.weight = torch.nn.Parameter(torch.full((8,), 3.0, dtype=F64))  # replaced
    with pytest.raises(UnsupportedModelError):
        _run(norm)
    norm.weight = torch.nn.Parameter(torch.ones(8, dtype=F64))
    _run(norm)
    norm.float()  # a cast
    _run(norm, torch.float32)
    assert len(counted) == 8


def test_a_non_finite_output_proves_nothing(counted):
    norm = LlamaRMSNorm(8).to(F64)
    with torch.no_grad():
        norm.weight[0] = float("inf")
    _run(norm)
    _run(norm)
    assert len(counted) == 2  # nothing was compared, so nothing is remembered
