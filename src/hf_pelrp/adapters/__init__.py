"""Per-architecture adapter declarations; importing this package registers the built-in ones."""

# importing a module registers its adapters
from . import (  # noqa: F401
    albert,
    bert,
    clip,
    cohere,
    deepseek,
    dinov2,
    electra,
    gemma,
    gpt2,
    gpt_bigcode,
    gpt_neox,
    gptj,
    granite,
    llama,
    modernbert,
    moe,
    olmo,
    olmo2,
    opt,
    phi,
    phi3,
    qwen2_vl,
    qwen3,
    smollm3,
    stablelm,
    starcoder2,
    vit,
    xlm_roberta,
)
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
