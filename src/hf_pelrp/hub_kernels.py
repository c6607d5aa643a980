"""Hub kernels: the modules' own torch forwards for the duration of an attribution.

Since transformers 5.25, ``from_pretrained`` turns hub kernels on by default (``use_kernels=True`` unless
``USE_HUB_KERNELS=0``). The ``kernels`` library then *kernelizes* the model: for every module whose class is
declared replaceable (``@use_kernel_forward_from_hub("RMSNorm")``: norms, activations, the rotary function held
in an attention module's ``_kernel_funcs``) and for which a kernel exists on the model's device, it binds the
kernel layer's forward on the instance (``module.forward = MethodType(Kernel.forward, module)``). On a CPU no
kernel exists, nothing is bound, and the model is exactly the torch model.

A bound kernel computes the same outputs with its own (fused, often custom-op) backward, which the LRP rules
cannot see. :func:`kernel_forwards` lists every such binding; :func:`hf_pelrp.lrp` removes them for the
duration of the attribution (the class's torch forward runs again) and puts them back on exit, exactly: the
same bound methods, the same ``use_kernels`` and ``kernels_mode`` (neither is ever set, so transformers never
re-kernelizes). A forward replaced by anything else (``torch.compile`` on the instance, another patching
library) is not a kernel and stays a refusal (:meth:`hf_pelrp.adapters.base.Adapter.check_model`).
"""

from __future__ import annotations

from collections.abc import Iterable
from types import MethodType
from typing import Any, NamedTuple

import torch

#: the attribute the ``kernels`` library gives a class it may kernelize (``use_kernel_forward_from_hub``)
KERNEL_LAYER_ATTRIBUTE = "kernel_layer_name"


def _kernelizable(module: torch.nn.Module) -> bool:
    """The class is declared replaceable and the ``kernels`` library bound a kernel on this instance (it records
    the kernel's repository next to the binding). A forward bound by anything else is not ours to swap."""
    return hasattr(type(module), KERNEL_LAYER_ATTRIBUTE) and "_kernel_repo" in module.__dict__


def _foreign_method(module: torch.nn.Module, bound: Any) -> bool:
    """``bound`` is a method bound on ``module`` whose function is not the class's own forward."""
    return (
        isinstance(bound, MethodType)
        and bound.__self__ is module
        and bound.__func__ is not getattr(type(module), "forward", None)
    )


def is_kernel_forward(module: torch.nn.Module) -> bool:
    """Whether ``module.forward`` is a hub kernel's forward bound on this instance by the ``kernels`` library."""
    return _kernelizable(module) and _foreign_method(module, module.__dict__.get("forward"))


def _kernel_funcs(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The private function wrappers (``use_kernelized_func``) an instance holds outside its sub-modules."""
    held = module.__dict__.get("_kernel_funcs")
    return [f for f in held.values() if isinstance(f, torch.nn.Module)] if isinstance(held, dict) else []


class KernelBinding(NamedTuple):
    """One hub-kernel forward bound on an instance, and what runs instead during an attribution."""

    own: dict[str, Any]  #: the instance's ``__dict__``
    key: str  #: ``"forward"``, or ``"_old_forward"`` under accelerate's dispatch hook
    kernel: MethodType  #: the kernel's forward bound on the instance (put back on exit)
    torch: (
        MethodType | None
    )  #: the class's own forward bound on the instance, or ``None``: no instance forward


def kernel_forwards(
    model: torch.nn.Module, modules: Iterable[torch.nn.Module] | None = None
) -> list[KernelBinding]:
    """Every hub-kernel forward bound on an instance inside ``model`` (modules and their private function
    wrappers). Where accelerate's dispatch hook wraps a kernelized module, accelerate keeps the forward it found,
    the kernel's, as ``_old_forward`` and calls that: the binding is that attribute. ``modules``: the caller's
    list of ``model.modules()``, if it has one."""
    found: list[KernelBinding] = []
    for module in model.modules() if modules is None else modules:
        for instance in (module, *_kernel_funcs(module)):
            if not _kernelizable(instance):
                continue
            own = instance.__dict__
            if hasattr(instance, "_hf_hook"):
                if _foreign_method(instance, own.get("_old_forward")):
                    torch_forward = MethodType(type(instance).forward, instance)
                    found.append(KernelBinding(own, "_old_forward", own["_old_forward"], torch_forward))
            elif _foreign_method(instance, own.get("forward")):
                found.append(KernelBinding(own, "forward", own["forward"], None))
    return found
