"""Models dispatched by accelerate (``device_map``, CPU / disk offload): where a module runs, its offloaded
weights, and which accelerate hooks the LRP rules can see through.

accelerate's big-model dispatch wraps each module's ``forward`` with a hook that moves the inputs to the module's
execution device and, for offloaded modules, loads the weights before the call and puts them back on the
``meta`` device after it. Torch forward hooks (the rules) run outside that wrapper: they see the module with its
weights already gone. The helpers here let a rule load them again for the few lines that need them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import UnsupportedModelError

#: accelerate hook classes that only move inputs / weights between devices and leave the computation unchanged
#: (``ModelHook`` itself is the no-op base class)
TRANSPARENT_HOOKS = frozenset({"AlignDevicesHook", "CpuOffload", "ModelHook"})


def _hooks_of(hook) -> list:
    """The hooks of a (possibly nested) ``SequentialHook``, flattened."""
    inner = getattr(hook, "hooks", None)
    if type(hook).__name__ == "SequentialHook" and inner is not None:
        return [h for sub in inner for h in _hooks_of(sub)]
    return [hook]


def check_dispatch_hooks(model: torch.nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` if an accelerate hook of ``model`` changes what the rules see.

    Device-placement hooks (``AlignDevicesHook`` from ``device_map`` / ``dispatch_model`` / ``cpu_offload``,
    ``CpuOffload`` from ``cpu_offload_with_hook``) are transparent. A hook that runs the forward under
    ``no_grad`` would cut the backward pass (every map would be 0), and any other hook class may change the
    module's computation behind the rules' back; both are refused by name.
    """
    for name, module in model.named_modules():
        hook = module.__dict__.get("_hf_hook")
        if hook is None:
            continue
        where = f"module {name or type(model).__name__!r} ({type(module).__name__})"
        if "_old_forward" not in module.__dict__:
            raise UnsupportedModelError(
                f"{where} has an accelerate hook but no `_old_forward`: its forward was replaced in a way hf_pelrp "
                "cannot see through. Remove the hook (accelerate.hooks.remove_hook_from_module) or reload the model."
            )
        for sub in _hooks_of(hook):
            kind = type(sub).__name__
            if getattr(sub, "no_grad", False):
                raise UnsupportedModelError(
                    f"{where} has an accelerate {kind} that runs the forward pass under torch.no_grad(): no "
                    "relevance could flow through it (every map would be 0). Attach the hook with no_grad=False."
                )
            if kind not in TRANSPARENT_HOOKS:
                raise UnsupportedModelError(
                    f"{where} has an accelerate {kind}, which may change the module's computation where the LRP "
                    f"rules cannot see it; hf_pelrp sees through {', '.join(sorted(TRANSPARENT_HOOKS))} only "
                    "(device_map dispatch, CPU / disk offload). Remove it with "
                    "accelerate.hooks.remove_hook_from_module before attributing."
                )


def execution_device(module: torch.nn.Module) -> torch.device | None:
    """The device ``module`` computes on: its accelerate hook's execution device, else that of its parameters.

    ``None`` when neither says (a module without parameters and without a hook): then the inputs decide.
    """
    hook = module.__dict__.get("_hf_hook")
    for sub in _hooks_of(hook) if hook is not None else []:
        device = getattr(sub, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return None


@contextmanager
def weights_on_device(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block, the module's offloaded weights (``meta`` outside its forward) are real tensors on its
    execution device; afterwards they are offloaded again. A no-op for modules that are not offloaded.

    The tensors created inside the block stay referenced by the autograd graph of whatever uses them, exactly
    as the ones of the module's own forward do.
    """
    # offloaded weights come with accelerate's hook; without one there is nothing to load (a module with meta
    # weights and no hook fails in its own forward, before any rule runs)
    if "_hf_hook" not in module.__dict__ or not any(p.is_meta for p in module.parameters(recurse=False)):
        yield
        return
    from accelerate.utils import align_module_device, has_offloaded_params

    if not has_offloaded_params(module):
        raise UnsupportedModelError(
            f"{type(module).__name__} has weights on the meta device but no accelerate offload hook to load them: "
            "load the model completely (or with device_map / offload_folder) before attributing."
        )
    with align_module_device(module):
        yield
