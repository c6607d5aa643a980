"""Per-architecture adapter declarations; importing this package registers the built-in ones."""

from . import alibi, beit, bert, deberta, gpt2, llama, seq2seq, swin, vit  # noqa: F401  (importing a module registers its adapters)
from .base import (
    Adapter,
    FunctionalActivationSite,
    GatedProduct,
    adapter_for,
    adapter_for_type,
    refuse_model_type,
    refused_model_types,
    register_adapter,
    supported_model_types,
)
from .refusals import REFUSED  # noqa: F401  (registers the model types refused by name)

__all__ = [
    "Adapter",
    "FunctionalActivationSite",
    "GatedProduct",
    "adapter_for",
    "adapter_for_type",
    "refuse_model_type",
    "refused_model_types",
    "register_adapter",
    "supported_model_types",
]
