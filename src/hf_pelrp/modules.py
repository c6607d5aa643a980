"""Finding the modules an adapter declaration names by path (``"embeddings.position_embeddings"``)."""

from __future__ import annotations

import torch

from .errors import UnsupportedModelError


def find_optional(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """The sub-module of ``root`` at the dotted ``path`` (``""`` is ``root``), or ``None`` if there is none."""
    module = root
    for part in path.split(".") if path else []:
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, torch.nn.Module) else None


def find_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The sub-module of ``root`` at the dotted ``path``; :class:`UnsupportedModelError` if it is missing."""
    module = find_optional(root, path)
    if module is None:
        raise UnsupportedModelError(
            f"{type(root).__name__} has no module {path!r}, which the adapter declaration names: this model "
            "does not have the layout the adapter was written for."
        )
    return module
