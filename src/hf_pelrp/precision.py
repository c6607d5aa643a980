"""Half precision: find the module where a float16 / bfloat16 attribution stopped being finite.

When the relevance of an attribution is not finite, the engine runs the same pass once more with a
:class:`NonFiniteWatch` attached: forward hooks on every module note the first module whose output is NaN or
inf although its inputs were finite (a forward overflow), and gradient hooks on the module outputs note where
the backward pass first produced a non-finite gradient. The error then names the module instead of leaving the
user with a map of NaNs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    # ModelOutput and other containers of tensors
    if hasattr(value, "to_tuple"):
        return _tensors(value.to_tuple())
    return []


def _finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


@dataclass
class NonFiniteWatch:
    """Where values stopped being finite during one forward and backward pass.

    Attributes
    ----------
    forward_module : str or None
        The first module (in the order modules finish) whose output is not finite while its inputs are.
    backward_module : str or None
        The first module (in backward order) whose output received a non-finite gradient: the overflow
        happened in the backward pass of the modules that consume that output.
    dtype : torch.dtype or None
        The floating dtype of the module named, for the message.
    """

    forward_module: str | None = None
    backward_module: str | None = None
    dtype: torch.dtype | None = None

    def describe(self) -> str:
        """One sentence naming where the pass overflowed (or that it could not be located)."""
        if self.forward_module is not None:
            return (
                f"the forward pass overflowed in module {self.forward_module!r} (its inputs are finite, its "
                f"output is not, in {self.dtype})."
            )
        if self.backward_module is not None:
            return (
                "the forward pass is finite; the backward pass overflowed where the gradient reaches the output "
                f"of module {self.backward_module!r}."
            )
        return "no single module could be blamed (the forward and the module gradients of the re-run are finite)."


@contextmanager
def watch_non_finite(model: torch.nn.Module) -> Iterator[NonFiniteWatch]:
    """Record, during the block, where outputs or gradients of ``model``'s modules stop being finite.

    Enter it *inside* an ``lrp()`` context, so that its hooks run after the rules' and see the tensors the
    backward pass really flows through. The hooks synchronise with the device on every module: use it for
    diagnosis only.
    """
    watch = NonFiniteWatch()
    handles = []

    def forward_hook(name):
        def hook(_module, args, kwargs, output):
            outputs = _tensors(output)
            if watch.forward_module is None and not _finite(outputs) and _finite(_tensors((args, kwargs))):
                watch.forward_module = name
                watch.dtype = next((t.dtype for t in outputs if t.is_floating_point()), None)
            for t in outputs:
                if t.requires_grad and t.is_floating_point():
                    handles.append(t.register_hook(grad_hook(name)))

        return hook

    def grad_hook(name):
        def hook(grad):
            if watch.backward_module is None and not bool(torch.isfinite(grad).all()):
                watch.backward_module = name
            return None

        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(forward_hook(name or "<model>"), with_kwargs=True))
    try:
        yield watch
    finally:
        for handle in handles:
            handle.remove()


def half_precision_hint(dtype: torch.dtype | None) -> str:
    """What to do about an overflow in ``dtype``."""
    if dtype == torch.float16:
        return (
            " float16 has a range of +-65504 and overflows where bfloat16 does not: load the model with "
            "dtype=torch.bfloat16 (or torch.float32)."
        )
    if dtype == torch.bfloat16:
        return " Try dtype=torch.float32."
    return ""
