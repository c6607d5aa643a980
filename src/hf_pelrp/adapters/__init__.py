"""Per-architecture adapters; importing this package registers the built-in ones."""

from . import bert, distilbert, gpt2, llama, vit  # noqa: F401  (importing a module registers its adapter)
from .base import Adapter, adapter_for, register_adapter, supported_model_types

__all__ = ["Adapter", "adapter_for", "register_adapter", "supported_model_types"]
